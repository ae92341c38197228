"""Copying entries into a running guest through the agent's ``cp_in`` op.

Each entry is one tar stream (banger_guest.transfer reads it in the guest): its top
entry is named after the guest path's last component and extracted into the guest
path's parent, which ``cp_in`` makes first (``parents``), so it lands at the guest path
exactly, whether or not something is there already. Everything is owned by root in the
guest (the agent extracts as root: uid 0, gid 0). A file takes the entry's mode; a
directory's files and subdirectories keep their own permission bits, symlinks in it
are copied as links (never followed), and what is neither (a socket, a FIFO, a device)
is skipped.
"""

from __future__ import annotations

import os
import posixpath
import stat
import tarfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from banger_agent.api import AgentAPI

    from banger_filesync.entries import Entry

#: how long one wait for the agent may take (a write, the end of a copy)
TIMEOUT = 120.0


@dataclass
class Outcome:
    """What one sync did: what landed, what was skipped (and why), what failed."""

    when: str
    synced: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    files: int = 0
    size: int = 0

    def record(self) -> dict[str, Any]:
        return {
            "when": self.when,
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "synced": self.synced,
            "skipped": self.skipped,
            "failed": self.failed,
        }


def _info(name: str, st: os.stat_result, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, int(st.st_mtime)
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def write_file(out: BinaryIO, path: str, name: str, mode: int) -> int:
    """One file as a tar stream, named ``name``, mode ``mode``; its size."""
    with open(path, "rb") as fh, tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        st = os.fstat(fh.fileno())
        info = _info(name, st, tarfile.REGTYPE, mode)
        info.size = st.st_size
        tar.addfile(info, fh)
        return st.st_size


def write_tree(out: BinaryIO, root: str, name: str, skipped: list[str]) -> tuple[int, int]:
    """The directory ``root`` as a tar stream under ``name``: (files, bytes). What cannot
    be read, or is neither a file, a directory nor a symlink, is added to ``skipped``."""
    files = size = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        todo = [(root, name)]
        while todo:
            path, arc = todo.pop()
            try:
                st = os.lstat(path)
                if stat.S_ISDIR(st.st_mode):
                    with os.scandir(path) as it:
                        children = sorted(e.name for e in it)
                    tar.addfile(_info(arc, st, tarfile.DIRTYPE, st.st_mode & 0o777))
                    todo.extend((os.path.join(path, c), f"{arc}/{c}") for c in reversed(children))
                elif stat.S_ISREG(st.st_mode):
                    with open(path, "rb") as fh:  # opened before its header is written: unreadable is skipped
                        st = os.fstat(fh.fileno())
                        info = _info(arc, st, tarfile.REGTYPE, st.st_mode & 0o777)
                        info.size = st.st_size
                        tar.addfile(info, fh)
                    files, size = files + 1, size + st.st_size
                elif stat.S_ISLNK(st.st_mode):
                    info = _info(arc, st, tarfile.SYMTYPE, 0o777)
                    info.linkname = os.readlink(path)
                    tar.addfile(info)
                else:
                    skipped.append(f"{path}: not a file, directory or symlink")
            except OSError as exc:
                skipped.append(f"{path}: {exc.strerror or exc}")
    return files, size


class _Stream:
    """One entry's tar stream, written when the agent's session is open (the agent
    service calls it with the session's STDIN), with what it wrote and skipped."""

    def __init__(self, entry: "Entry", real: str) -> None:
        self.entry, self.real = entry, real
        self.skipped: list[str] = []
        self.files = self.size = 0

    def __call__(self, out: BinaryIO) -> None:
        name = posixpath.basename(self.entry.guest)
        if os.path.isdir(self.real):
            self.files, self.size = write_tree(out, self.real, name, self.skipped)
        else:
            self.files, self.size = 1, write_file(out, self.real, name, self.entry.file_mode)


def sync(ctx: Any, entries: "list[Entry]", when: str) -> Outcome:
    """Copy every entry into the VM (``when``: "start" or "resume"); never raises for an
    entry: what could not be copied is a warning (ctx.warn) and the VM goes on."""
    from banger_filesync.entries import inside

    outcome = Outcome(when=when)
    if not entries:
        return outcome
    t0 = time.monotonic()
    agent: AgentAPI = ctx.service("agent")
    if agent.health(ctx.vm.id) is None:  # no agent answered this start: an image without banger's agent
        n = len(entries)
        ctx.warn(
            f"no agent answers in VM {ctx.vm.name} (its image has no banger agent):"
            f" {n} file_sync entr{'y' if n == 1 else 'ies'} not copied"
        )
        outcome.failed = [f"{e.describe()}: no agent" for e in entries]
        return outcome
    for e in entries:
        what = e.describe()
        real = os.path.realpath(e.host)
        if not os.path.exists(real):
            ctx.warn(f"{e.host}: no such file or directory on this host: skipped ({e.guest} not copied)")
            outcome.skipped.append(f"{what}: missing on the host")
            continue
        if e.project is not None and not inside(real, e.project):  # it changed since the config was checked
            ctx.warn(f"{e.host} is now {real}, outside the project {e.project}: skipped")
            outcome.skipped.append(f"{what}: outside the project")
            continue
        if not (os.path.isdir(real) or os.path.isfile(real)):
            ctx.warn(f"{e.host}: not a file or a directory: skipped")
            outcome.skipped.append(f"{what}: not a file or a directory")
            continue
        if os.path.isdir(real) and e.mode is not None:
            ctx.warn(f"{what}: mode {e.mode} is for a file; a directory's files keep their own modes")
        stream = _Stream(e, real)
        request = {"op": "cp_in", "dest": posixpath.dirname(e.guest), "parents": True}
        try:
            status, why = agent.send(ctx.paths, ctx.vm.id, request, stream, timeout=TIMEOUT)
        except Exception as exc:
            status, why = -1, f"{type(exc).__name__}: {exc}"
        if status != 0:
            ctx.warn(f"{what}: not copied: {why or f'exit status {status}'}")
            outcome.failed.append(f"{what}: {why or f'exit status {status}'}")
            continue
        for note in stream.skipped:
            ctx.warn(f"{what}: {note}: skipped")
        outcome.skipped += [f"{what}: {note}" for note in stream.skipped]
        outcome.synced.append(what)
        outcome.files, outcome.size = outcome.files + stream.files, outcome.size + stream.size
    ctx.log.info(
        "VM %s: file_sync at %s: %d of %d entries copied (%d files, %d bytes), %d skipped, %d failed, in %.2fs",
        ctx.vm.name,
        when,
        len(outcome.synced),
        len(entries),
        outcome.files,
        outcome.size,
        len(outcome.skipped),
        len(outcome.failed),
        time.monotonic() - t0,
    )
    return outcome
