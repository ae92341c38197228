"""Copy host files into the guest when a VM starts (``[[filesync.entries]]``)."""

from __future__ import annotations

import os
import posixpath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from banger_core import hookimpl
from banger_core.context import CheckResult

requires = ["workdisk"]


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(description="absolute host path (file or directory); ~ expands")
    guest: str = Field(description="guest path under ~ or /root")
    mode: Literal["copy", "once"] = Field(default="copy", description="copy at every start, or only if absent")

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        v = os.path.expanduser(v)
        if not os.path.isabs(v):
            raise ValueError("must be an absolute path (or start with ~)")
        if ".." in v.split("/"):
            raise ValueError("must not contain '..'")
        return v

    @field_validator("guest")
    @classmethod
    def _guest(cls, v: str) -> str:
        if ".." in v.split("/"):
            raise ValueError("must not contain '..'")
        if v == "~" or v.startswith("~/"):
            v = "/root" + v[1:]
        if not v.startswith("/"):
            raise ValueError("must be absolute or start with ~")
        v = posixpath.normpath(v)
        if v != "/root" and not v.startswith("/root/"):
            raise ValueError("must be under ~ or /root")
        return v


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entries: list[Entry] = Field(default_factory=list)


@hookimpl
def config_model() -> type[BaseModel]:
    return Settings


@hookimpl
def register_doctor_checks(register) -> None:
    def sources(s: Settings) -> CheckResult:
        missing = [e.host for e in s.entries if not os.path.exists(e.host)]
        if missing:
            return CheckResult.warn("sources", f"host paths missing (skipped at start): {', '.join(missing)}")
        return CheckResult.ok("sources", f"{len(s.entries)} entr{'y' if len(s.entries) == 1 else 'ies'}")

    register("sources", sources)
