"""Guest agent channel (vsock, or virtio-serial where vsock is unavailable): health, ports."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field

from banger_core import hookimpl
from banger_core.context import CheckResult

requires: list[str] = []
provides = ["agent"]


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    port: int = Field(default=1024, ge=1, le=65535, description="guest vsock port of the agent")
    health_timeout_s: float = Field(default=120.0, gt=0, description="how long to wait for the agent after boot")


@hookimpl
def config_model() -> type[BaseModel]:
    return Settings


@hookimpl
def register_doctor_checks(register) -> None:
    def transport(_s: Settings) -> CheckResult:
        if os.path.exists("/dev/vhost-vsock"):
            return CheckResult.ok("transport", "vsock (/dev/vhost-vsock)")
        return CheckResult.ok("transport", "virtio-serial (no /dev/vhost-vsock on this host)")

    register("transport", transport)
