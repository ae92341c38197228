"""Copy a git repo into the guest's /root/repo and export the guest's edits as a patch."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from banger_core import hookimpl
from banger_core.context import check_binaries

requires = ["agent", "workdisk"]


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    guest_path: str = Field(default="/root/repo", pattern=r"^/root(/[^/]+)+$")
    include_untracked: bool = False


@hookimpl
def config_model() -> type[BaseModel]:
    return Settings


@hookimpl
def register_doctor_checks(register) -> None:
    register("tools", lambda _s: check_binaries("tools", "git", package="git"))
