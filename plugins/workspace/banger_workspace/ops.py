"""A workspace in a running VM: prepare, export, and whether the guest's copy changed
since (daemon side, in worker threads, through the agent's published ``send``).

Everything git does in the guest happens inside the repository's git directory (a
temporary index there, never the guest's own, and never /tmp, which may be a small
tmpfs), so the guest's staged set is untouched.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger_core.errors import BangerError, ErrorCode
from banger_workspace import repo

if TYPE_CHECKING:
    from banger_agent.api import AgentAPI

log = logging.getLogger("banger.plugin.workspace")

#: how long one wait for the agent may take (a write of the stream, a script)
TIMEOUT = 600.0
RECORD = "workspace.json"  # in the VM's directory: what was prepared there

# The copy ($new, next to the destination $dest) gets its index refreshed (its files'
# stat data is this guest's) and the tree it holds noted (for "changes not exported
# yet"), then replaces what is at $dest; prints the tree. $head: the copy's HEAD.
PLACE = r"""
tree=""
if command -v git >/dev/null 2>&1; then
    cd "$new"
    git update-index -q --refresh >/dev/null 2>&1 || true
    idx="$new/.git/banger-tree.index"
    cp "$new/.git/index" "$idx"
    tree=$(GIT_INDEX_FILE="$idx" git add -A && GIT_INDEX_FILE="$idx" git write-tree)
    rm -f "$idx"
    printf '%s %s' "$head" "$tree" > "$new/.git/banger-workspace.tree"
    cd /
fi
old="$dest.banger-old.$$"
if [ -e "$dest" ] || [ -L "$dest" ]; then mv "$dest" "$old"; fi
mv "$new" "$dest"
rm -rf "$old"
printf '%s' "$tree"
"""

# One round trip: the guest's tar extracts the stream (a tree of small files ~3x faster
# than the agent's Python tarfile under emulation) into $1 as $2, then PLACE at $3.
# Without a tar it exits 127 having read nothing (the caller falls back to cp_in).
EXTRACT = (
    'set -e\nnew="$1/$2"; dest="$3"; head="$4"\nmkdir -p "$1"; rm -rf "$new"\n'
    'command -v tar >/dev/null 2>&1 || exit 127\ntar -x -f - -C "$1"\n' + PLACE
)
FINISH = 'set -e\nnew="$1"; dest="$2"; head="$3"\n' + PLACE

NEEDS_GIT = """command -v git >/dev/null 2>&1 || { echo "the guest has no git (use an image with git, e.g. debian-bookworm)" >&2; exit 127; }
cd "$1" 2>/dev/null || { echo "no workspace at $1 in the guest" >&2; exit 3; }
gd=$(git rev-parse --absolute-git-dir)
"""

# HEAD and the tree the working tree holds now (untracked files included).
STATE = (
    "set -e\n"
    + NEEDS_GIT
    + r"""idx="$gd/banger-state.$$.index"
trap 'rm -f "$idx" "$idx.lock"' EXIT
if [ -f "$gd/index" ]; then cp "$gd/index" "$idx"; fi
export GIT_INDEX_FILE="$idx"
git add -A
printf '%s %s' "$(git rev-parse HEAD)" "$(git write-tree)"
"""
)

# "HEAD TREE NAMES_LEN\n", the name-status list (-z), then the binary patch.
EXPORT = (
    "set -e\n"
    + NEEDS_GIT
    + r"""base="$2"
idx="$gd/banger-export.$$.index"; names="$gd/banger-export.$$.names"
trap 'rm -f "$idx" "$idx.lock" "$names"' EXIT
git rev-parse -q --verify "$base^{commit}" >/dev/null || { echo "base commit $base is not in the guest's repository at $1" >&2; exit 3; }
if [ -f "$gd/index" ]; then cp "$gd/index" "$idx"; fi
export GIT_INDEX_FILE="$idx"
git add -A
tree=$(git write-tree)
git diff --cached --name-status -z --no-renames "$base" > "$names"
printf '%s %s %s\n' "$(git rev-parse HEAD)" "$tree" "$(wc -c < "$names" | tr -d ' ')"
cat "$names"
git -c core.quotepath=off diff --cached --binary --full-index --no-renames --no-color --no-ext-diff --no-textconv \
    --src-prefix=a/ --dst-prefix=b/ "$base"
"""
)

MARKERS = r"""cat "$1/.git/banger-workspace.json" 2>/dev/null || exit 3
printf '\n'
cat "$1/.git/banger-workspace.tree" 2>/dev/null || true
"""


def sh(agent: "AgentAPI", paths: Any, vm_id: str, script: str, *args: str, timeout: float = TIMEOUT) -> tuple[int, bytes, str]:
    """``sh -c script`` in the guest: (exit status, stdout, stderr)."""
    out = bytearray()
    request = {"op": "exec", "argv": ["sh", "-c", script, "sh", *args], "env": {}, "cwd": "/"}
    status, err = agent.send(paths, vm_id, request, None, timeout=timeout, stdout=out.extend)
    return status, bytes(out), err


# --------------------------------------------------------------------------- the record
def record_path(paths: Any, vm_id: str) -> str:
    return os.path.join(str(paths.vm_dir(vm_id)), RECORD)


def load_record(paths: Any, vm_id: str) -> dict[str, Any] | None:
    try:
        with open(record_path(paths, vm_id)) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def save_record(paths: Any, vm_id: str, record: dict[str, Any]) -> None:
    from banger_core.fsutil import atomic_write

    atomic_write(Path(record_path(paths, vm_id)), json.dumps(record, indent=2))


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- operations
def prepare(agent: "AgentAPI", paths: Any, vm: Any, plan: repo.Plan, guest_path: str) -> dict[str, Any]:
    """Send ``plan`` to ``guest_path`` in the VM (replacing what is there once the copy
    is complete), record it; the record."""
    record: dict[str, Any] = {
        **repo.record_of(plan, guest_path),
        "prepared_at": now(),
        "host_state": repo.host_state(plan.top, plan.include_untracked),
    }
    name = f".banger-ws-{secrets.token_hex(4)}"
    parent = posixpath.dirname(guest_path)
    sent: dict[str, int] = {}

    def write(out: Any) -> None:
        sent["entries"], sent["bytes"] = repo.write_tar(plan, out, name, record)

    exec_in = {"op": "exec", "argv": ["sh", "-c", EXTRACT, "sh", parent, name, guest_path, plan.head], "env": {}, "cwd": "/"}
    out = bytearray()
    try:
        status, why = agent.send(paths, vm.id, exec_in, write, timeout=TIMEOUT, stdout=out.extend)
        if status == 127:  # no tar in the guest: the agent's cp_in, then the same placing
            sent.clear()
            status, why = agent.send(paths, vm.id, {"op": "cp_in", "dest": parent, "parents": True}, write, timeout=TIMEOUT)
            if status == 0:
                status, placed, why = sh(agent, paths, vm.id, FINISH, f"{parent}/{name}", guest_path, plan.head)
                out += placed
    except BaseException as exc:
        _remove(agent, paths, vm, f"{parent}/{name}")  # what a copy cut short extracted
        if isinstance(exc, repo.RepoError):
            raise BangerError(ErrorCode.BAD_REQUEST, str(exc)) from None
        raise
    if status != 0:
        _remove(agent, paths, vm, f"{parent}/{name}")
        raise BangerError(ErrorCode.OPERATION_FAILED, f"copying the workspace to {guest_path} in {vm.name} failed: {why}")
    tree = out.decode().strip() or None
    record.update(tree=tree, prepared=[plan.head, tree] if tree else None, exported=None, sent=sent)
    save_record(paths, vm.id, record)
    return record


def prepare_from(
    agent: "AgentAPI",
    paths: Any,
    vm: Any,
    path: str,
    mode: str,
    include_untracked: bool,
    guest_path: str,
    *,
    force: bool,
    subdir: str | None = None,
) -> tuple[repo.Plan, dict[str, Any]]:
    """The repository ``path`` is in, sent to ``guest_path`` (``prepare``), unless the VM
    already holds a workspace with changes not exported yet and not ``force``: (what was
    sent, its record). ``subdir``: where commands run in it, when not ``path``'s own."""
    try:
        plan = repo.inspect(path, mode, include_untracked)
    except repo.RepoError as exc:
        raise BangerError(ErrorCode.BAD_REQUEST, str(exc)) from None
    if subdir is not None:
        plan.subdir = subdir
    old = load_record(paths, vm.id)
    if old is not None and not force:
        refuse_unexported(agent, paths, vm, old)
    return plan, prepare(agent, paths, vm, plan, guest_path)


def _remove(agent: "AgentAPI", paths: Any, vm: Any, path: str) -> None:
    try:
        sh(agent, paths, vm.id, 'rm -rf "$1"', path, timeout=120)
    except Exception as exc:  # the failure being reported matters more
        log.warning("VM %s: could not remove %s: %s", vm.name, path, exc)


def guest_state(agent: "AgentAPI", paths: Any, vm: Any, guest_path: str) -> tuple[str, str]:
    """(HEAD, tree of the working tree) of the guest's copy."""
    status, out, err = sh(agent, paths, vm.id, STATE, guest_path)
    if status != 0:
        raise BangerError(ErrorCode.OPERATION_FAILED, f"cannot read the workspace in {vm.name}: {err}")
    head, tree = out.decode().split()
    return head, tree


def unexported(agent: "AgentAPI", paths: Any, vm: Any, record: dict[str, Any]) -> str | None:
    """Why the guest's copy holds changes not exported yet (None: it holds what was
    prepared, or what was last exported)."""
    try:
        state = list(guest_state(agent, paths, vm, record["guest_path"]))
    except BangerError as exc:
        return f"its state cannot be read ({exc.message})"
    if state in (record.get("prepared"), record.get("exported")):
        return None
    if record.get("prepared") and state[0] != record["prepared"][0]:
        return f"its HEAD moved to {state[0][:12]} (commits made in the guest)"
    return "its files changed since it was prepared"


def refuse_unexported(agent: "AgentAPI", paths: Any, vm: Any, record: dict[str, Any]) -> None:
    """Refuse to replace a workspace whose guest copy holds changes not exported yet."""
    why = unexported(agent, paths, vm, record)
    if why is not None:
        raise BangerError(
            ErrorCode.BAD_REQUEST,
            f"the workspace in {vm.name} holds changes not exported yet: {why}; export them first "
            f"(banger vm workspace export {vm.name} > changes.patch), or give --force to replace them",
        )


def export(agent: "AgentAPI", paths: Any, vm: Any, guest_path: str, base: str) -> tuple[dict[str, Any], bytes]:
    """Everything the guest's copy changed against ``base``: ({head, tree, files}, patch)."""
    status, out, err = sh(agent, paths, vm.id, EXPORT, guest_path, base)
    if status != 0:
        raise BangerError(ErrorCode.BAD_REQUEST if status in (3, 127) else ErrorCode.OPERATION_FAILED, f"{vm.name}: {err}")
    header, _, rest = out.partition(b"\n")
    head, tree, n = header.decode().split()
    names, patch = rest[: int(n)], rest[int(n) :]
    parts = names.decode(errors="surrogateescape").split("\0")
    files = [{"status": parts[i], "path": parts[i + 1]} for i in range(0, len(parts) - 1, 2)]
    return {"head": head, "tree": tree, "files": files}, patch


def read_markers(agent: "AgentAPI", paths: Any, vm: Any, guest_path: str) -> dict[str, Any] | None:
    """The record a prepare left in the guest's copy (after a restore), or None."""
    status, out, _err = sh(agent, paths, vm.id, MARKERS, guest_path, timeout=30)
    if status != 0:
        return None
    text, _, tree_line = out.decode(errors="replace").rpartition("\n")
    try:
        record: dict[str, Any] = json.loads(text)
    except ValueError:
        return None
    state = tree_line.split()
    record.update(prepared=state if len(state) == 2 else None, exported=None)
    return record


def bootstrap(agent: "AgentAPI", paths: Any, vm: Any, where: str, toolchain: str) -> str:
    """``mise install`` of the repository's toolchain file in the guest; its output's tail."""
    status, _out, _err = sh(agent, paths, vm.id, "command -v mise", timeout=30)
    if status != 0:
        raise BangerError(
            ErrorCode.BAD_REQUEST,
            f"{toolchain} declares a toolchain and the image {vm.image} has no mise to install it: "
            "use an image with mise, or --no-bootstrap",
        )
    script = 'cd "$1" && mise trust -q "$2" && mise install 2>&1'
    status, out, err = sh(agent, paths, vm.id, script, where, toolchain, timeout=1800)
    tail = (out.decode(errors="replace") + err).strip().splitlines()[-5:]
    if status != 0:
        raise BangerError(ErrorCode.OPERATION_FAILED, f"mise install of {toolchain} failed (exit {status}): {' | '.join(tail)}")
    return " | ".join(tail)
