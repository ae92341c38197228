#!/usr/bin/env python3
"""What bridge networking adds to `banger vm create`'s control plane, over `--network none`.

Everything runs inside a network namespace this benchmark makes (the network safety
rule): the daemon (BANGER_NETNS names it, BANGER_TRACE_PLUGINS=1 logs every hook call
with its duration), its bridge, TAPs and rules; the namespace goes at the end.

Guest: the cached test kernel + busybox root disk (tests/guest_assets.py), registered
as an image. Creates alternate ``--network none`` and ``--network bridge`` (the TAP
pool warm: the daemon refills it between creates), each deleted after. Per create the
hook durations the daemon logged are summed per stage for the network-side plugins
(network, nat, dns), and the CLI's wall time is taken; the table shows medians and
the difference bridge - none (the target: at most 50 ms).

    .venv/bin/python benchmarks/network_overhead.py [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import guest_assets as ga

from report import banger_env, print_table

BANGER = Path(sys.executable).parent / "banger"
PLUGINS = ("network", "nat", "dns")
STAGES = ("prepare_host", "configure_machine", "post_boot", "cleanup")
HOOK_RE = re.compile(r"hook (\w+)\.(\w+) took ([\d.]+) ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cache = ga.default_cache_dir()
    kernel = ga.test_kernel(cache)
    rootfs = cache / "rootfs-busybox.ext4"
    if not rootfs.exists():
        ga.busybox_rootfs(rootfs, modules_dir=Path(kernel["modules"]), cache=cache)
    ns = f"bgbench-{secrets.token_hex(3)}"
    root = Path(tempfile.mkdtemp(prefix="bgno-", dir="/tmp"))
    env = banger_env(root, netns=ns)
    env["BANGER_TRACE_PLUGINS"] = "1"
    (root / "cfg").mkdir(parents=True)
    (root / "cfg" / "config.toml").write_text("[vmm]\naccel = 'tcg'\n[network]\ntap_pool = 2\n[dns]\nport = 42169\n")
    log = root / "state" / "bangerd.log"

    def banger(*a: str, timeout: float = 300) -> float:
        t = time.monotonic()
        r = subprocess.run(["ip", "netns", "exec", ns, str(BANGER), *a], env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"banger {' '.join(a)} exited {r.returncode}: {r.stderr.strip()[-800:]}")
        return time.monotonic() - t

    def hooks_since(offset: int) -> dict[str, float]:
        out = {s: 0.0 for s in STAGES}
        text = log.read_text()[offset:] if log.exists() else ""
        for m in HOOK_RE.finditer(text):
            plugin, stage, ms = m.group(1), m.group(2), float(m.group(3))
            if plugin in PLUGINS and stage in out:
                out[stage] += ms
        return out

    results: dict[str, list[dict[str, float]]] = {"none": [], "bridge": []}
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
    try:
        banger("kernel", "import", "dc", "--from", str(Path(kernel["kernel"]).parent))
        banger("image", "register", "bb", "--rootfs", str(rootfs), "--kernel-ref", "dc")
        banger("vm", "create", "--name", "warmup", "--image", "bb", "--vcpu", "1", "--memory", "256M", "--network", "bridge")
        banger("vm", "delete", "--force", "warmup")
        for i in range(args.runs):
            for mode in ("none", "bridge"):
                time.sleep(1.0)  # the pool refills in the background
                offset = log.stat().st_size if log.exists() else 0
                name = f"{mode}{i}"
                wall = banger(
                    "vm", "create", "--name", name, "--image", "bb", "--vcpu", "1", "--memory", "256M", "--network", mode
                )
                delete = banger("vm", "delete", "--force", name)
                row = hooks_since(offset)
                row["setup"] = row["prepare_host"] + row["configure_machine"] + row["post_boot"]
                row["create_wall_ms"] = wall * 1000
                row["delete_wall_ms"] = delete * 1000
                results[mode].append(row)
    finally:
        subprocess.run(["ip", "netns", "exec", ns, str(BANGER), "daemon", "stop"], env=env, capture_output=True, timeout=60)
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)

    keys = [*STAGES, "setup", "create_wall_ms", "delete_wall_ms"]
    med = {m: {k: statistics.median(r[k] for r in rows) for k in keys} for m, rows in results.items()}
    if args.json:
        print(json.dumps({"runs": args.runs, "median_ms": med, "raw": results}, indent=2))
        return 0
    print(f"network-side plugin hooks (network, nat, dns) per create, ms, medians of {args.runs} (TCG, busybox, 1 vCPU):")
    rows = []
    for k in keys:
        rows.append([k, f"{med['none'][k]:.1f}", f"{med['bridge'][k]:.1f}", f"{med['bridge'][k] - med['none'][k]:+.1f}"])
    print_table(["stage", "--network none", "--network bridge", "bridge - none"], rows)
    added = med["bridge"]["setup"] - med["none"]["setup"]
    print(
        f"bridge mode with a warm pool adds {added:.1f} ms of control-plane time to a create (target <= 50 ms): "
        f"{'met' if added <= 50 else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
