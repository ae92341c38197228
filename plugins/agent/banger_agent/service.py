"""The daemon side of every VM's agent: one channel per VM, owned here.

The channels live on an event loop of their own (a daemon thread), so the VM lifecycle
hooks (which run in worker threads) and the RPC handlers (on the daemon's loop) reach
them the same way: ``run(coro)`` from a thread, ``await relay(coro)`` from a loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from banger_agent.channel import AgentMismatch, Channel, ChannelClosed, Opener, Session, unix_opener, vsock_opener
from banger_guest import protocol as P

T = TypeVar("T")
log = logging.getLogger("banger.plugin.agent")


class Watch:
    """A session kept open to a VM's agent (``AgentService.watch``)."""

    def __init__(self, service: "AgentService", vm_id: str, what: str) -> None:
        self.service, self.vm_id, self.what = service, vm_id, what
        self.task: asyncio.Task[None] | None = None
        self.lines = 0  # JSON lines delivered
        self.sessions = 0  # sessions opened (more than one: the channel dropped and it was reopened)
        self.last_error: str | None = None
        self.cancelled = False

    def cancel(self) -> None:
        """Stop watching (the agent kills the op's process); from any thread, idempotent."""
        self.cancelled = True
        task = self.task
        if task is not None:
            self.service.loop.call_soon_threadsafe(task.cancel)


class _StdinWriter(io.RawIOBase):
    """A writable file whose bytes go to a session's STDIN (``AgentService.send``),
    from a thread; once the op has ended, a write is a BrokenPipeError."""

    def __init__(self, service: "AgentService", session: Session, ended: "concurrent.futures.Future[Any]", timeout: float):
        self.service, self.session, self.ended, self.timeout = service, session, ended, timeout

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        if self.ended.done():
            raise BrokenPipeError("the op ended in the VM")
        data = bytes(b)
        self.service.run(self.session.stdin(data), self.timeout)
        return len(data)


class AgentUnavailable(RuntimeError):
    """No agent answered (not yet, or not at all)."""


def opener_for(socket: Path) -> Opener:
    """How to reach the agent behind ``socket``: a ``.vsock`` path is a Firecracker VM's
    vsock socket (the hybrid handshake to the agent's port first), any other QEMU's
    virtio-serial chardev."""
    if socket.suffix == ".vsock":
        return vsock_opener(str(socket))
    return unix_opener(str(socket))


class TcpProxy:
    """A host port whose connections go to a guest port through the agent
    (``AgentService.listen_tcp``)."""

    def __init__(self, service: "AgentService", server: asyncio.base_events.Server, port: int) -> None:
        self.service, self.server, self.port = service, server, port
        self.connections = 0

    def close(self) -> None:
        """Stop accepting (connections under way go on until either side closes);
        from any thread, idempotent."""
        self.service.loop.call_soon_threadsafe(self.server.close)


class AgentService:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="agent-io", daemon=True)
        self._thread.start()
        self.channels: dict[str, Channel] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.healths: dict[str, dict[str, Any]] = {}  # vm id -> the health its agent answered at start

    # --- crossing threads and loops --------------------------------------------------
    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """From a thread: run ``coro`` on the agent loop and wait for it."""
        return self.submit(coro).result(timeout)

    async def relay(self, coro: Coroutine[Any, Any, T]) -> T:
        """From another loop (an RPC handler): await ``coro`` run on the agent loop."""
        return await asyncio.wrap_future(self.submit(coro))

    # --- channels (on the agent loop) ---------------------------------------------------
    async def channel(self, vm_id: str, socket: Path, timeout: float) -> Channel:
        lock = self._locks.setdefault(vm_id, asyncio.Lock())
        async with lock:
            ch = self.channels.get(vm_id)
            if ch is not None and not ch.closed:
                return ch
            ch = await Channel.connect(opener_for(socket), timeout)
            self.channels[vm_id] = ch
            return ch

    async def open(self, vm_id: str, socket: Path, request: dict[str, Any], timeout: float = 10) -> Session:
        ch = await self.channel(vm_id, socket, timeout)
        return await ch.open(request)

    async def call(self, vm_id: str, socket: Path, request: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        ch = await self.channel(vm_id, socket, timeout)
        return await ch.call(request, timeout)

    async def _drop(self, vm_id: str) -> None:
        ch = self.channels.pop(vm_id, None)
        if ch is not None:
            await ch.close()

    def drop(self, vm_id: str) -> None:
        """From a thread: close the VM's channel (its sessions end)."""
        try:
            self.run(self._drop(vm_id), timeout=10)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass

    # --- for other plugins (ctx.service("agent"), see api.py) ---------------------------
    def health(self, vm_id: str) -> dict[str, Any] | None:
        """The health the VM's agent answered when it (re)started, or None."""
        return self.healths.get(vm_id)

    def request(self, paths: Any, vm_id: str, request: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        """From a thread (a lifecycle hook): one op's RESULT from the VM's agent; the
        agent's ERROR raises RuntimeError (its message), no answer in time a TimeoutError."""
        from banger_agent import socket_of

        return self.run(self.call(vm_id, socket_of(paths, vm_id), request, timeout=timeout), timeout=timeout + 5)

    def send(
        self,
        paths: Any,
        vm_id: str,
        request: dict[str, Any],
        write: Callable[[BinaryIO], None] | None,
        timeout: float = 60,
        stdout: Callable[[bytes], None] | None = None,
    ) -> tuple[int, str]:
        """From a thread: ``write(out)`` into the STDIN of a session of ``request`` (an op
        that reads it, e.g. ``cp_in``; None: no input), its STDOUT to ``stdout`` as it
        comes, then the op's (exit status, why); see api.py."""
        from banger_agent import socket_of

        session = self.run(self.open(vm_id, socket_of(paths, vm_id), request, timeout=min(timeout, 10)), timeout + 5)
        ended = self.submit(self._outcome(session, stdout))  # read as it comes: an early end stops the writes
        try:
            try:
                if write is not None:
                    with io.BufferedWriter(_StdinWriter(self, session, ended, timeout), P.MAX_PAYLOAD) as out:
                        write(out)
            except BrokenPipeError:
                pass  # the op ended before its input did: its outcome says why
            except BaseException:
                # the input is incomplete: the op is asked to stop first (a cp_in then
                # removes what it staged), killed below if it does not end at once
                with contextlib.suppress(Exception):
                    self.run(session.signal(signal.SIGTERM), 5)
                    ended.result(5)
                raise
            if not ended.done():
                self.run(session.stdin_eof(), timeout)
            return ended.result(timeout)
        finally:
            if not ended.done():  # write failed, or no end in time: kill the op, forget the session
                ended.cancel()
                with contextlib.suppress(Exception):
                    self.run(session.close(), 10)

    async def _outcome(self, session: Session, stdout: Callable[[bytes], None] | None = None) -> tuple[int, str]:
        """How a session ends: (exit status, its STDERR text or the agent's message);
        its STDOUT to ``stdout`` (dropped when None)."""
        err = bytearray()
        async for frame in session.events():
            if frame.kind == P.STDERR:
                err += frame.payload
            elif frame.kind == P.STDOUT and stdout is not None:
                stdout(frame.payload)
            elif frame.kind == P.EXIT:
                return int(frame.obj().get("status", 255)), err.decode(errors="replace").strip()
            elif frame.kind == P.ERROR:
                return int(frame.obj().get("status") or 1), str(frame.obj().get("message"))
            elif frame.kind == P.RESULT:
                return 0, err.decode(errors="replace").strip()
        raise ChannelClosed("the session ended without an outcome")  # pragma: no cover

    def watch(
        self, paths: Any, vm_id: str, request: dict[str, Any], on_line: Callable[[Any], None], retry_max: float = 5.0
    ) -> Watch:
        """From any thread: keep a session of ``request`` open to the VM's agent and
        call ``on_line(obj)`` for each JSON line the op writes on its STDOUT, on the
        agent's event-loop thread (be quick: hand work to a thread of your own). When
        the session or the channel ends (the agent restarted, the daemon reconnected)
        it is opened again, after a back-off of 0.5 s doubling up to ``retry_max``, until
        ``cancel()``."""
        from banger_agent import socket_of

        w = Watch(self, vm_id, str(request.get("op")))

        def start() -> None:
            w.task = self.loop.create_task(self._watch(w, lambda: socket_of(paths, vm_id), request, on_line, retry_max))
            if w.cancelled:
                w.task.cancel()

        self.loop.call_soon_threadsafe(start)
        return w

    async def _watch(
        self, w: Watch, socket: Callable[[], Path], request: dict[str, Any], on_line: Callable[[Any], None], retry_max: float
    ) -> None:
        backoff = 0.5
        while not w.cancelled:
            session: Session | None = None
            try:
                session = await self.open(w.vm_id, socket(), request, timeout=10)
                w.sessions += 1
                buf = b""
                async for frame in session.events():
                    if frame.kind == P.STDOUT:
                        buf += frame.payload
                        *lines, buf = buf.split(b"\n")
                        for line in lines:
                            w.lines += 1
                            backoff = 0.5
                            try:
                                on_line(json.loads(line))
                            except Exception as exc:  # the consumer's problem: say so, keep watching
                                log.warning("VM %s: %s consumer failed: %s", w.vm_id, w.what, exc)
                    elif frame.kind in P.ENDS:
                        why = frame.obj().get("message") or frame.obj().get("status")
                        w.last_error = f"the agent ended {w.what}: {why}"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                w.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            finally:
                if session is not None:
                    with contextlib.suppress(Exception):
                        await session.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, retry_max)

    def listen_tcp(self, paths: Any, vm_id: str, guest_port: int, host_port: int = 0, host: str = "127.0.0.1") -> TcpProxy:
        """From a thread: listen on ``host:host_port`` (0: an ephemeral port; OSError
        when taken) and relay each connection to the guest's 127.0.0.1:``guest_port``
        through the agent (its ``tcp_connect`` op): a listener bound to the guest's
        loopback, which nothing outside the guest reaches otherwise."""
        from banger_agent import socket_of

        proxy: TcpProxy | None = None

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            assert proxy is not None
            proxy.connections += 1
            session: Session | None = None
            up: asyncio.Task[None] | None = None
            try:
                session = await self.open(vm_id, socket_of(paths, vm_id), {"op": "tcp_connect", "port": guest_port}, timeout=10)

                async def to_guest(s: Session) -> None:
                    while data := await reader.read(P.MAX_PAYLOAD):
                        await s.stdin(data)
                    await s.stdin_eof()

                up = asyncio.get_running_loop().create_task(to_guest(session))
                async for frame in session.events():
                    if frame.kind == P.STDOUT:
                        writer.write(frame.payload)
                        await writer.drain()
            except Exception as exc:  # the guest refused, the channel went, the client went: this connection ends
                log.debug("VM %s: relay to guest port %d ended: %s", vm_id, guest_port, exc)
            finally:
                if up is not None:
                    up.cancel()
                if session is not None:
                    with contextlib.suppress(Exception):
                        await session.close()
                writer.close()

        async def start() -> TcpProxy:
            nonlocal proxy
            server = await asyncio.start_server(handle, host, host_port)
            proxy = TcpProxy(self, server, int(server.sockets[0].getsockname()[1]))
            return proxy

        return self.run(start(), timeout=10)

    def probe_tcp(self, paths: Any, vm_id: str, port: int, timeout: float = 5) -> bytes:
        """From a thread: what the guest's 127.0.0.1:``port`` sends first after a
        connection (through the agent; b"" when it sends nothing in ``timeout``).
        RuntimeError (the agent's reason) when nothing listens there."""
        from banger_agent import socket_of

        async def probe() -> bytes:
            s = await self.open(vm_id, socket_of(paths, vm_id), {"op": "tcp_connect", "port": port}, timeout=timeout)
            try:
                async for frame in s.events():
                    if frame.kind == P.STDOUT:
                        return frame.payload
                    if frame.kind == P.STDERR:
                        raise RuntimeError(frame.payload.decode(errors="replace").strip())
                return b""
            finally:
                await s.close()

        try:
            return self.run(asyncio.wait_for(probe(), timeout), timeout=timeout + 5)
        except (asyncio.TimeoutError, concurrent.futures.TimeoutError):
            return b""

    # --- waiting for an agent (from a thread) ------------------------------------------
    def wait_ready(self, vm_id: str, socket: Path, deadline: float, alive: Any = lambda: True) -> dict[str, Any]:
        """Health, once the agent answers; AgentUnavailable at the deadline (or when
        ``alive()`` says the VM is gone); AgentMismatch at once."""
        last = "no answer"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentUnavailable(last)
            if not alive():
                raise AgentUnavailable("the VM exited while banger waited for its agent")
            try:
                if not socket.exists():
                    raise FileNotFoundError(f"{socket} does not exist yet")
                health = self.run(self.call(vm_id, socket, {"op": "health"}, timeout=min(left, 5)), timeout=min(left, 5) + 1)
                self.healths[vm_id] = health
                return health
            except AgentMismatch:
                raise
            except (OSError, ChannelClosed, asyncio.TimeoutError, concurrent.futures.TimeoutError, RuntimeError) as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                self.drop(vm_id)
                time.sleep(0.2)
