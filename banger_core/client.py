"""Talk to bangerd; start it on demand; replace it when it is stale. Stdlib only."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
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

    def stream(self, method: str, params: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Send one request; yield every reply (events, then the final one)."""
        req = protocol.request(method, params)
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
        if autostart:
            self.ensure_daemon()
        for msg in self.stream(method, params):
            if "event" in msg:
                if on_event:
                    on_event(msg["event"])
                continue
            if msg.get("ok"):
                return msg.get("result")
            raise BangerError.from_dict(msg.get("error") or {})
        raise AssertionError("unreachable")

    # --- daemon management --------------------------------------------------------
    def hello(self) -> dict[str, Any] | None:
        """The running daemon's identity, or None when none answers."""
        try:
            return self.call("daemon.hello", autostart=False)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
                return None
            raise BangerError(ErrorCode.DAEMON_UNAVAILABLE, f"cannot connect to {self.paths.socket}: {exc.strerror}") from None

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
            proc = subprocess.Popen(
                [sys.executable, "-m", "banger_core.daemon.server"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,  # outlives this CLI and its terminal's signals
                close_fds=True,
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
        except (OSError, BangerError):
            pass
        if not _wait_gone(pid, STOP_TIMEOUT):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5)
        return pid


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
