"""Authoritative in-process DNS for <name>.vm, answering on loopback."""

from __future__ import annotations

import ipaddress
import socket

from pydantic import BaseModel, ConfigDict, Field, field_validator

from banger_core import hookimpl
from banger_core.context import CheckResult

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
def register_doctor_checks(register) -> None:
    def port(s: Settings) -> CheckResult:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((s.listen, s.port))
            except OSError as exc:
                return CheckResult.warn("port", f"{s.listen}:{s.port}/udp is taken ({exc.strerror}); bangerd may hold it")
        return CheckResult.ok("port", f"{s.listen}:{s.port}/udp is free")

    register("port", port)
