"""Pydantic models for what banger stores and what crosses its boundaries."""

from __future__ import annotations

import enum
import re
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

VM_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def validate_vm_name(name: str) -> str:
    """VM names are DNS labels: 1–63 of [a-z0-9-], no leading or trailing '-'."""
    if not VM_NAME_RE.match(name):
        raise ValueError(
            f"invalid VM name {name!r}: use 1-63 characters of a-z, 0-9 and '-', "
            "not starting or ending with '-'"
        )
    return name


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VMState(str, enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    ERROR = "error"


class VMSpec(Strict):
    vcpus: int = Field(gt=0)
    memory_mib: int = Field(gt=0)
    disk_size_mib: int = Field(gt=0)
    kernel: str | None = None  # boot this kernel instead of the image's kernel_ref


class VM(Strict):
    id: str
    name: str
    state: VMState = VMState.CREATED
    image: str | None = None
    spec: VMSpec
    driver: str = "qemu"
    disk_strategy: str | None = None
    guest_ip: str | None = None
    project_dir: str | None = None
    last_error: str | None = None
    # What teardown needs even if handles.json is lost (tap name, nat rules, ...),
    # keyed by plugin name. Durable: lives in SQLite.
    teardown: dict[str, dict[str, Any]] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validate_vm_name(v)


class Image(Strict):
    name: str
    rootfs: str
    kernel_ref: str | None = None
    managed: bool = False
    sha256: str | None = None
    init: str | None = None  # kernel init= for images whose own init is not /sbin/init
    source: str | None = None  # where it came from: catalog name, OCI ref@digest, file
    created_at: datetime = Field(default_factory=utcnow)


class Kernel(Strict):
    name: str
    # What QEMU boots by default: a bzImage (on -M pc) or an ELF vmlinux (on -M microvm).
    kernel: str
    # The uncompressed ELF kernel, when there is one: Firecracker boots only this.
    vmlinux: str | None = None
    initrd: str | None = None
    modules: str | None = None
    # Where it came from: "recipe:NAME/REV", "bundle:SHA256" or "import:PATH"; a catalog
    # kernel whose source differs from what a pull would record now is stale.
    source: str | None = None
    created_at: datetime = Field(default_factory=utcnow)


class VMHandles(Strict):
    """Transient handles of a running VM: in memory, mirrored to ``handles.json``."""

    vm_id: str
    pid: int | None = None
    driver: str | None = None
    api_socket: str | None = None
    devices: dict[str, str] = Field(default_factory=dict)
    plugins: dict[str, dict[str, Any]] = Field(default_factory=dict)


# --- the VMM-neutral machine description that plugins extend in configure_machine ---


class Drive(Strict):
    id: str
    path: str
    read_only: bool = False
    root: bool = False


class NIC(Strict):
    id: str
    tap: str
    mac: str


class AgentChannel(Strict):
    kind: Literal["vsock", "serial"]
    host_path: str
    guest_cid: int | None = None


class Machine(Strict):
    kernel: str
    vmlinux: str | None = None  # the ELF form of ``kernel``, for VMMs that boot only ELF
    initrd: str | None = None
    boot_args: list[str] = Field(default_factory=list)
    vcpus: int = Field(gt=0)
    memory_mib: int = Field(gt=0)
    drives: list[Drive] = Field(default_factory=list)
    nics: list[NIC] = Field(default_factory=list)
    agent: AgentChannel | None = None
    console_log: str | None = None
