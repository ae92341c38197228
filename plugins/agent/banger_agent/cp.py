"""``banger vm cp``: the client's half of ``agent.cp``.

Exactly one side names a VM (``VM:PATH``). The tar stream (banger_guest.transfer, the
one definition both sides use) is written straight into the call's STDIN, or read
straight from its STDOUT, a chunk at a time: memory stays flat for any size. Local
paths are checked before anything is sent; guest paths by the agent, which answers
with an error naming the path.
"""

from __future__ import annotations

import io
import os
import re
import sys
import tarfile
import threading
from typing import Any

from banger_core import protocol
from banger_core.errors import BangerError, ErrorCode
from banger_guest import transfer

#: ``VM:PATH``; a local path holding a colon is written ./a:b (it starts with . or /)
REMOTE_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,62}):(.*)", re.DOTALL)


def split(arg: str) -> tuple[str | None, str]:
    """(VM, path) for ``VM:PATH``, (None, path) for a local path."""
    m = REMOTE_RE.fullmatch(arg)
    if m is None or arg.startswith(("/", ".")):
        return None, arg
    if not m.group(2):
        raise BangerError(ErrorCode.BAD_REQUEST, f"{arg!r}: no path after the VM name (e.g. {m.group(1)}:/root)")
    return m.group(1), m.group(2)


class _StreamWriter(io.RawIOBase):
    """A writable file whose bytes go to the call's STDIN."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        if not self.stream.send(protocol.STDIN, data):
            raise BrokenPipeError("the copy ended in the VM")
        return len(data)


class _StreamReader(io.RawIOBase):
    """A readable file of the call's STDOUT data; its STDERR goes to ours."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buf = b""
        self.eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self.buf and not self.eof:
            frame = self.stream.recv()
            if frame is None:
                self.eof = True
            elif frame.kind == protocol.DATA and frame.channel == protocol.STDOUT:
                self.buf = frame.data
            elif frame.kind == protocol.DATA and frame.channel == protocol.STDERR:
                os.write(2, frame.data)
            elif frame.kind == protocol.END and frame.channel == protocol.STDOUT:
                self.eof = True
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n


def copy(src: str, dst: str) -> tuple[int, str]:
    """Run one copy; (exit status, what was copied)."""
    from banger_core.client import Client

    (src_vm, src_path), (dst_vm, dst_path) = split(src), split(dst)
    if (src_vm is None) == (dst_vm is None):
        raise BangerError(
            ErrorCode.BAD_REQUEST,
            "name the VM on exactly one side: banger vm cp ./local VM:/path, or banger vm cp VM:/path ./local",
        )
    try:
        if dst_vm is not None:  # host -> guest
            transfer.check_source(src_path, "on this host")
            with Client().open_stream("agent.cp", {"ref": dst_vm, "direction": "in", "path": dst_path}) as stream:
                return _send(stream, src_path, f"{dst_vm}:{dst_path}")
        assert src_vm is not None
        directory, rename = transfer.place(dst_path, "on this host")
        with Client().open_stream("agent.cp", {"ref": src_vm, "direction": "out", "path": src_path}) as stream:
            return _receive(stream, directory, rename, dst_path)
    except transfer.TransferError as exc:
        raise BangerError(ErrorCode.BAD_REQUEST, str(exc)) from None


def _send(stream: Any, path: str, where: str) -> tuple[int, str]:
    sent: dict[str, Any] = {}

    def writer() -> None:
        try:
            with io.BufferedWriter(_StreamWriter(stream), transfer.BUFSIZE) as out:
                sent["counts"] = transfer.tar_out(path, out)
            stream.end(protocol.STDIN)
        except (OSError, tarfile.TarError, transfer.TransferError) as exc:
            sent["error"] = exc
            stream.end(protocol.STDIN)

    t = threading.Thread(target=writer, name="banger-cp", daemon=True)
    t.start()
    for frame in stream:
        if frame.kind == protocol.DATA and frame.channel == protocol.STDERR:
            os.write(2, frame.data)
    t.join()
    status = int((stream.result or {}).get("exit_status", 255))
    if status == 0 and "error" in sent:
        print(f"banger: copying {path}: {sent['error']}", file=sys.stderr)
        return 1, ""
    count, size = sent.get("counts", (0, 0))
    return status, f"{count} entries, {_human(size)} to {where}"


def _receive(stream: Any, directory: str, rename: str | None, dst: str) -> tuple[int, str]:
    reader = io.BufferedReader(_StreamReader(stream), transfer.BUFSIZE)
    error: BaseException | None = None
    counts = (0, 0)
    try:
        counts = transfer.tar_in(reader, directory, rename, owner=(os.getuid(), os.getgid()))
    except (OSError, tarfile.TarError, transfer.TransferError) as exc:
        error = exc
    stream.wait()  # the rest (the stream's padding), then the result
    status = int((stream.result or {}).get("exit_status", 255))
    if status == 0 and error is not None:
        print(f"banger: copying to {dst}: {error}", file=sys.stderr)
        return 1, ""
    return status, f"{counts[0]} entries, {_human(counts[1])} to {dst}"


def _human(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"
