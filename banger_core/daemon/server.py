"""bangerd: one daemon per user, serving RPC on an owner-only Unix socket."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any

from banger_core import PROTOCOL_VERSION, __version__, fsutil, protocol
from banger_core.daemon.rpc import Call, Registry, Stream
from banger_core.errors import BangerError, Cancelled, ErrorCode
from banger_core.fingerprint import fingerprint
from banger_core.logs import clip, current_op, setup_json_logging
from banger_core.paths import Paths

log = logging.getLogger("banger.daemon")

DRAIN_TIMEOUT = 30.0
# After the drain: how long cancelled operations get to roll back in their threads
# before the daemon exits anyway (one that ignores cancellation must not keep it alive).
WORKER_GRACE = 10.0
MAX_CONNECTIONS = 256  # served at once; one more is answered `busy` and closed


def peer_uid(sock: socket.socket) -> tuple[int, int]:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return pid, uid


class Daemon:
    def __init__(self, paths: Paths) -> None:
        from banger_core.vm.handles import HandleStore
        from banger_core.runtime import Runtime
        from banger_core.store import Store

        self.paths = paths
        self.rt = Runtime.load(paths)
        self.store = Store(paths.db_file)
        self.handles = HandleStore(paths)
        self.registry = Registry()
        self.started = time.time()
        self.fingerprint = fingerprint(paths)
        self.owner_uid = os.getuid()
        self._inflight: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        from banger_core.daemon.state import DaemonState
        from banger_core.vm.service import VMService

        self.vms = VMService(self.rt, self.store, self.handles)
        self.state = DaemonState(
            paths=paths,
            runtime=self.rt,
            store=self.store,
            handles=self.handles,
            vms=self.vms,
            registry=self.registry,
            started=self.started,
            fingerprint=self.fingerprint,
            inflight=lambda: len(self._inflight),
            max_connections=MAX_CONNECTIONS,
            request_shutdown=self._request_shutdown,
        )
        # Every method, the core's own included, comes from a plugin's register_rpc_methods;
        # then the services plugins offer each other.
        broke = self.rt.host.register_rpc_methods(self.registry)
        sources, broke_sources = self.rt.host.register_sources(self.rt)
        puller = self.vms.puller
        puller.sources = sources
        puller.disabled = sorted(n for n, r in self.rt.host.records.items() if r.status == "disabled")
        puller.service_for = self.rt.host.service_for
        puller.ctx.payload, broke_payload = self.rt.host.register_guest_payload()
        broke_sources += broke_payload
        broke_sources += self.rt.host.register_migrations(self.store)  # a plugin's tables exist before its service
        for name in self.rt.host.register_services(self.state) + broke_sources:
            self.registry.drop_owner(name)  # broken: its methods go too
            broke.append(name)
        if broke:
            self.rt.resolve()  # a plugin whose registration broke is out of the order now

    def _request_shutdown(self) -> None:
        asyncio.get_running_loop().call_soon(self._stopping.set)

    # --- reconcile ----------------------------------------------------------------
    def reconcile(self) -> None:
        from banger_core.context import ReconcileContext

        self.handles.load_all()
        report = self.vms.reconcile()
        log.info("reconciled VMs: %s", report, extra={"op_id": "reconcile"})
        if self.rt.order_error:
            log.error("plugins not usable: %s", self.rt.order_error.message)
            return
        host = self.rt.host

        def ctx(name: str) -> ReconcileContext:
            return ReconcileContext(
                plugin=name,
                paths=self.paths,
                store=self.store,
                settings=self.rt.config.settings_for(host, name),
                log=logging.LoggerAdapter(logging.getLogger(f"banger.plugin.{name}"), {"op_id": "reconcile"}),
                service=lambda capability: host.service_for(name, capability),
            )

        for name, exc in host.reconcile(self.rt.order or [], ctx):
            log.error("plugin %s: reconcile failed: %s", name, exc)

    def start_services(self) -> None:
        """Plugins' daemon-lifetime services start (after reconcile, before serving)."""
        for name, exc in self.rt.host.start_services():
            log.error("plugin %s: service not started: %s", name, exc)

    def stop_services(self) -> None:
        for name, exc in self.rt.host.stop_services():
            log.error("plugin %s: service stop failed: %s", name, exc)

    # --- connections --------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        busy = len(self._inflight) >= MAX_CONNECTIONS
        if not busy:
            self._inflight.add(task)
        try:
            if busy:
                err = f"bangerd is serving {MAX_CONNECTIONS} connections, its limit; try again"
                await self._reject(reader, writer, BangerError(ErrorCode.BUSY, err, op_id=protocol.new_op_id()))
            else:
                await self._handle(reader, writer)
        except (ConnectionError, BrokenPipeError):
            pass
        except Exception:  # the daemon stays up whatever a client sends
            log.exception("unexpected error serving a connection")
        finally:
            self._inflight.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except Exception:
                pass

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    async def _reply_error(self, writer: asyncio.StreamWriter, err: BangerError, *, frames: bool = False) -> None:
        """Send ``err`` as the final reply: a JSON line, or a REPLY frame once the
        connection carries frames (``frames``)."""
        log.warning("request failed: %s: %s", err.code.value, err.message, extra={"op_id": err.op_id})
        reply = protocol.error(err.op_id, err.to_dict())
        await self._send(writer, protocol.json_frame(protocol.REPLY, reply) if frames else protocol.encode(reply))

    async def _read_request(self, reader: asyncio.StreamReader, op_id: str) -> tuple[dict[str, Any] | None, str]:
        """The request line, decoded; None when the client left without sending one.

        Raises a typed error for everything else: no line within the deadline, a line
        over ``MAX_REQUEST``, a half line, bytes that are not JSON, JSON nested too
        deeply or that is not an object. The op id is the client's once it is known.
        """
        try:
            line = await asyncio.wait_for(reader.readline(), protocol.REQUEST_TIMEOUT)
        except asyncio.TimeoutError:
            raise BangerError(
                ErrorCode.BAD_REQUEST, f"no complete request within {protocol.REQUEST_TIMEOUT:.0f} s", op_id=op_id
            ) from None
        except ValueError:  # no newline within the stream limit, MAX_REQUEST
            raise BangerError(ErrorCode.BAD_REQUEST, f"frame exceeds {protocol.MAX_REQUEST} bytes", op_id=op_id) from None
        if not line:
            return None, op_id  # connected and left
        if len(line) > protocol.MAX_REQUEST:  # the newline came within the limit's slack
            raise BangerError(ErrorCode.BAD_REQUEST, f"frame exceeds {protocol.MAX_REQUEST} bytes", op_id=op_id)
        if not line.endswith(b"\n"):
            raise BangerError(ErrorCode.BAD_REQUEST, f"truncated frame: {len(line)} bytes without a newline", op_id=op_id)
        # Errors are raised after the except blocks, with the line dropped: a decode
        # error holds the whole decoded text, kept while the rejection drains (seconds).
        problem = None
        try:
            req = json.loads(line)
        except RecursionError:
            problem = f"request nests deeper than {protocol.MAX_DEPTH} levels"
        except (UnicodeDecodeError, ValueError) as exc:
            problem = f"frame is not valid JSON: {clip(str(exc), 200)}"
        del line
        if problem is not None:
            raise BangerError(ErrorCode.BAD_REQUEST, problem, op_id=op_id)
        if not isinstance(req, dict):
            raise BangerError(ErrorCode.BAD_REQUEST, "request must be a JSON object", op_id=op_id)
        if isinstance(req.get("op_id"), str) and protocol.OP_ID_RE.fullmatch(req["op_id"]):
            op_id = req["op_id"]
        if protocol.depth_exceeds(req):
            raise BangerError(ErrorCode.BAD_REQUEST, f"request nests deeper than {protocol.MAX_DEPTH} levels", op_id=op_id)
        return req, op_id

    async def _reject(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, err: BangerError) -> None:
        """Reply with an error before the request was (fully) read.

        Closing a Unix socket with unread input resets the connection and can destroy
        the reply in flight, so half-close and drain the rest first (bounded).
        """
        await self._reply_error(writer, err)
        await self._linger(reader, writer)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        pid, uid = peer_uid(sock)
        op_id = protocol.new_op_id()
        if uid not in (self.owner_uid, 0):
            await self._reject(
                reader,
                writer,
                BangerError(
                    ErrorCode.UNAUTHORIZED,
                    f"uid {uid} may not use the banger daemon of uid {self.owner_uid}",
                    op_id=op_id,
                ),
            )
            return
        try:
            req, op_id = await self._read_request(reader, op_id)
        except BangerError as exc:
            await self._reject(reader, writer, exc)
            return
        if req is None:
            return
        version = req.get("v")
        if type(version) is not int or version != PROTOCOL_VERSION:  # not true, not 1.0
            await self._reject(
                reader,
                writer,
                BangerError(
                    ErrorCode.BAD_VERSION,
                    f"protocol version {clip(repr(version), 100)} not supported; this daemon speaks {PROTOCOL_VERSION}",
                    op_id=op_id,
                ),
            )
            return
        method = req.get("method")
        if not isinstance(method, str):
            await self._reject(reader, writer, BangerError(ErrorCode.BAD_REQUEST, "request has no method", op_id=op_id))
            return
        expected = req.get("fingerprint")
        if expected is not None and expected != self.fingerprint:  # checked before anything runs
            stale = f"bangerd runs other code or config than this CLI ({clip(str(expected), 40)}); the CLI replaces it"
            await self._reject(reader, writer, BangerError(ErrorCode.STALE_DAEMON, stale, op_id=op_id))
            return
        wants_frames = req.get("stream") is True
        known = self.registry.methods.get(method)
        if wants_frames or (known is not None and known.stream):
            # Refused here, as one JSON line, before the connection switches to frames.
            try:
                self.registry.lookup(method, stream=wants_frames)
            except BangerError as exc:
                exc.op_id = op_id
                await self._reject(reader, writer, exc)
                return
            await self._run_stream(method, req.get("params", {}), op_id, uid, reader, writer)
            return
        await self._run(method, req.get("params", {}), op_id, uid, reader, writer)

    def _new_call(self, method: str, op_id: str, uid: int, writer: asyncio.StreamWriter, stream: "Stream | None" = None) -> Call:
        """The call object a handler gets: its request, the daemon's state, its stream."""
        return Call(
            op_id=op_id,
            method=method,
            peer_uid=uid,
            _send=lambda b: self._send(writer, b),
            runtime=self.rt,
            store=self.store,
            state=self.state,
            stream=stream,
        )

    async def _run(
        self,
        method: str,
        params: Any,
        op_id: str,
        uid: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        token = current_op.set(op_id)
        try:
            call = self._new_call(method, op_id, uid, writer)
            log.info("request %s", method, extra={"method": method, "peer_uid": uid})
            t0 = time.perf_counter()
            work = asyncio.create_task(self.registry.dispatch(method, params, call))
            watch = asyncio.create_task(self._until_eof(reader))
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:
                work.cancel()
                try:
                    await work
                except (asyncio.CancelledError, Exception):
                    pass
                log.warning("request %s cancelled: client disconnected", method)
                return
            watch.cancel()
            err = self._failure(work, method, op_id)
            if err is not None:
                await self._reply_error(writer, err)
                return
            value = work.result()
            log.info("request %s ok in %.1f ms", method, (time.perf_counter() - t0) * 1000)
            await self._send(writer, protocol.encode(protocol.result(op_id, value)))
        finally:
            current_op.reset(token)

    async def _run_stream(
        self,
        method: str,
        params: Any,
        op_id: str,
        uid: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Run a streaming method: after the request line, frames both ways.

        The stream's pump reads the client's frames beside the handler and takes the
        EOF watch's place: the client leaving (EOF, reset) cancels the handler without
        a reply; a frame it may not send cancels it with a ``bad_request`` REPLY. The
        handler's outcome is the REPLY frame, after which the daemon reads no more.
        """

        token = current_op.set(op_id)
        try:
            stream = Stream(reader, writer)
            call = self._new_call(method, op_id, uid, writer, stream)
            log.info("request %s (stream)", method, extra={"method": method, "peer_uid": uid})
            t0 = time.perf_counter()
            work = asyncio.create_task(self.registry.dispatch(method, params, call))
            pump = asyncio.create_task(stream.pump())
            done, _ = await asyncio.wait({work, pump}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done or stream.violation is not None:  # a bad frame wins over a result
                await self._cancelled(work)
                if stream.violation is None:
                    log.warning("request %s cancelled: client disconnected", method)
                    return
                err: BangerError | None = stream.violation
                stream.violation = None
            else:
                await self._cancelled(pump)
                exc = None if work.cancelled() else work.exception()
                if isinstance(exc, ConnectionError) and writer.is_closing():  # a write found the client gone
                    exc.__traceback__ = None
                    log.warning("request %s cancelled: client disconnected", method)
                    return
                err = self._failure(work, method, op_id)
            if err is not None:
                err.op_id = op_id
                await self._reply_error(writer, err, frames=True)
            else:
                log.info(
                    "request %s ok in %.1f ms (%d bytes in, %d out)",
                    method,
                    (time.perf_counter() - t0) * 1000,
                    stream.bytes_in,
                    stream.bytes_out,
                )
                await self._send(writer, protocol.json_frame(protocol.REPLY, protocol.result(op_id, work.result())))
            await self._linger(reader, writer)
        finally:
            current_op.reset(token)

    @staticmethod
    async def _cancelled(task: asyncio.Task[Any]) -> None:
        """Cancel ``task`` (if still running) and wait until it has finished."""
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """After the last reply: half-close and read what the client still sends (for
        at most 2 s), so closing with unread input does not reset the connection and
        destroy the reply in flight."""
        if writer.can_write_eof():
            writer.write_eof()
        try:
            await asyncio.wait_for(self._until_eof(reader), timeout=2.0)
        except (asyncio.TimeoutError, ValueError, ConnectionError):
            pass

    @staticmethod
    def _failure(work: asyncio.Task[Any], method: str, op_id: str) -> BangerError | None:
        """The typed error a finished request ended with, or None if it succeeded.

        The exception is read, not re-raised, and its traceback dropped once logged:
        re-raised here it would tie this frame, which holds the task, into a cycle with
        the handler's frames, and the request's params (up to a megabyte) would live
        on until the cyclic garbage collector ran.
        """
        if work.cancelled():
            return Cancelled("request (the daemon is shutting down)", op_id=op_id)
        exc = work.exception()
        if exc is None:
            return None
        try:
            if isinstance(exc, BangerError):
                exc.op_id = op_id
                return exc
            log.error("%s failed", method, exc_info=exc)
            return BangerError(
                ErrorCode.OPERATION_FAILED, f"{method} failed: {type(exc).__name__}: {clip(str(exc), 2000)}", op_id=op_id
            )
        finally:
            exc.__traceback__ = None
            exc.__context__ = None

    async def _monitor(self, interval: float = 2.0) -> None:
        """Notice VMMs that exit behind banger's back and clean up after them."""
        from banger_core.daemon.work import run_simple

        while True:
            await asyncio.sleep(interval)
            try:
                await run_simple(self.vms.monitor_once)
            except Exception:
                log.exception("VM monitor pass failed")

    @staticmethod
    async def _until_eof(reader: asyncio.StreamReader) -> None:
        while await reader.read(4096):
            pass

    # --- lifecycle ----------------------------------------------------------------
    async def serve(self) -> None:
        sock_path = self.paths.socket
        try:
            sock_path.unlink()
        except FileNotFoundError:
            pass
        old = os.umask(0o177)  # the socket is born 0600: no window where others may connect
        try:
            # The stream limit bounds the request line (what the daemon reads), not replies.
            server = await asyncio.start_unix_server(
                self.handle, path=str(sock_path), limit=protocol.MAX_REQUEST, backlog=MAX_CONNECTIONS
            )
        finally:
            os.umask(old)
        os.chmod(sock_path, 0o600)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        log.info("bangerd %s listening on %s (pid %s)", __version__, sock_path, os.getpid())
        monitor = asyncio.create_task(self._monitor())
        async with server:
            await self._stopping.wait()
            log.info("shutting down")
            server.close()
            monitor.cancel()
            pending = {t for t in self._inflight if t is not asyncio.current_task()}
            if pending:
                _, late = await asyncio.wait(pending, timeout=DRAIN_TIMEOUT)
                for t in late:
                    t.cancel()
        try:
            sock_path.unlink()
        except FileNotFoundError:
            pass


def _acquire_lock(paths: Paths) -> int | None:
    fd = os.open(paths.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _return_freed_memory() -> None:
    """Serve big buffers (a request line up to 1 MiB, per connection) from mmap, always.

    glibc raises its mmap threshold each time such a buffer is freed (up to 32 MiB), so
    later ones come from the heap, which fragments and is not given back: 64 requests
    of 1 MiB at once peaked higher and left the daemon larger. A fixed threshold gives
    each one back when it is freed. A no-op where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(m_mmap_threshold, 128 * 1024)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="bangerd", description="banger's per-user daemon")
    parser.add_argument("--version", action="version", version=f"bangerd {__version__}")
    parser.add_argument(
        "--check-migrations",
        action="store_true",
        help="list the database migrations (the core's and each plugin's) a daemon start would apply, apply none; "
        "exit 1 when some are pending",
    )
    args = parser.parse_args(argv)
    if args.check_migrations:
        return check_migrations(Paths.from_env())
    _return_freed_memory()
    paths = Paths.from_env()
    paths.ensure()
    lock_fd = _acquire_lock(paths)
    if lock_fd is None:
        print(f"bangerd: another daemon holds {paths.lock_file}; exiting", file=sys.stderr)
        return 0
    stuck: list[str] = []
    try:
        from banger_core.config import Config

        try:
            level = Config.load(paths.config_file).core.daemon.log_level
        except BangerError:
            level = "info"
        setup_json_logging(paths.daemon_log, level)
        try:
            daemon = Daemon(paths)
        except BangerError as exc:
            log.error("cannot start: %s", exc.message)
            print(f"bangerd: {exc.message}", file=sys.stderr)
            return 1
        _sweep_leftovers(paths)
        daemon.reconcile()
        daemon.start_services()
        fsutil.atomic_write(paths.pid_file, f"{os.getpid()}\n")
        try:
            _serve(daemon)
        finally:
            daemon.stop_services()
        stuck = _join_workers(WORKER_GRACE)
        if stuck:
            log.error(
                "exiting with %d operation(s) still running %.0f s after shutdown: %s", len(stuck), WORKER_GRACE, ", ".join(stuck)
            )
        return 0
    finally:
        try:
            if paths.pid_file.read_text().strip() == str(os.getpid()):
                paths.pid_file.unlink()
        except OSError:
            pass
        os.close(lock_fd)
        if stuck:  # interpreter exit would join those threads, however long they run
            logging.shutdown()
            os._exit(0)


def check_migrations(paths: Paths) -> int:
    """``bangerd --check-migrations``: what a daemon start would apply, applied not."""
    from banger_core.runtime import Runtime
    from banger_core.store import MIGRATIONS, Store

    exists = paths.db_file.exists()
    store = Store(paths.db_file, migrate=False) if exists else None
    pending: list[str] = []
    try:
        core = store.pending_migrations() if store else [(n, d) for n, d, _f in MIGRATIONS]
        pending += [f"core {n}: {d}" for n, d in core]
        try:
            rt = Runtime.load(paths)
        except BangerError as exc:
            print(f"bangerd: plugins not inspected: {exc.message}", file=sys.stderr)
            rt = None
        if rt is not None:
            host = rt.host
            host.collect_migrations()
            for plugin, migrations in sorted(host.migrations.items()):
                todo = store.pending_plugin_migrations(plugin, migrations) if store else [(n, d) for n, d, _f in migrations]
                pending += [f"{plugin} {n}: {d}" for n, d in todo]
            for name, rec in sorted(host.records.items()):
                if rec.status == "broken":
                    print(f"bangerd: plugin {name} is broken: {rec.reason}", file=sys.stderr)
    finally:
        if store is not None:
            store.close()
    where = str(paths.db_file) if exists else f"{paths.db_file} (not created yet)"
    if not pending:
        print(f"no pending migrations in {where}")
        return 0
    print(f"{len(pending)} pending migration(s) in {where}:")
    for line in pending:
        print(f"  {line}")
    return 1


def _serve(daemon: Daemon) -> None:
    """Serve until told to stop. Unlike ``asyncio.run``, closing the loop does not wait
    for worker threads; ``_join_workers`` bounds that wait."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(daemon.serve())
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


def _join_workers(timeout: float) -> list[str]:
    """Wait up to ``timeout`` for operation threads; the names of those still running.

    The operation pool is shut down first, so its idle threads exit at once and only
    threads still running an operation are waited for (the loop's own pool was shut
    down the same way when the loop closed)."""
    from banger_core.daemon.work import EXECUTOR

    EXECUTOR.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + timeout

    def workers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]

    for t in workers():
        t.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in workers()]


def _sweep_leftovers(paths: Paths) -> None:
    """Remove what operations cut off by the previous daemon left (it was killed, or
    exited with work still running): this daemon holds the lock, nothing else runs."""
    import shutil

    for p in paths.transient_leftovers():
        try:
            original = Paths.aside_of(p)
            if original is not None and not original.exists():
                p.rename(original)  # cut off between "move the old one aside" and "move the new one in"
                log.warning("restored %s from %s, left by an interrupted replacement", original, p)
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            log.warning("removed %s, left by an operation the previous daemon did not finish", p)
        except OSError as exc:
            log.error("cannot remove leftover %s: %s", p, exc)


if __name__ == "__main__":
    sys.exit(main())
