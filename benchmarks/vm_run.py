#!/usr/bin/env python3
"""`banger vm run --rm -- true` end to end, against a bare QEMU booting the same guest
to the same readiness.

    baseline   qemu-system-x86_64 with the command line banger's QEMU driver makes for
               the same Machine (kernel, initrd, boot args, a qcow2 overlay of the same
               image, the same agent disk and virtio-serial channel), timed from launch
               until the agent's first health answer (the host side of the agent
               plugin, connected directly), then killed
    banger     banger vm run --rm --cold -- true: create (auto-pull: the image is cached),
               wait for the agent, exec `true`, delete; the CLI's wall time and its
               per-stage split (create / exec / delete, from its last stderr line)

Rounds interleave the two so drift hits both alike. Fresh config/state/runtime dirs
with [vmm] accel = 'tcg'; the cache is shared with the test suite
(/var/cache/banger-test/banger-cache), where the default image is already built.

    .venv/bin/python benchmarks/vm_run.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
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
RAN_RE = re.compile(r"ran in ([\d.]+)s \((.*)\)")


class Bench:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = banger_env(root, cache=TEST_CACHE)
        (root / "cfg").mkdir(parents=True)
        (root / "cfg" / "config.toml").write_text("[vmm]\naccel = 'tcg'\n")

    def banger(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([str(BANGER), *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"banger {' '.join(args)} exited {r.returncode}: {r.stderr.strip()[-800:]}")
        return r

    def machine(self) -> dict:
        """The Machine banger boots for a 1-vCPU, 1 GiB VM of the default image."""
        self.banger("vm", "run", "-d", "--name", "probe", "--vcpu", "1", "--memory", "1G")
        try:
            return json.loads(self.banger("vm", "show", "probe", "--json").stdout)["machine"]
        finally:
            self.banger("vm", "delete", "probe", "--force")

    def baseline(self, machine: dict, image_rootfs: str, i: int) -> float:
        from banger_agent.service import AgentService
        from banger_core.models import Machine
        from banger_core.vmm.qemu import QemuDriver

        d = self.root / f"bare{i}"
        d.mkdir()
        disk = d / "root.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", image_rootfs, str(disk), "4G"], check=True)
        m = Machine.model_validate(machine)
        m.drives[0].path = str(disk)
        assert m.agent is not None
        m.agent.host_path = str(d / "agent.sock")
        m.console_log = str(d / "console.log")
        m.boot_args = [a if not a.startswith("banger.vm=") else f"banger.vm=bare{i}" for a in m.boot_args]
        argv = QemuDriver().argv(f"bare{i}", m, d, "tcg")
        svc = AgentService()
        t0 = time.monotonic()
        subprocess.run(argv, check=True, capture_output=True)  # -daemonize: returns once QEMU runs
        pid = int((d / "vmm.pid").read_text())
        try:
            svc.wait_ready(f"bare{i}", Path(m.agent.host_path), time.monotonic() + 600)
            return time.monotonic() - t0
        finally:
            svc.drop(f"bare{i}")
            os.kill(pid, 9)
            time.sleep(0.5)
            shutil.rmtree(d, ignore_errors=True)

    def run(self) -> tuple[float, dict[str, float]]:
        t0 = time.monotonic()
        r = self.banger("vm", "run", "--rm", "--cold", "--vcpu", "1", "--memory", "1G", "--", "true")
        wall = time.monotonic() - t0
        m = RAN_RE.search(r.stderr.strip().splitlines()[-1])
        stages = {k: float(v.rstrip("s")) for k, v in (p.split() for p in m.group(2).split(", "))} if m else {}
        return wall, stages


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bgb-", dir="/tmp"))
    b = Bench(root)
    try:
        b.banger("image", "pull", "debian-bookworm")
        image = json.loads(b.banger("image", "show", "debian-bookworm", "--json").stdout)["rootfs"]
        machine = b.machine()
        bare, walls, stage_rows = [], [], []
        for i in range(args.runs):
            bare.append(b.baseline(machine, image, i))
            wall, stages = b.run()
            walls.append(wall)
            stage_rows.append(stages)
            print(f"round {i + 1}: bare {bare[-1]:.2f}s, vm run {wall:.2f}s {stages}", file=sys.stderr)
        med_bare, med_run = statistics.median(bare), statistics.median(walls)
        rows = [
            ["bare QEMU to agent-ready", f"{med_bare:.2f}", f"{min(bare):.2f}", f"{max(bare):.2f}", "1.00"],
            ["vm run --rm -- true", f"{med_run:.2f}", f"{min(walls):.2f}", f"{max(walls):.2f}", f"{med_run / med_bare:.2f}"],
        ]
        for stage in ("create", "exec", "delete"):
            vals = [s[stage] for s in stage_rows if stage in s]
            if vals:
                rows.append([f"  stage {stage}", f"{statistics.median(vals):.2f}", f"{min(vals):.2f}", f"{max(vals):.2f}", ""])
        print(f"vm run vs a bare QEMU boot to the agent's first answer ({args.runs} runs, TCG, 1 vCPU, 1 GiB, seconds)")
        print_table(["what", "median", "min", "max", "x bare"], rows, left=(0,))
        return 0
    finally:
        subprocess.run([str(BANGER), "daemon", "stop"], env=b.env, capture_output=True)
        subprocess.run(["pkill", "-9", "-f", str(root)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
