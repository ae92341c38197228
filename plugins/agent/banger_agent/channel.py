"""The host side of a VM's agent channel: one connection (QEMU's socket chardev takes
one client at a time; Firecracker's vsock socket, after its ``CONNECT``/``OK``
handshake, one per connection the agent accepts), many sessions over it. The wire
format is banger_guest.protocol, the same module the agent runs. Each session's queue
is bounded: a consumer that falls behind stops the reader (and so the guest) rather
than growing the daemon.

``await Channel.connect(open_stream, timeout)`` opens the connection and says hello
(SYNC, HELLO with a fresh nonce; everything before the WELCOME carrying that nonce is
ignored). ``await channel.open(request)`` starts a session; its ``events()`` yields
frames until the one that ends it (EXIT, RESULT, ERROR), or raises ``ChannelClosed``
when the connection goes. ``channel.close()`` ends every session (the agent kills their
processes when the host side goes).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from banger_guest import protocol as P

HELLO_EVERY = 1.0
QUEUE_FRAMES = (
    64  # per session: at most 64 reads (4 MiB) wait for a slow consumer  # seconds between HELLOs until the agent answers
)

Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]

#: the AF_VSOCK port the agent listens on in a Firecracker guest (``banger.agent=vsock:PORT``)
VSOCK_PORT = 10240
STREAM_LIMIT = 1 << 20


def unix_opener(path: str) -> Opener:
    """The channel is a unix socket (QEMU's virtio-serial chardev)."""

    async def opener() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(path, limit=STREAM_LIMIT)

    return opener


def vsock_opener(uds_path: str, port: int = VSOCK_PORT) -> Opener:
    """The channel is a vsock stream to ``port`` in a Firecracker guest, through the
    VM's vsock unix socket (Firecracker's hybrid vsock): send ``CONNECT <port>\\n``;
    Firecracker answers ``OK <hostport>\\n`` once the guest accepted, and closes the
    connection when nothing in the guest listens on ``port`` (yet). Then the stream is
    the agent's."""

    async def opener() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_unix_connection(uds_path, limit=STREAM_LIMIT)
        try:
            writer.write(f"CONNECT {port}\n".encode())
            await writer.drain()
            line = b""
            while not line.endswith(b"\n") and len(line) < 64:  # the agent says nothing first
                chunk = await reader.read(1)
                if not chunk:
                    break
                line += chunk
            words = line.split()
            if len(words) == 2 and words[0] == b"OK" and words[1].isdigit() and line.endswith(b"\n"):
                return reader, writer
            if not line:
                raise ChannelClosed(
                    f"vsock {uds_path}: the connection closed at CONNECT {port} (nothing in the guest listens on port {port} yet)"
                )
            raise ChannelClosed(f"vsock {uds_path}: CONNECT {port} was answered {line!r}, not 'OK <port>'")
        except BaseException:
            writer.close()
            raise

    return opener


class ChannelClosed(ConnectionError):
    """The connection to the agent ended (the VM stopped, the agent died)."""


class AgentMismatch(RuntimeError):
    """The agent speaks another protocol version."""


class Session:
    def __init__(self, channel: "Channel", sid: int) -> None:
        self.channel = channel
        self.sid = sid
        # bounded: a consumer that falls behind (a slow client) stops the channel's reader,
        # and so the guest's writer, instead of growing the daemon's memory
        self.queue: asyncio.Queue[P.Frame | None] = asyncio.Queue(maxsize=QUEUE_FRAMES)
        self.ended = False
        self.sent = 0  # stdin bytes sent; the agent acknowledges them (STDIN_ACK)
        self.acked = 0
        self._window = asyncio.Event()  # set when an ack (or the end) may let stdin() go on

    def on_ack(self, frame: P.Frame) -> None:
        written = frame.obj().get("written")
        if isinstance(written, int) and written > self.acked:
            self.acked = written
            self._window.set()

    def wake(self) -> None:
        self._window.set()

    async def next(self) -> P.Frame:
        """The agent's next frame for this session (the ending one last); ChannelClosed
        when the connection went."""
        if self.queue.empty() and self.channel.closed:
            self.ended = True
            raise ChannelClosed(self.channel.closed_why or "the agent channel closed")
        frame = await self.queue.get()
        if frame is None:
            self.ended = True
            self.wake()
            raise ChannelClosed(self.channel.closed_why or "the agent channel closed")
        if frame.kind in P.ENDS:
            self.ended = True
            self.wake()
            self.channel.sessions.pop(self.sid, None)
        return frame

    async def events(self) -> AsyncIterator[P.Frame]:
        """The agent's frames for this session, the ending one last."""
        while not self.ended:
            yield await self.next()

    async def result(self) -> P.Frame:
        """The frame that ends the session (for ops without output)."""
        async for frame in self.events():
            if frame.kind in P.ENDS:
                return frame
        raise ChannelClosed("the session ended without a result")  # pragma: no cover

    async def stdin(self, data: bytes) -> None:
        """Send stdin, waiting while ``STDIN_WINDOW`` bytes are unacknowledged; once the
        session has ended, what is left is dropped."""
        view = memoryview(data)
        while view and not self.ended:
            while self.sent - self.acked >= P.STDIN_WINDOW and not self.ended and not self.channel.closed:
                self._window.clear()
                await self._window.wait()
            if self.ended:
                return  # the send below raises ChannelClosed when the channel is gone
            chunk = bytes(view[: min(P.MAX_PAYLOAD, P.STDIN_WINDOW - (self.sent - self.acked))])
            view = view[len(chunk) :]
            self.sent += len(chunk)
            await self.channel.send(P.encode(P.STDIN, self.sid, chunk))

    async def stdin_eof(self) -> None:
        await self.channel.send(P.encode(P.STDIN_EOF, self.sid))

    async def signal(self, signum: int) -> None:
        await self.channel.send(P.encode_json(P.SIGNAL, self.sid, {"signal": signum}))

    async def resize(self, rows: int, cols: int) -> None:
        await self.channel.send(P.encode_json(P.RESIZE, self.sid, {"rows": rows, "cols": cols}))

    async def close(self) -> None:
        """Kill the session's process group (unless it already ended) and forget it."""
        self.channel.sessions.pop(self.sid, None)
        while not self.queue.empty():  # frees a reader waiting to queue one more
            self.queue.get_nowait()
        was_open, self.ended = not self.ended, True
        self.wake()  # a sender waiting on the window gives up
        if was_open and not self.channel.closed:
            with contextlib.suppress(ChannelClosed, ConnectionError):
                await self.channel.send(P.encode(P.CLOSE, self.sid))


class Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)
        self._write_lock = asyncio.Lock()
        self.welcome: dict[str, Any] = {}
        self.closed = False
        self.closed_why = ""
        self._task: asyncio.Task[None] | None = None
        self._decoder = P.Decoder()

    @classmethod
    async def connect(cls, opener: Opener, timeout: float) -> "Channel":
        """Connect and greet the agent; TimeoutError when no WELCOME comes in time."""
        reader, writer = await asyncio.wait_for(opener(), timeout)
        ch = cls(reader, writer)
        try:
            await asyncio.wait_for(ch._hello(), timeout)
        except BaseException:
            ch._abort("hello failed")
            raise
        ch._task = asyncio.get_running_loop().create_task(ch._read_loop())
        return ch

    async def _hello(self) -> None:
        nonce = secrets.token_hex(8)
        hello = P.SYNC + P.encode_json(P.HELLO, 0, {"nonce": nonce, "version": P.VERSION})
        decoder = P.Decoder()
        while True:
            # again each second: a port drops what is written before the guest opens it
            await self.send(hello)
            try:
                data = await asyncio.wait_for(self.reader.read(P.MAX_PAYLOAD), HELLO_EVERY)
            except asyncio.TimeoutError:
                continue
            if not data:
                raise ChannelClosed("the agent channel closed before the agent answered")
            for frame in decoder.feed(data):
                if frame.kind != P.WELCOME:
                    continue  # from before this hello
                welcome = frame.obj()
                if welcome.get("nonce") != nonce:
                    continue
                if welcome.get("version") != P.VERSION:
                    raise AgentMismatch(
                        f"the agent speaks protocol {welcome.get('version')!r}, banger speaks {P.VERSION}: "
                        f"the agent disk is from another banger (agent {welcome.get('agent')!r})"
                    )
                self.welcome = welcome
                self._decoder = decoder
                return

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self.reader.read(P.MAX_PAYLOAD)
                if not data:
                    break
                for frame in self._decoder.feed(data):
                    s = self.sessions.get(frame.session)
                    if s is None:
                        continue
                    if frame.kind == P.STDIN_ACK:  # not queued: a sender may be waiting on it
                        s.on_ack(frame)
                    else:
                        await s.queue.put(frame)
        except (ConnectionError, OSError) as exc:
            self.closed_why = f"the agent channel failed: {exc}"
        finally:
            self._abort(self.closed_why or "the agent channel closed")

    def _abort(self, why: str) -> None:
        if not self.closed:
            self.closed = True
            self.closed_why = why
        for s in list(self.sessions.values()):
            s.wake()  # a sender waiting on its window sees the channel closed
            with contextlib.suppress(asyncio.QueueFull):  # a full queue: next() sees `closed` once drained
                s.queue.put_nowait(None)
        self.sessions.clear()
        with contextlib.suppress(Exception):
            self.writer.close()

    async def send(self, data: bytes) -> None:
        if self.closed:
            raise ChannelClosed(self.closed_why)
        async with self._write_lock:
            self.writer.write(data)
            try:
                await self.writer.drain()
            except (ConnectionError, OSError) as exc:
                self._abort(f"the agent channel failed: {exc}")
                raise ChannelClosed(self.closed_why) from None

    async def open(self, request: dict[str, Any]) -> Session:
        sid = next(self._ids)
        s = Session(self, sid)
        self.sessions[sid] = s
        await self.send(P.encode_json(P.OPEN, sid, request))
        return s

    async def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """An op that answers with one RESULT (health, poweroff)."""
        s = await self.open(request)
        try:
            frame = await asyncio.wait_for(s.result(), timeout)
        finally:
            await s.close()
        if frame.kind == P.ERROR:
            raise RuntimeError(frame.obj().get("message", "the agent refused"))
        return frame.obj()

    async def close(self) -> None:
        self._abort("closed by banger")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
