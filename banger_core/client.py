"""Talk to bangerd; start it on demand; replace it when it is stale. Stdlib only."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterator

from banger_core import PROTOCOL_VERSION, __version__, protocol
from banger_core.errors import BangerError, ErrorCode
from banger_core.paths import Paths

START_TIMEOUT = 15.0
STOP_TIMEOUT = 45.0


class Client:
    def __init__(self, paths: Paths | None = None) -> None:
        self.paths = paths or Paths.from_env()

    # --- one request --------------------------------------------------------------
    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.paths.socket))
        except OSError:
            s.close()
            raise
        return s

    def stream(
        self, method: str, params: dict[str, Any] | None = None, fingerprint: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Send one request; yield every reply (events, then the final one)."""
        req = protocol.request(method, params, fingerprint=fingerprint)
        s = self._connect()
        try:
            s.sendall(protocol.encode(req))
            buf = s.makefile("rb")
            while True:
                line = buf.readline(protocol.MAX_FRAME + 1)
                if not line:
                    raise BangerError(
                        ErrorCode.DAEMON_UNAVAILABLE,
                        f"bangerd closed the connection during {method}; see {self.paths.daemon_log}",
                        op_id=req["op_id"],
                    )
                msg = json.loads(line)
                yield msg
                if "ok" in msg:
                    return
        finally:
            s.close()

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        *,
        autostart: bool = True,
    ) -> Any:
        """One request. With ``autostart`` the request carries this CLI's fingerprint:
        a daemon that is missing, stale or speaks another protocol is (re)started and the
        request sent again (it never ran); one round trip when the daemon is current."""
        if not autostart:
            return self._call_once(method, params, on_event)
        from banger_core.fingerprint import fingerprint

        mine = fingerprint(self.paths)
        try:
            return self._call_once(method, params, on_event, mine)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
                raise BangerError(
                    ErrorCode.DAEMON_UNAVAILABLE, f"cannot connect to {self.paths.socket}: {exc.strerror}"
                ) from None
        except BangerError as exc:
            if exc.code not in (ErrorCode.STALE_DAEMON, ErrorCode.BAD_VERSION):
                raise
        self.ensure_daemon()
        return self._call_once(method, params, on_event, mine)

    def _call_once(
        self,
        method: str,
        params: dict[str, Any] | None,
        on_event: Callable[[dict[str, Any]], None] | None,
        fingerprint: str | None = None,
    ) -> Any:
        for msg in self.stream(method, params, fingerprint):
            if "event" in msg:
                if on_event:
                    on_event(msg["event"])
                continue
            if msg.get("ok"):
                return msg.get("result")
            raise BangerError.from_dict(msg.get("error") or {})
        raise AssertionError("unreachable")

    def open_stream(self, method: str, params: dict[str, Any] | None = None, *, autostart: bool = True) -> ClientStream:
        """Start a streaming method: binary frames both ways until its final reply.

        Use the returned object as a context manager (closing it early cancels the call)."""
        if autostart:
            self.ensure_daemon()
        req = protocol.request(method, params, stream=True)
        s = self._connect()
        try:
            s.sendall(protocol.encode(req))
        except BaseException:
            s.close()
            raise
        return ClientStream(s, method, req["op_id"], self.paths)

    # --- daemon management --------------------------------------------------------
    def hello(self) -> dict[str, Any] | None:
        """The running daemon's identity, or None when none answers."""
        try:
            info: dict[str, Any] = self.call("daemon.hello", autostart=False)
            return info
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
                return None
            raise BangerError(ErrorCode.DAEMON_UNAVAILABLE, f"cannot connect to {self.paths.socket}: {exc.strerror}") from None
        except BangerError as exc:
            if exc.code is not ErrorCode.BAD_VERSION:
                raise
        # A daemon of another protocol (an older or newer banger): known by its pid file,
        # replaced like any stale daemon.
        try:
            pid = int(self.paths.pid_file.read_text().strip())
        except (OSError, ValueError):
            raise BangerError(
                ErrorCode.DAEMON_UNAVAILABLE,
                f"a bangerd speaking another protocol answers on {self.paths.socket} and {self.paths.pid_file} "
                "does not say its pid: stop it",
            ) from None
        return {"version": "another protocol", "protocol": None, "pid": pid, "fingerprint": None}

    def ensure_daemon(self) -> dict[str, Any]:
        from banger_core.fingerprint import fingerprint

        info = self.hello()
        if info is not None:
            if (
                info.get("version") == __version__
                and info.get("protocol") == PROTOCOL_VERSION
                and info.get("fingerprint") == fingerprint(self.paths)
            ):
                return info
            self.stop_daemon(info)
        return self.start_daemon()

    def start_daemon(self) -> dict[str, Any]:
        from banger_core.config import Config

        Config.load(self.paths.config_file)  # a config error is reported here, directly
        self.paths.ensure()
        log_path = self.paths.daemon_stderr
        with open(log_path, "ab") as err:
            start = err.tell()
            import subprocess  # only when starting the daemon: 3 ms off every other call

            proc = subprocess.Popen(
                [sys.executable, "-m", "banger_core.daemon.server"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,  # outlives this CLI and its terminal's signals
                close_fds=True,
                # not the CLI's directory: `-m` puts the cwd first on sys.path, and a banger
                # checkout there would be another banger than this CLI's (stale forever)
                cwd="/",
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            info = self.hello()
            if info is not None:
                return info
            code = proc.poll()
            if code not in (None, 0):
                raise BangerError(ErrorCode.DAEMON_UNAVAILABLE, f"bangerd failed to start: {_tail(log_path, start)}")
            time.sleep(0.02)
        raise BangerError(
            ErrorCode.DAEMON_UNAVAILABLE,
            f"bangerd did not answer on {self.paths.socket} within {START_TIMEOUT:.0f}s; see {log_path}",
        )

    def stop_daemon(self, info: dict[str, Any] | None = None) -> int | None:
        """Ask the daemon to exit and wait for it; returns its pid or None if none ran."""
        info = info or self.hello()
        if info is None:
            return None
        pid = int(info["pid"])
        try:
            self.call("daemon.shutdown", autostart=False)
        except (OSError, BangerError):  # e.g. another protocol: the signal says the same
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                return pid
        if not _wait_gone(pid, STOP_TIMEOUT):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5)
        return pid


class ClientStream:
    """The client's side of one streaming call (``Client.open_stream``).

    Sending: ``send(channel, data)``, ``end(channel)`` (half-close one channel; output
    keeps coming), ``control(obj)`` / ``resize(rows, cols)`` / ``signal(name)``. They
    may be called from another thread than the one receiving, and they block while the
    daemon is slow to read. Once the daemon has stopped reading (the call ended) they
    drop what they are given and return False: the outcome is in the final reply.

    Receiving: iterate (or call ``recv()``) for DATA, END and EVENT frames
    (``protocol.Frame``); iteration ends at the final reply, whose result is then in
    ``result``, or raises its ``BangerError``. ``pump()`` does all of it for a process.
    """

    def __init__(self, sock: socket.socket, method: str, op_id: str, paths: Paths) -> None:
        self._sock = sock
        self._rfile = sock.makefile("rb")
        self._lock = threading.Lock()
        self._send_closed = False
        self._frames = False  # set once the daemon's first byte shows it switched to frames
        self.method = method
        self.op_id = op_id
        self.paths = paths
        self.done = False
        self.result: Any = None

    # --- sending ------------------------------------------------------------------
    def send(self, channel: int, data: bytes | bytearray | memoryview) -> bool:
        for f in protocol.data_frames(channel, data):
            if not self._sendall(f):
                return False
        return True

    def end(self, channel: int = protocol.STDIN) -> bool:
        return self._sendall(protocol.frame(protocol.END, channel))

    def control(self, obj: dict[str, Any]) -> bool:
        encoded = protocol.json_frame(protocol.CONTROL, obj)
        if len(encoded) - protocol.HEADER.size > protocol.MAX_CHUNK:
            raise BangerError(ErrorCode.BAD_REQUEST, f"control message exceeds {protocol.MAX_CHUNK} bytes", op_id=self.op_id)
        return self._sendall(encoded)

    def resize(self, rows: int, cols: int) -> bool:
        return self.control(protocol.resize(rows, cols))

    def signal(self, name: str) -> bool:
        return self.control(protocol.signal(name))

    def _sendall(self, data: bytes) -> bool:
        with self._lock:
            if self._send_closed:
                return False
            try:
                self._sock.sendall(data)
            except OSError:  # EPIPE, ECONNRESET: the daemon has closed; the reply tells why
                self._send_closed = True
                return False
        return True

    # --- receiving ----------------------------------------------------------------
    def recv(self) -> protocol.Frame | None:
        """The daemon's next DATA, END or EVENT frame; None after the final reply."""
        if self.done:
            return None
        try:
            if not self._frames:
                first = self._rfile.peek(1)[:1]
                if first == b"{":  # refused before the switch: one JSON line
                    self._reply(json.loads(self._rfile.readline(protocol.MAX_FRAME + 1) or b"{}"))
                    return None
                self._frames = True
            frame = protocol.read_frame(self._rfile)
        except ValueError as exc:
            raise BangerError(ErrorCode.DAEMON_UNAVAILABLE, f"bad frame from bangerd: {exc}", op_id=self.op_id) from None
        except (EOFError, ConnectionError):
            frame = None
        if frame is None:
            raise BangerError(
                ErrorCode.DAEMON_UNAVAILABLE,
                f"bangerd closed the connection during {self.method}; see {self.paths.daemon_log}",
                op_id=self.op_id,
            )
        if frame.kind == protocol.REPLY:
            self._reply(frame.obj)
            return None
        return frame

    def _reply(self, msg: dict[str, Any]) -> None:
        self.done = True
        self.close()
        if msg.get("ok"):
            self.result = msg.get("result")
            return
        raise BangerError.from_dict(msg.get("error") or {})

    def __iter__(self) -> Iterator[protocol.Frame]:
        while (frame := self.recv()) is not None:
            yield frame

    def wait(self) -> Any:
        """Discard output until the final reply; its result."""
        for _ in self:
            pass
        return self.result

    def pump(
        self,
        stdin: int | None = 0,
        stdout: int = 1,
        stderr: int = 2,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> Any:
        """Run the call for a process: copy the fd ``stdin`` to the daemon from a thread
        (then end STDIN; ``None`` ends it at once), write STDOUT and STDERR data to the
        fds ``stdout`` and ``stderr`` until the final reply; its result."""
        try:
            if stdin is None:
                self.end(protocol.STDIN)
            else:
                threading.Thread(target=self._copy_in, args=(stdin,), name="banger-stdin", daemon=True).start()
            fds = {protocol.STDOUT: stdout, protocol.STDERR: stderr}
            for frame in self:
                if frame.kind == protocol.DATA and frame.channel in fds:
                    _write_all(fds[frame.channel], frame.data)
                elif frame.kind == protocol.EVENT and on_event is not None:
                    on_event(frame.obj.get("event") or {})
            return self.result
        finally:
            self.close()

    def _copy_in(self, fd: int) -> None:
        try:
            while data := os.read(fd, protocol.MAX_CHUNK):
                if not self._sendall(protocol.frame(protocol.DATA, protocol.STDIN, data)):
                    return
        except OSError:
            pass  # stdin unreadable: end it
        self.end(protocol.STDIN)

    def close(self) -> None:
        """Close the connection; before the final reply that cancels the call."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a sender blocked in sendall
        except OSError:
            pass
        with self._lock:
            self._send_closed = True
            self._rfile.close()
            self._sock.close()

    def __enter__(self) -> ClientStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        if _is_zombie(pid):  # exited; its parent has not reaped it yet
            return True
        time.sleep(0.02)
    return False


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _tail(path: os.PathLike[str] | str, start: int, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            text = fh.read().decode(errors="replace").strip()
    except OSError:
        return "(no output)"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else "(no output)")[-limit:]
