"""Real guest assets for tests that boot VMs: a kernel + initrd, and a busybox root disk.

Plain functions (no pytest here) so fixtures, benchmarks and manual scripts share
them.  Nothing runs at import.

The busybox root filesystem is built to be observed and stopped from the host:
at boot it prints, on the console,

    BANGER-TEST-BOOT nproc=<N> mem_kb=<MemTotal>
    BANGER-TEST-CMDLINE <kernel command line>

(the BOOT line comes last, once the guest is ready for a power-button press), and
an ACPI power-button press (QMP ``system_powerdown``) or ctrl-alt-del prints
``BANGER-TEST-POWEROFF <why>`` and does ``sync; poweroff -f``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from banger_debian.debian_kernel import (
    build_debian_cloud_kernel,
    busybox_applets,
    static_busybox,
)

DEFAULT_CACHE = Path("/var/cache/banger-test")

BOOT_MARKER = "BANGER-TEST-BOOT"
CMDLINE_MARKER = "BANGER-TEST-CMDLINE"
POWEROFF_MARKER = "BANGER-TEST-POWEROFF"

# Modules the guest loads when it has a module tree: the ACPI power button and the
# input event devices acpid reads it from, and the virtio devices tests attach.
GUEST_MODULES = ("button", "evdev", "virtio_net", "virtio_console")


def default_cache_dir() -> Path:
    """Where test assets are cached: $BANGER_TEST_CACHE or /var/cache/banger-test."""
    return Path(os.environ.get("BANGER_TEST_CACHE") or DEFAULT_CACHE)


def test_kernel(cache_dir: Path) -> dict[str, Any]:
    """Debian's cloud kernel + initrd + modules, built once into cache_dir/kernel."""
    return build_debian_cloud_kernel(Path(cache_dir) / "kernel", cache=Path(cache_dir) / "debs")


# pytest would otherwise collect test_kernel as a test when a test module imports it.
test_kernel.__test__ = False  # type: ignore[attr-defined]


_INITTAB = """\
# busybox init: no gettys, the test guest only idles once rcS is done.
::sysinit:/etc/init.d/rcS
::ctrlaltdel:/etc/banger-test/poweroff ctrl-alt-del
::shutdown:/bin/sync
"""

_RCS = f"""\
#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
[ -e /proc/self ] || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
grep -q '^devtmpfs /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
hostname -F /etc/hostname

if [ -d "/lib/modules/$(uname -r)" ]; then
    for m in $(cat /etc/banger-test/modules); do
        modprobe "$m" || echo "banger-test: modprobe $m failed"
    done
fi

# acpid opens /dev/input/event0.. once at start: only after button and evdev loaded.
if [ -e /dev/input/event0 ]; then
    acpid -l /var/log/acpid.log
else
    echo "banger-test: no /dev/input/event*: the ACPI power button will do nothing"
fi

echo "{CMDLINE_MARKER} $(cat /proc/cmdline)"
mem_kb=$(sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo)
echo "{BOOT_MARKER} nproc=$(nproc) mem_kb=$mem_kb"
"""

_POWEROFF = f"""\
#!/bin/sh
echo "{POWEROFF_MARKER} ${{1:-acpi-power-button}}" > /dev/console
sync
exec poweroff -f
"""


def busybox_rootfs(
    path: Path,
    size_mib: int = 64,
    modules_dir: Path | None = None,
    *,
    cache: Path | None = None,
) -> Path:
    """Write an ext4 image at ``path`` holding a busybox system (see the module doc).

    The image is ``size_mib`` MiB, or larger when its contents need more.

    ``modules_dir`` is a ``/lib/modules/<version>`` tree (the ``modules`` entry of
    :func:`test_kernel`); it is copied to the same place in the guest, which then
    modprobes those of GUEST_MODULES that tree has as modules (built-in ones need
    no loading).  ``cache`` is where a static busybox is fetched to when the host
    has none (default: default_cache_dir()).  Needs mkfs.ext4 with ``-d``
    (e2fsprogs >= 1.43).
    """
    path = Path(path)
    cache = Path(cache) if cache is not None else default_cache_dir()
    busybox = static_busybox(cache / "debs", log=lambda _msg: None)
    with tempfile.TemporaryDirectory(prefix="banger-rootfs-") as tmp:
        tree = Path(tmp) / "root"
        _populate_tree(tree, busybox, modules_dir)
        size_mib = max(size_mib, _needed_mib(tree))
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.tmp")
        partial.unlink(missing_ok=True)
        with open(partial, "wb") as fh:
            fh.truncate(size_mib * 1024 * 1024)
        mkfs = subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-L", "banger-test", "-d", str(tree), str(partial)],
            capture_output=True,
            text=True,
            check=False,
        )
        if mkfs.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"mkfs.ext4 -d failed ({size_mib} MiB image): {mkfs.stderr.strip()}")
        os.replace(partial, path)
    return path


def _needed_mib(tree: Path) -> int:
    """A size that fits the tree: its 4 KiB blocks, +25% and 16 MiB for ext4's metadata.

    A kernel's whole module tree (about 90 MiB for Debian's cloud kernel) does not
    fit the default 64 MiB, so the image grows rather than failing.
    """
    used = 0
    for entry in tree.rglob("*"):
        size = entry.lstat().st_size if entry.is_file() and not entry.is_symlink() else 0
        used += -(-size // 4096) * 4096 + 256  # data blocks + an inode's share
    return int(used * 1.25) // (1024 * 1024) + 16


def _populate_tree(tree: Path, busybox: Path, modules_dir: Path | None) -> None:
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc/init.d",
        "etc/banger-test",
        "etc/acpi/PWRF",
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "root",
        "var/log",
        "lib/modules",
        "mnt",
    ):
        (tree / d).mkdir(parents=True, exist_ok=True)
    (tree / "tmp").chmod(0o1777)
    shutil.copy2(busybox, tree / "bin" / "busybox")
    (tree / "bin" / "busybox").chmod(0o755)
    for applet in busybox_applets(busybox):
        link = tree / applet
        if applet != "bin/busybox" and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")

    _write(tree / "etc/inittab", _INITTAB)
    _write(tree / "etc/init.d/rcS", _RCS, 0o755)
    _write(tree / "etc/banger-test/poweroff", _POWEROFF, 0o755)
    # busybox acpid: KEY_POWER maps to event "PWRF/00000080", run as
    # /etc/acpi/PWRF/00000080 (the action file spells out the default mapping).
    _write(tree / "etc/acpid.conf", "PWRF PWRF/00000080\n")
    (tree / "etc/acpi/PWRF/00000080").symlink_to("/etc/banger-test/poweroff")
    _write(tree / "etc/hostname", "banger-test\n")
    _write(tree / "etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
    _write(tree / "etc/group", "root:x:0:\n")

    modules: list[str] = []
    if modules_dir is not None:
        modules_dir = Path(modules_dir)
        shutil.copytree(modules_dir, tree / "lib" / "modules" / modules_dir.name, symlinks=True)
        modules = _loadable(modules_dir, GUEST_MODULES)
    _write(tree / "etc/banger-test/modules", "".join(f"{m}\n" for m in modules))


def _loadable(modules_dir: Path, names: tuple[str, ...]) -> list[str]:
    """The names that this kernel ships as modules (listed in modules.dep)."""
    shipped = set()
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path = line.partition(":")[0]
        shipped.add(path.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_"))
    return [n for n in names if n in shipped]


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    path.chmod(mode)


def busybox_assets(cache: Path | None = None) -> dict[str, Any]:
    """The test kernel (Debian's cloud kernel + banger's initrd) and the busybox root
    disk, made once per host and cached: {"kernel", "kernel_dir", "rootfs"}."""
    cache = cache or default_cache_dir()
    kernel = test_kernel(cache)
    rootfs = cache / "rootfs-busybox.ext4"
    if not rootfs.exists():
        busybox_rootfs(rootfs, modules_dir=Path(kernel["modules"]), cache=cache)
    return {"kernel": kernel, "kernel_dir": Path(kernel["kernel"]).parent, "rootfs": rootfs}
