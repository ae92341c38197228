"""Per-VM copy-on-write root disks. The image's own rootfs is never written.

Strategies, chosen by probing, best first:
  reflink  - ``cp --reflink=always``: instant, shares blocks (btrfs, xfs, ...)
  qcow2    - a qcow2 overlay backed by the image (QEMU only)
  sparse   - ``cp --sparse=always``: a full copy that skips holes (always works)
(dm-snapshot is not offered: it needs device-mapper, which this code does not yet
drive; see the README's status.)
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from banger_core import fsutil, proc
from banger_core.errors import BangerError, ErrorCode
from banger_core.paths import VMFiles

if TYPE_CHECKING:  # pragma: no cover
    from banger_core.models import Machine

log = logging.getLogger("banger.disks")

STRATEGIES = ("reflink", "qcow2", "sparse")


def reflink_works(directory: Path) -> bool:
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".reflink-probe-") as tmp:
        src = Path(tmp) / "a"
        src.write_bytes(b"x" * 4096)
        r = proc.run(["cp", "--reflink=always", src, Path(tmp) / "b"], check=False, what="reflink probe")
        return r.returncode == 0


def choose_strategy(vm_dir: Path, driver: str, wanted: str = "auto") -> str:
    if wanted != "auto":
        if wanted == "qcow2" and driver != "qemu":
            raise BangerError(ErrorCode.BAD_REQUEST, "disk strategy qcow2 needs the QEMU driver")
        return wanted
    if reflink_works(vm_dir):
        return "reflink"
    if driver == "qemu" and shutil.which("qemu-img"):
        return "qcow2"
    return "sparse"


def root_disk_path(vm_dir: Path, strategy: str) -> Path:
    return VMFiles(vm_dir).root_disk(strategy)


def create_root_disk(image_rootfs: Path, vm_dir: Path, size_mib: int, strategy: str) -> Path:
    """Clone the image's rootfs for a VM and grow it to ``size_mib`` (never shrink)."""
    if not image_rootfs.is_file():
        raise BangerError(ErrorCode.NOT_FOUND, f"image rootfs {image_rootfs} does not exist")
    vm_dir.mkdir(parents=True, exist_ok=True)
    dest = root_disk_path(vm_dir, strategy)
    base_mib = -(-image_rootfs.stat().st_size // (1024 * 1024))
    size = max(size_mib, base_mib)
    with fsutil.atomic_file(dest) as tmp:
        if strategy == "qcow2":
            proc.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", image_rootfs.resolve(), tmp, f"{size}M"],
                what="creating qcow2 overlay",
            )
        else:
            flag = "--reflink=always" if strategy == "reflink" else "--sparse=always"
            proc.run(["cp", flag, image_rootfs, tmp], timeout=1800, what=f"{strategy} copy of the image")
            if size > base_mib:
                os.truncate(tmp, size * 1024 * 1024)
                grow_ext4(tmp)
    return dest


def is_ext4(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(1024 + 0x38)
            return fh.read(2) == b"\x53\xef"
    except OSError:
        return False


def fsck(path: Path) -> None:
    """``e2fsck -fy`` before editing a reused disk offline (stale bitmaps otherwise)."""
    r = proc.run(["e2fsck", "-fy", path], check=False, timeout=600, what="e2fsck")
    if r.returncode not in (0, 1, 2):  # 1/2: errors corrected
        raise BangerError(ErrorCode.OPERATION_FAILED, f"e2fsck {path} failed with status {r.returncode}")


def grow_ext4(path: Path) -> None:
    if not is_ext4(path):
        return  # not ours to resize: the guest grows its own filesystem
    fsck(path)
    proc.run(["resize2fs", path], timeout=600, what="resize2fs")


def resize_root_disk(disk: Path, size_mib: int) -> None:
    """Grow a stopped VM's root disk (``vm set --root-size``)."""
    current = disk_size_mib(disk)
    if size_mib < current:
        raise BangerError(ErrorCode.BAD_REQUEST, f"disks only grow: {disk.name} is {current} MiB, asked {size_mib} MiB")
    if size_mib == current:
        return
    if disk.suffix == ".qcow2":
        proc.run(["qemu-img", "resize", "-q", disk, f"{size_mib}M"], what="qemu-img resize")
    else:
        os.truncate(disk, size_mib * 1024 * 1024)
        grow_ext4(disk)


def disk_size_mib(disk: Path) -> int:
    if disk.suffix == ".qcow2":
        import json

        info = json.loads(proc.run(["qemu-img", "info", "--output=json", "-U", disk], what="qemu-img info").stdout)
        return int(info["virtual-size"]) // (1024 * 1024)
    return disk.stat().st_size // (1024 * 1024)


# --- snapshot layers -------------------------------------------------------------------
def freeze_root(root: Path, dest_dir: Path) -> Path:
    """Copy a paused VM's root disk into a snapshot as its read-only layer. The VM is
    paused (its VMM flushed the disk when it stopped the guest), so the copy matches
    its memory. A qcow2 overlay copies only what the VM wrote (it keeps its backing
    image); a raw disk is reflinked where the filesystem can, else copied sparsely."""
    dest = dest_dir / f"root{root.suffix}"
    proc.run(["cp", "--reflink=auto", "--sparse=always", root, dest], timeout=1800, what="copying the root disk")
    os.chmod(dest, 0o444)
    return dest


#: in a snapshot's dir: copies of the VM's own writable drives besides the root disk
DRIVES_DIR = "drives"


def own_drives(machine: "Machine", vm_dir: Path) -> list[Path]:
    """The VM's own writable disks besides the root disk: drives a plugin keeps in the
    VM's dir (a work disk). They are the VM's state as much as its root disk is."""
    inside = str(vm_dir) + os.sep
    return [Path(d.path) for d in machine.drives if not d.root and not d.read_only and d.path.startswith(inside)]


def freeze_drives(machine: "Machine", vm_dir: Path, dest_dir: Path) -> list[Path]:
    """Copy a paused VM's own drives (``own_drives``) into a snapshot, read-only, under
    their file names: a restore gets a copy of each at the same name in its own dir."""
    out = []
    for disk in own_drives(machine, vm_dir):
        dest = dest_dir / DRIVES_DIR / disk.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        proc.run(["cp", "--reflink=auto", "--sparse=always", disk, dest], timeout=1800, what=f"copying the disk {disk.name}")
        os.chmod(dest, 0o444)
        out.append(dest)
    return out


def drives_from_snapshot(snapshot_dir: Path, vm_dir: Path) -> list[Path]:
    """A restored VM's own copy of each drive ``freeze_drives`` kept (reflinked where
    the filesystem can, else sparse), before its plugins prepare: they find their disk
    already there, as it was when the snapshot was taken."""
    src = snapshot_dir / DRIVES_DIR
    if not src.is_dir():
        return []
    vm_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for layer in sorted(src.iterdir()):
        with fsutil.atomic_file(vm_dir / layer.name) as tmp:
            proc.run(["cp", "--reflink=auto", "--sparse=always", layer, tmp], timeout=1800, what=f"copying {layer.name}")
            os.chmod(tmp, 0o644)
        out.append(vm_dir / layer.name)
    return out


def snapshot_layer(snapshot_dir: Path) -> Path:
    """The root disk layer in a snapshot's directory."""
    for suffix in (".qcow2", ".img"):
        if (p := snapshot_dir / f"root{suffix}").exists():
            return p
    raise BangerError(ErrorCode.NOT_FOUND, f"snapshot {snapshot_dir.name} has no root disk layer")


def disk_from_layer(layer: Path, vm_dir: Path, driver: str) -> str:
    """A VM's own root disk standing on a snapshot's layer; the strategy it used.
    QEMU: a qcow2 overlay backed by the layer (instant). Otherwise (Firecracker reads
    raw disks only): a reflink where the filesystem can, else a sparse copy."""
    vm_dir.mkdir(parents=True, exist_ok=True)
    if driver == "qemu" and shutil.which("qemu-img"):
        fmt = "qcow2" if layer.suffix == ".qcow2" else "raw"
        with fsutil.atomic_file(root_disk_path(vm_dir, "qcow2")) as tmp:
            proc.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", layer.resolve(), tmp],
                what="creating the VM's overlay on the snapshot",
            )
        return "qcow2"
    if layer.suffix == ".qcow2":
        raise BangerError(ErrorCode.BAD_REQUEST, f"the {driver} driver cannot use a qcow2 snapshot layer")
    strategy = "reflink" if reflink_works(vm_dir) else "sparse"
    with fsutil.atomic_file(root_disk_path(vm_dir, strategy)) as tmp:
        proc.run(["cp", "--reflink=auto", "--sparse=always", layer, tmp], timeout=1800, what="copying the snapshot's disk")
        os.chmod(tmp, 0o644)
    return strategy
