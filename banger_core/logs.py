"""JSON logging with the request's op id on every record."""

from __future__ import annotations

import contextvars
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

current_op: contextvars.ContextVar[str | None] = contextvars.ContextVar("banger_op_id", default=None)

_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"op_id", "message", "asctime"}

#: the most any one logged string takes in the log once JSON-escaped (a traceback: 4x)
MAX_STR = 1024


def _fits(text: str, limit: int) -> bool:
    return len(json.dumps(text)) - 2 <= limit


def clip(text: str, limit: int = MAX_STR, *, keep_tail: bool = False) -> str:
    """``text``, cut so that its JSON form (escapes included) takes about ``limit`` bytes.

    Whatever a client sends may end up in a log message; a log line must not copy it
    whole (a multi-megabyte request field, or a megabyte of NULs at six bytes each).
    """
    if len(text) <= limit and ((text.isascii() and text.isprintable()) or _fits(text, limit)):
        return text
    n_tail = limit // 2 if keep_tail else 0
    head, tail = text[: limit - n_tail], text[len(text) - n_tail :] if n_tail else ""
    while not _fits(head + tail, limit):
        head, tail = head[: len(head) // 2], tail[len(tail) // 2 :]
    return f"{head}...[{len(text) - len(head) - len(tail)} of {len(text)} chars cut]...{tail}"


class OpIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "op_id", None) is None:
            record.op_id = current_op.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": clip(record.getMessage()),
            "op_id": getattr(record, "op_id", None),
        }
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**64:
                    value = f"<int of {value.bit_length()} bits>"  # repr() of a huge one raises
                if not isinstance(value, (int, float, bool, type(None))):
                    value = clip(value if isinstance(value, str) else repr(value))
                out[clip(key, 64)] = value
        if isinstance(out["op_id"], str):
            out["op_id"] = clip(out["op_id"], 64)
        if record.exc_info:
            out["exc"] = clip(self.formatException(record.exc_info), 4 * MAX_STR, keep_tail=True)
        return json.dumps(out)


def setup_json_logging(path: Path, level: str = "info") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(OpIdFilter())
    # asyncio reports what it cannot hand to anyone (an accept that failed, a task's
    # exception nobody retrieved) on its own logger: into the same, bounded, log.
    for name in ("banger", "asyncio"):
        root = logging.getLogger(name)
        root.handlers[:] = [handler]
        root.setLevel(level.upper() if name == "banger" else "WARNING")
        root.propagate = False
