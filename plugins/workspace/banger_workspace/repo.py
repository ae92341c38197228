"""The host side of a workspace: what a repository sends, and the tar stream that
carries it (standard library only: ``vm workspace prepare --dry-run`` runs it in the CLI).

What goes (``inspect``): the repository at its HEAD commit with the working-tree content
of its tracked files (a tracked file deleted on the host is not sent, so it shows as
deleted in the guest too); untracked files that ``.gitignore`` does not exclude only when
asked; in ``full_copy`` the whole git directory (every commit, branch and tag) and the
submodules' trees, in ``copy`` a git directory holding HEAD's commit alone (shallow).
The guest's index is HEAD's tree, so the host's uncommitted edits are uncommitted edits
there too.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

MODES = ("copy", "full_copy")
SHA_RE = re.compile(r"[0-9a-f]{4,64}")
#: where the guest copy records what was prepared (read back after a restore)
MARKER = "banger-workspace.json"
#: the files that declare a toolchain mise bootstraps
MISE_FILES = (".mise.toml", "mise.toml")


class RepoError(Exception):
    """A path that is not a repository banger can send, and why."""


def git(*args: str, cwd: str, env: dict[str, str] | None = None, input: bytes | None = None) -> bytes:
    """``git ARGS`` in ``cwd``: its stdout; a RepoError with its stderr when it fails.
    ``safe.directory=*``: the daemon may run as another user than the repository's owner."""
    argv = ["git", "-c", "safe.directory=*", "-c", "core.quotepath=off", *args]
    try:
        r = subprocess.run(argv, cwd=cwd, env=env, input=input, capture_output=True, check=False)
    except FileNotFoundError:
        raise RepoError("git is not installed on this host (apt install git)") from None
    if r.returncode != 0:
        why = r.stderr.decode(errors="replace").strip().splitlines()
        raise RepoError(f"git {args[0]} failed in {cwd}: {why[-1] if why else f'exit {r.returncode}'}")
    return r.stdout


def _z(data: bytes) -> list[str]:
    return [p for p in data.decode(errors="surrogateescape").split("\0") if p]


@dataclass
class Plan:
    """What a prepare of ``top`` sends."""

    top: str  # the repository's top directory (real path)
    subdir: str  # where the asked path is inside it ("" at the top)
    head: str
    branch: str | None  # None: a detached HEAD
    mode: str
    include_untracked: bool
    files: list[str] = field(default_factory=list)  # working-tree paths sent, relative to top
    untracked: list[str] = field(default_factory=list)  # sent (include_untracked) or left out
    dirty: list[str] = field(default_factory=list)  # tracked files whose content differs from HEAD
    submodules: list[str] = field(default_factory=list)  # in copy mode: left out
    git_dir: str = ""
    size: int = 0

    @property
    def mise(self) -> str | None:
        """The toolchain file at the top, when the repository declares one."""
        return next((f for f in MISE_FILES if f in self.files), None)


def inspect(path: str, mode: str = "copy", include_untracked: bool = False) -> Plan:
    """What preparing a workspace from ``path`` (in a git work tree) would send."""
    if mode not in MODES:
        raise RepoError(f"mode {mode!r}: use copy or full_copy")
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise RepoError(f"{path}: not a directory")
    try:
        top = git("rev-parse", "--show-toplevel", cwd=real).decode().strip()
    except RepoError:
        raise RepoError(f"{path} is not in a git repository (git init, and commit something)") from None
    try:
        head = git("rev-parse", "--verify", "-q", "HEAD^{commit}", cwd=top).decode().strip()
    except RepoError:
        raise RepoError(f"{top}: the repository has no commit yet (commit something first)") from None
    try:
        branch: str | None = git("symbolic-ref", "-q", "--short", "HEAD", cwd=top).decode().strip()
    except RepoError:  # a detached HEAD
        branch = None
    git_dir = git("rev-parse", "--absolute-git-dir", cwd=top).decode().strip()
    if mode == "full_copy" and os.path.realpath(git_dir) != os.path.join(os.path.realpath(top), ".git"):
        raise RepoError(f"{top}: its .git is not a directory of its own (a worktree or a submodule): use --mode copy")
    staged = git("ls-files", "-z", "--stage", cwd=top).decode(errors="surrogateescape").split("\0")
    gitlinks = {e.split("\t", 1)[1] for e in staged if e.startswith("160000 ")}
    tracked = [p for p in _z(git("ls-files", "-z", "--cached", cwd=top)) if p not in gitlinks]
    plan = Plan(
        top=top,
        subdir="" if real == os.path.realpath(top) else os.path.relpath(real, os.path.realpath(top)),
        head=head,
        branch=branch,
        mode=mode,
        include_untracked=include_untracked,
        git_dir=git_dir,
    )
    plan.untracked = _z(git("ls-files", "-z", "--others", "--exclude-standard", cwd=top))
    plan.dirty = _z(git("diff", "--name-only", "-z", "--no-renames", "HEAD", "--", cwd=top))
    files = [p for p in tracked if os.path.lexists(os.path.join(top, p))]
    if include_untracked:
        files += plan.untracked
    if mode == "full_copy":
        for sub in sorted(gitlinks):
            files += _submodule_files(top, sub)
    else:
        plan.submodules = sorted(gitlinks)
    plan.files = files
    plan.size = sum(_size(os.path.join(top, p)) for p in files)
    return plan


def _submodule_files(top: str, sub: str) -> list[str]:
    """A checked-out submodule's files (its tracked ones and its .git file), nested
    submodules included; nothing for one not checked out."""
    where = os.path.join(top, sub)
    if not os.path.lexists(os.path.join(where, ".git")):
        return []
    out = [f"{sub}/.git"]
    staged = git("ls-files", "-z", "--stage", cwd=where).decode(errors="surrogateescape").split("\0")
    links = {e.split("\t", 1)[1] for e in staged if e.startswith("160000 ")}
    for p in _z(git("ls-files", "-z", "--cached", cwd=where)):
        if p in links:
            out += _submodule_files(top, f"{sub}/{p}")
        elif os.path.lexists(os.path.join(where, p)):
            out.append(f"{sub}/{p}")
    return out


def _size(path: str) -> int:
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def host_state(top: str, include_untracked: bool) -> str:
    """A digest of the repository's state as a prepare would send it: HEAD, which files
    differ from it (and their size and mtime, so a further edit counts). Two equal
    digests: nothing a prepare sends changed."""
    h = hashlib.sha256(git("rev-parse", "HEAD", cwd=top))
    status = git("status", "--porcelain=v1", "-z", f"--untracked-files={'all' if include_untracked else 'no'}", cwd=top)
    h.update(status)
    for entry in _z(status):
        p = entry[3:] if len(entry) > 3 and entry[2] == " " else entry
        try:
            st = os.lstat(os.path.join(top, p))
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode(errors="surrogateescape"))
        except OSError:
            h.update(f"{p}\0-\0".encode(errors="surrogateescape"))
    return h.hexdigest()


def shallow_git_dir(plan: Plan, into: str) -> str:
    """A git directory holding HEAD's commit and its tree alone (``copy`` mode), HEAD
    on the host's branch, the index HEAD's tree; made in ``into``; its path."""
    gd = os.path.join(into, "git")
    git("init", "-q", "--bare", gd, cwd=into)
    objects = git("rev-list", "--objects", "-n", "1", plan.head, cwd=plan.top)
    pack = git("pack-objects", "--stdout", "-q", cwd=plan.top, input=objects)
    env = {**os.environ, "GIT_DIR": gd}
    git("index-pack", "--stdin", cwd=into, env=env, input=pack)
    with open(os.path.join(gd, "shallow"), "w") as fh:
        fh.write(plan.head + "\n")
    if plan.branch:
        git("update-ref", f"refs/heads/{plan.branch}", plan.head, cwd=into, env=env)
        git("symbolic-ref", "HEAD", f"refs/heads/{plan.branch}", cwd=into, env=env)
    else:
        git("update-ref", "--no-deref", "HEAD", plan.head, cwd=into, env=env)
    git("config", "core.bare", "false", cwd=into, env=env)
    git("read-tree", plan.head, cwd=into, env={**env, "GIT_INDEX_FILE": os.path.join(gd, "index")})
    return gd


def write_tar(plan: Plan, out: BinaryIO, name: str, record: dict[str, object]) -> tuple[int, int]:
    """The workspace as one tar stream under ``name``: ``.git`` (the host's in
    ``full_copy``, a shallow one made here in ``copy``) with ``record`` in it as
    MARKER, then the files; (entries, bytes). Owned by root in the guest."""
    tmp = tempfile.mkdtemp(prefix="banger-workspace-")
    try:
        gd = plan.git_dir if plan.mode == "full_copy" else shallow_git_dir(plan, tmp)
        entries = size = 0
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:

            def add(path: str, arc: str) -> None:
                nonlocal entries, size
                info = tar.gettarinfo(path, arc)
                info.mtime = int(info.mtime)  # a float needs a pax header per entry: twice the stream
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                if info.isreg():
                    with open(path, "rb") as fh:
                        tar.addfile(info, fh)
                    size += info.size
                elif info.isdir() or info.issym():
                    tar.addfile(info)
                else:
                    return  # a socket, a FIFO, a device: not a repository's
                entries += 1

            add(plan.top, name)
            for root, dirs, files in os.walk(gd):
                rel = os.path.relpath(root, gd)
                arc = f"{name}/.git" if rel == "." else f"{name}/.git/{rel}"
                add(root, arc)
                for f in files:
                    if f not in (MARKER, "index.lock"):
                        add(os.path.join(root, f), f"{arc}/{f}")
                dirs.sort()
            data = json.dumps(record, indent=2).encode()
            info = tarfile.TarInfo(f"{name}/.git/{MARKER}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
            made: set[str] = set()
            for p in plan.files:
                parts = p.split("/")
                for i in range(1, len(parts)):  # parents first, with their own modes
                    d = "/".join(parts[:i])
                    if d not in made:
                        made.add(d)
                        add(os.path.join(plan.top, d), f"{name}/{d}")
                add(os.path.join(plan.top, p), f"{name}/{p}")
        return entries, size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def record_of(plan: Plan, guest_path: str) -> dict[str, object]:
    """What is recorded of a prepare (and put in the guest copy's git dir)."""
    return {**asdict(plan), "files": len(plan.files), "untracked": len(plan.untracked), "guest_path": guest_path}
