"""The validated parameters of ``vm.create`` and ``vm.set``, and the checks a VM spec
must pass on this host."""

from __future__ import annotations

import secrets
from typing import Any

from pydantic import BaseModel, Field, field_validator

from banger_core import host
from banger_core.errors import BangerError, ErrorCode
from banger_core.models import HostPath, Input, SizeMiB, VMSpec, validate_vm_name


class CreateParams(Input):
    name: str | None = None
    image: str | None = None
    kernel: str | None = None
    vcpus: int | None = Field(default=None, gt=0)
    memory_mib: SizeMiB | None = None
    root_size_mib: SizeMiB | None = None
    driver: str | None = None
    project_dir: HostPath | None = None
    #: per-VM plugin options: plugin -> {field: value} (each plugin's vm_options model)
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: deleted by the daemon when the run that made it ends (vm run --rm); see VM.ephemeral
    ephemeral: bool = False
    #: start from a warm-start template when one matches (else boot, then make one)
    warm: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return validate_vm_name(v) if v is not None else v


class SetParams(Input):
    refs: list[str] = Field(min_length=1)
    vcpus: int | None = Field(default=None, gt=0)
    memory_mib: SizeMiB | None = None
    root_size_mib: SizeMiB | None = None
    #: per-VM plugin options to change: plugin -> {field: value}, merged over the VM's
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)


def stored_options(checked: dict[str, BaseModel | None], given: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The options to store: for each plugin given some, the values given (as the
    model validated them; JSON), so the model's defaults stay its own."""
    out: dict[str, dict[str, Any]] = {}
    for name in given:
        model = checked.get(name)
        if model is not None:
            out[name] = model.model_dump(mode="json", include=set(given[name]))
    return out


def check_host_limits(spec: VMSpec) -> None:
    cpus, mem = host.cpu_count(), host.memory_mib()
    if spec.vcpus > cpus:
        raise BangerError(ErrorCode.BAD_REQUEST, f"vcpus {spec.vcpus} exceeds this host's {cpus} CPUs")
    if spec.memory_mib > mem:
        raise BangerError(ErrorCode.BAD_REQUEST, f"memory {spec.memory_mib} MiB exceeds this host's {mem} MiB")


def random_name() -> str:
    adjectives = ["brisk", "calm", "eager", "fuzzy", "jolly", "lucid", "nimble", "quiet", "rapid", "witty"]
    nouns = ["otter", "falcon", "badger", "heron", "lynx", "marten", "osprey", "puffin", "tapir", "wren"]
    return f"{secrets.choice(adjectives)}-{secrets.choice(nouns)}-{secrets.token_hex(2)}"
