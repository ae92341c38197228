"""bangerd itself: `banger version`, `banger daemon ...` and the daemon.* methods."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from banger_core.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    import typer


@hookimpl
def register_commands(app: "typer.Typer") -> None:
    from banger_core.cli import daemon_cmd

    app.command("version")(daemon_cmd.version)
    app.add_typer(daemon_cmd.app, name="daemon")


@hookimpl
def register_rpc_methods(register: Callable[..., None]) -> None:
    from banger_core.daemon import daemon_methods

    daemon_methods.register(register)
