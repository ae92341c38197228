"""The workspace plugin's models: its settings, per-VM options and vm exec options."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Mode = Literal["copy", "full_copy"]


class Settings(BaseModel):
    """``[workspace]`` in config.toml (or a project's banger.toml)."""

    model_config = ConfigDict(extra="forbid")

    guest_path: str = Field(default="/root/repo", pattern=r"^/root(/[A-Za-z0-9._-]+)+$", description="where the repository goes")
    include_untracked: bool = Field(default=False, description="send untracked files (those .gitignore does not exclude)")
    mode: Mode = Field(default="copy", description="copy: HEAD's commit alone; full_copy: the whole git dir and submodules")
    bootstrap: bool = Field(default=True, description="install a toolchain the repository declares (.mise.toml) with mise")


class VMOptions(BaseModel):
    """How ``vm run PATH`` (and a later ``--auto-prepare``) sends the VM's workspace."""

    model_config = ConfigDict(extra="forbid")

    include_untracked: bool | None = Field(default=None, description="send untracked files too (default: [workspace])")
    mode: Mode | None = Field(default=None, description="copy (HEAD alone) or full_copy (all history, submodules)")
    bootstrap: bool | None = Field(default=None, description="install the toolchain .mise.toml declares (needs egress)")


class ExecOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    auto_prepare: bool = Field(default=False, description="copy the host repository into the workspace again first")
    force: bool = Field(default=False, description="with --auto-prepare: even over changes not exported yet")
