"""The one error type of banger: a code, a message and the op id of the request."""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(str, enum.Enum):
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    BAD_REQUEST = "bad_request"
    BAD_VERSION = "bad_version"
    UNKNOWN_METHOD = "unknown_method"
    OPERATION_FAILED = "operation_failed"
    UNAUTHORIZED = "unauthorized"
    CANCELLED = "cancelled"
    CONFIG = "config_error"
    PLUGIN = "plugin_error"
    DAEMON_UNAVAILABLE = "daemon_unavailable"
    BUSY = "busy"
    STALE_DAEMON = "stale_daemon"  # the daemon runs other code/config than the CLI: replace it


class BangerError(Exception):
    """An error a user can act on.

    Raised anywhere in the core or a plugin; travels over RPC as
    ``{"code", "message", "op_id", "details"}`` and is printed by the CLI as
    ``banger: <message> (op-…)``.
    """

    def __init__(
        self,
        code: ErrorCode | str,
        message: str,
        *,
        op_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = ErrorCode(code) if not isinstance(code, ErrorCode) else code
        self.message = message
        self.op_id = op_id
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code.value,
            "message": self.message,
            "op_id": self.op_id,
            "details": self.details,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BangerError":
        code = data.get("code", ErrorCode.OPERATION_FAILED.value)
        try:
            code = ErrorCode(code)
        except ValueError:
            code = ErrorCode.OPERATION_FAILED
        return cls(
            code,
            str(data.get("message", "unknown error")),
            op_id=data.get("op_id"),
            details=data.get("details") or {},
        )

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"BangerError({self.code.value!r}, {self.message!r}, op_id={self.op_id!r})"


class MultiError(BangerError):
    """Several independent failures (e.g. every plugin's cleanup), reported together."""

    def __init__(self, what: str, failures: list[tuple[str, BaseException]], *, op_id: str | None = None):
        self.failures = failures
        lines = "; ".join(f"{who}: {exc}" for who, exc in failures)
        super().__init__(
            ErrorCode.OPERATION_FAILED,
            f"{what} failed for {len(failures)} part(s): {lines}",
            op_id=op_id,
            details={"failures": [{"part": who, "error": str(exc)} for who, exc in failures]},
        )


class Cancelled(BangerError):
    """The one way to say an operation stopped because it was cancelled (its client
    went away, or the daemon is shutting down); ``what`` names the operation."""

    def __init__(self, what: str, *, op_id: str | None = None) -> None:
        super().__init__(ErrorCode.CANCELLED, f"{what}: cancelled", op_id=op_id)


def raise_if_cancelled(cancel: Any, what: str) -> None:
    """Raise ``Cancelled(what)`` when ``cancel`` (a threading.Event or None) is set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled(what)
