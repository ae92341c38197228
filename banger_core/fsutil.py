"""The one way to put a file or a directory in place, and small filesystem facts
shared by image builders.

A reader (or a daemon killed half way) never sees a half-written file or dir:

* ``atomic_file(final)`` yields a temp path beside ``final`` for the caller (or a
  tool it runs) to create; it is renamed onto ``final`` when the block ends, removed
  if it raises. ``atomic_write`` and ``atomic_copy`` are the common cases.
* ``staged_dir(final)`` yields a staging dir (``Paths.staging_dir``) to fill; it
  replaces ``final`` when the block ends (``replace_dir``: the old one is moved aside
  and removed only once the new one is in), removed if it raises. What a cut-off
  daemon leaves of either is cleaned up by the next daemon's start-up sweep
  (``Paths.transient_leftovers``).

``locked(path)`` is the one inter-process lock: ``flock`` on a lock file (made 0600
with its directory if missing), exclusive, or shared for readers.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from banger_core.paths import Paths


@contextmanager
def locked(path: Path, shared: bool = False) -> Iterator[None]:
    """Hold an ``flock`` on the lock file ``path`` (exclusive, or ``shared``) for the
    block; made 0600, with its directory (0700), when missing. Released when the block
    ends or the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def atomic_file(final: Path, *, tmp: Path | None = None) -> Iterator[Path]:
    """A not-yet-existing temp path beside ``final`` (``.NAME.XXXXXXXX.tmp``, or
    ``tmp``), renamed onto ``final`` when the block returns; on any failure it is
    removed and ``final`` is left as it was. ``final``'s dir is made if missing."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if tmp is None:
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write ``data`` (str as UTF-8) to ``path`` atomically and durably: a temp file in
    the same dir, fsync, chmod ``mode``, rename, fsync of the dir."""
    raw = data.encode() if isinstance(data, str) else data
    with atomic_file(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # whatever the umask
    dfd = os.open(path.parent, os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def atomic_copy(src: Path, final: Path) -> None:
    """Copy a (large) file into place atomically."""
    with atomic_file(final) as tmp:
        shutil.copyfile(src, tmp)


def not_owner_only(d: Path) -> str | None:
    """Why the existing ``d`` is not a directory of this user's alone (a symlink,
    another owner, a mode open to others), or None when it is."""
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory (a symlink?)"
    if st.st_uid != os.getuid():
        return f"is owned by uid {st.st_uid}, not you ({os.getuid()})"
    if stat.S_IMODE(st.st_mode) & 0o077:
        return f"has mode {oct(stat.S_IMODE(st.st_mode))}; want 0700"
    return None


def copy_sparse(src: Path, dest: Path, mode: int = 0o600) -> int:
    """Copy ``src`` to a new file ``dest`` of the same size, only its data extents
    (``SEEK_DATA``/``SEEK_HOLE``: a guest's RAM file is mostly holes); the holes stay
    holes. Returns the bytes copied."""
    copied = 0
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dfd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            size = os.fstat(sfd).st_size
            os.ftruncate(dfd, size)
            pos = 0
            while pos < size:
                try:
                    start = os.lseek(sfd, pos, os.SEEK_DATA)
                except OSError:  # ENXIO: no data after pos
                    break
                end = os.lseek(sfd, start, os.SEEK_HOLE)
                os.lseek(dfd, start, os.SEEK_SET)
                off = start
                while off < end:
                    n = os.sendfile(dfd, sfd, off, min(end - off, 1 << 30))
                    if n == 0:
                        break
                    off += n
                copied += off - start
                pos = end
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    return copied


def replace_dir(src: Path, final: Path) -> None:
    """Move the complete dir ``src`` to ``final`` (same filesystem). An existing
    ``final`` is moved aside (``Paths.aside``) first and removed once ``src`` is in;
    if ``src`` cannot go in, it is put back. Readers see the old dir or the new one,
    and a crash in between leaves the old one aside, which the daemon's sweep restores."""
    if not (final.exists() or final.is_symlink()):
        src.rename(final)
        return
    aside = Paths.aside(final)
    _rmtree(aside)
    final.rename(aside)
    try:
        src.rename(final)
    except BaseException:
        aside.rename(final)
        raise
    _rmtree(aside)


@contextmanager
def staged_dir(final: Path, *, discard: Callable[[Path], object] | None = None) -> Iterator[Path]:
    """A new, empty staging dir beside ``final`` (``Paths.staging_dir``) to fill; it
    replaces ``final`` (``replace_dir``) when the block returns. On any failure it is
    removed with ``discard`` (default: rmtree; a build with mounts inside passes a
    remover that detaches them first) and ``final`` is left as it was."""
    staging = Paths.staging_dir(final)
    try:
        yield staging
        replace_dir(staging, final)
    except BaseException:
        (discard or _rmtree)(staging)
        raise


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def tree_bytes(root: Path) -> int:
    """Bytes the files under ``root`` occupy on disk (allocated blocks, no symlink follow)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total
