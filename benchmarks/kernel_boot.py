#!/usr/bin/env python3
"""Boot time of the same root disk on the debian plugin's two kernels.

    baseline    debian-cloud: Debian's cloud bzImage + banger's initrd, QEMU -M pc
    candidate   microvm-6.1: the ELF vmlinux compiled from linux-source-6.1 with
                banger's config fragment (everything built in), QEMU -M microvm

Both run with the exact argv banger's QEMU driver builds (``QemuDriver.argv``, TCG,
1 vCPU unless --vcpus, 1 GiB), on a fresh sparse copy of the root disk per boot.
Reported: seconds from QEMU's start until the console shows the kernel handing over
to /sbin/init's first line (``systemd[1]`` or the busybox marker) and, for a Debian
image, the ``login:`` prompt; medians over interleaved rounds and the ratio
baseline / candidate.

Root disk: --rootfs, else the debian-bookworm image built in the test cache or in
~/.cache/banger, else the busybox test disk. Kernels come from the test cache
(tests/guest_assets.py and the microvm recipe; the microvm kernel is compiled first
if it is not cached, which takes minutes).

    .venv/bin/python benchmarks/kernel_boot.py [--runs N] [--vcpus N] [--rootfs F] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import guest_assets as ga

from banger_debian.microvm_kernel import build_microvm_kernel
from banger_core.models import Drive, Machine
from banger_core.vmm.qemu import QemuDriver

TIMEOUT = 240.0
APPEND = ["console=ttyS0", "root=/dev/vda", "rw", "panic=-1", "net.ifnames=0"]


def find_rootfs(arg: str | None) -> tuple[Path, bool]:
    """The disk to boot and whether it is a Debian (systemd, login prompt) image."""
    if arg:
        return Path(arg), True
    for base in (ga.default_cache_dir() / "banger-cache", Path.home() / ".cache" / "banger"):
        debian = base / "builds" / "image-debian-bookworm" / "rootfs.ext4"
        if debian.is_file():
            return debian, True
    cache = ga.default_cache_dir()
    busybox = cache / "rootfs-busybox.ext4"
    if not busybox.exists():
        ga.busybox_rootfs(busybox, modules_dir=Path(ga.test_kernel(cache)["modules"]), cache=cache)
    return busybox, False


def boot(machine: Machine, rootfs: Path, work: Path, debian: bool) -> dict[str, float]:
    run_dir = Path(tempfile.mkdtemp(dir=work))
    disk = run_dir / "root.ext4"
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(rootfs), str(disk)], check=True)
    console = run_dir / "console.log"
    m = machine.model_copy(update={"drives": [Drive(id="root", path=str(disk), root=True)], "console_log": str(console)})
    argv = [a for a in QemuDriver().argv("0" * 16, m, run_dir, "tcg") if a != "-daemonize"]
    marks = {"init": b"systemd[1]" if debian else ga.BOOT_MARKER.encode()}
    if debian:
        marks["login"] = b"login:"
    seen: dict[str, float] = {}
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while time.monotonic() - t0 < TIMEOUT and len(seen) < len(marks):
            if p.poll() is not None:
                raise SystemExit(f"QEMU exited {p.returncode}: {p.stderr.read().decode()[-500:]}")  # type: ignore[union-attr]
            text = console.read_bytes() if console.exists() else b""
            for name, needle in marks.items():
                if name not in seen and needle in text:
                    seen[name] = time.monotonic() - t0
            time.sleep(0.02)
    finally:
        p.kill()
        p.wait()
        shutil.rmtree(run_dir, ignore_errors=True)
    missing = set(marks) - set(seen)
    if missing:
        raise SystemExit(f"no {', '.join(sorted(missing))} within {TIMEOUT:.0f}s booting {machine.kernel}")
    return seen


def arguments(doc: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--vcpus", type=int, default=1)
    ap.add_argument("--rootfs")
    ap.add_argument("--json", action="store_true")
    return ap.parse_args()


def compare(variants: dict[str, tuple[Machine, Path]], runs: int, work: Path, debian: bool) -> dict[str, list[dict[str, float]]]:
    """Boot each (machine, root disk) variant ``runs`` times, interleaved (drift hits all
    alike); the marks each boot reached, by variant."""
    results: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    for r in range(runs):
        for name, (machine, disk) in variants.items():
            seen = boot(machine, disk, work, debian)
            results[name].append(seen)
            print(f"  round {r + 1} {name}: " + ", ".join(f"{k} {v:.2f}s" for k, v in seen.items()), file=sys.stderr)
    return results


def report(results: dict[str, list[dict[str, float]]], rootfs: Path, as_json: bool) -> None:
    """Medians per mark and the ratio baseline (first variant) / candidate (second)."""
    (base_name, base), (cand_name, cand) = results.items()
    summary = {}
    for mark in base[0]:
        b = statistics.median(x[mark] for x in base)
        c = statistics.median(x[mark] for x in cand)
        summary[mark] = {"baseline_s": round(b, 2), "candidate_s": round(c, 2), "ratio": round(b / c, 2)}
    if as_json:
        print(
            json.dumps(
                {"rootfs": str(rootfs), "baseline": base_name, "candidate": cand_name, "runs": results, "median": summary},
                indent=2,
            )
        )
        return
    print(f"{'':8} {base_name:>30} {cand_name:>26} {'ratio':>7}")
    for mark, s in summary.items():
        print(f"{mark:8} {s['baseline_s']:>29.2f}s {s['candidate_s']:>25.2f}s {s['ratio']:>6.2f}x")


def main() -> None:
    args = arguments(__doc__)
    cache = ga.default_cache_dir()
    cloud = ga.test_kernel(cache)
    micro = build_microvm_kernel(
        cache / "banger-cache" / "builds" / "kernel-microvm-6.1",
        cache=cache / "banger-cache" / "debs",
        log=lambda m: print(f"  {m}", file=sys.stderr),
    )
    rootfs, debian = find_rootfs(args.rootfs)
    variants = {
        "debian-cloud (-M pc, initrd)": (
            Machine(kernel=cloud["kernel"], initrd=cloud["initrd"], boot_args=APPEND, vcpus=args.vcpus, memory_mib=1024),
            rootfs,
        ),
        "microvm-6.1 (-M microvm)": (
            Machine(kernel=micro["vmlinux"], boot_args=APPEND, vcpus=args.vcpus, memory_mib=1024),
            rootfs,
        ),
    }
    print(
        f"root disk {rootfs} ({'Debian' if debian else 'busybox'}), {args.vcpus} vCPU, TCG, {args.runs} rounds", file=sys.stderr
    )
    with tempfile.TemporaryDirectory(prefix="banger-kboot-") as work:
        results = compare(variants, args.runs, Path(work), debian)
    report(results, rootfs, args.json)


if __name__ == "__main__":
    main()
