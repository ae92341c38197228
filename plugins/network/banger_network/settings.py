"""The network plugin's settings (``[network]``) and per-VM options (``--network``)."""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ModeSetting = Literal["auto", "bridge", "user", "none"]
NETNS_ENV = "BANGER_NETNS"
#: the value of ``netns`` (or BANGER_NETNS) that forbids acting in any namespace
NO_NETNS = "none"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: ModeSetting = Field(
        default="auto",
        description="VMs' network: bridge, user, none, or auto (bridge when the daemon may create TAP devices here, else none "
        "until user mode exists)",
    )
    bridge: str = Field(default="banger0", max_length=15, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$", description="host bridge")
    subnet: str = Field(default="172.30.0.0/24", description="guest subnet; the bridge takes its first host address")
    tap_pool: int = Field(default=2, ge=0, le=64, description="TAP devices kept warm for fast creates")
    netns: str = Field(
        default="",
        description="the network namespace (a name under /run/netns) banger may change; '' = the one the daemon first acted "
        "in (recorded); 'none' = none (bridge mode refused, auto picks none). BANGER_NETNS overrides it",
    )
    resolver: str | None = Field(default=None, description="nameserver for guests; default: the host's first non-loopback one")

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, v: str) -> str:
        net = ipaddress.ip_network(v, strict=True)
        if net.version != 4 or net.prefixlen > 29:
            raise ValueError("must be an IPv4 network of /29 or larger")
        return str(net)

    @field_validator("netns")
    @classmethod
    def _netns(cls, v: str) -> str:
        if v and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", v):
            raise ValueError("must be a network namespace name (as `ip netns` names them), '' or 'none'")
        return v

    @field_validator("resolver")
    @classmethod
    def _resolver(cls, v: str | None) -> str | None:
        if v is not None:
            ipaddress.IPv4Address(v)
        return v

    def expected_netns(self) -> str:
        env = os.environ.get(NETNS_ENV)
        return env if env is not None else self.netns


class VMOptions(BaseModel):
    """``--network MODE`` on vm create / vm run / vm set (a stopped VM)."""

    model_config = ConfigDict(extra="forbid")

    network: ModeSetting | None = Field(default=None, description="bridge, user, none or auto (default: [network] mode)")
