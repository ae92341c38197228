"""`banger doctor` and the core's own checks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from banger_core.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    import typer

    from banger_core.context import CheckFn, DoctorContext


@hookimpl
def register_commands(app: "typer.Typer") -> None:
    from banger_core.cli import doctor_cmd

    app.command("doctor")(doctor_cmd.doctor)


@hookimpl
def register_doctor_checks(register: Callable[[str, "CheckFn"], None], doctor: "DoctorContext") -> None:
    from banger_core.doctor import register_core_checks

    register_core_checks(register, doctor)
