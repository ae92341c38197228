"""Per-VM persistent /root on an ext4 work disk cloned from the image's seed."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from banger_core import hookimpl
from banger_core.context import check_binaries

requires: list[str] = []


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    size_mib: int = Field(default=4096, ge=64, description="size of a new VM's work disk")


@hookimpl
def config_model() -> type[BaseModel]:
    return Settings


@hookimpl
def register_doctor_checks(register) -> None:
    register(
        "tools",
        lambda _s: check_binaries("tools", "mkfs.ext4", "e2fsck", "resize2fs", "debugfs", package="e2fsprogs"),
    )
