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
Stdlib only: the CLI imports this on every call.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

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
    return "op-" + secrets.token_hex(6)


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


def request(method: str, params: dict[str, Any] | None = None, op_id: str | None = None) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "method": method, "params": params or {}, "op_id": op_id or new_op_id()}


def result(op_id: str, value: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "op_id": op_id, "ok": True, "result": value}


def error(op_id: str | None, err: dict[str, Any]) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "op_id": op_id, "ok": False, "error": err}


def event(op_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "op_id": op_id, "event": payload}
