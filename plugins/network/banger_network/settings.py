"""The network plugin's settings (``[network]``) and per-VM options (``--network``)."""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from banger_core.models import USER_NET_DEFAULT

ModeSetting = Literal["auto", "bridge", "user", "none"]
NETNS_ENV = "BANGER_NETNS"
#: the value of ``netns`` (or BANGER_NETNS) that forbids acting in any namespace
NO_NETNS = "none"


#: a port, or a range, of a protocol or of both: "8080", "tcp/8080", "udp/5353", "6000-6010"
PORT_SPEC_RE = r"(?:(tcp|udp)/)?([0-9]{1,5})(?:-([0-9]{1,5}))?"


def parse_port_spec(spec: str) -> tuple[tuple[str, ...], int, int]:
    """("tcp", "udp") or one of them, first port, last port; ValueError when malformed."""
    m = re.fullmatch(PORT_SPEC_RE, spec)
    if m is None:
        raise ValueError(f"{spec!r} is not a port spec: PORT, PROTO/PORT or [PROTO/]FIRST-LAST (PROTO tcp or udp)")
    first = int(m.group(2))
    last = int(m.group(3)) if m.group(3) else first
    if not 1 <= first <= last <= 65535:
        raise ValueError(f"{spec!r}: ports are 1-65535, the first of a range not above the last")
    return ((m.group(1),) if m.group(1) else ("tcp", "udp")), first, last


class ForwardSettings(BaseModel):
    """``[network.forward]``: which guest listeners user mode forwards to 127.0.0.1."""

    model_config = ConfigDict(extra="forbid")

    auto: bool = Field(default=True, description="forward user-mode guests' TCP and UDP listeners to 127.0.0.1 automatically")
    exclude: list[str] = Field(default_factory=list, description='guest ports never forwarded: "22", "udp/5353", "tcp/6000-6010"')
    pin: dict[str, int] = Field(
        default_factory=dict,
        description='guest port -> the host port it must get (else it is not forwarded): { "8080" = 18080, "udp/53" = 10053 }',
    )

    @field_validator("exclude")
    @classmethod
    def _exclude(cls, v: list[str]) -> list[str]:
        for spec in v:
            parse_port_spec(spec)
        return v

    @field_validator("pin")
    @classmethod
    def _pin(cls, v: dict[str, int]) -> dict[str, int]:
        seen: dict[tuple[str, int], str] = {}
        for spec, host_port in v.items():
            protos, first, last = parse_port_spec(spec)
            if first != last:
                raise ValueError(f"pin {spec!r}: one guest port, not a range")
            if not 1 <= host_port <= 65535:
                raise ValueError(f"pin {spec!r} = {host_port}: host ports are 1-65535")
            for proto in protos:
                if (proto, host_port) in seen:
                    raise ValueError(f"pin {spec!r} and {seen[(proto, host_port)]!r} both want host port {proto}/{host_port}")
                seen[(proto, host_port)] = spec
        return v

    def excluded(self, proto: str, port: int) -> bool:
        for spec in self.exclude:
            protos, first, last = parse_port_spec(spec)
            if proto in protos and first <= port <= last:
                return True
        return False

    def pinned(self, proto: str, port: int) -> int | None:
        for spec, host_port in self.pin.items():
            protos, first, _last = parse_port_spec(spec)
            if proto in protos and first == port:
                return host_port
        return None


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: ModeSetting = Field(
        default="auto",
        description="VMs' network: bridge, user, none, or auto (bridge when the daemon may create TAP devices here, else user "
        "when the VMM has it (QEMU), else none)",
    )
    bridge: str = Field(default="banger0", max_length=15, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$", description="host bridge")
    subnet: str = Field(default="172.30.0.0/24", description="guest subnet; the bridge takes its first host address")
    tap_pool: int = Field(default=2, ge=0, le=64, description="TAP devices kept warm for fast creates")
    netns: str = Field(
        default="",
        description="the network namespace (a name under /run/netns) banger's VMs may use and change; '' = bridge mode in the "
        "one the daemon first made its bridge in (recorded), user mode anywhere; 'none' = none (bridge and user mode refused, "
        "auto picks none). BANGER_NETNS overrides it",
    )
    resolver: str | None = Field(default=None, description="nameserver for guests; default: the host's first non-loopback one")
    user_subnet: str = Field(
        default=USER_NET_DEFAULT,
        description="user mode's guest network (QEMU's slirp: the guest is its .15, the host's loopback its .2, DNS its .3)",
    )
    forward: ForwardSettings = Field(default_factory=ForwardSettings, description="user mode's port forwarding")

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, v: str) -> str:
        net = ipaddress.ip_network(v, strict=True)
        if net.version != 4 or net.prefixlen > 29:
            raise ValueError("must be an IPv4 network of /29 or larger")
        return str(net)

    @field_validator("user_subnet")
    @classmethod
    def _user_subnet(cls, v: str) -> str:
        from banger_core.models import user_net

        return user_net(v).network

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
