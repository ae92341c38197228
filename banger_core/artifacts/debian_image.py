"""Build the default image, ``debian-bookworm``, on the host from Debian's packages.

    dest/rootfs.ext4      ext4 root filesystem, owned by root
    dest/manifest.json    what was built

mmdebstrap makes a minbase tree with systemd (and dbus, which logind needs to act on
the ACPI power button), openssh-server, python3, git, iproute2, ca-certificates and curl; banger then puts in what a VM needs to come up on its own
(the kernel's modules, a hostname, a serial console login, DHCP-free networking left
to banger's guest side) and makes the filesystem with ``mkfs.ext4 -d``, sized
max(tree x 1.5, 1 GiB). Everything is staged and renamed into place at the end, so a
failed build leaves nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

from banger_core.fsutil import tree_bytes

Log = Callable[[str], Any]

RECIPE = 3
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "systemd", "systemd-sysv", "udev", "dbus", "openssh-server", "python3", "git", "iproute2",
    "ca-certificates", "curl", "kmod",
)


class ImageBuildError(RuntimeError):
    pass


def _run(argv: list[str], log: Log, timeout: float = 1800) -> None:
    log("$ " + " ".join(argv))
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
        raise ImageBuildError(f"{argv[0]} failed ({r.returncode}): {' | '.join(tail)}")


def customize(tree: Path, modules_dir: Path | None) -> None:
    """What banger adds to the Debian tree so a VM boots to a usable state."""
    (tree / "etc/hostname").write_text("banger\n")
    (tree / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 banger\n")
    # root logs in on the serial console without a password (the VM is the user's own)
    getty = tree / "etc/systemd/system/serial-getty@ttyS0.service.d"
    getty.mkdir(parents=True, exist_ok=True)
    (getty / "autologin.conf").write_text(
        "[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 %I $TERM\n"
    )
    (tree / "etc/fstab").write_text("/dev/vda / ext4 defaults,errors=remount-ro 0 1\n")
    if modules_dir is not None:
        dest = tree / "lib/modules" / modules_dir.name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(modules_dir, dest, symlinks=True)
        load = tree / "etc/modules-load.d/banger.conf"
        load.parent.mkdir(parents=True, exist_ok=True)
        # button + evdev: systemd-logind sees the ACPI power button (graceful `vm stop`)
        load.write_text("button\nevdev\nvirtio_net\nvirtio_console\nvsock\nvmw_vsock_virtio_transport\n")


def build_debian_image(dest: Path, modules_dir: Path | None = None, log: Log = print, size_mib: int | None = None) -> dict[str, Any]:
    dest = Path(dest)
    manifest_path = dest / "manifest.json"
    if manifest_path.exists():
        m = json.loads(manifest_path.read_text())
        same_modules = m.get("kernel_modules") == (modules_dir.name if modules_dir else None)
        if m.get("recipe") == RECIPE and same_modules and (dest / m["rootfs"]).exists():
            return {**m, "rootfs": str(dest / m["rootfs"])}
    if shutil.which("mmdebstrap") is None:
        raise ImageBuildError("mmdebstrap is not installed (apt install mmdebstrap)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.staging-", dir=dest.parent))
    try:
        tree = staging / "tree"
        log(f"building {SUITE} root filesystem with mmdebstrap (a minute or two)")
        _run(
            ["mmdebstrap", "--variant=minbase", "--mode=root", f"--include={','.join(PACKAGES)}",
             "--dpkgopt=path-exclude=/usr/share/{doc,man,locale}/*", "--dpkgopt=path-include=/usr/share/locale/locale.alias",
             SUITE, str(tree), MIRROR],
            log,
        )
        customize(tree, modules_dir)
        used_mib = tree_bytes(tree) // (1024 * 1024)
        size = max(size_mib or 0, int(used_mib * 1.5), 1024)
        rootfs = staging / "rootfs.ext4"
        with open(rootfs, "wb") as fh:
            fh.truncate(size * 1024 * 1024)
        log(f"making a {size} MiB ext4 from the {used_mib} MiB tree")
        _run(["mkfs.ext4", "-q", "-F", "-L", "banger-root", "-d", str(tree), str(rootfs)], log)
        shutil.rmtree(tree)
        manifest = {"name": "debian-bookworm", "suite": SUITE, "packages": list(PACKAGES), "rootfs": "rootfs.ext4",
                    "size_mib": size, "recipe": RECIPE,
                    "kernel_modules": modules_dir.name if modules_dir else None}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {**manifest, "rootfs": str(dest / "rootfs.ext4")}
