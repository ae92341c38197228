"""A minimal synchronous QMP client (QEMU Machine Protocol over a Unix socket)."""

from __future__ import annotations

import json
import socket
from typing import Any

from banger_core.errors import BangerError, ErrorCode


class QMP:
    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise BangerError(ErrorCode.OPERATION_FAILED, f"QMP: cannot connect to {path}: {exc.strerror}") from None
        self.file = self.sock.makefile("rb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise BangerError(ErrorCode.OPERATION_FAILED, f"QMP: unexpected greeting {greeting!r}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise BangerError(ErrorCode.OPERATION_FAILED, "QMP: connection closed")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, *, pass_fds: tuple[int, ...] = (), **arguments: Any) -> Any:
        """Run ``command``; ``pass_fds`` go with it (SCM_RIGHTS), as ``getfd`` needs."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        if pass_fds:
            socket.send_fds(self.sock, [data], list(pass_fds))
        else:
            self.sock.sendall(data)
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                raise BangerError(ErrorCode.OPERATION_FAILED, f"QMP {command}: {reply['error'].get('desc')}")
            return reply.get("return")

    def send_fd(self, name: str, fd: int) -> None:
        """``getfd``: hand QEMU an open file descriptor under ``name``."""
        self.execute("getfd", pass_fds=(fd,), fdname=name)

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "QMP":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
