"""Helpers for testing banger plugins (see docs/plugins.md, "Testing a plugin")."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from banger_core.vm.stages import Lifecycle
from banger_core.models import VM, Machine, VMSpec
from banger_core.runtime import Runtime


def sample_vm(name: str = "sample", project_dir: Path | None = None, **kwargs: Any) -> VM:
    return VM(
        id=secrets.token_hex(8),
        name=name,
        spec=VMSpec(vcpus=1, memory_mib=512, root_size_mib=1024),
        project_dir=str(project_dir) if project_dir else None,
        **kwargs,
    )


def run_lifecycle(rt: Runtime | None = None, vm: VM | None = None, boot: Any = None) -> tuple[VM, Machine]:
    """Run every enabled plugin's lifecycle hooks for a VM without booting anything.

    Loads plugins from entry points (as banger does) unless ``rt`` is given; returns the
    VM (with its teardown record) and the machine description plugins built.
    """
    rt = rt or Runtime.load()
    vm = vm or sample_vm()
    machine = Machine(kernel="/dev/null", vcpus=vm.spec.vcpus, memory_mib=vm.spec.memory_mib)
    lc = Lifecycle(rt, vm, op_id="op-" + secrets.token_hex(6))
    lc.start(machine, boot or (lambda _m: None))
    lc.cleanup()
    return vm, machine
