"""A git repository in the guest at /root/repo, and every change back out as a patch.

- ``vm run PATH -- CMD``: the VM is made from PATH's project, its repository goes to
  /root/repo (``before_exec`` of the run), a declared toolchain (``.mise.toml``) is
  installed, then CMD runs there.
- ``vm workspace prepare VM PATH`` / ``vm workspace export VM``: the same copy into a
  running VM, and the patch of what the guest changed (``git apply`` on the host).
- ``vm exec`` runs in the workspace when one was prepared, warns when the host's
  repository changed since, and ``--auto-prepare`` copies it again first (refusing,
  unless ``--force``, when the guest holds changes not exported yet).

The copy lives on the work disk (requires ``workdisk``): it survives stop/start and is
part of the VM's snapshots. See README.md beside this file.
"""

from __future__ import annotations

import os

import posixpath
from typing import TYPE_CHECKING, Any

from banger_core import hookimpl

if TYPE_CHECKING:
    from pydantic import BaseModel

    from banger_workspace.repo import Plan

# The models (pydantic) are imported in the hooks that need them: `vm exec` loads this
# module on every call (this plugin adds flags to it), and most calls give none of them.

requires = ["agent", "workdisk"]


@hookimpl
def config_model() -> type[BaseModel]:
    from banger_workspace.settings import Settings

    return Settings


@hookimpl
def vm_options() -> type[BaseModel]:
    from banger_workspace.settings import VMOptions

    return VMOptions


@hookimpl
def exec_options() -> type[BaseModel]:
    from banger_workspace.settings import ExecOptions

    return ExecOptions


def resolved(settings: Any, options: Any) -> tuple[str, bool, bool]:
    """(mode, include_untracked, bootstrap): the VM's options, else the settings."""
    from banger_workspace.settings import Settings, VMOptions

    s = settings if isinstance(settings, Settings) else Settings()
    o = options if isinstance(options, VMOptions) else VMOptions()
    return (
        o.mode or s.mode,
        s.include_untracked if o.include_untracked is None else o.include_untracked,
        s.bootstrap if o.bootstrap is None else o.bootstrap,
    )


def guest_path(settings: Any) -> str:
    from banger_workspace.settings import Settings

    return (settings if isinstance(settings, Settings) else Settings()).guest_path


@hookimpl
def register_rpc_methods(register: Any) -> None:
    from banger_workspace import rpc

    register("workspace.prepare", rpc.prepare, params=rpc.PrepareParams)
    register("workspace.export", rpc.export, params=rpc.ExportParams, stream=True)


@hookimpl
def register_commands(app: Any, vm: Any) -> None:
    from banger_workspace.cli import add_commands

    add_commands(vm)


@hookimpl
def register_doctor_checks(register: Any) -> None:
    from banger_core.context import check_binaries

    register("tools", lambda _s: check_binaries("tools", "git", package="git"))


def summary(plan: "Plan", guest: str) -> list[str]:
    """What a prepare sends, in a few lines (the first says where from and to)."""
    head = f"{plan.branch or 'detached HEAD'} at {plan.head[:12]}"
    lines = [f"{plan.top} ({head}, {plan.mode}) -> {guest}: {len(plan.files)} files, {plan.size / 1e6:.1f} MB"]
    if plan.dirty:
        shown = ", ".join(plan.dirty[:5]) + (f" and {len(plan.dirty) - 5} more" if len(plan.dirty) > 5 else "")
        lines.append(f"{len(plan.dirty)} uncommitted host edit(s) arrive as uncommitted edits: {shown}")
    if plan.untracked and not plan.include_untracked:
        lines.append(f"{len(plan.untracked)} untracked file(s) left out (--include-untracked sends them)")
    elif plan.untracked:
        lines.append(f"{len(plan.untracked)} untracked file(s) sent")
    if plan.submodules:
        lines.append(f"submodule(s) left out in copy mode (--mode full_copy sends them): {', '.join(plan.submodules)}")
    return lines


@hookimpl
def before_exec(ctx: Any) -> None:
    from banger_core.errors import BangerError, ErrorCode
    from banger_workspace import ops, repo

    from banger_workspace.settings import ExecOptions

    mode, untracked, boot = resolved(ctx.settings, ctx.options)
    guest = guest_path(ctx.settings)
    if ctx.run:  # vm run PATH: the project's repository goes in before the command runs
        if not ctx.vm.project_dir:
            return
        try:
            plan = repo.inspect(ctx.vm.project_dir, mode, untracked)
        except repo.RepoError as exc:
            ctx.note(f"no workspace: {exc}")
            return
        if ctx.plan:
            for line in summary(plan, guest):
                ctx.note(("would copy " if line.startswith(plan.top) else "") + line)
            if plan.mise and boot and not ctx.egress():
                raise BangerError(
                    ErrorCode.BAD_REQUEST,
                    f"{plan.top}/{plan.mise} declares a toolchain, and installing it needs network egress, which this "
                    "VM would not have: give --nat (bridge network) or --network user, or --no-bootstrap",
                )
            return
        agent = ctx.service("agent")
        made = ops.prepare(agent, ctx.paths, ctx.vm, plan, guest)
        for line in summary(plan, guest):
            ctx.note(line)
        if ctx.request.cwd is None:
            ctx.request.cwd = posixpath.join(guest, plan.subdir) if plan.subdir else guest
        if plan.mise and boot:
            ctx.note(f"installing the toolchain {plan.mise} declares (mise install)")
            ctx.note(ops.bootstrap(agent, ctx.paths, ctx.vm, guest, plan.mise))
        ctx.log.info("VM %s: workspace prepared from %s at %s", ctx.vm.name, plan.top, made["head"])
        return
    if ctx.plan:
        return
    record = ops.load_record(ctx.paths, ctx.vm.id)
    wanted = ctx.exec_options if isinstance(ctx.exec_options, ExecOptions) else ExecOptions()
    if record is None:
        if wanted.auto_prepare:
            raise BangerError(
                ErrorCode.BAD_REQUEST,
                f"VM {ctx.vm.name} has no workspace to prepare again: banger vm workspace prepare {ctx.vm.name} PATH",
            )
        return
    if wanted.auto_prepare:  # as it was sent before, from where it came
        plan, _made = ops.prepare_from(
            ctx.service("agent"),
            ctx.paths,
            ctx.vm,
            record["top"],
            record.get("mode") or "copy",
            bool(record.get("include_untracked")),
            record["guest_path"],
            force=wanted.force,
            subdir=record.get("subdir") or "",
        )
        for line in summary(plan, record["guest_path"]):
            ctx.note(line)
    else:
        try:
            changed = repo.host_state(record["top"], bool(record.get("include_untracked"))) != record.get("host_state")
        except repo.RepoError as exc:
            ctx.warn(f"cannot tell whether {record['top']} changed since it was prepared: {exc}")
            changed = False
        if changed:
            ctx.warn(
                f"{record['top']} changed on the host since it was prepared into {ctx.vm.name} "
                f"(banger vm exec --auto-prepare {ctx.vm.name} -- ... copies it again)"
            )
    if ctx.request.cwd is None:
        sub = record.get("subdir") or ""
        ctx.request.cwd = posixpath.join(record["guest_path"], sub) if sub else record["guest_path"]


@hookimpl
def vm_resumed(ctx: Any, resumed: Any) -> None:
    """A VM restored from a snapshot holds the workspace its source had (on its own copy
    of the work disk): its record comes back from the copy's git dir."""
    from banger_workspace import ops

    if not resumed.new_identity or resumed.kind == "template":  # templates never hold a workspace
        return
    source = resumed.source_vm_id
    if resumed.kind == "fork" and source and os.path.isdir(ctx.paths.vm_dir(source)):
        # a fork is of its source as it is now: the source's record is the fork's, and
        # says whether there is a workspace at all, with no round trip into the guest
        record = ops.load_record(ctx.paths, source)
        if record is None:
            return
    else:
        try:
            agent = ctx.service("agent")
        except Exception:
            return
        if agent.health(ctx.vm.id) is None:
            return
        record = ops.read_markers(agent, ctx.paths, ctx.vm, guest_path(ctx.settings))
    if record is not None:
        ops.save_record(ctx.paths, ctx.vm.id, record)
        ctx.log.info("VM %s: holds the workspace of %s (%s)", ctx.vm.name, resumed.source_vm, record.get("head"))


@hookimpl
def vm_fields(ctx: Any, detail: bool) -> dict[str, object] | None:
    from banger_workspace import ops

    if not detail or ctx.paths is None:  # a FieldsContext made without paths (they are optional)
        return None
    record = ops.load_record(ctx.paths, ctx.vm.id)
    if record is None:
        return None
    return {
        "path": record.get("guest_path"),
        "from": record.get("top"),
        "head": record.get("head"),
        "branch": record.get("branch"),
        "mode": record.get("mode"),
        "files": record.get("files"),
        "prepared_at": record.get("prepared_at"),
        "exported_at": record.get("exported_at"),
    }
