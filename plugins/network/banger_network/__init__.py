"""Host bridge, TAP devices and guest IP allocation for VMs."""

from __future__ import annotations

import ipaddress
import os

from pydantic import BaseModel, ConfigDict, Field, field_validator

from banger_core import hookimpl
from banger_core.context import CheckResult, check_binaries

requires: list[str] = []
provides = ["net"]


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bridge: str = Field(default="banger0", max_length=15, description="host bridge name")
    subnet: str = Field(default="172.30.0.0/24", description="guest subnet; the bridge takes the first host address")
    tap_pool: int = Field(default=2, ge=0, le=64, description="TAP devices kept warm for fast creates")

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, v: str) -> str:
        net = ipaddress.ip_network(v, strict=True)
        if net.version != 4 or net.prefixlen > 29:
            raise ValueError("must be an IPv4 network of /29 or larger")
        return str(net)


@hookimpl
def config_model() -> type[BaseModel]:
    return Settings


@hookimpl
def register_doctor_checks(register) -> None:
    register("tools", lambda _s: check_binaries("tools", "ip", package="iproute2"))

    def tun(_s: Settings) -> CheckResult:
        if os.path.exists("/dev/net/tun"):
            return CheckResult.ok("tun", "/dev/net/tun")
        return CheckResult.fail("tun", "/dev/net/tun missing: load the tun module (modprobe tun)")

    register("tun", tun)
