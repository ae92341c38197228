"""``agent.exec`` (a streaming call: stdin in, stdout/stderr out, the exit status as its
result; optionally on a terminal), ``agent.cp`` (a tar stream either way),
``agent.ports`` and ``agent.health``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from banger_agent.terminal import TERM_RE
from banger_core import protocol
from banger_core.errors import BangerError, ErrorCode
from banger_core.models import fullmatching
from banger_guest import protocol as P


class HealthParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ref: str


class Terminal(BaseModel):
    """The client's terminal, for a command run on a pseudo-terminal in the guest."""

    model_config = ConfigDict(extra="forbid")
    rows: int = Field(default=24, gt=0, lt=65536)
    cols: int = Field(default=80, gt=0, lt=65536)
    term: Annotated[str, fullmatching(TERM_RE.pattern, "a TERM name (letters, digits, . _ + -)")] = "xterm-256color"


class ExecParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ref: str
    argv: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    user: str | None = None
    tty: Terminal | None = None
    #: plugins' ``vm exec`` options (plugin -> {field: value}; their ``exec_options``)
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)


class CpParams(BaseModel):
    """``in``: the client's STDIN is a tar stream (banger_guest.transfer) extracted at
    ``path`` in the guest; ``out``: ``path`` in the guest comes back as one on STDOUT."""

    model_config = ConfigDict(extra="forbid")
    ref: str
    direction: Literal["in", "out"]
    path: str = Field(min_length=1, max_length=4096)


class ConnectParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ref: str
    port: int = Field(gt=0, lt=65536, description="a TCP port in the guest (connected to on its 127.0.0.1)")


class PortsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ref: str
    probe: bool = Field(default=True, description="probe TCP listeners for https/http")


def _target(call: Any, ref: str) -> tuple[Any, Any]:
    """The running VM and its channel's socket; a clear refusal otherwise."""
    from banger_agent import socket_of
    from banger_core.models import VMState

    vm = call.state.vms.resolve(ref)
    if vm.state is VMState.PAUSED:
        raise BangerError(ErrorCode.BAD_REQUEST, f"VM {vm.name} is paused: resume it first (banger vm resume {vm.name})")
    if vm.state is not VMState.RUNNING:
        raise BangerError(ErrorCode.BAD_REQUEST, f"VM {vm.name} is {vm.state.value}: start it first (banger vm start {vm.name})")
    why = (vm.teardown or {}).get("agent", {}).get("no_agent")
    if why:
        raise BangerError(ErrorCode.BAD_REQUEST, f"VM {vm.name} has no agent: {why}")
    return vm, socket_of(call.state.paths, vm.id)


def _unavailable(vm: Any, exc: BaseException) -> BangerError:
    console = vm and f"; see the console log of {vm.name}"
    return BangerError(ErrorCode.OPERATION_FAILED, f"the agent of {vm.name} does not answer: {exc}{console}")


async def agent_health(p: HealthParams, call: Any) -> dict[str, Any]:
    from banger_agent import agents

    vm, sock = _target(call, p.ref)
    svc = agents()
    try:
        health: dict[str, Any] = await svc.relay(svc.call(vm.id, sock, {"op": "health"}, timeout=10))
    except Exception as exc:
        raise _unavailable(vm, exc) from None
    return {"vm": vm.name, **health}


async def agent_exec(p: ExecParams, call: Any) -> dict[str, Any]:
    """Run ``argv`` in the VM: the client's STDIN data goes to the command, its stdout and
    stderr come back on STDOUT/STDERR, a signal control reaches its process group; the
    result is ``{"exit_status": N}`` (128+N for signal N). The client going away kills
    the command's process group in the guest."""
    from banger_core.context import ExecRequest

    vm, sock = _target(call, p.ref)
    req = await before_exec(call, vm, ExecRequest(argv=p.argv, cwd=p.cwd, env=p.env, user=p.user), p.options)
    request = {"op": "exec", "argv": req.argv, "env": req.env, "cwd": req.cwd, "user": req.user}
    if p.tty is not None:
        request["tty"] = p.tty.model_dump()
    return await exec_session(call, vm, sock, request)


async def before_exec(call: Any, vm: Any, req: Any, options: dict[str, dict[str, Any]], run: bool = False) -> Any:
    """Every acting plugin's ``before_exec`` (in a worker thread: they may reach into
    the guest through this plugin's service); the request as they left it."""
    from banger_core.daemon.work import run_blocking

    await run_blocking(
        call, lambda progress, _cancel: call.state.vms.before_exec(vm, req, options, call.op_id, progress, run=run)
    )
    return req


async def agent_cp(p: CpParams, call: Any) -> dict[str, Any]:
    """Copy into or out of the guest: the tar stream is the call's STDIN (``in``) or
    STDOUT (``out``), passed through as it comes (memory stays flat)."""
    vm, sock = _target(call, p.ref)
    if p.direction == "in":
        return await exec_session(call, vm, sock, {"op": "cp_in", "dest": p.path})
    return await exec_session(call, vm, sock, {"op": "cp_out", "path": p.path})


async def agent_connect(p: ConnectParams, call: Any) -> dict[str, Any]:
    """A TCP connection to the guest's 127.0.0.1:PORT through the agent: the call's
    STDIN goes to it, what it sends comes back on STDOUT (an SSH ProxyCommand's
    transport, for VMs the host has no route to)."""
    vm, sock = _target(call, p.ref)
    return await exec_session(call, vm, sock, {"op": "tcp_connect", "port": p.port})


async def agent_ports(p: PortsParams, call: Any) -> dict[str, Any]:
    """The guest's listeners (the agent reads them from /proc and probes TCP ones), each
    with the endpoint the host reaches it at: the first plugin whose
    ``vm_port_endpoint`` answers, else ``guest:PORT``."""
    from banger_agent import agents
    from banger_core.models import Listener

    vm, sock = _target(call, p.ref)
    svc = agents()
    try:
        session = await svc.relay(svc.open(vm.id, sock, {"op": "ports", "probe": p.probe}))
    except Exception as exc:
        raise _unavailable(vm, exc) from None
    out, err = bytearray(), bytearray()
    try:
        while True:
            frame = await svc.relay(session.next())
            if frame.kind == P.STDOUT:
                out += frame.payload
            elif frame.kind == P.STDERR:
                err += frame.payload
            elif frame.kind in P.ENDS:
                break
    finally:
        await svc.relay(session.close())
    status = frame.obj().get("status") if frame.kind != P.RESULT else 0
    if frame.kind == P.ERROR or status:
        why = frame.obj().get("message") if frame.kind == P.ERROR else err.decode(errors="replace").strip()
        raise BangerError(ErrorCode.OPERATION_FAILED, f"the agent of {vm.name} could not list its ports: {why}")
    try:
        listeners = [Listener.model_validate(d) for d in json.loads(out)]
    except ValueError as exc:
        raise BangerError(ErrorCode.OPERATION_FAILED, f"the agent of {vm.name} sent a bad port list: {exc}") from None
    from banger_core.daemon.work import run_blocking

    endpoints = await run_blocking(call, lambda _progress, _cancel: call.state.vms.port_endpoints(vm, listeners))
    rows = [{**lst.model_dump(), "endpoint": ep, "via": via} for lst, (ep, via) in zip(listeners, endpoints, strict=True)]
    return {"vm": vm.name, "listeners": rows}


async def exec_session(call: Any, vm: Any, sock: Any, request: dict[str, Any]) -> dict[str, Any]:
    """One exec session bridged to the call's stream (agent.exec, agent.run)."""
    from banger_agent import agents

    svc = agents()
    try:
        session = await svc.relay(svc.open(vm.id, sock, request))
    except Exception as exc:
        raise _unavailable(vm, exc) from None
    stream = call.stream

    async def client_to_guest() -> None:
        while (frame := await stream.read()) is not None:
            if frame.kind == protocol.DATA and frame.channel == protocol.STDIN:
                await svc.relay(session.stdin(frame.data))
            elif frame.kind == protocol.END and frame.channel == protocol.STDIN:
                await svc.relay(session.stdin_eof())
            elif frame.kind == protocol.CONTROL and frame.obj.get("type") == "resize":
                rows, cols = frame.obj.get("rows"), frame.obj.get("cols")
                if isinstance(rows, int) and isinstance(cols, int):
                    await svc.relay(session.resize(rows, cols))
            elif frame.kind == protocol.CONTROL and frame.obj.get("type") == "signal":
                try:
                    number = signal.Signals[f"SIG{frame.obj.get('name')}"].value
                except KeyError:
                    continue
                await svc.relay(session.signal(number))

    feeder = asyncio.get_running_loop().create_task(client_to_guest())
    finished = False
    try:
        while True:
            frame = await svc.relay(session.next())
            if frame.kind == P.STDOUT:
                await stream.write(protocol.STDOUT, frame.payload)
            elif frame.kind == P.STDERR:
                await stream.write(protocol.STDERR, frame.payload)
            elif frame.kind == P.EXIT:
                finished = True
                return {"exit_status": int(frame.obj().get("status", 255))}
            elif frame.kind == P.ERROR:
                finished = True
                err = frame.obj()
                await stream.write(protocol.STDERR, f"banger: {err.get('message')}\n".encode())
                return {"exit_status": int(err.get("status", 255)), "error": err.get("message")}
    except Exception as exc:
        from banger_agent.channel import ChannelClosed

        if isinstance(exc, ChannelClosed):
            raise BangerError(ErrorCode.OPERATION_FAILED, f"the agent channel of {vm.name} closed: {exc}") from None
        raise
    finally:
        feeder.cancel()
        with contextlib.suppress(BaseException):
            await feeder
        if not finished:  # the client went away (or the call failed): kill the command
            with contextlib.suppress(Exception):
                await svc.relay(session.close())
