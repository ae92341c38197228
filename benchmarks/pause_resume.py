#!/usr/bin/env python3
"""`vm pause` / `vm resume` latency, against a no-op request to the same daemon.

    baseline   vm.show of the VM: one RPC round trip through the daemon, no VMM work
    pause      vm.pause: the RPC, the VM's lock, QMP `stop`, the state written
    resume     vm.resume: the same with QMP `cont` (issue 13's target: <= 50 ms)

Each is timed in one client process (no CLI start-up: that is benchmarks/cli_startup.py's
business), alternating pause and resume, --rounds times; medians and p90s, and the ratio
to the baseline. One VM of the default image, 1 vCPU, 1 GiB, TCG; fresh config/state/
runtime dirs, the cache shared with the test suite. Nothing is asserted.

    .venv/bin/python benchmarks/pause_resume.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from banger_core.client import Client
from banger_core.paths import Paths
from report import TEST_CACHE, banger_env, print_table

BANGER = Path(sys.executable).parent / "banger"
VM = "pausebench"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bg-pause-") as tmp:
        root = Path(tmp)
        env = banger_env(root, cache=TEST_CACHE)
        (root / "cfg").mkdir()
        (root / "cfg" / "config.toml").write_text("[vmm]\naccel = 'tcg'\n")
        run = [str(BANGER), "vm", "run", "-d", "--name", VM, "--vcpu", "1", "--memory", "1G"]
        try:
            subprocess.run(run, env=env, check=True, capture_output=True, timeout=1800)
            times = measure(Paths.from_env(env), args.rounds)
        finally:
            subprocess.run([str(BANGER), "vm", "delete", VM, "--force"], env=env, capture_output=True, timeout=300)
            subprocess.run([str(BANGER), "daemon", "stop"], env=env, capture_output=True, timeout=120)
    report(times, args.rounds)
    return 0


def report(times: dict[str, list[float]], rounds: int) -> None:
    """The table of ``measure``'s times, and the target."""
    base = statistics.median(times["vm.show (baseline)"])
    print(f"vm pause / resume, {rounds} rounds, one client process (ms; TCG, 1 vCPU, 1 GiB)")
    rows = []
    for what, ts in times.items():
        ts = sorted(ts)
        med = statistics.median(ts)
        rows.append([what, f"{med * 1000:.1f}", f"{ts[int(len(ts) * 0.9)] * 1000:.1f}", f"{med / base:.2f}"])
    print_table(["what", "median", "p90", "x baseline"], rows)
    resume = statistics.median(times["vm.resume"]) * 1000
    print(f"target: resume <= 50 ms: {resume:.1f} ms ({'met' if resume <= 50 else 'NOT met'})")


def measure(paths: Paths, rounds: int) -> dict[str, list[float]]:
    c = Client(paths)
    out: dict[str, list[float]] = {"vm.show (baseline)": [], "vm.pause": [], "vm.resume": []}
    for _ in range(rounds):
        for method in ("vm.show", "vm.pause", "vm.resume"):
            params = {"ref": VM} if method == "vm.show" else {"refs": [VM]}
            t = time.monotonic()
            r = c.call(method, params)
            out["vm.show (baseline)" if method == "vm.show" else method].append(time.monotonic() - t)
            if method != "vm.show" and not all(x["ok"] for x in r["results"]):
                raise RuntimeError(f"{method}: {r}")
    return out


if __name__ == "__main__":
    sys.exit(main())
