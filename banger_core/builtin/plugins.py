"""The plugin system's own commands: `banger plugins list|resolve`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from banger_core.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    import typer


@hookimpl
def register_commands(app: "typer.Typer") -> None:
    from banger_core.cli import plugins_cmd

    app.add_typer(plugins_cmd.app, name="plugins")
