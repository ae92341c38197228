"""What ``vm cp`` sends: one tar stream (POSIX pax), used by both sides.

The side that reads a path writes ``tar_out(path)``: the file or directory tree under
its own base name, modes, mtimes and symlinks kept. The side that writes reads it with
``tar_in(stream, dest_dir, rename)``: ``place(dest)`` decides where it goes, as ``cp -a``
and ``docker cp`` do: into ``dest`` when that is a directory, else as ``dest`` itself
(its parent must exist). Both stream (``w|``/``r|``): memory stays flat whatever the size.

Standard library only: the guest agent runs this, and so does banger's CLI.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

BUFSIZE = 64 * 1024


class TransferError(Exception):
    """A path that cannot be copied (missing, unsafe, the wrong kind)."""


def check_source(path: str, where: str) -> None:
    """Refuse a source that is missing or that has no base name to copy it under."""
    if not os.path.lexists(path):
        raise TransferError(f"{path}: no such file or directory {where}")
    if not os.path.basename(os.path.normpath(path)) or os.path.normpath(path) in ("/", "."):
        raise TransferError(f"{path}: name a file or a directory below it, not {path} itself")


def place(dest: str, where: str) -> tuple[str, str | None]:
    """Where a copy into ``dest`` lands: (directory, new name for the top entry, or None
    to keep its own). A missing parent is an error."""
    if os.path.isdir(dest):
        return dest, None
    if dest.endswith("/"):
        raise TransferError(f"{dest}: no such directory {where}")
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise TransferError(f"{parent}: no such directory {where} (to copy into {dest})")
    return parent, os.path.basename(dest)


def make_dirs(dest: str, where: str) -> None:
    """``dest`` and its missing parents made as directories, as ``mkdir -p`` does
    (mode 0755 less the umask, owned by whoever runs this); a part of it that exists and
    is not a directory is an error."""
    try:
        os.makedirs(dest, 0o755, exist_ok=True)
    except OSError as exc:
        raise TransferError(f"{dest}: cannot make this directory {where}: {exc.strerror or exc}") from None


def tar_out(path: str, out: BinaryIO) -> tuple[int, int]:
    """Write ``path`` (a file or a whole tree) to ``out`` as a tar stream; (entries, bytes)."""
    check_source(path, "")
    count = size = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, bufsize=BUFSIZE) as tar:
        root = os.path.normpath(path)
        name = os.path.basename(root)
        for full in _walk(root):
            arc = name if full == root else os.path.join(name, os.path.relpath(full, root))
            info = tar.gettarinfo(full, arcname=arc)
            if info.isreg():
                with open(full, "rb") as fh:
                    tar.addfile(info, fh)
                size += info.size
            else:
                tar.addfile(info)
            count += 1
    return count, size


def _walk(root: str) -> Iterator[str]:
    """The root, then everything under it (sorted; links to directories not followed)."""
    yield root
    if os.path.isdir(root) and not os.path.islink(root):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for n in sorted(dirnames + filenames):
                yield os.path.join(dirpath, n)


def tar_in(stream: BinaryIO, dest_dir: str, rename: str | None, owner: tuple[int, int] | None = None) -> tuple[int, int]:
    """Extract a ``tar_out`` stream into ``dest_dir`` (the top entry renamed to ``rename``
    when given), modes and mtimes kept, owned by ``owner`` (uid, gid) when given; (entries, bytes).

    It lands in a staging directory beside the target first and is moved into place
    once whole, so a copy cut short leaves nothing half-written; an existing directory
    is merged into (as ``cp -a`` does), files in it replaced."""
    count = size = 0
    stage = tempfile.mkdtemp(prefix=".banger-cp-", dir=dest_dir)
    try:
        tops: set[str] = set()
        dirs: list[tarfile.TarInfo] = []
        with tarfile.open(fileobj=stream, mode="r|", bufsize=BUFSIZE) as tar:
            for m in tar:
                m.name = _renamed(m.name, rename)
                tops.add(m.name.split("/")[0])
                if m.islnk():
                    m.linkname = os.path.join(stage, _renamed(m.linkname, rename))
                if owner is not None:
                    m.uid, m.gid = owner
                    m.uname = m.gname = ""
                if m.isdev():
                    raise TransferError(f"{m.name}: a device node: not copied")
                kwargs = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
                # a directory's mode comes last: a read-only one must still take its files
                tar.extract(m, stage, set_attrs=not m.isdir(), numeric_owner=True, **kwargs)  # type: ignore[arg-type]
                if m.isdir():
                    dirs.append(m)
                count += 1
                size += m.size if m.isreg() else 0
        for d in reversed(dirs):
            path = os.path.join(stage, d.name)
            if owner is not None and os.geteuid() == 0:
                os.chown(path, *owner)
            os.chmod(path, d.mode)
            os.utime(path, (d.mtime, d.mtime))
        for top in tops:
            _move(os.path.join(stage, top), os.path.join(dest_dir, top))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return count, size


def _move(src: str, dst: str) -> None:
    """``src`` to ``dst``: renamed when ``dst`` is not a directory, merged into it when both are."""
    src_dir = os.path.isdir(src) and not os.path.islink(src)
    dst_dir = os.path.isdir(dst) and not os.path.islink(dst)
    if src_dir and dst_dir:
        for name in sorted(os.listdir(src)):
            _move(os.path.join(src, name), os.path.join(dst, name))
        shutil.copystat(src, dst)
    elif dst_dir:
        raise TransferError(f"{dst}: a directory: not replaced by a file")
    elif src_dir and os.path.lexists(dst):
        raise TransferError(f"{dst}: not a directory: not replaced by one")
    else:
        os.replace(src, dst)


def _renamed(name: str, rename: str | None) -> str:
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or not parts[0]:
        raise TransferError(f"{name!r}: an unsafe path in the copy stream")
    if rename:
        parts[0] = rename
    return "/".join(parts)
