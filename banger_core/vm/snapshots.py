"""Snapshots, restores and warm-start templates.

A snapshot is a VM frozen at one instant, in a directory of its own
(``Paths.snapshot_dir``): the driver's files (QEMU's migration stream; Firecracker's
vmstate and memory), the root disk as a read-only layer (``disks.freeze_root``) and
the Machine the VM ran with. Taking one pauses the guest for as long as writing its
memory takes, then lets it go on (or stops it, ``--stop``). A restore is a new VM whose
disk stands on the layer (``disks.disk_from_layer``) and whose VMM continues from the
driver's files; its plugins then make it a VM of its own (the ``vm_resumed`` hook).

``compat`` is what a restore must match: the same kernel files, the same devices (the
agent disk's path names its contents), the same VMM binary. A warm-start template is a
snapshot of kind ``template`` with a key (``template_key``) naming everything the VM
it was taken from was made of; ``vm run`` restores one that matches, else boots and
makes one right after the agent answers. Crash safety: a snapshot is written in a
staging dir and moved into place before its row is added; the daemon's start removes
staging dirs and snapshot dirs without a row, and resumes a VM it finds paused while
its row says running (``VMService.reconcile``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import ValidationError

from banger_core.errors import BangerError, ErrorCode
from banger_core.fsutil import atomic_write
from banger_core.models import VM, Machine, Resumed, Snapshot, SnapshotKind, VMState, utcnow
from banger_core.paths import SNAPSHOT_MACHINE, Paths
from banger_core.vm import disks

if TYPE_CHECKING:
    from banger_core.store import Store
    from banger_core.vm.service import Progress, VMService
    from banger_core.vmm.base import Driver

log = logging.getLogger("banger.snapshots")

COMPAT = "compat.json"  # in a snapshot's (or suspend image's) dir: ``compat`` at the time


def _file_identity(path: str | None) -> str | None:
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return f"{path}:missing"
    return f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"


def compat(machine: Machine, driver: "Driver", vm_dir: Path) -> dict[str, Any]:
    """What a VMM restoring a snapshot of ``machine`` must have exactly: kernel and
    initrd (files, not names), vCPUs and memory, the device set (drives outside the
    VM's own dir by path: the agent disk's name carries its contents), the agent
    channel's kind, and the VMM binary."""
    inside = str(vm_dir) + os.sep
    return {
        "kernel": _file_identity(machine.kernel),
        "initrd": _file_identity(machine.initrd),
        "vcpus": machine.vcpus,
        "memory_mib": machine.memory_mib,
        "drives": [
            {"id": d.id, "root": d.root, "read_only": d.read_only, "path": None if d.path.startswith(inside) else d.path}
            for d in machine.drives
        ],
        "nics": [n.id if n.kind == "tap" else f"{n.id}:{n.kind}" for n in machine.nics],  # slirp has device state
        "agent": machine.agent.kind if machine.agent else None,
        "vmm": driver.identity(),
        "format": driver.snapshot_format,
    }


_WHAT = {
    "kernel": "the kernel changed",
    "initrd": "the initrd changed",
    "vcpus": "the vCPU count changed",
    "memory_mib": "the memory size changed",
    "drives": "the devices changed (disks, or the agent)",
    "nics": "the network devices changed",
    "agent": "the agent channel changed",
    "vmm": "the VMM binary changed",
    "format": "it was written in an older format (by an older banger)",
}


def compat_diff(then: dict[str, Any], now: dict[str, Any]) -> str | None:
    """Why a snapshot taken with ``then`` cannot be restored as ``now``; None if it can."""
    why = [_WHAT.get(k, f"{k} changed") for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
    return "; ".join(why) or None


@dataclass
class ResumeFrom:
    """How a start continues from a snapshot (or a suspend image) instead of booting."""

    src: Path  # the driver's files and SNAPSHOT_MACHINE
    resumed: Resumed
    #: the start fails when the snapshot cannot be used (a restore); otherwise it boots
    #: (a warm start, a suspend image), after ``discard``
    strict: bool = False
    discard: Callable[[], None] = field(default=lambda: None)
    what: str = "the snapshot"

    @property
    def machine(self) -> Machine:
        return Machine.model_validate_json((self.src / SNAPSHOT_MACHINE).read_bytes())

    @property
    def compat(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.src / COMPAT).read_text())
            return data
        except (OSError, ValueError):
            return {}


def write_image(vms: "VMService", vm: VM, driver: "Driver", pid: int, dest: Path) -> None:
    """Into ``dest``: the paused VM's state (driver), its Machine and ``compat``."""
    run_dir = vms.run_dir(vm)
    machine = Machine.model_validate_json(vms.machine_file(vm).read_bytes())
    driver.snapshot(pid, run_dir, dest)
    atomic_write(dest / SNAPSHOT_MACHINE, machine.model_dump_json(indent=2))
    atomic_write(dest / COMPAT, json.dumps(compat(machine, driver, run_dir), indent=2))


def fork_names(prefix: str, count: int) -> list[str]:
    """The names of ``count`` forks named after ``prefix``: PREFIX-1..PREFIX-N, each a
    valid VM name (ValueError saying which is not)."""
    from banger_core.checks import validate_vm_name

    validate_vm_name(prefix, "fork prefix")
    return [validate_vm_name(f"{prefix}-{i}", "fork") for i in range(1, count + 1)]


def image_snapshots(store: "Store", paths: Paths, image: str) -> list[str]:
    """Before ``image`` is deleted or rebuilt (a snapshot's disk layer is an overlay of
    its rootfs: other bytes under it would be a corrupt disk): its templates that no VM
    stands on are removed (a later run makes new ones); the names of its user
    snapshots, which must go first, are returned."""
    kept = []
    for snap in store.list_snapshots():
        if snap.image != image:
            continue
        if (
            snap.kind is SnapshotKind.TEMPLATE
            and not store.vms_on_snapshot(snap.id)
            and not any(s.base_snapshot == snap.id for s in store.list_snapshots())
        ):
            store.delete_snapshot(snap.id)
            shutil.rmtree(paths.snapshot_dir(snap.id), ignore_errors=True)
        else:
            kept.append(snap.name)
    return kept


def _size(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


class SnapshotService:
    """``vm snapshot``, ``vm restore``, ``snapshot list|show|delete`` and templates."""

    def __init__(self, vms: "VMService") -> None:
        self.vms = vms
        self.store = vms.store
        self.paths: Paths = vms.paths
        self._making: dict[str, threading.Event] = {}  # template key -> set when made (or given up)
        self._making_guard = threading.Lock()
        self._guard = threading.Lock()  # a delete's check and a VM's stand_on do not interleave

    # --- lookups -----------------------------------------------------------------------
    def resolve(self, ref: str) -> Snapshot:
        if not ref:
            raise BangerError(ErrorCode.BAD_REQUEST, "empty snapshot reference")
        snap = self.store.find_snapshot(ref)
        if snap is not None:
            return snap
        matches = self.store.find_snapshots(ref)
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise BangerError(ErrorCode.NOT_FOUND, f"no snapshot named or with ID prefix {ref!r} (see banger snapshot list)")
        raise BangerError(ErrorCode.BAD_REQUEST, f"snapshot reference {ref!r} is ambiguous")

    def show(self, snap: Snapshot) -> dict[str, Any]:
        data = snap.model_dump(mode="json")
        data["dir"] = str(self.paths.snapshot_dir(snap.id))
        data["vms"] = [v.name for v in self.store.vms_on_snapshot(snap.id)]
        data["snapshots"] = [s.name for s in self._snapshots_on(snap)]
        return data

    def _snapshots_on(self, snap: Snapshot) -> list[Snapshot]:
        return [s for s in self.store.list_snapshots() if s.base_snapshot == snap.id]

    def listing(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [self.show(s) for s in self.store.list_snapshots(kind)]

    # --- taking one ----------------------------------------------------------------------
    def take(
        self,
        vm: VM,
        name: str | None,
        op_id: str,
        stop: bool = False,
        kind: SnapshotKind = SnapshotKind.USER,
        key: str | None = None,
        locked: bool = False,
    ) -> Snapshot:
        """Pause ``vm``, write its state and its disk layer, then let it go on (or stop
        it). ``locked``: the caller holds the VM's lock."""
        if not locked:
            with self.vms.lock(vm.id):
                return self.take(vm, name, op_id, stop, kind, key, locked=True)
        vms = self.vms
        vm = vms._settle(self.store.get_vm(vm.id), op_id)
        if not vm.state.live:
            raise BangerError(
                ErrorCode.BAD_REQUEST, f"VM {vm.name} is {vm.state.value}: only a running or paused VM is snapshotted"
            )
        snap_id = secrets.token_hex(8)
        try:
            snap = Snapshot(
                id=snap_id,
                # a default name fits the 63 characters of a name: <vm name, cut>-YYYYmmdd-HHMMSS
                name=name or f"{vm.name[:47].rstrip('-')}-{time.strftime('%Y%m%d-%H%M%S')}",
                kind=kind,
                vm_id=vm.id,
                vm_name=vm.name,
                image=vm.image,
                spec=vm.spec,
                driver=vm.driver,
                disk_strategy=vm.disk_strategy or "sparse",
                project_dir=vm.project_dir,
                options=vm.options,
                key=key,
                base_snapshot=vm.base_snapshot,
            )
        except ValidationError as exc:  # its last line is only a link to pydantic's docs
            raise BangerError(ErrorCode.BAD_REQUEST, exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
        if self.store.find_snapshot(snap.name):
            raise BangerError(ErrorCode.ALREADY_EXISTS, f"a snapshot named {snap.name!r} already exists")
        driver = vms.driver(vm)
        pid = vms._pid(vm)
        assert pid is not None  # _settle: a live VM has its VMM
        run_dir = vms.run_dir(vm)
        final = self.paths.snapshot_dir(snap_id)
        was_running = vm.state is VMState.RUNNING
        t0 = time.monotonic()
        staging: Path | None = None
        moved = False
        try:
            if was_running:  # the row stays "running": a daemon dying now leaves it to reconcile to resume
                driver.pause(pid, run_dir)
            staging = Paths.staging_dir(final)
            write_image(vms, vm, driver, pid, staging)
            disks.freeze_root(disks.root_disk_path(run_dir, vm.disk_strategy or "sparse"), staging)
            disks.freeze_drives(Machine.model_validate_json(vms.machine_file(vm).read_bytes()), run_dir, staging)
            snap.size_bytes = _size(staging)
            if vms._pid(vm) is None:  # the VMM died meanwhile: the snapshot failed, whatever was written
                raise BangerError(ErrorCode.OPERATION_FAILED, f"VM {vm.name}'s VMM exited during the snapshot")
            os.rename(staging, final)
            moved = True
            self.store.insert_snapshot(snap)
        except BaseException:
            if moved:
                shutil.rmtree(final, ignore_errors=True)
            elif staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            if was_running and vms._pid(vm) is not None:
                self._cont(driver, pid, run_dir, vm, op_id, cut_off=True)
            raise
        paused_for = time.monotonic() - t0
        if stop:
            vms._stop_locked(vm, op_id, force=True)
        elif was_running:
            self._cont(driver, pid, run_dir, vm, op_id)
        log.info(
            "VM %s: snapshot %s (%s, %.1f MiB) in %.2fs",
            vm.name,
            snap.name,
            kind.value,
            snap.size_bytes / 2**20,
            paused_for,
            extra={"op_id": op_id},
        )
        return snap

    @staticmethod
    def _cont(driver: "Driver", pid: int, run_dir: Path, vm: VM, op_id: str, cut_off: bool = False) -> None:
        """Let the paused source run again; ``cut_off``: its snapshot did not finish (a
        failure, a daemon that died), so what QEMU may still be writing is cancelled first."""
        if cut_off:
            try:
                driver.cancel_snapshot(pid, run_dir)
            except BangerError:
                pass
        try:
            driver.resume(pid, run_dir)
        except BangerError as exc:
            log.error("VM %s: could not resume after the snapshot: %s", vm.name, exc, extra={"op_id": op_id})

    # --- restoring ---------------------------------------------------------------------------
    def resume_from(self, snap: Snapshot, vm: VM, strict: bool) -> ResumeFrom:
        """A start of ``vm`` (whose disk stands on ``snap``) continuing from ``snap``."""

        def discard() -> None:  # boot instead: the disk goes back to the image's
            vm_dir = self.vms.run_dir(vm)
            for strategy in ("qcow2", "reflink"):
                disks.root_disk_path(vm_dir, strategy).unlink(missing_ok=True)
            vm.base_snapshot = None
            vm.disk_strategy = None
            self.store.update_vm(vm)
            if snap.kind is SnapshotKind.TEMPLATE:  # stale or broken: the VM booting now replaces it
                try:
                    self.delete(snap)
                except BangerError as exc:
                    log.info("template %s kept: %s", snap.name, exc.message)

        return ResumeFrom(
            src=self.paths.snapshot_dir(snap.id),
            resumed=Resumed(
                snapshot=snap.name,
                kind={SnapshotKind.TEMPLATE: "template", SnapshotKind.FORK: "fork"}.get(snap.kind, "restore"),
                source_vm=snap.vm_name,
                source_vm_id=snap.vm_id,
                new_identity=True,
                taken_at=snap.created_at,
            ),
            strict=strict,
            discard=discard,
            what=f"{snap.kind.value} {snap.name}",
        )

    def stand_on(self, snap: Snapshot, vm: VM) -> None:
        """Make ``vm``'s root disk a copy-on-write layer over ``snap``'s."""
        with self._guard:
            if self.store.find_snapshot(snap.name) is None:
                raise BangerError(ErrorCode.NOT_FOUND, f"snapshot {snap.name} was deleted")
            layer = disks.snapshot_layer(self.paths.snapshot_dir(snap.id))
            vm.disk_strategy = disks.disk_from_layer(layer, self.vms.run_dir(vm), vm.driver)
            disks.drives_from_snapshot(self.paths.snapshot_dir(snap.id), self.vms.run_dir(vm))
            vm.base_snapshot = snap.id
            self.store.update_vm(vm)
            snap.last_used_at = utcnow()
            self.store.update_snapshot(snap)

    def restore(self, ref: str, name: str | None, op_id: str, progress: "Progress", cancel: threading.Event) -> VM:
        from banger_core.vm.params import random_name

        snap = self.resolve(ref)
        return self._restore_as(snap, name or random_name(), op_id, progress, cancel, f"restores snapshot {snap.name}")

    def _restore_as(self, snap: Snapshot, name: str, op_id: str, progress: "Progress", cancel: threading.Event, how: str) -> VM:
        """A new VM ``name`` made as ``snap``'s source was, continuing from ``snap``."""
        vm = VM(
            id=secrets.token_hex(8),
            name=name,
            image=snap.image,
            spec=snap.spec,
            driver=snap.driver,
            project_dir=snap.project_dir,
            options=snap.options,
        )
        return self.vms.make(vm, op_id, progress, cancel, prepare=lambda v: self._restore_disk(snap, v), how=how)

    def _restore_disk(self, snap: Snapshot, vm: VM) -> ResumeFrom:
        self.stand_on(snap, vm)
        return self.resume_from(snap, vm, strict=True)

    # --- forks ------------------------------------------------------------------------------
    def fork(
        self, source: VM, count: int, prefix: str | None, op_id: str, progress: "Progress", cancel: threading.Event
    ) -> list[VM]:
        """``vm fork``: ``count`` new VMs ``PREFIX-1..N`` that go on from ``source``'s
        state now, each on its own disk layer and with its own identity (``vm_resumed``
        with ``kind`` "fork"); ``source`` runs on. One snapshot (kind ``fork``, removed
        with the last of its forks) is taken, then the forks are restored from it side
        by side; its memory file is mapped privately by each, so they share its pages.
        All or nothing: a fork that fails takes the others and the snapshot with it."""
        from concurrent.futures import ThreadPoolExecutor

        t0 = time.monotonic()
        source = self.vms.refresh(self.store.get_vm(source.id), op_id)
        if not source.state.live:
            raise BangerError(
                ErrorCode.BAD_REQUEST,
                f"VM {source.name} is {source.state.value}: only a running or paused VM is forked (banger vm start {source.name})",
            )
        prefix = prefix or source.name
        try:
            names = fork_names(prefix, count)
        except ValueError as exc:
            raise BangerError(ErrorCode.BAD_REQUEST, str(exc)) from None
        taken = [n for n in names if self.store.find_vms(name=n)]
        if taken:
            raise BangerError(ErrorCode.ALREADY_EXISTS, f"VMs named {', '.join(taken)} already exist (choose another --name)")
        snap_name = f"{prefix[:40].rstrip('-')}-fork-{secrets.token_hex(3)}"
        snap = self.take(source, snap_name, op_id, kind=SnapshotKind.FORK)
        progress(
            "step", {"msg": f"snapshot {snap.name} of {source.name} taken ({time.monotonic() - t0:.2f}s); {source.name} runs on"}
        )

        def one(name: str) -> VM:
            def quiet(stage: str, data: dict[str, Any]) -> None:  # N starts' steps would interleave
                if stage == "ready":
                    progress("step", {"msg": f"{name} ready ({data.get('elapsed_s', 0):.2f}s)"})

            return self._restore_as(snap, name, op_id, quiet, cancel, f"forks {source.name}")

        made: list[VM] = []
        failures: list[tuple[str, BaseException]] = []
        with ThreadPoolExecutor(max_workers=count, thread_name_prefix="fork") as pool:
            futures = {n: pool.submit(one, n) for n in names}
            for n, fut in futures.items():
                try:
                    made.append(fut.result())
                except BaseException as exc:  # every fork is waited for, then all are undone
                    failures.append((n, exc))
        if failures:
            for vm in made:
                try:
                    self.vms.delete(vm, op_id, force=True)
                except BangerError as exc:
                    log.error("fork %s not undone: %s", vm.name, exc, extra={"op_id": op_id})
            self.release(snap.id)
            name, first = failures[0]
            if isinstance(first, BangerError):
                first.message = f"fork {name}: {first.message} (no fork is left)"
                raise first
            raise first
        return made

    def release(self, snap_id: str | None) -> None:
        """A VM standing on ``snap_id`` is gone: a ``fork`` snapshot goes with the last
        VM (or snapshot) standing on it."""
        if snap_id is None:
            return
        with self._guard:
            snap = next((s for s in self.store.find_snapshots(snap_id) if s.id == snap_id), None)
            if snap is None or snap.kind is not SnapshotKind.FORK:
                return
            if self.store.vms_on_snapshot(snap.id) or self._snapshots_on(snap):
                return
            self.store.delete_snapshot(snap.id)
            shutil.rmtree(self.paths.snapshot_dir(snap.id), ignore_errors=True)

    # --- deleting ------------------------------------------------------------------------------
    def delete(self, snap: Snapshot) -> None:
        """Refused while a VM stands on it (its disk is a layer over the snapshot's)."""
        with self._guard:
            on = [v.name for v in self.store.vms_on_snapshot(snap.id)]
            if on:
                raise BangerError(
                    ErrorCode.BAD_REQUEST, f"snapshot {snap.name}: VMs stand on it ({', '.join(on)}); delete them first"
                )
            above = [s.name for s in self._snapshots_on(snap)]
            if above:
                raise BangerError(
                    ErrorCode.BAD_REQUEST,
                    f"snapshot {snap.name}: snapshots of VMs restored from it stand on it ({', '.join(above)}); delete them first",
                )
            self.store.delete_snapshot(snap.id)
            shutil.rmtree(self.paths.snapshot_dir(snap.id), ignore_errors=True)

    def sweep(self) -> list[str]:
        """At daemon start: snapshot dirs with no row (a daemon died between the move
        and the insert) go."""
        known = {s.id for s in self.store.list_snapshots()}
        gone = []
        if self.paths.snapshots_dir.is_dir():
            for d in self.paths.snapshots_dir.iterdir():
                if not d.name.startswith(".") and d.name not in known:
                    shutil.rmtree(d, ignore_errors=True)
                    gone.append(d.name)
        return gone

    # --- warm-start templates -------------------------------------------------------------------
    def template_key(self, vm: VM, plugins: dict[str, Any]) -> str:
        """Everything a template's VM was made of: image and kernel (their files), spec,
        VMM, plugin set with settings and the VM's options, and the banger build (the
        agent). ``plugins``: plugin name -> its settings and options (JSON)."""
        from banger_core.build import build_info

        image = self.store.get_image(vm.image or "")
        kernel = self.store.get_kernel(vm.spec.kernel or image.kernel_ref or "")
        b = build_info()
        material = {
            "image": [image.name, _file_identity(image.rootfs), image.init],
            "kernel": [kernel.name, _file_identity(kernel.kernel), _file_identity(kernel.initrd), _file_identity(kernel.vmlinux)],
            "spec": vm.spec.model_dump(mode="json"),
            "driver": self.vms.driver(vm).identity(),
            "boot_args": list(self.vms.cfg.vmm.boot_args),
            "plugins": plugins,
            "build": [b.get("version"), b.get("commit"), b.get("build_time")],
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()

    def acquire_template(self, key: str, wait: float = 600) -> tuple[Snapshot | None, bool]:
        """The template for ``key``, waiting while another run makes it; else (None,
        True): the caller makes it and must ``release_template(key)``."""
        deadline = time.monotonic() + wait
        while True:
            found = self.store.list_snapshots(SnapshotKind.TEMPLATE.value, key)
            if found:
                return found[0], False
            with self._making_guard:
                event = self._making.get(key)
                if event is None:
                    self._making[key] = threading.Event()
                    return None, True
            if not event.wait(max(0.0, deadline - time.monotonic())):
                return None, False  # the maker is slow: boot without one

    def release_template(self, key: str) -> None:
        with self._making_guard:
            event = self._making.pop(key, None)
        if event is not None:
            event.set()

    def make_template(self, vm: VM, key: str, op_id: str) -> Snapshot | None:
        """Snapshot ``vm`` (its lock held) as the template for ``key``; then keep at most
        ``templates_max``. A failure is logged: the run goes on without one."""
        try:
            snap = self.take(vm, f"template-{key[:12]}", op_id, kind=SnapshotKind.TEMPLATE, key=key, locked=True)
        except BangerError as exc:
            log.warning("VM %s: no template made: %s", vm.name, exc.message, extra={"op_id": op_id})
            return None
        self.evict(keep=snap.id)
        return snap

    def evict(self, keep: str | None = None) -> list[str]:
        """Templates beyond ``templates_max`` (least recently used first) and stale ones
        (their image or kernel is gone), that no VM stands on."""
        cap = self.vms.cfg.snapshots.templates_max
        templates = self.store.list_snapshots(SnapshotKind.TEMPLATE.value)
        gone: list[str] = []

        def stale(s: Snapshot) -> bool:
            return s.image is None or self.store.find_image(s.image) is None

        by_use = sorted(templates, key=lambda s: s.last_used_at or s.created_at)
        excess = len(templates) - cap
        for s in by_use:
            if s.id == keep or self.store.vms_on_snapshot(s.id):
                continue
            if stale(s) or excess > 0:
                try:
                    self.delete(s)
                except BangerError:  # a snapshot stands on it
                    continue
                gone.append(s.name)
                excess -= 1
        return gone

    def remove_templates(self, image: str | None) -> tuple[list[str], list[str]]:
        """``image warm --rm``: (removed, kept because VMs stand on them)."""
        removed, kept = [], []
        for s in self.store.list_snapshots(SnapshotKind.TEMPLATE.value):
            if image is not None and s.image != image:
                continue
            try:
                self.delete(s)
            except BangerError:  # VMs (or snapshots) stand on it
                kept.append(s.name)
                continue
            removed.append(s.name)
        return removed, kept
