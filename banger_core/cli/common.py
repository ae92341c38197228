"""What every CLI command module shares: the lazily loaded process state, JSON output
and the error line. Command modules import this, never cli.app (which imports them)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from banger_core.cli import style
from banger_core.errors import BangerError

if TYPE_CHECKING:  # pragma: no cover
    from banger_core.client import Client
    from banger_core.paths import Paths
    from banger_core.runtime import Runtime


class _State:
    """Lazily loaded process state shared by commands."""

    def __init__(self) -> None:
        self._rt: Runtime | None = None
        self.load_error: BangerError | None = None
        self._paths: Paths | None = None
        #: the command line being run (set by cli.app.run)
        self.argv: list[str] = []

    def asks_help_for(self, *command: str) -> bool:
        """Whether the command line asks for ``command``'s help (``banger vm create -h``)."""
        return tuple(self.argv[: len(command)]) == command and any(a in ("-h", "--help") for a in self.argv)

    @property
    def paths(self) -> "Paths":
        if self._paths is None:
            from banger_core.paths import Paths

            self._paths = Paths.from_env()
        return self._paths

    def try_runtime(self) -> "Runtime | None":
        if self._rt is None and self.load_error is None:
            from banger_core.runtime import Runtime

            try:
                self._rt = Runtime.load(self.paths)
            except BangerError as exc:
                self.load_error = exc
        return self._rt

    def runtime(self) -> "Runtime":
        rt = self.try_runtime()
        if rt is None:
            assert self.load_error is not None
            raise self.load_error
        return rt

    def client(self) -> Client:  # avoid importing at module load
        from banger_core.client import Client

        return Client(self.paths)


state = _State()


def echo_json(data: Any) -> None:
    style.echo(json.dumps(data, indent=2, default=str))


def error_line(err: BangerError) -> str:
    """``banger: <message> (<code>, op-…)``; operation_failed is the generic code, not shown."""
    from banger_core.errors import ErrorCode

    tags = [err.code.value] if err.code is not ErrorCode.OPERATION_FAILED else []
    if err.op_id:
        tags.append(err.op_id)
    return f"banger: {err.message}" + (f" ({', '.join(tags)})" if tags else "")
