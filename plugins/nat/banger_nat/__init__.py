"""Per-VM outbound NAT: a MASQUERADE rule scoped to the guest /32 plus FORWARD rules."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from banger_core import hookimpl
from banger_core.context import check_binaries

requires = ["net"]


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uplink: str | None = Field(default=None, description="outbound interface; default: the default route's")
    comment: str = Field(default="banger", min_length=1, max_length=32, description="iptables comment tag")


@hookimpl
def config_model() -> type[BaseModel]:
    return Settings


@hookimpl
def register_doctor_checks(register) -> None:
    register("tools", lambda _s: check_binaries("tools", "iptables", package="iptables"))
