"""The daemon's snapshot methods (``vm.snapshot``, ``vm.restore``, ``snapshot.*``),
registered by the built-in ``vm`` plugin."""

from __future__ import annotations

from typing import Any, Callable

from pydantic import Field, field_validator, model_validator

from banger_core.daemon.rpc import Call
from banger_core.daemon.work import run_blocking, run_simple
from banger_core.errors import BangerError, ErrorCode
from banger_core.models import Input, SnapshotKind, validate_vm_name
from banger_core.vm.params import CreateParams
from banger_core.vm.snapshots import fork_names


def _name(v: str | None) -> str | None:
    return validate_vm_name(v) if v is not None else None


def _snapshot_name(v: str | None) -> str | None:
    return validate_vm_name(v, "snapshot") if v is not None else None


class SnapshotParams(Input):
    ref: str = Field(description="the VM")
    name: str | None = Field(default=None, description="the snapshot's name (default VM-YYYYmmdd-HHMMSS)")
    stop: bool = Field(default=False, description="leave the VM stopped (its disk then is the snapshot's)")

    _check_name = field_validator("name")(_snapshot_name)


class RestoreParams(Input):
    snapshot: str
    name: str | None = None

    _check_name = field_validator("name")(_name)


class ForkParams(Input):
    ref: str = Field(description="the running (or paused) VM to fork")
    count: int = Field(default=1, ge=1, le=64, description="how many forks")
    name: str | None = Field(default=None, description="the forks' names are NAME-1..NAME-N (default: the VM's name)")

    @model_validator(mode="after")
    def _names(self) -> "ForkParams":
        if self.name is not None:  # refused before the VM is looked up (the default is checked by the fork)
            fork_names(self.name, self.count)
        return self


class SnapshotListParams(Input):
    kind: SnapshotKind | None = None


class SnapshotRefParams(Input):
    ref: str


class SnapshotDeleteParams(Input):
    refs: list[str] = Field(min_length=1)


class WarmParams(Input):
    image: str | None = Field(default=None, description="the image (default: the default image)")
    rm: bool = Field(default=False, description="remove the image's templates instead (all images': no image)")
    create: CreateParams = Field(default_factory=CreateParams, description="what a VM would be made with")


async def snapshot(p: SnapshotParams, call: Call) -> dict[str, Any]:
    vms = call.state.vms

    def take() -> dict[str, Any]:
        vm = vms.resolve(p.ref)
        snap = vms.snapshots.take(vm, p.name, call.op_id, stop=p.stop)
        return {"snapshot": vms.snapshots.show(snap), "vm": vms.show(vms.store.get_vm(vm.id))}

    out: dict[str, Any] = await run_simple(take)
    return out


async def restore(p: RestoreParams, call: Call) -> dict[str, Any]:
    vms = call.state.vms
    vm = await run_blocking(call, lambda prog, cancel: vms.snapshots.restore(p.snapshot, p.name, call.op_id, prog, cancel))
    return vms.show(vm)


async def fork(p: ForkParams, call: Call) -> dict[str, Any]:
    vms = call.state.vms

    def go(progress: Any, cancel: Any) -> list[Any]:
        return vms.snapshots.fork(vms.resolve(p.ref), p.count, p.name, call.op_id, progress, cancel)

    made = await run_blocking(call, go)
    return {"vms": [vms.show(v) for v in made]}


async def list_(p: SnapshotListParams, call: Call) -> dict[str, Any]:
    snaps = call.state.vms.snapshots
    return {"snapshots": await run_simple(snaps.listing, p.kind.value if p.kind else None)}


async def show(p: SnapshotRefParams, call: Call) -> dict[str, Any]:
    snaps = call.state.vms.snapshots
    out: dict[str, Any] = await run_simple(lambda: snaps.show(snaps.resolve(p.ref)))
    return out


async def delete(p: SnapshotDeleteParams, call: Call) -> dict[str, Any]:
    """Each ref on its own: one that cannot go (VMs stand on it) does not stop the rest."""
    snaps = call.state.vms.snapshots
    results: list[dict[str, Any]] = []
    for ref in p.refs:
        try:
            snap = await run_simple(snaps.resolve, ref)
            await run_simple(snaps.delete, snap)
            results.append({"ref": ref, "ok": True, "vm": {"name": snap.name, "state": "deleted"}})
        except BangerError as exc:
            exc.op_id = call.op_id
            results.append({"ref": ref, "ok": False, "error": exc.to_dict()})
    return {"results": results}


async def warm(p: WarmParams, call: Call) -> dict[str, Any]:
    """``image warm``: make the template a warm ``vm run`` of IMAGE would use (a VM is
    booted for it, then deleted), or with ``rm`` remove templates."""
    vms = call.state.vms
    if p.rm:
        if p.create.model_fields_set:
            raise BangerError(ErrorCode.BAD_REQUEST, "--rm takes only an image")
        removed, kept = await run_simple(vms.snapshots.remove_templates, p.image)
        return {"removed": removed, "kept": kept}
    from banger_core.vm.params import random_name

    params = p.create.model_copy(update={"image": p.image or p.create.image, "warm": True, "ephemeral": True})
    params.name = params.name or random_name()
    try:
        vm = await run_blocking(call, lambda prog, cancel: vms.create(params, call.op_id, prog, cancel))
        how = "existing" if vm.base_snapshot else "made"
        snap_id = vm.base_snapshot
    finally:
        for v in vms.store.find_vms(name=params.name):
            if v.ephemeral:
                await run_simple(vms.delete, v, call.op_id, True)
    if snap_id is None:
        made = [s for s in vms.store.list_snapshots(SnapshotKind.TEMPLATE.value) if s.vm_name == params.name]
        if not made:
            raise BangerError(ErrorCode.OPERATION_FAILED, "the VM booted but no template was made: see the daemon log")
        snap = made[0]
    else:
        snap = vms.store.find_snapshots(snap_id)[0]
    return {"template": vms.snapshots.show(snap), "how": how}


def register_vm(register: Callable[..., None]) -> None:
    """The vm built-in's: methods of a VM."""
    register("vm.snapshot", snapshot, SnapshotParams)
    register("vm.restore", restore, RestoreParams)
    register("vm.fork", fork, ForkParams)


def register(register: Callable[..., None]) -> None:
    """The snapshot built-in's."""
    register("snapshot.list", list_, SnapshotListParams)
    register("snapshot.show", show, SnapshotRefParams)
    register("snapshot.delete", delete, SnapshotDeleteParams)
    register("snapshot.warm", warm, WarmParams)
