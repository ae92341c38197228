"""Per-VM persistent /root on an ext4 work disk cloned from the image's work-seed.

- ``prepare_host``: the VM's ``work.img`` (its own dir) is made at its first start from
  the image's work-seed (``disks``), grown to ``--disk-size`` (else ``[workdisk]
  size_mib``); later starts keep it (grown if the size was raised by ``vm set``).
- ``configure_machine``: attached read-write; ``banger.workdisk=banger-work`` on the
  kernel command line tells the agent to mount it on /root before it serves.
- ``post_boot`` (also after a restore or a warm start): the agent's health must say
  /root is the work disk, else the start fails saying why.
- snapshots: the core keeps a copy of every writable drive in the VM's dir, so a
  restored VM continues on its own copy of the work disk as it was.
- ``cleanup``: the disk goes with the VM (``DELETE``), never on a stop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from banger_core import hookimpl
from banger_core.context import check_binaries
from banger_core.models import SizeMiB

requires = ["agent"]  # the agent mounts the disk on /root


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    size_mib: SizeMiB = Field(
        default=4096,
        ge=16,
        description='size of a new VM\'s work disk (MiB, or a size like "8G"; sparse: unused space costs nothing)',
    )


class VMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    disk_size: SizeMiB | None = Field(
        default=None, ge=16, description="the work disk that holds /root, e.g. 8G (default: [workdisk] size_mib); only grows"
    )


@hookimpl
def config_model() -> type[BaseModel]:
    return Settings


@hookimpl
def vm_options() -> type[BaseModel]:
    return VMOptions


def _size(ctx: Any) -> int:
    opts = ctx.options if isinstance(ctx.options, VMOptions) else VMOptions()
    settings = ctx.settings if isinstance(ctx.settings, Settings) else Settings()
    return opts.disk_size or settings.size_mib


def disk_path(ctx: Any) -> Path:
    from banger_workdisk.disks import DISK

    return Path(ctx.paths.vm_files(ctx.vm.id).dir) / DISK


@hookimpl
def prepare_host(ctx: Any) -> None:
    from banger_core.store import Store
    from banger_workdisk import disks

    disk, size = disk_path(ctx), _size(ctx)
    if disk.exists():  # its own, from an earlier start or a snapshot: keep it, grow it if asked
        if ctx.teardown.get("disk") != str(disk):  # a restored VM: the core made its copy
            ctx.teardown["disk"] = str(disk)
            ctx.persist()
        if disks.grow(disk, size):
            ctx.log.info("VM %s: work disk grown to %d MiB", ctx.vm.name, size)
        return
    store = Store(ctx.paths.db_file)
    try:
        image = store.find_image(ctx.vm.image or "")
    finally:
        store.close()
    if image is None:  # (a VM without an image: only banger_core.testing.run_lifecycle makes one)
        ctx.warn(f"no work disk: image {ctx.vm.image} is gone (no work-seed to make it from)")
        return
    ctx.teardown["disk"] = str(disk)  # recorded first: a failed create's cleanup (DELETE) removes it
    ctx.persist()
    disks.make_disk(ctx.paths.state_dir, image.name, Path(image.rootfs), disk, size)
    ctx.log.info("VM %s: work disk %s (%d MiB) from image %s's work-seed", ctx.vm.name, disk.name, size, image.name)


@hookimpl
def configure_machine(ctx: Any, machine: Any) -> None:
    from banger_core.models import Drive
    from banger_workdisk.disks import LABEL

    if disk_path(ctx).exists():
        machine.drives.append(Drive(id="work", path=str(disk_path(ctx))))
        machine.boot_args.append(f"banger.workdisk={LABEL}")


@hookimpl
def post_boot(ctx: Any) -> None:
    """/root must be the work disk before anything is placed there (keys, files)."""
    if not disk_path(ctx).exists():
        return
    health = ctx.service("agent").health(ctx.vm.id)
    if health is None:  # an image without banger's agent: nothing mounts the disk
        ctx.warn("/root is the image's, not the work disk: the image has no banger agent to mount it")
        ctx.teardown["mounted"] = None
        ctx.persist()
        return
    if "workdisk" not in health:
        raise RuntimeError(f"the work disk was not mounted on /root: agent {health.get('agent')} does not mount work disks")
    state = health["workdisk"]
    if state is None:  # an agent not started by the guest's boot (the fake Firecracker's, on the host)
        ctx.warn("the agent was not asked to mount the work disk (no banger.workdisk= on its command line)")
        return
    if not isinstance(state, dict) or state.get("error") or not state.get("device"):
        why = state.get("error") if isinstance(state, dict) else f"the agent said {state!r}"
        raise RuntimeError(f"the work disk was not mounted on /root: {why}")
    ctx.teardown["mounted"] = state.get("target")
    ctx.persist()


@hookimpl
def cleanup(ctx: Any) -> None:
    from banger_core.context import CleanupReason

    if ctx.reason not in (CleanupReason.DELETE, None):
        return  # the work disk outlives stops: it is the VM's /root
    disk = ctx.teardown.get("disk")
    if disk:
        Path(disk).unlink(missing_ok=True)


@hookimpl
def reconcile(ctx: Any) -> None:
    """Work-seeds of images that are gone (deleted, or renamed by a re-register)."""
    from banger_workdisk import disks

    root = disks.seeds_dir(ctx.paths.state_dir, "x").parent
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and ctx.store.find_image(d.name) is None:
                disks.remove_seeds(ctx.paths.state_dir, d.name)
                ctx.log.info("removed the work-seed of image %s (gone)", d.name)


@hookimpl
def vm_fields(ctx: Any, detail: bool) -> dict[str, object] | None:
    disk = ctx.teardown.get("disk")
    if not detail or not disk:
        return None
    p = Path(disk)
    try:
        st = p.stat()
    except OSError:
        return {"disk": disk, "state": "missing"}
    return {
        "disk": disk,
        "size_mib": st.st_size // (1024 * 1024),
        "allocated_mib": round(st.st_blocks * 512 / (1024 * 1024), 1),
        "mounted_on": ctx.teardown.get("mounted"),
    }


@hookimpl
def register_doctor_checks(register: Any) -> None:
    register(
        "tools",
        lambda _s: check_binaries("tools", "mkfs.ext4", "e2fsck", "resize2fs", "debugfs", package="e2fsprogs"),
    )
