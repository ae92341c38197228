#!/usr/bin/env python3
"""What the work disk costs a VM's create and start, against the same VMs without it.

Two isolated banger daemons side by side, the default image on the microVM kernel
(both from the test suite's cache), TCG: one with every plugin, one with
``[plugins] disable = ["workdisk", "filesync", "workspace"]`` (the two that need it go
too). Rounds interleave the two so drift on the machine hits both alike. Each round:
``vm create`` (cold), ``vm stop``, ``vm start``, ``vm delete --force``; wall times of
create and start, and the workdisk plugin's own hook times (BANGER_TRACE_PLUGINS). Before
the rounds, the work-seed of the image is made once (timed: the first create pays it).

    .venv/bin/python benchmarks/workdisk.py [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import TEST_CACHE, banger_env, print_table

BANGER = Path(sys.executable).parent / "banger"
HOOK_RE = re.compile(r"hook workdisk\.(\w+) took ([\d.]+) ms")
SPEC = ["--vcpu", "1", "--memory", "512M"]


class Side:
    def __init__(self, root: Path, disabled: list[str]) -> None:
        self.root = root
        self.env = banger_env(root, cache=TEST_CACHE)
        self.env["BANGER_TRACE_PLUGINS"] = "1"
        (root / "cfg").mkdir(parents=True)
        extra = f"[plugins]\ndisable = {json.dumps(disabled)}\n" if disabled else ""
        (root / "cfg" / "config.toml").write_text(
            f"{extra}[vmm]\naccel = 'tcg'\nstop_timeout_s = 30\n[vm_defaults]\nkernel = 'microvm-6.1'\n"
        )
        self.log = root / "state" / "bangerd.log"

    def run(self, *a: str, timeout: float = 900) -> float:
        t = time.monotonic()
        r = subprocess.run([str(BANGER), *a], env=self.env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"banger {' '.join(a)} exited {r.returncode}: {r.stderr.strip()[-800:]}")
        return time.monotonic() - t

    def hooks_since(self, offset: int) -> dict[str, float]:
        out: dict[str, float] = {}
        text = self.log.read_text()[offset:] if self.log.exists() else ""
        for m in HOOK_RE.finditer(text):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
        return out

    def offset(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def round(self, name: str) -> dict[str, float]:
        at = self.offset()
        create = self.run("vm", "create", "--name", name, *SPEC)
        self.run("vm", "stop", name)
        start = self.run("vm", "start", name)
        self.run("vm", "delete", name, "--force")
        hooks = self.hooks_since(at)
        return {"create": create, "start": start, **{f"hook_{k}": v / 1000 for k, v in hooks.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bgwd-", dir="/tmp"))
    with_wd = Side(base / "with", [])
    without = Side(base / "without", ["workdisk", "filesync", "workspace"])
    results: dict[str, list[dict[str, float]]] = {"without": [], "with": []}
    try:
        for side in (without, with_wd):  # pull (from the shared cache) and a first VM: not measured
            side.run("image", "pull", "debian-bookworm", timeout=3600)
            side.run("kernel", "pull", "microvm-6.1", timeout=3600)
        at = with_wd.offset()
        first = with_wd.run("vm", "create", "--name", "seed", *SPEC)
        seed_hooks = with_wd.hooks_since(at)
        with_wd.run("vm", "delete", "seed", "--force")
        without.run("vm", "create", "--name", "warmup", *SPEC)
        without.run("vm", "delete", "warmup", "--force")
        for i in range(args.runs):
            results["without"].append(without.round(f"r{i}"))
            results["with"].append(with_wd.round(f"r{i}"))
    finally:
        for side in (with_wd, without):
            r = subprocess.run([str(BANGER), "vm", "list", "--json"], env=side.env, capture_output=True, text=True, timeout=60)
            names = [v["name"] for v in json.loads(r.stdout or "[]")] if r.returncode == 0 else []
            if names:
                subprocess.run([str(BANGER), "vm", "delete", "--force", *names], env=side.env, capture_output=True, timeout=300)
            subprocess.run([str(BANGER), "daemon", "stop"], env=side.env, capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)

    def med(side: str, key: str) -> float:
        vals = [r.get(key, 0.0) for r in results[side]]
        return statistics.median(vals) if vals else 0.0

    summary = {
        "first_create_with_seed_build_s": first,
        "seed_build_prepare_host_s": seed_hooks.get("prepare_host", 0.0) / 1000,
        "runs": results,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"first create of the image (the work-seed made): {first:.2f}s, workdisk prepare_host {summary['seed_build_prepare_host_s']:.3f}s"
    )
    rows = []
    for key, what in (("create", "vm create (wall)"), ("start", "vm start after stop (wall)")):
        a, b = med("without", key), med("with", key)
        rows.append([what, f"{a:.2f}s", f"{b:.2f}s", f"{b / a:.2f}x" if a else "-"])
    for hook in ("prepare_host", "configure_machine", "post_boot", "cleanup"):
        rows.append([f"workdisk {hook} (hook)", "-", f"{med('with', 'hook_' + hook) * 1000:.0f} ms", ""])
    print(f"medians of {args.runs} rounds, default image on microvm-6.1, TCG")
    print_table(["", "without work disk", "with", "ratio"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
