"""VMs: `banger vm ...` and the vm.* methods."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from banger_core.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    import typer


@hookimpl
def register_commands(app: "typer.Typer") -> None:
    from banger_core.cli import snapshot_cmd, vm_cmd

    snapshot_cmd.add_vm_commands(vm_cmd.app)  # here: the CLI's fast path for `vm …` builds this built-in only
    app.add_typer(vm_cmd.app, name="vm")


@hookimpl
def register_rpc_methods(register: Callable[..., None]) -> None:
    from banger_core.daemon import snapshot_methods, vm_methods

    vm_methods.register(register)
    snapshot_methods.register_vm(register)
