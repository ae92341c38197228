"""Work-seeds and work disks, on the host.

A work-seed is an ext4 (label ``banger-work``) holding an image's /root, made once per
image file (its path, size and mtime: a re-pulled image gets a new one) from the
rootfs with ``debugfs rdump``, under ``$STATE/workdisk/seeds/<image>/``. It lands by
rename (``fsutil.atomic_file``): a create never reads a torn seed. One builder at a time
per image (an exclusive lock); creates copying a seed hold the lock shared, so a
refresh removes the superseded seeds only when nobody is reading them.

A VM's work disk is ``work.img`` in its own dir: a copy of the seed (reflinked where
the filesystem can, else sparse), grown to the VM's size. It is never shrunk.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from banger_core import fsutil, proc
from banger_core.errors import BangerError, ErrorCode
from banger_core.images import ext4_from_tree, tree_needs
from banger_core.vm import disks

LABEL = "banger-work"
DISK = "work.img"
MIB = 1024 * 1024


def seeds_dir(state_dir: Path, image: str) -> Path:
    return state_dir / "workdisk" / "seeds" / image


def rootfs_identity(rootfs: Path) -> str:
    st = os.stat(rootfs)
    return hashlib.sha256(f"{os.path.realpath(rootfs)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def seed_size_mib(tree: Path) -> int:
    """Room for ``tree`` with half again to spare (and its inodes); the seed is only
    copied and grown, so small is fast."""
    data, entries = tree_needs(tree)
    return max(32, -(-(data * 3 // 2 + entries * 384) // MIB) + 8)


def build_seed(rootfs: Path, out: Path) -> int:
    """Make ``out`` the work-seed of ``rootfs``: its /root (an empty one when the image
    has none or is not ext4). Returns the number of entries copied."""
    with tempfile.TemporaryDirectory(prefix="banger-workseed-", dir=out.parent) as tmp:
        tree = Path(tmp) / "root"
        if disks.is_ext4(rootfs):
            proc.run(["debugfs", "-R", f"rdump /root {tmp}", rootfs], check=False, what="reading the image's /root")
        if not tree.is_dir():  # no /root in the image: an empty one, root's own
            tree.mkdir(mode=0o700)
        entries = tree_needs(tree)[1]
        cmds = Path(tmp) / "cmds"
        cmds.write_text(owner_fixes(tree))
        with fsutil.atomic_file(out) as tmp_out:
            ext4_from_tree(tree, tmp_out, size_mib=seed_size_mib(tree), label=LABEL, what="the work-seed")
            proc.run(["debugfs", "-w", "-f", cmds, tmp_out], what="setting the work-seed's /root mode")
    return entries


def owner_fixes(tree: Path) -> str:
    """debugfs commands run on the made seed: its top dir gets /root's mode and owner
    (mkfs -d leaves it 0755); and when banger runs unprivileged, so that ``rdump`` could
    not give files their owners, what it made the daemon's own becomes root's (an
    image's /root is root's), or sshd would refuse root's authorized_keys."""
    st = tree.stat()
    uid, unprivileged = os.geteuid(), os.geteuid() != 0
    top = (0, 0) if unprivileged and st.st_uid == uid else (st.st_uid, st.st_gid)
    lines = [f"sif / mode 0{st.st_mode:o}", f"sif / uid {top[0]}", f"sif / gid {top[1]}"]
    if unprivileged:
        for dirpath, dirs, files in os.walk(tree):
            for name in [*dirs, *files]:
                path = os.path.join(dirpath, name)
                rel = "/" + os.path.relpath(path, tree)
                if os.lstat(path).st_uid == uid and re.fullmatch(r"[^\s\"\\]+", rel):
                    lines += [f'sif "{rel}" uid 0', f'sif "{rel}" gid 0']
    return "".join(f"{ln}\n" for ln in lines)


def seed_for(state_dir: Path, image: str, rootfs: Path) -> Path:
    """The current work-seed of ``image`` (made now if missing or its rootfs changed).
    Callers copy it while holding ``seed_lock(..., shared=True)``."""
    d = seeds_dir(state_dir, image)
    seed = d / f"{rootfs_identity(rootfs)}.ext4"
    if seed.exists():
        return seed
    with fsutil.locked(d / ".lock"):  # exclusive: one builder; readers of older seeds are done
        if not seed.exists():
            build_seed(rootfs, seed)
        for old in d.glob("*.ext4"):
            if old != seed:
                old.unlink(missing_ok=True)
    return seed


def make_disk(state_dir: Path, image: str, rootfs: Path, dest: Path, size_mib: int) -> None:
    """``dest``: a copy of the image's work-seed grown to ``size_mib``."""
    with fsutil.atomic_file(dest) as tmp:
        for _attempt in range(3):
            seed = seed_for(state_dir, image, rootfs)
            with fsutil.locked(seeds_dir(state_dir, image) / ".lock", shared=True):
                if not seed.exists():  # superseded between the two steps: take the new one
                    continue
                need = -(-seed.stat().st_size // MIB)
                if size_mib < need:
                    raise BangerError(
                        ErrorCode.BAD_REQUEST,
                        f"work disk size {size_mib} MiB is too small: image {image}'s /root needs {need} MiB",
                    )
                proc.run(["cp", "--reflink=auto", "--sparse=always", seed, tmp], timeout=600, what="copying the work-seed")
                break
        else:
            raise BangerError(ErrorCode.OPERATION_FAILED, f"image {image}'s work-seed kept changing while it was copied")
        os.chmod(tmp, 0o644)
        grow(tmp, size_mib)


def grow(disk: Path, size_mib: int) -> bool:
    """Grow ``disk`` (and its ext4) to ``size_mib``; False when it already is that
    size. Refused when smaller than it is: a work disk never shrinks."""
    current = disk.stat().st_size // MIB
    if size_mib < current:
        raise BangerError(
            ErrorCode.BAD_REQUEST, f"the work disk is {current} MiB and cannot shrink to {size_mib} MiB (disks only grow)"
        )
    if size_mib == current:
        return False
    os.truncate(disk, size_mib * MIB)
    disks.grow_ext4(disk)
    return True


def remove_seeds(state_dir: Path, image: str) -> None:
    shutil.rmtree(seeds_dir(state_dir, image), ignore_errors=True)
