"""Root filesystem images: `banger image ...` and the image.* methods."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from banger_core.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    import typer


@hookimpl
def register_commands(app: "typer.Typer") -> None:
    from banger_core.cli import artifacts_cmd, snapshot_cmd

    artifacts_cmd.image_app.command("warm")(snapshot_cmd.image_warm)
    app.add_typer(artifacts_cmd.image_app, name="image")


@hookimpl
def register_rpc_methods(register: Callable[..., None]) -> None:
    from banger_core.daemon import artifact_methods

    artifact_methods.register_image(register)
