"""Choosing and building VMM drivers from config."""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

from banger_core.errors import BangerError, ErrorCode
from banger_core.vmm.base import Driver
from banger_core.vmm.firecracker import FirecrackerDriver
from banger_core.vmm.qemu import QemuDriver

if TYPE_CHECKING:  # pragma: no cover
    from banger_core.config import VMMTable
    from banger_core.paths import Paths

DRIVERS = ("qemu", "firecracker")
#: each driver's class, for what it can do before one is built (``nic_kinds``)
DRIVER_CLASSES: dict[str, type[Driver]] = {"qemu": QemuDriver, "firecracker": FirecrackerDriver}


def pick_driver(wanted: str, cfg: "VMMTable") -> str:
    """``auto``: Firecracker when its binary and a usable /dev/kvm exist, else QEMU."""
    if wanted == "auto":
        if shutil.which(cfg.firecracker_binary) and os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "firecracker"
        return "qemu"
    if wanted not in DRIVERS:
        raise BangerError(ErrorCode.BAD_REQUEST, f"unknown VMM driver {wanted!r}; choose one of {', '.join(DRIVERS)}")
    return wanted


def driver_for(name: str, cfg: "VMMTable", paths: "Paths") -> Driver:
    if name == "qemu":
        return QemuDriver(
            binary=cfg.qemu_binary,
            accel=cfg.accel,
            machine_type=cfg.qemu_machine,
            kvm_probe_timeout=cfg.kvm_probe_timeout_s,
            probe_cache=paths.kvm_probe,
            memory_dir=paths.memory_dir,
            tb_size_mib=cfg.tcg_tb_size_mib,
        )
    if name == "firecracker":
        return FirecrackerDriver(binary=cfg.firecracker_binary, links_dir=paths.runtime_dir / "fc")
    raise BangerError(ErrorCode.BAD_REQUEST, f"unknown VMM driver {name!r}")
