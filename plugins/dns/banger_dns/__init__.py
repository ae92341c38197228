"""Authoritative DNS for <name>.vm, answering on loopback (a daemon-lifetime service).

The records are the "net" service's (``records()``: VM name -> address of running
bridged VMs), reached through the core; see README.md for pointing the host's
resolver at it.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from banger_core import hookimpl
from banger_core.context import CheckResult
from banger_core.errors import BangerError

if TYPE_CHECKING:
    from banger_core.context import DoctorContext, FieldsContext
    from banger_core.models import Listener
    from banger_dns.server import DnsService

requires = ["net"]


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    listen: str = Field(default="127.0.0.1", description="address to answer on (loopback only)")
    port: int = Field(default=42069, ge=1, le=65535)
    zone: str = Field(default="vm", pattern=r"^[a-z0-9-]+(\.[a-z0-9-]+)*$")
    ttl: int = Field(default=5, ge=0, le=86400)

    @field_validator("listen")
    @classmethod
    def _loopback(cls, v: str) -> str:
        if not ipaddress.ip_address(v).is_loopback:
            raise ValueError("must be a loopback address")
        return v


@hookimpl
def config_model() -> type[BaseModel]:
    return Settings


@hookimpl
def register_services(register: Any, daemon: Any) -> None:
    from banger_dns.server import DnsService

    rt = daemon.runtime
    service = DnsService(
        settings=lambda: rt.config.settings_for(rt.host, "dns"),
        net=lambda: rt.host.service_for("dns", "net"),  # looked up at start, not now
    )
    register("dns", service)


def _service(ctx: FieldsContext) -> DnsService | None:
    """This plugin's service (FieldsContext.service, core 0.5), None outside a daemon."""
    try:
        service: DnsService = ctx.service("dns")
    except (BangerError, AttributeError):
        return None
    return service


def _vm_name(ctx: FieldsContext) -> str | None:
    """The VM's name in the zone, when the net service has a record for it."""
    service = _service(ctx)
    if service is None or service.address_of(ctx.vm.name) is None:
        return None
    return f"{ctx.vm.name}.{service.zone_name()}"


@hookimpl
def vm_fields(ctx: FieldsContext, detail: bool) -> dict[str, object] | None:
    name = _vm_name(ctx)
    return {"dns": name} if name else None


@hookimpl
def vm_port_endpoint(ctx: FieldsContext, listener: Listener) -> str | None:
    if listener.proto not in ("tcp", "udp"):
        return None
    try:
        bound = ipaddress.ip_address(listener.address.split("%")[0])
    except ValueError:
        return None
    if bound.is_loopback:
        return None  # nothing outside the guest reaches it
    service = _service(ctx)
    address = service.address_of(ctx.vm.name) if service is not None else None
    if address is None:
        return None
    if not bound.is_unspecified and str(bound) != address:
        return None  # bound to another address of the guest: the name does not lead there
    return f"{_vm_name(ctx)}:{listener.port}"


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port_check(s: Settings, doctor: DoctorContext | None) -> CheckResult:
    family = socket.AF_INET6 if ":" in s.listen else socket.AF_INET
    taken: list[str] = []
    reasons: list[str] = []
    for proto, kind in (("udp", socket.SOCK_DGRAM), ("tcp", socket.SOCK_STREAM)):
        with socket.socket(family, kind) as sock:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds it
            try:
                sock.bind((s.listen, s.port))
            except OSError as exc:
                taken.append(proto)
                reasons.append(exc.strerror or str(exc))
    where = _addr(s.listen, s.port)
    if not taken:
        return CheckResult.ok("port", f"{where} udp and tcp are free")
    from banger_dns.probe import answers_for_zone

    held = f"{where}/{'+'.join(taken)} is taken ({'; '.join(sorted(set(reasons)))})"
    if answers_for_zone(s.listen, s.port, s.zone):
        pid = _daemon_dns_pid(doctor, where)
        if pid is not None:
            return CheckResult.ok("port", f"bangerd (pid {pid}) answers on {where} for .{s.zone}")
        return CheckResult.fail(
            "port", f"{held} by a DNS server for .{s.zone} that is not this user's bangerd; set [dns] port to a free port"
        )
    return CheckResult.fail("port", f"{held} by another program; stop it, or set [dns] port to a free port")


def _daemon_dns_pid(doctor: DoctorContext | None, where: str) -> int | None:
    """The pid of this user's bangerd when its dns service listens on ``where``."""
    if doctor is None:
        return None
    from banger_core.client import Client

    try:
        st = Client(doctor.paths).call("daemon.status", autostart=False)
    except Exception:
        return None
    dns = (st.get("services") or {}).get("dns") or {}
    if dns.get("listen") == where and dns.get("udp"):
        pid: int = st["pid"]
        return pid
    return None


@hookimpl
def register_doctor_checks(register: Any, doctor: DoctorContext) -> None:
    register("port", lambda s: _port_check(s, doctor))
