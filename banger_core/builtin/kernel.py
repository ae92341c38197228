"""Kernels: `banger kernel ...` and the kernel.* methods."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from banger_core.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    import typer


@hookimpl
def register_commands(app: "typer.Typer") -> None:
    from banger_core.cli import artifacts_cmd

    app.add_typer(artifacts_cmd.kernel_app, name="kernel")


@hookimpl
def register_rpc_methods(register: Callable[..., None]) -> None:
    from banger_core.daemon import artifact_methods

    artifact_methods.register_kernel(register)
