#!/usr/bin/env python3
"""Boot time of the default image as banger builds it, against the same image with
banger's trimming undone.

    baseline    debian-bookworm with the masked units unmasked and re-enabled
                (``systemctl --root ... unmask``/``enable``) and the module blacklist
                removed: what mmdebstrap's Debian would boot
    candidate   debian-bookworm as built (recipe's MASKED_UNITS, BLACKLISTED_MODULES)

Both boot on the default kernel (debian-cloud: bzImage + banger's initrd, QEMU -M pc,
TCG, 1 vCPU unless --vcpus, 1 GiB) with the exact argv banger's QEMU driver builds, on
a fresh sparse copy per boot, interleaved. Reported: seconds from QEMU's start until
``systemd[1]`` and until the ``login:`` prompt; medians and the ratio baseline/candidate.

    .venv/bin/python benchmarks/image_trim.py [--runs N] [--vcpus N] [--rootfs F] [--json]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_boot as kb

from banger_debian import debian_image
from banger_core.models import Machine


def untrimmed_copy(rootfs: Path, dest: Path) -> None:
    """``rootfs`` with banger's masks and blacklist undone, at ``dest``."""
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(rootfs), str(dest)], check=True)
    mnt = Path(tempfile.mkdtemp(prefix="banger-untrim-"))
    subprocess.run(["mount", "-o", "loop", str(dest), str(mnt)], check=True)
    try:
        masked = [u for u in debian_image.MASKED_UNITS if (mnt / "etc/systemd/system" / u).is_symlink()]
        if not masked:
            raise SystemExit(f"{rootfs} has none of banger's masks: not a trimmed image (recipe >= 4)?")
        subprocess.run(["systemctl", f"--root={mnt}", "unmask", *masked], check=True, capture_output=True)
        # re-enable what Debian enables of them (templates and static units refuse: fine)
        for unit in masked:
            subprocess.run(["systemctl", f"--root={mnt}", "enable", unit], capture_output=True)
        (mnt / "etc/modprobe.d/banger-vm.conf").unlink(missing_ok=True)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        mnt.rmdir()


def main() -> None:
    args = kb.arguments(__doc__)
    rootfs, debian = kb.find_rootfs(args.rootfs)
    if not debian:
        raise SystemExit("no debian-bookworm image built here: `banger image pull debian-bookworm` first")
    cloud = kb.ga.test_kernel(kb.ga.default_cache_dir())
    machine = Machine(kernel=cloud["kernel"], initrd=cloud["initrd"], boot_args=kb.APPEND, vcpus=args.vcpus, memory_mib=1024)
    print(f"root disk {rootfs}, debian-cloud on -M pc, {args.vcpus} vCPU, TCG, {args.runs} rounds", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="banger-trim-") as work:
        untrimmed = Path(work) / "untrimmed.ext4"
        untrimmed_copy(rootfs, untrimmed)
        variants = {"Debian as mmdebstrap left it": (machine, untrimmed), "banger's trimmed image": (machine, rootfs)}
        results = kb.compare(variants, args.runs, Path(work), True)
    kb.report(results, rootfs, args.json)


if __name__ == "__main__":
    shutil.which("systemctl") or sys.exit("needs systemctl (for `systemctl --root`)")
    main()
