"""Snapshots: `banger snapshot ...` and the snapshot.* methods. (`vm snapshot`, `vm
restore` and their methods are the vm built-in's; `image warm` is the image built-in's:
the CLI's fast path builds only the built-in a command's group belongs to.)"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from banger_core.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    import typer


@hookimpl
def register_commands(app: "typer.Typer") -> None:
    from banger_core.cli import snapshot_cmd

    app.add_typer(snapshot_cmd.app, name="snapshot")


@hookimpl
def register_rpc_methods(register: Callable[..., None]) -> None:
    from banger_core.daemon import snapshot_methods

    snapshot_methods.register(register)
