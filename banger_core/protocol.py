"""The daemon's wire protocol: one JSON object per line over a Unix socket.

A connection carries one request and its replies::

    -> {"v": 1, "method": "daemon.hello", "params": {}, "op_id": "op-…"}
    <- {"v": 1, "op_id": "op-…", "event": {...}}          (zero or more progress events)
    <- {"v": 1, "op_id": "op-…", "ok": true, "result": …}  (or)
    <- {"v": 1, "op_id": "op-…", "ok": false, "error": {"code", "message", "op_id", "details"}}

Closing the connection before the final reply cancels the request.
Stdlib only: the CLI imports this on every call.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from banger_core import PROTOCOL_VERSION

MAX_FRAME = 16 * 1024 * 1024
OP_ID_RE = re.compile(r"op-[0-9a-f]{6,32}")  # always fullmatch


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
