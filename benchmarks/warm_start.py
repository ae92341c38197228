#!/usr/bin/env python3
"""Warm `vm run` against cold, in the same run; and resume latency after `vm pause`.

    cold       banger vm run --rm --cold -- true: create (a boot of the default image),
               wait for the agent, exec `true`, delete
    warm       banger vm run --rm -- true: the same, restored from the warm-start
               template instead of booted (the template is made first, by `image warm`,
               and is not timed)
    resume     vm.pause then vm.resume of one running VM through one client process
               (benchmarks/pause_resume.py's measure), against vm.show

Cold and warm rounds interleave so drift hits both alike; the CLI's wall time and its
per-stage split (create / exec / delete) are reported. Fresh config/state/runtime dirs
with [vmm] accel = 'tcg'; the cache is shared with the test suite. Targets (issue 13):
warm >= 10x faster than cold and <= 1 s; resume <= 50 ms. Nothing is asserted.

    .venv/bin/python benchmarks/warm_start.py [--runs 3] [--rounds 20]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from banger_core.paths import Paths
from pause_resume import VM, measure, report
from report import TEST_CACHE, banger_env, print_table
from vm_run import RAN_RE

BANGER = Path(sys.executable).parent / "banger"
SPEC = ["--vcpu", "1", "--memory", "1G"]


def banger(env: dict[str, str], *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(BANGER), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"banger {' '.join(args)} exited {r.returncode}: {r.stderr.strip()[-800:]}")
    return r


def run(env: dict[str, str], *extra: str) -> tuple[float, dict[str, float], str]:
    t0 = time.monotonic()
    r = banger(env, "vm", "run", "--rm", *SPEC, *extra, "--", "true")
    wall = time.monotonic() - t0
    m = RAN_RE.search(r.stderr.strip().splitlines()[-1])
    stages = {k: float(v.rstrip("s")) for k, v in (p.split() for p in m.group(2).split(", "))} if m else {}
    how = next((ln.rsplit("| ", 1)[-1] for ln in r.stderr.splitlines() if ln.startswith("spec:")), "?")
    return wall, stages, how


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="cold and warm runs each")
    ap.add_argument("--rounds", type=int, default=20, help="pause/resume rounds")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bgw-", dir="/tmp"))
    env = banger_env(root, cache=TEST_CACHE)
    (root / "cfg").mkdir()
    (root / "cfg" / "config.toml").write_text("[vmm]\naccel = 'tcg'\n")
    try:
        banger(env, "image", "pull", "debian-bookworm")
        t0 = time.monotonic()
        banger(env, "image", "warm", *SPEC)
        print(f"template made in {time.monotonic() - t0:.1f}s (a boot, then the snapshot)", file=sys.stderr)
        results: dict[str, list[tuple[float, dict[str, float]]]] = {"cold": [], "warm": []}
        for i in range(args.runs):
            for kind, extra in (("cold", ("--cold",)), ("warm", ())):
                wall, stages, how = run(env, *extra)
                if not how.startswith(kind):
                    raise RuntimeError(f"a {kind} run said it started {how!r}")
                results[kind].append((wall, stages))
                print(f"round {i + 1}: {kind} {wall:.2f}s {stages} ({how})", file=sys.stderr)
        banger(env, "vm", "run", "-d", "--name", VM, *SPEC)
        times = measure(Paths.from_env(env), args.rounds)
    finally:
        subprocess.run([str(BANGER), "vm", "delete", VM, "--force"], env=env, capture_output=True, timeout=300)
        subprocess.run([str(BANGER), "daemon", "stop"], env=env, capture_output=True, timeout=120)
        subprocess.run(["pkill", "-9", "-f", str(root)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)

    med = {k: statistics.median(w for w, _ in v) for k, v in results.items()}
    rows = []
    for kind in ("cold", "warm"):
        walls = [w for w, _ in results[kind]]
        rows.append(
            [
                f"vm run --rm -- true ({kind})",
                f"{med[kind]:.2f}",
                f"{min(walls):.2f}",
                f"{max(walls):.2f}",
                f"{med['cold'] / med[kind]:.1f}",
            ]
        )
        for stage in ("create", "exec", "delete"):
            vals = [s[stage] for _, s in results[kind] if stage in s]
            if vals:
                rows.append([f"  stage {stage}", f"{statistics.median(vals):.2f}", f"{min(vals):.2f}", f"{max(vals):.2f}", ""])
    print(f"warm vs cold vm run ({args.runs} runs each, TCG, 1 vCPU, 1 GiB, seconds; ratio = cold / this)")
    print_table(["what", "median", "min", "max", "x faster than cold"], rows)
    speedup = med["cold"] / med["warm"]
    print(
        f"targets: warm >= 10x cold: {speedup:.1f}x ({'met' if speedup >= 10 else 'NOT met'}); "
        f"warm <= 1 s: {med['warm']:.2f}s ({'met' if med['warm'] <= 1 else 'NOT met'})"
    )
    print()
    report(times, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
