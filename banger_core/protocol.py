"""The daemon's wire protocol: one JSON object per line over a Unix socket.

A connection carries one request and its replies::

    -> {"v": 1, "method": "daemon.hello", "params": {}, "op_id": "op-…"}
    <- {"v": 1, "op_id": "op-…", "event": {...}}          (zero or more progress events)
    <- {"v": 1, "op_id": "op-…", "ok": true, "result": …}  (or)
    <- {"v": 1, "op_id": "op-…", "ok": false, "error": {"code", "message", "op_id", "details"}}

Closing the connection before the final reply cancels the request. The request line
is at most ``MAX_REQUEST`` bytes, nests at most ``MAX_DEPTH`` levels and must arrive
within ``REQUEST_TIMEOUT`` seconds of connecting; what the daemon sends back is bounded
by ``MAX_FRAME`` per line only.

A method registered with ``stream=True`` is requested with ``"stream": true`` in the
request line (``request(..., stream=True)``). After that line both directions carry
binary frames instead of JSON lines: a 6-byte header, ``kind`` (1 byte), ``channel``
(1 byte) and the payload's length (4 bytes, big-endian), then the payload::

    -> request line (JSON, as above, with "stream": true)
    -> DATA(0, bytes) ... END(0) CONTROL(0, {"type": "resize", "rows", "cols"}) ...
    <- DATA(1, bytes) DATA(2, bytes) EVENT(0, {event envelope}) ... END(1) END(2)
    <- REPLY(0, {the same final reply object as above})

Data frames carry raw bytes (no JSON, no base64) on a channel: STDIN 0, STDOUT 1,
STDERR 2, or any other number a method defines. END half-closes one channel (its
payload is empty); the others stay open. CONTROL, EVENT and REPLY payloads are one
UTF-8 JSON object. A client sends only DATA, END and CONTROL, each at most
``MAX_CHUNK`` bytes of payload; anything else is answered by a ``bad_request`` REPLY
and the connection is closed. Closing the socket (not an END frame) still cancels the
request. A request refused before the switch (unknown method, bad version, …) is
answered by one JSON line as before: its first byte, ``{``, is no frame kind.
Stdlib only: the CLI imports this on every call.
"""

from __future__ import annotations

import json
import re
import os
import struct
from typing import Any, BinaryIO, Iterator, NamedTuple

from banger_core import PROTOCOL_VERSION

MAX_FRAME = 16 * 1024 * 1024  # one line the client reads (a reply or an event)
MAX_REQUEST = 1024 * 1024  # the one request line the daemon reads
MAX_DEPTH = 64  # nesting of arrays and objects in a request
REQUEST_TIMEOUT = 10.0  # seconds from connecting to a complete request line
OP_ID_RE = re.compile(r"op-[0-9a-f]{6,32}")  # always fullmatch


def depth_exceeds(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether arrays and objects in a decoded JSON value nest deeper than ``limit``.

    Iterative: the value may be nested far deeper than Python's recursion limit.
    """
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def new_op_id() -> str:
    return "op-" + os.urandom(6).hex()  # what secrets.token_hex does, without importing it


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


def request(
    method: str,
    params: dict[str, Any] | None = None,
    op_id: str | None = None,
    *,
    stream: bool = False,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """A request line. With ``fingerprint`` the daemon runs it only if its own matches,
    else answers ``stale_daemon`` (the CLI then replaces it and sends it again)."""
    req: dict[str, Any] = {"v": PROTOCOL_VERSION, "method": method, "params": params or {}, "op_id": op_id or new_op_id()}
    if stream:
        req["stream"] = True
    if fingerprint is not None:
        req["fingerprint"] = fingerprint
    return req


def result(op_id: str, value: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "op_id": op_id, "ok": True, "result": value}


def error(op_id: str | None, err: dict[str, Any]) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "op_id": op_id, "ok": False, "error": err}


def event(op_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "op_id": op_id, "event": payload}


# --- binary frames (streaming methods) ---------------------------------------------
DATA = 1  # raw bytes on a channel
END = 2  # end of one channel (half-close); empty payload
CONTROL = 3  # client -> daemon: a JSON object, e.g. resize(rows, cols), signal(name)
EVENT = 4  # daemon -> client: a progress event envelope, as event()
REPLY = 5  # daemon -> client: the final reply, as result() / error(); the last frame
KIND_NAMES = {DATA: "data", END: "end", CONTROL: "control", EVENT: "event", REPLY: "reply"}
CLIENT_KINDS = frozenset({DATA, END, CONTROL})
JSON_KINDS = frozenset({CONTROL, EVENT, REPLY})

STDIN, STDOUT, STDERR = 0, 1, 2
HEADER = struct.Struct(">BBI")  # kind, channel, payload length
MAX_CHUNK = 256 * 1024  # payload of a data or control frame, either way


class Frame(NamedTuple):
    kind: int
    channel: int = 0
    data: bytes = b""
    #: the decoded JSON object of a CONTROL, EVENT or REPLY frame
    obj: Any = None


def frame(kind: int, channel: int = 0, data: bytes = b"") -> bytes:
    """One encoded frame: header and payload."""
    return HEADER.pack(kind, channel, len(data)) + data


def json_frame(kind: int, obj: dict[str, Any]) -> bytes:
    return frame(kind, 0, json.dumps(obj, separators=(",", ":"), default=str).encode())


def data_frames(channel: int, data: bytes | bytearray | memoryview) -> Iterator[bytes]:
    """``data`` on ``channel`` as frames of at most ``MAX_CHUNK`` bytes (none if empty),
    made one at a time: a big write is not copied whole."""
    view = memoryview(data).cast("B")
    for i in range(0, len(view), MAX_CHUNK):
        chunk = view[i : i + MAX_CHUNK]
        yield HEADER.pack(DATA, channel, len(chunk)) + chunk


def resize(rows: int, cols: int) -> dict[str, Any]:
    return {"type": "resize", "rows": rows, "cols": cols}


def signal(name: str) -> dict[str, Any]:
    """A signal by name without ``SIG``: ``signal("TERM")``."""
    return {"type": "signal", "name": name}


def parse_header(header: bytes, *, from_client: bool) -> tuple[int, int, int]:
    """(kind, channel, length) of a frame header; ValueError for a frame the reader
    must not accept: an unknown kind, a kind the sender may not send, a payload over
    its bound (``MAX_CHUNK`` for data and control, ``MAX_FRAME`` for events and
    replies), a non-empty END."""
    kind, channel, length = HEADER.unpack(header)
    allowed = CLIENT_KINDS if from_client else KIND_NAMES.keys() - {CONTROL}
    if kind not in allowed:
        raise ValueError(f"unexpected frame kind {kind:#04x}" + (" (a JSON line?)" if kind == ord("{") else ""))
    limit = MAX_FRAME if kind in (EVENT, REPLY) else MAX_CHUNK
    if length > limit:
        raise ValueError(f"{KIND_NAMES[kind]} frame of {length} bytes exceeds {limit} bytes")
    if kind == END and length:
        raise ValueError(f"end frame with a {length}-byte payload")
    return kind, channel, length


def decode_frame(kind: int, channel: int, data: bytes) -> Frame:
    """A frame from a checked header and its payload; ValueError if a JSON payload is
    not one JSON object nested at most ``MAX_DEPTH`` levels."""
    if kind not in JSON_KINDS:
        return Frame(kind, channel, data)
    try:
        obj = json.loads(data)
    except RecursionError:
        raise ValueError(f"{KIND_NAMES[kind]} frame nests deeper than {MAX_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{KIND_NAMES[kind]} frame is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{KIND_NAMES[kind]} frame must hold a JSON object")
    if depth_exceeds(obj):
        raise ValueError(f"{KIND_NAMES[kind]} frame nests deeper than {MAX_DEPTH} levels")
    return Frame(kind, channel, b"", obj)


def read_frame(fh: BinaryIO, *, from_client: bool = False) -> Frame | None:
    """The next frame from a blocking binary file; None at EOF before a header.

    ValueError for a frame ``parse_header``/``decode_frame`` refuse, EOFError for a
    frame cut off by EOF."""
    header = fh.read(HEADER.size)
    if not header:
        return None
    if len(header) < HEADER.size:
        raise EOFError(f"connection closed within a frame header ({len(header)} bytes)")
    kind, channel, length = parse_header(header, from_client=from_client)
    data = fh.read(length) if length else b""
    if len(data) < length:
        raise EOFError(f"connection closed within a {KIND_NAMES[kind]} frame ({len(data)} of {length} bytes)")
    return decode_frame(kind, channel, data)
