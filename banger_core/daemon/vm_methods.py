"""The daemon's ``vm.*`` methods, registered by the built-in ``vm`` plugin."""

from __future__ import annotations

import asyncio
import signal as signals
from pathlib import Path
from typing import Any, Callable

from pydantic import Field, field_validator, model_validator

from banger_core import protocol
from banger_core.daemon.rpc import Call, NoParams
from banger_core.daemon.work import fan_out, run_blocking, run_simple
from banger_core.errors import BangerError, ErrorCode
from banger_core.models import VM, Input
from banger_core.vm.params import CreateParams, SetParams


class RefsParams(Input):
    refs: list[str] = Field(min_length=1)
    force: bool = False


class StopParams(RefsParams):
    suspend: bool = Field(default=False, description="write the guest's memory and devices to disk; `vm start` resumes it")

    @model_validator(mode="after")
    def _one_way(self) -> "StopParams":
        if self.suspend and self.force:
            raise ValueError("--suspend and --force exclude each other: a suspend keeps the guest's state, --force drops it")
        return self


class VMsParams(Input):
    refs: list[str] = Field(min_length=1)


class KillParams(Input):
    refs: list[str] = Field(min_length=1)
    signal: str = "KILL"

    @field_validator("signal")
    @classmethod
    def _sig(cls, v: str) -> str:
        name = v.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        if name not in signals.Signals.__members__:
            raise ValueError(f"unknown signal {v!r}")
        return name


class RefParams(Input):
    ref: str


class LogsParams(Input):
    ref: str
    lines: int = Field(default=200, ge=0)


#: how often a followed console log is checked for new output
FOLLOW_INTERVAL = 0.2


async def create(p: CreateParams, call: Call) -> dict[str, Any]:
    vms = call.state.vms
    vm = await run_blocking(call, lambda prog, cancel: vms.create(p, call.op_id, prog, cancel))
    return vms.show(vm)


async def _boot_each(call: Call, refs: list[str], boot: Callable[..., VM]) -> dict[str, Any]:
    """``boot(vm, op_id, progress, cancel)`` (start or restart) for each VM the refs name."""
    vms = call.state.vms

    async def op(vm: VM) -> dict[str, Any]:
        done = await run_blocking(call, lambda prog, cancel: boot(vm, call.op_id, prog, cancel))
        return vms.show(done)

    return await fan_out(call, refs, op)


async def start(p: RefsParams, call: Call) -> dict[str, Any]:
    return await _boot_each(call, p.refs, call.state.vms.start)


async def restart(p: RefsParams, call: Call) -> dict[str, Any]:
    return await _boot_each(call, p.refs, call.state.vms.restart)


async def stop(p: StopParams, call: Call) -> dict[str, Any]:
    vms = call.state.vms

    async def op(vm: VM) -> dict[str, Any]:
        return vms.show(await run_simple(vms.stop, vm, call.op_id, p.force, p.suspend))

    return await fan_out(call, p.refs, op)


async def pause(p: VMsParams, call: Call) -> dict[str, Any]:
    vms = call.state.vms

    async def op(vm: VM) -> dict[str, Any]:
        return vms.show(await run_simple(vms.pause, vm, call.op_id))

    return await fan_out(call, p.refs, op)


async def resume(p: VMsParams, call: Call) -> dict[str, Any]:
    vms = call.state.vms

    async def op(vm: VM) -> dict[str, Any]:
        return vms.show(await run_simple(vms.resume, vm, call.op_id))

    return await fan_out(call, p.refs, op)


async def kill(p: KillParams, call: Call) -> dict[str, Any]:
    vms = call.state.vms
    sig = int(signals.Signals[p.signal])

    async def op(vm: VM) -> dict[str, Any]:
        return vms.show(await run_simple(vms.kill, vm, call.op_id, sig))

    return await fan_out(call, p.refs, op)


async def delete(p: RefsParams, call: Call) -> dict[str, Any]:
    vms = call.state.vms

    async def op(vm: VM) -> dict[str, Any]:
        gone = await run_simple(vms.delete, vm, call.op_id, p.force)
        return {"id": gone.id, "name": gone.name, "state": "deleted"}

    return await fan_out(call, p.refs, op)


async def prune(_p: NoParams, call: Call) -> dict[str, Any]:
    gone = await run_simple(call.state.vms.prune, call.op_id)
    return {"deleted": [{"id": v.id, "name": v.name} for v in gone]}


async def set_(p: SetParams, call: Call) -> dict[str, Any]:
    vms = call.state.vms
    if not p.options and all(v is None for k, v in p.model_dump().items() if k not in ("refs", "options")):
        raise BangerError(ErrorCode.BAD_REQUEST, "nothing to set: give vcpus, memory_mib, root_size_mib or plugin options")

    async def op(vm: VM) -> dict[str, Any]:
        notes: list[str] = []
        shown = vms.show(await run_simple(vms.set, vm, p, call.op_id, notes))
        return {**shown, "notes": notes} if notes else shown

    return await fan_out(call, p.refs, op)


async def list_(_p: NoParams, call: Call) -> dict[str, Any]:
    return {"vms": await run_simple(call.state.vms.list)}


async def show(p: RefParams, call: Call) -> dict[str, Any]:
    vms = call.state.vms
    shown: dict[str, Any] = await run_simple(lambda: vms.show(vms.resolve(p.ref)))
    return shown


async def logs(p: LogsParams, call: Call) -> dict[str, Any]:
    vms = call.state.vms

    def read() -> dict[str, Any]:
        vm = vms.resolve(p.ref)
        path = vms.console_log(vm)
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        lines = text.splitlines()[-p.lines :] if p.lines else text.splitlines()
        return {"vm": vm.name, "path": str(path), "text": "\n".join(lines)}

    out: dict[str, Any] = await run_simple(read)
    return out


def _tail(path: Path, lines: int) -> tuple[bytes, int]:
    """The last ``lines`` lines of ``path`` (0: all), and the offset after them."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return b"", 0
    if lines:
        data = b"".join(data.splitlines(keepends=True)[-lines:])
    return data, path.stat().st_size if path.exists() else 0


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read(protocol.MAX_CHUNK)
    except FileNotFoundError:
        return b""


async def follow(p: LogsParams, call: Call) -> dict[str, Any]:
    """Stream the console log: its last lines, then new output as it comes (STDOUT),
    until the VM is no longer running (all its output sent) or the client leaves."""
    assert call.stream is not None
    vms = call.state.vms
    vm = await run_simple(vms.resolve, p.ref)
    path = vms.console_log(vm)
    data, offset = await run_simple(_tail, path, p.lines)
    if data:
        await call.stream.write(protocol.STDOUT, data)
    while True:
        chunk = await run_simple(_read_from, path, offset)
        if chunk:
            offset += len(chunk)
            await call.stream.write(protocol.STDOUT, chunk)
            continue
        current = await run_simple(lambda: vms.refresh(vms.store.get_vm(vm.id)))
        if not current.state.live:
            rest = await run_simple(_read_from, path, offset)  # written before it stopped
            if not rest:
                break
            offset += len(rest)
            await call.stream.write(protocol.STDOUT, rest)
            continue
        await asyncio.sleep(FOLLOW_INTERVAL)
    await call.stream.end(protocol.STDOUT)
    return {"vm": vm.name, "state": current.state.value}


def register(register: Callable[..., None]) -> None:
    register("vm.create", create, CreateParams)
    register("vm.start", start, RefsParams)
    register("vm.restart", restart, RefsParams)
    register("vm.stop", stop, StopParams)
    register("vm.kill", kill, KillParams)
    register("vm.pause", pause, VMsParams)
    register("vm.resume", resume, VMsParams)
    register("vm.delete", delete, RefsParams)
    register("vm.prune", prune, NoParams)
    register("vm.set", set_, SetParams)
    register("vm.list", list_, NoParams)
    register("vm.show", show, RefParams)
    register("vm.logs", logs, LogsParams)
    register("vm.follow", follow, LogsParams, stream=True)
