"""The catalog of images and kernels banger can build or fetch: its doctor checks
(the catalog files readable, the tools a kernel compile needs). Not essential: a host
that only registers its own images and kernels may disable it
(``[plugins] disable = ["catalog"]``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from banger_core.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from banger_core.context import CheckFn, DoctorContext


@hookimpl
def register_doctor_checks(register: Callable[[str, "CheckFn"], None], doctor: "DoctorContext") -> None:
    from banger_core.doctor import register_catalog_checks

    register_catalog_checks(register, doctor)
