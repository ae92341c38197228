"""``workspace.prepare`` and ``workspace.export`` (a streaming call: the patch is its
STDOUT, the changed files its result)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from banger_core.errors import BangerError, ErrorCode

SHA_PATTERN = r"^[0-9a-fA-F]{4,64}$"


class PrepareParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ref: str
    path: str = Field(min_length=1, max_length=4096, description="a directory in a git work tree on this host")
    mode: Literal["copy", "full_copy"] | None = None
    include_untracked: bool | None = None
    force: bool = Field(default=False, description="replace a workspace holding changes not exported yet")


class ExportParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ref: str
    base_commit: str | None = Field(default=None, pattern=SHA_PATTERN, description="diff against this commit (default HEAD)")


def _running(call: Any, ref: str) -> Any:
    from banger_core.models import VMState

    vm = call.state.vms.resolve(ref)
    if vm.state is not VMState.RUNNING:
        raise BangerError(ErrorCode.BAD_REQUEST, f"VM {vm.name} is {vm.state.value}: start it first (banger vm start {vm.name})")
    return vm


def _lifecycle_view(call: Any, vm: Any) -> tuple[Any, Any]:
    """This plugin's settings and options for the VM (its project's banger.toml applies)."""
    fields = call.state.vms.fields_context(vm, "workspace")
    if fields is None:
        raise BangerError(ErrorCode.BAD_REQUEST, f"the workspace plugin does not act on {vm.name} (see banger plugins resolve)")
    return fields.settings, fields.options


async def prepare(p: PrepareParams, call: Any) -> dict[str, Any]:
    from banger_core.daemon.work import run_blocking
    from banger_workspace import guest_path, ops, resolved, summary

    vm = _running(call, p.ref)
    settings, options = _lifecycle_view(call, vm)
    mode, untracked, _boot = resolved(settings, options)
    mode = p.mode or mode
    untracked = untracked if p.include_untracked is None else p.include_untracked

    def work(progress: Any, _cancel: Any) -> dict[str, Any]:
        agent = call.state.service("agent")
        plan, record = ops.prepare_from(agent, call.state.paths, vm, p.path, mode, untracked, guest_path(settings), force=p.force)
        return {"vm": vm.name, **record, "summary": summary(plan, record["guest_path"]), "dirty_files": plan.dirty}

    return await run_blocking(call, work)


async def export(p: ExportParams, call: Any) -> dict[str, Any]:
    from banger_core import protocol
    from banger_core.daemon.work import run_blocking
    from banger_workspace import guest_path, ops

    vm = _running(call, p.ref)
    settings, _options = _lifecycle_view(call, vm)
    record = ops.load_record(call.state.paths, vm.id)
    where = record["guest_path"] if record else guest_path(settings)
    base = (p.base_commit or "HEAD").lower() if p.base_commit else "HEAD"

    def work(_progress: Any, _cancel: Any) -> tuple[dict[str, Any], bytes]:
        got, patch = ops.export(call.state.service("agent"), call.state.paths, vm, where, base)
        if record is not None:
            record.update(exported=[got["head"], got["tree"]], exported_at=ops.now())
            ops.save_record(call.state.paths, vm.id, record)
        return got, patch

    got, patch = await run_blocking(call, work)
    await call.stream.write(protocol.STDOUT, patch)
    return {"vm": vm.name, "path": where, "base": base, "bytes": len(patch), **got}
