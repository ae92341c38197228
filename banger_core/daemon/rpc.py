"""RPC method registry and the per-request call object handed to handlers."""

from __future__ import annotations

import asyncio
import inspect
import logging
import select
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from pydantic import BaseModel, ValidationError

from banger_core import protocol
from banger_core.errors import BangerError, ErrorCode
from banger_core.logs import clip
from banger_core.models import Input, validate_input

if TYPE_CHECKING:  # pragma: no cover
    from banger_core.daemon.state import DaemonState

log = logging.getLogger("banger.rpc")

Handler = Callable[[Any, "Call"], Awaitable[Any] | Any]

#: validation problems named in one bad_request (a request may have thousands)
MAX_PROBLEMS = 10


class NoParams(Input):
    """The params of a method that takes none: ``{}`` only."""


@dataclass
class Method:
    name: str
    handler: Handler
    params: type[BaseModel] | None
    owner: str  # "core" or a plugin name
    stream: bool = False  # binary frames both ways after the request (Call.stream)


@dataclass
class Call:
    """One request in flight: its op id, a logger that stamps it, and ``emit``."""

    op_id: str
    method: str
    peer_uid: int
    _send: Callable[[bytes], Awaitable[None]]
    #: the daemon's Runtime (paths, config, plugin host) and Store (also on ``state``)
    runtime: Any = None
    store: Any = None
    #: the daemon's state, typed: paths, runtime, store, vms, puller, registry (set by
    #: the daemon for every request; see banger_core.daemon.state)
    state: "DaemonState" = None  # type: ignore[assignment]
    #: the binary frames of a method registered with ``stream=True``; None otherwise
    stream: Stream | None = None
    log: logging.LoggerAdapter[logging.Logger] = field(init=False)

    def __post_init__(self) -> None:
        self.log = logging.LoggerAdapter(logging.getLogger("banger.rpc"), {"op_id": self.op_id})

    async def emit(self, payload: dict[str, Any]) -> None:
        """Stream a progress event to the client."""
        if self.stream is not None:  # an EVENT frame: the connection carries frames now
            await self.stream.send_frame(protocol.json_frame(protocol.EVENT, protocol.event(self.op_id, payload)))
            return
        await self._send(protocol.encode(protocol.event(self.op_id, payload)))


class Registry:
    def __init__(self) -> None:
        self.methods: dict[str, Method] = {}

    def register(
        self,
        name: str,
        handler: Handler,
        params: type[BaseModel] | None = None,
        *,
        owner: str = "core",
        stream: bool = False,
    ) -> None:
        if owner != "core" and not name.startswith(f"{owner}."):
            raise BangerError(ErrorCode.PLUGIN, f"plugin {owner!r} may only register methods named '{owner}.*', not {name!r}")
        if name in self.methods:
            raise BangerError(ErrorCode.PLUGIN, f"RPC method {name!r} registered by both {self.methods[name].owner} and {owner}")
        if stream and not inspect.iscoroutinefunction(handler):
            raise BangerError(ErrorCode.PLUGIN, f"streaming method {name!r} needs an async handler")
        self.methods[name] = Method(name, handler, params, owner, stream)

    def drop_owner(self, owner: str) -> None:
        for name in [n for n, m in self.methods.items() if m.owner == owner]:
            del self.methods[name]

    def for_plugin(self, plugin: str) -> Callable[..., None]:
        def register(name: str, handler: Handler, params: type[BaseModel] | None = None, *, stream: bool = False) -> None:
            self.register(name, handler, params, owner=plugin, stream=stream)

        return register

    def lookup(self, method_name: str, *, stream: bool) -> Method:
        """The method a request names; a typed error if there is none, or if the request
        asks for frames (``"stream": true``) and the method is not a streaming one or
        the other way round."""
        method = self.methods.get(method_name)
        if method is None:
            raise BangerError(
                ErrorCode.UNKNOWN_METHOD,
                f"unknown method {clip(method_name, 200)!r}",
                details={"known": sorted(self.methods)},
            )
        if method.stream and not stream:
            raise BangerError(
                ErrorCode.BAD_REQUEST, f'{method_name} is a streaming method: request it with "stream": true (open_stream)'
            )
        if stream and not method.stream:
            raise BangerError(ErrorCode.BAD_REQUEST, f'{method_name} is not a streaming method: request it without "stream"')
        return method

    async def dispatch(self, method_name: str, raw_params: Any, call: Call) -> Any:
        method = self.lookup(method_name, stream=call.stream is not None)
        if not isinstance(raw_params, dict):
            raise BangerError(ErrorCode.BAD_REQUEST, "params must be a JSON object")
        params: Any = raw_params
        if method.params is not None:
            errors = None
            try:
                params = validate_input(method.params, raw_params)
            except ValidationError as exc:
                errors = exc.errors(include_url=False, include_input=False)
            if errors is not None:  # raised here, not chained to what holds the input
                problems = "; ".join(
                    f"{clip('.'.join(str(p) for p in e['loc']), 100) or 'params'}: {clip(e['msg'], 300)}"
                    for e in errors[:MAX_PROBLEMS]
                )
                if len(errors) > MAX_PROBLEMS:
                    problems += f"; and {len(errors) - MAX_PROBLEMS} more"
                raise BangerError(ErrorCode.BAD_REQUEST, f"{method_name}: invalid params: {problems}")
        if inspect.iscoroutinefunction(method.handler):
            value = await method.handler(params, call)
        else:
            value = await asyncio.to_thread(method.handler, params, call)
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        return value


#: client frames read ahead of a streaming handler (each at most protocol.MAX_CHUNK)
STREAM_QUEUE = 2
#: how often a stalled stream (its handler not reading) checks that the client is still there
HANGUP_POLL = 0.5


class Stream:
    """The binary side of a streaming call (``call.stream``).

    ``await read()`` is the client's next frame, a ``protocol.Frame``: ``DATA`` (bytes on
    a channel), ``END`` (that channel is closed; others stay open) or ``CONTROL`` (a
    JSON object in ``frame.obj``), in the order sent; None once the client has gone.
    The client going (closing or resetting the socket, not an END frame) cancels the
    handler: a ``read()`` waiting then raises ``CancelledError``, so cleanup belongs
    in ``except``/``finally``. ``await write(channel, data)`` and
    ``await end(channel)`` send; they wait while the client is slow to read. Frames are
    read ahead only ``STREAM_QUEUE`` at a time: a handler that stops reading stops the
    client's writes, so memory stays flat whatever flows through.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The reader buffers up to twice its limit before it stops reading the socket;
        # that limit (MAX_REQUEST) bounds the request line, read by now. Frames need
        # only MAX_CHUNK: 2 MiB read ahead per stream would be most of its memory.
        # (StreamReader has no public setter; without the attribute the bound stays.)
        if hasattr(reader, "_limit"):
            reader._limit = protocol.MAX_CHUNK
        self._reader = reader
        self._writer = writer
        self._queue: asyncio.Queue[protocol.Frame] = asyncio.Queue(STREAM_QUEUE)
        self._gone = False
        #: the typed error for a frame the client may not send, once pump() has returned
        self.violation: BangerError | None = None
        self.bytes_in = 0
        self.bytes_out = 0

    async def read(self) -> protocol.Frame | None:
        if self._gone and self._queue.empty():
            return None
        frame = await self._queue.get()
        if frame.kind == protocol.DATA:
            self.bytes_in += len(frame.data)
        return frame

    async def write(self, channel: int, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` on ``channel`` (split into frames of at most ``MAX_CHUNK``)."""
        for f in protocol.data_frames(channel, data):
            self.bytes_out += len(f) - protocol.HEADER.size
            await self.send_frame(f)

    async def end(self, channel: int) -> None:
        """Close ``channel`` towards the client (it reads an END frame)."""
        await self.send_frame(protocol.frame(protocol.END, channel))

    async def send_frame(self, encoded: bytes) -> None:
        self._writer.write(encoded)
        await self._writer.drain()

    async def pump(self) -> None:
        """Read the client's frames into the queue until EOF or a reset (the client has
        gone) or a frame it may not send (``violation`` is set). The daemon runs this
        beside the handler, in place of the EOF watch of ordinary methods."""
        try:
            while True:
                header = await self._reader.readexactly(protocol.HEADER.size)
                try:
                    kind, channel, length = protocol.parse_header(header, from_client=True)
                    data = await self._reader.readexactly(length) if length else b""
                    frame = protocol.decode_frame(kind, channel, data)
                except ValueError as exc:
                    self.violation = BangerError(ErrorCode.BAD_REQUEST, f"bad frame: {exc}")
                    return
                await self._put(frame)
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # EOF, within a frame or not: the client has gone
        finally:
            # A read() waiting now is not woken: the daemon cancels the handler instead,
            # so its cleanup runs as a cancellation rather than as a normal end.
            self._gone = True

    async def _put(self, frame: protocol.Frame) -> None:
        try:
            self._queue.put_nowait(frame)
            return
        except asyncio.QueueFull:
            pass
        # The handler is not reading: wait (backpressure), but notice the client leaving,
        # which reading the socket cannot show now.
        put = asyncio.ensure_future(self._queue.put(frame))
        try:
            while not put.done():
                await asyncio.wait({put}, timeout=HANGUP_POLL)
                if not put.done() and self._hung_up():
                    raise ConnectionResetError("the client hung up")
        finally:
            put.cancel()

    def _hung_up(self) -> bool:
        sock = self._writer.get_extra_info("socket")
        if sock is None:
            return True
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLRDHUP)
        return any(ev & (select.POLLHUP | select.POLLRDHUP | select.POLLERR) for _, ev in poller.poll(0))
