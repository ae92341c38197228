"""The VM state machine and every lifecycle operation.

Operations are blocking (they shell out, copy disks, wait for processes) and run in
worker threads; the daemon's RPC layer bridges them to asyncio, progress and
cancellation. Locking: a short global lock reserves a name and a DB row; everything
after runs under that VM's own lock, so creates of different VMs overlap.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal as signals
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from banger_core.vm import disks
from banger_core.context import CleanupReason, ExecRequest, FieldsContext
from banger_core.errors import BangerError, ErrorCode, MultiError, raise_if_cancelled
from banger_core.fsutil import atomic_write
from banger_core.vm.handles import HandleStore
from banger_core.vm.params import CreateParams, SetParams, check_host_limits, random_name, stored_options
from banger_core.vm.snapshots import ResumeFrom, SnapshotService, compat, compat_diff, write_image
from banger_core.vm.stages import Lifecycle
from banger_core.models import VM, Drive, HostForward, Image, Listener, Machine, Resumed, VMHandles, VMSpec, VMState, utcnow
from banger_core.config import CoreConfig, ProjectConfig, resolve_vm_defaults
from banger_core.pulls import Puller
from banger_core.runtime import Runtime
from banger_core.store import Store
from banger_core.vmm import base as vmm
from banger_core.vmm.drivers import driver_for, pick_driver

log = logging.getLogger("banger.vms")

Progress = Callable[[str, dict[str, Any]], None]
Names = list[str]  # (VMService.list shadows the builtin inside the class body)

# Legal state transitions; anything else is refused.
TRANSITIONS: dict[VMState, set[VMState]] = {
    VMState.CREATED: {VMState.RUNNING, VMState.ERROR, VMState.STOPPED},
    VMState.RUNNING: {VMState.STOPPED, VMState.ERROR, VMState.PAUSED, VMState.SUSPENDED},
    VMState.PAUSED: {VMState.RUNNING, VMState.STOPPED, VMState.ERROR, VMState.SUSPENDED},
    VMState.SUSPENDED: {VMState.RUNNING, VMState.STOPPED, VMState.ERROR},
    VMState.STOPPED: {VMState.RUNNING, VMState.ERROR},
    VMState.ERROR: {VMState.RUNNING, VMState.STOPPED, VMState.ERROR},
}


class VMService:
    def __init__(self, rt: Runtime, store: Store, handles: HandleStore) -> None:
        self.rt = rt
        self.store = store
        self.handles = handles
        self.paths = rt.paths
        self._global = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.puller = Puller(
            store,
            rt.paths,
            rt.config.core.images.max_rootfs_size,
            default_image=resolve_vm_defaults(rt.config.core.vm_defaults)["image"][0],
        )
        self.snapshots = SnapshotService(self)

    # --- helpers ----------------------------------------------------------------------
    def lock(self, vm_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(vm_id, threading.Lock())

    @property
    def cfg(self) -> "CoreConfig":
        return self.rt.config.core

    def driver(self, vm: VM) -> vmm.Driver:
        return driver_for(vm.driver, self.cfg.vmm, self.paths)

    def host_forward(self, vm: VM, nic_id: str, forward: HostForward, remove: bool = False) -> bool:
        """Add (or with ``remove``, remove) a host forward on a running VM's user-mode
        NIC, through its driver. For plugins (from any thread; quick). Raises
        ``BangerError``: BUSY when the host port is taken, BAD_REQUEST when the VM is not
        running or its VMM has no user-mode networking. Removing answers whether the
        forward existed."""
        pid = self._pid(vm)
        if pid is None:
            raise BangerError(ErrorCode.BAD_REQUEST, f"VM {vm.name} is not running: no forward to change")
        driver = self.driver(vm)
        if remove:
            return driver.remove_forward(pid, self.run_dir(vm), nic_id, forward)
        driver.add_forward(pid, self.run_dir(vm), nic_id, forward)
        return True

    def resolve(self, ref: str) -> VM:
        """A VM by exact name, else by unique ID prefix."""
        if not ref:
            raise BangerError(ErrorCode.BAD_REQUEST, "empty VM reference")
        by_name = self.store.find_vms(name=ref)
        if by_name:
            return by_name[0]
        matches = self.store.find_vms(id_prefix=ref)
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise BangerError(ErrorCode.NOT_FOUND, f"no VM named or with ID prefix {ref!r}")
        names = ", ".join(f"{m.name} ({m.id})" for m in matches[:5])
        raise BangerError(ErrorCode.BAD_REQUEST, f"VM reference {ref!r} is ambiguous: {names}")

    def _transition(self, vm: VM, to: VMState, error: str | None = None) -> None:
        if to not in TRANSITIONS[vm.state] and to != vm.state:
            raise BangerError(ErrorCode.BAD_REQUEST, f"VM {vm.name} cannot go from {vm.state.value} to {to.value}")
        vm.state = to
        vm.last_error = error
        self.store.update_vm(vm)

    def run_dir(self, vm: VM) -> Path:
        return self.paths.vm_dir(vm.id)

    def console_log(self, vm: VM) -> Path:
        return self.paths.vm_files(vm.id).console_log

    def machine_file(self, vm: VM) -> Path:
        """The Machine the VM was last booted with (JSON), written at each launch."""
        return self.paths.vm_files(vm.id).machine

    def last_machine(self, vm: VM) -> dict[str, Any] | None:
        """``machine_file`` as shown by ``vm show``; None if the VM never booted."""
        try:
            return Machine.model_validate_json(self.machine_file(vm).read_bytes()).model_dump(mode="json")
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("VM %s: unreadable %s: %s", vm.name, self.machine_file(vm), exc)
            return None

    def _pid(self, vm: VM) -> int | None:
        h = self.handles.get(vm.id)
        if h and h.pid and vmm.is_vmm_of(h.pid, vm.id):
            return h.pid
        return None

    def refresh(self, vm: VM, op_id: str = "op-monitor") -> VM:
        """If a running (or paused) VM's VMM is gone, finalise it as stopped (cleanup included)."""
        if vm.state.live and self._pid(vm) is None:
            lock = self.lock(vm.id)
            if not lock.acquire(blocking=False):
                return vm  # an operation on this VM is under way; it will settle the state
            try:
                vm = self._settle(self.store.get_vm(vm.id), op_id)
            finally:
                lock.release()
        return vm

    def _settle(self, vm: VM, op_id: str) -> VM:
        """Under the VM's lock: a running or paused VM whose VMM is gone becomes stopped."""
        if vm.state.live and self._pid(vm) is None:
            log.warning("VM %s: VMM exited behind banger's back; cleaning up", vm.name, extra={"op_id": op_id})
            self._finalize_stopped(vm, op_id, CleanupReason.RECONCILE)
        return vm

    def _lifecycle(self, vm: VM, op_id: str) -> Lifecycle:
        h = self.handles.get(vm.id)

        def persist(v: VM) -> None:
            self.store.update_vm(v)

        return Lifecycle(self.rt, vm, op_id=op_id, persist=persist, handles=dict(h.plugins) if h else None)

    # --- before a command runs in a VM (vm exec, vm run) ---------------------------
    def before_exec(
        self,
        vm: VM,
        request: ExecRequest,
        exec_options: dict[str, dict[str, Any]],
        op_id: str,
        progress: Progress,
        *,
        run: bool = False,
    ) -> None:
        """Every acting plugin's ``before_exec`` for a command about to run in ``vm``."""
        self._lifecycle(vm, op_id).before_exec(request, exec_options, run=run, progress=progress)

    def fields_context(self, vm: VM, plugin: str) -> FieldsContext | None:
        """A plugin's read-only view of ``vm`` (its settings as the VM's project makes
        them, its options), for the plugin's RPC handlers; None when it does not act on
        the VM."""
        lc = self._lifecycle(vm, "")
        return lc.fields_ctx(plugin) if plugin in lc.plugins else None

    def plan_run(self, params: CreateParams, request: ExecRequest, op_id: str, progress: Progress) -> VM:
        """``vm run`` before it makes its VM: what it would make (no row, nothing on the
        host), checked by every acting plugin's ``before_exec`` with ``plan`` True."""
        vm = self.draft(params)
        vm.options = dict(params.options)  # as the plugins will see them (e.g. --nat)
        lc = Lifecycle(self.rt, vm, op_id=op_id)
        lc.options = lc.validate_options(params.options)
        lc.before_exec(request, {}, run=True, plan=True, progress=progress)
        return vm

    # --- create / start -----------------------------------------------------------
    def create(self, params: CreateParams, op_id: str, progress: Progress, cancel: threading.Event) -> VM:
        t0 = time.monotonic()
        progress("reserve", {})
        vm = self.draft(params)
        assert vm.image is not None  # the defaults always name one
        vm.image = self._image_or_pull(vm.image, progress, cancel, vm.spec.kernel).name
        if not params.warm:
            return self.make(vm, op_id, progress, cancel, options=params.options, t0=t0, how="cold: boots")
        if self.cfg.snapshots.templates_max == 0:
            how = "cold: boots ([snapshots] templates_max = 0: no warm starts)"
            return self.make(vm, op_id, progress, cancel, options=params.options, t0=t0, how=how)
        return self._make_warm(vm, params.options, op_id, progress, cancel, t0)

    def draft(self, params: CreateParams) -> VM:
        """The VM ``params`` describe, its spec completed from the defaults and checked
        against this host; not added (no row), its image not pulled (``image`` is the
        name asked for)."""
        # the project's [vm_defaults] over the user's: a bad banger.toml is refused here,
        # before anything of the VM exists
        project = ProjectConfig.load(Path(params.project_dir)) if params.project_dir else None
        resolved = resolve_vm_defaults(self.cfg.vm_defaults, project.vm_defaults if project else None)
        d = {k: v for k, (v, _src) in resolved.items()}
        try:
            spec = VMSpec(
                vcpus=params.vcpus or d["vcpus"],
                memory_mib=params.memory_mib or d["memory_mib"],
                root_size_mib=params.root_size_mib or d["root_size_mib"],
                kernel=params.kernel or d["kernel"],
            )
        except ValidationError as exc:
            raise BangerError(ErrorCode.BAD_REQUEST, f"invalid spec: {exc.errors()[0]['msg']}") from None
        check_host_limits(spec)
        return VM(
            id=secrets.token_hex(8),
            name=params.name or random_name(),
            image=params.image or d["image"],
            spec=spec,
            driver=pick_driver(params.driver or self.cfg.vmm.driver, self.cfg.vmm),
            project_dir=params.project_dir,
            ephemeral=params.ephemeral,
        )

    def _make_warm(
        self, vm: VM, options: dict[str, dict[str, Any]], op_id: str, progress: Progress, cancel: threading.Event, t0: float
    ) -> VM:
        """A VM from the template that matches it, else booted, then made the template
        (right after its agent answered, before anything runs in it)."""
        lc = self._lifecycle(vm, op_id)
        checked = lc.validate_options(options)
        plugins = {
            name: {
                "settings": s.model_dump(mode="json") if (s := lc.settings[name]) is not None else None,
                "options": o.model_dump(mode="json") if (o := checked.get(name)) is not None else None,
            }
            for name in lc.plugins
        }
        key = self.snapshots.template_key(vm, plugins)
        progress("step", {"msg": "looking for a warm-start template"})
        template, maker = self.snapshots.acquire_template(key)
        try:

            def prepare(v: VM) -> ResumeFrom | None:
                if template is None:
                    return None
                try:
                    self.snapshots.stand_on(template, v)
                except BangerError as exc:  # deleted meanwhile: boot
                    progress("step", {"msg": f"booting: {exc.message}"})
                    return None
                return self.snapshots.resume_from(template, v, strict=False)

            def after(v: VM) -> None:
                # the template it found could not be used (it is gone): this VM replaces it
                if v.base_snapshot is None and (maker or template is not None):
                    progress("step", {"msg": "making this VM the warm-start template"})
                    self.snapshots.make_template(v, key, op_id)

            if template is not None:
                how = f"warm: restores template {template.name}"
            else:
                how = "cold: boots, then becomes the warm-start template" if maker else "cold: no template"
            return self.make(
                vm, op_id, progress, cancel, options=options, prepare=prepare, after=after, t0=t0, how=how, lifecycle=lc
            )
        finally:
            if maker:
                self.snapshots.release_template(key)

    def make(
        self,
        vm: VM,
        op_id: str,
        progress: Progress,
        cancel: threading.Event,
        *,
        options: dict[str, dict[str, Any]] | None = None,
        prepare: Callable[[VM], ResumeFrom | None] | None = None,
        after: Callable[[VM], None] | None = None,
        t0: float | None = None,
        how: str | None = None,
        lifecycle: Lifecycle | None = None,
    ) -> VM:
        """Add ``vm`` and start it: booted, or continuing from what ``prepare`` (its lock
        held, its row added) returns; then ``after``. A make that does not finish
        leaves nothing behind: no row, no files."""
        t0 = time.monotonic() if t0 is None else t0
        # Resolve plugins and validate their settings and the VM's options before
        # anything exists.
        given = vm.options if options is None else options
        lc = lifecycle if lifecycle is not None else self._lifecycle(vm, op_id)  # a warm create resolved it already
        vm.options = stored_options(lc.validate_options(given), given)
        with self._global:  # short: name + row only
            if self.store.find_vms(name=vm.name):
                raise BangerError(ErrorCode.ALREADY_EXISTS, f"a VM named {vm.name!r} already exists")
            self.store.insert_vm(vm)
        spec = {"vm": vm.name, "id": vm.id, "image": vm.image, "driver": vm.driver, **vm.spec.model_dump()}
        progress("spec", {**spec, "start": how} if how else spec)
        try:
            with self.lock(vm.id):
                raise_if_cancelled(cancel, f"VM {vm.name}: create")
                resume = prepare(vm) if prepare is not None else None
                if resume is not None:
                    self.store.update_vm(vm)
                # a failed create removes the VM: its plugins are told DELETE, once
                self._start_locked(vm, op_id, progress, cancel, failure_reason=CleanupReason.DELETE, resume=resume)
                if after is not None:
                    after(vm)
        except BaseException as exc:
            # The failed start already ran every plugin's cleanup (exactly once, DELETE).
            errors = self._destroy(vm, op_id, plugins_cleaned=True)
            if errors and isinstance(exc, BangerError):
                exc.details["cleanup_failures"] = [str(e) for e in errors]
            raise
        progress("ready", {"elapsed_s": round(time.monotonic() - t0, 3)})
        return vm

    def start(self, vm: VM, op_id: str, progress: Progress, cancel: threading.Event) -> VM:
        with self.lock(vm.id):
            return self._start_stopped_locked(vm, op_id, progress, cancel)

    def _start_stopped_locked(self, vm: VM, op_id: str, progress: Progress, cancel: threading.Event) -> VM:
        vm = self._settle(self.store.get_vm(vm.id), op_id)
        if vm.state is VMState.PAUSED:
            raise BangerError(ErrorCode.BAD_REQUEST, f"VM {vm.name} is paused: banger vm resume {vm.name}")
        if vm.state is VMState.RUNNING:
            raise BangerError(ErrorCode.BAD_REQUEST, f"VM {vm.name} is already running")
        resume = self._suspend_image(vm)
        try:
            self._start_locked(vm, op_id, progress, cancel, resume=resume)
        except BangerError as exc:
            if resume is not None:  # not tried twice: the next start boots
                resume.discard()
                exc.message += "; its suspend image is discarded: the next start boots it"
            self._transition(vm, VMState.ERROR, exc.message)
            raise
        if resume is not None:  # consumed: the disk moves on from what the image holds
            resume.discard()
        return vm

    def _suspend_image(self, vm: VM) -> ResumeFrom | None:
        src = self.paths.vm_files(vm.id).suspend_dir
        if not src.is_dir():
            return None
        taken = utcnow()
        try:
            taken = datetime.fromtimestamp(src.stat().st_mtime, timezone.utc)
        except OSError:
            pass
        return ResumeFrom(
            src=src,
            resumed=Resumed(
                snapshot="", kind="suspend", source_vm=vm.name, source_vm_id=vm.id, new_identity=False, taken_at=taken
            ),
            discard=lambda: shutil.rmtree(src, ignore_errors=True),
            what="its suspend image",
        )

    def _start_locked(
        self,
        vm: VM,
        op_id: str,
        progress: Progress,
        cancel: threading.Event,
        failure_reason: CleanupReason = CleanupReason.FAILED_START,
        resume: ResumeFrom | None = None,
    ) -> None:
        """Boot ``vm`` (or continue it from ``resume``) under its lock. On failure the
        VMM and its run files are gone and every plugin's cleanup has run exactly once
        with ``failure_reason`` (by ``Lifecycle.start``, or here when the failure came
        before the plugins ran)."""
        lc: Lifecycle | None = None
        try:
            lc = self._lifecycle(vm, op_id)
            self._boot_locked(vm, lc, op_id, progress, cancel, resume, failure_reason)
        except BaseException:
            if lc is not None and not lc.started:
                try:
                    lc.cleanup(failure_reason)
                except BangerError as exc:
                    log.error("VM %s: plugin cleanup after a failed start: %s", vm.name, exc, extra={"op_id": op_id})
            raise

    def _boot_locked(
        self,
        vm: VM,
        lc: Lifecycle,
        op_id: str,
        progress: Progress,
        cancel: threading.Event,
        resume: ResumeFrom | None = None,
        failure_reason: CleanupReason = CleanupReason.FAILED_START,
    ) -> None:
        image = self.store.get_image(vm.image or "")
        kernel = self.store.get_kernel(vm.spec.kernel or image.kernel_ref or "")
        driver = self.driver(vm)
        run_dir = self.run_dir(vm)
        run_dir.mkdir(parents=True, exist_ok=True)
        progress("prepare_host", {})

        def ensure_root() -> Path:
            if not vm.disk_strategy:
                vm.disk_strategy = disks.choose_strategy(run_dir, vm.driver, self.cfg.vmm.disk_strategy)
                self.store.update_vm(vm)
            root = disks.root_disk_path(run_dir, vm.disk_strategy)
            if not root.exists():
                disks.create_root_disk(Path(image.rootfs), run_dir, vm.spec.root_size_mib, vm.disk_strategy)
            return root

        root = ensure_root()
        console = self.console_log(vm)
        machine = Machine(
            kernel=kernel.kernel,
            vmlinux=kernel.vmlinux,
            initrd=kernel.initrd,
            boot_args=self._boot_args(vm),
            vcpus=vm.spec.vcpus,
            memory_mib=vm.spec.memory_mib,
            drives=[Drive(id="root", path=str(root), root=True)],
            console_log=str(console),
        )

        def boot(m: Machine) -> Resumed | None:
            nonlocal resume
            raise_if_cancelled(cancel, f"VM {vm.name}: start")
            if resume is not None and (why := compat_diff(resume.compat, compat(m, driver, run_dir))):
                if resume.strict:
                    raise BangerError(ErrorCode.BAD_REQUEST, f"{resume.what} cannot be restored: {why}")
                progress("step", {"msg": f"booting: {resume.what} cannot be used: {why}"})
                log.info("VM %s: booting: %s cannot be used: %s", vm.name, resume.what, why, extra={"op_id": op_id})
                resume.discard()
                resume = None
                m.drives[0].path = str(ensure_root())
            launch = None
            if resume is not None:
                progress("restore", {"driver": driver.name, "from": resume.what})
                booted_args = m.boot_args
                m.boot_args = list(resume.machine.boot_args)  # the guest's command line is in its memory
                try:
                    t = time.monotonic()
                    launch = driver.restore(vm.id, m, run_dir, resume.src)
                    log.info(
                        "VM %s: restored from %s in %.2fs", vm.name, resume.what, time.monotonic() - t, extra={"op_id": op_id}
                    )
                except BangerError as exc:
                    if resume.strict:
                        raise
                    # the driver left nothing running: boot instead, and say why
                    progress("step", {"msg": f"booting: restoring {resume.what} failed: {exc.message}"})
                    log.warning("VM %s: restoring %s failed: %s", vm.name, resume.what, exc.message, extra={"op_id": op_id})
                    resume.discard()
                    resume = None
                    m.boot_args = booted_args
                    m.drives[0].path = str(ensure_root())
            if launch is None:
                progress("boot", {"driver": driver.name})
                launch = driver.launch(vm.id, m, run_dir)
            # what the VMM got, for `vm show` (kept across stops, gone with the VM)
            atomic_write(self.machine_file(vm), m.model_dump_json(indent=2))
            # handles.json first (atomically), then the cache, then the DB state.
            self.handles.set(
                VMHandles(vm_id=vm.id, pid=launch.pid, driver=driver.name, api_socket=launch.api_socket, plugins=lc.handles)
            )
            self._transition(vm, VMState.RUNNING)
            raise_if_cancelled(cancel, f"VM {vm.name}: start")
            progress("wait_agent", {})
            return resume.resumed if resume is not None else None

        try:
            lc.start(machine, boot, failure_reason, progress=progress)
        except BaseException:
            self._stop_vmm(vm, driver, graceful=False)
            for f in driver.run_files(run_dir):
                f.unlink(missing_ok=True)
            self.handles.drop(vm.id)
            raise

    def _image_or_pull(self, name: str, progress: Progress, cancel: threading.Event, kernel: str | None = None) -> Image:
        """The image and the kernel to boot it with (``kernel``, else the image's),
        each pulled first if it is missing and a source claims it. Staleness is only
        reported here: rebuilding is an explicit `pull`."""
        have = self.store.find_image(name)
        image = self.puller.ensure_image(name, progress, cancel)
        if have is not None and (why := self.puller.stale("image", image)):
            progress("step", {"msg": f"note: image {name} is stale: {why}"})
        kernel = kernel or image.kernel_ref
        if not kernel:
            raise BangerError(ErrorCode.BAD_REQUEST, f"image {image.name} names no kernel (give --kernel)")
        k = self.puller.ensure_kernel(kernel, progress, cancel)
        if why := self.puller.stale("kernel", k):
            progress("step", {"msg": f"note: kernel {kernel} is stale: {why}"})
        return image

    def _boot_args(self, vm: VM) -> list[str]:
        args = ["console=ttyS0", "root=/dev/vda", "rw", "panic=-1", "net.ifnames=0", f"banger.vm={vm.name}"]
        image = self.store.get_image(vm.image or "")
        if image.init:
            args.append(f"init={image.init}")
        if vm.driver == "firecracker":
            args += ["reboot=k", "pci=off"]
        return args + list(self.cfg.vmm.boot_args)

    # --- stop / kill -----------------------------------------------------------------
    def stop(self, vm: VM, op_id: str, force: bool = False, suspend: bool = False) -> VM:
        with self.lock(vm.id):
            if suspend:
                return self._suspend_locked(vm, op_id)
            return self._stop_locked(vm, op_id, force)

    def _suspend_locked(self, vm: VM, op_id: str) -> VM:
        """``vm stop --suspend``: the guest's memory and devices into its suspend image,
        then the VMM goes (host state undone as for a stop); ``vm start`` resumes it."""
        vm = self._settle(self.store.get_vm(vm.id), op_id)
        if not vm.state.live:
            raise BangerError(ErrorCode.BAD_REQUEST, f"VM {vm.name} is not running ({vm.state.value})")
        driver = self.driver(vm)
        pid = self._pid(vm)
        assert pid is not None
        run_dir = self.run_dir(vm)
        final = self.paths.vm_files(vm.id).suspend_dir
        was_running = vm.state is VMState.RUNNING
        staging: Path | None = None
        try:
            if was_running:
                driver.pause(pid, run_dir)
            staging = self.paths.staging_dir(final)
            write_image(self, vm, driver, pid, staging)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(staging, final)
        except BaseException:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            if was_running and self._pid(vm) is not None:
                driver.resume(pid, run_dir)
            raise
        driver.force_stop(pid, run_dir)
        if not vmm.wait_exit(pid, 10):
            vmm.send_signal(pid, signals.SIGKILL)
            vmm.wait_exit(pid, 5)
        log.info("VM %s: suspended", vm.name, extra={"op_id": op_id})
        self._finalize_stopped(vm, op_id, CleanupReason.STOP, VMState.SUSPENDED)
        return vm

    def _discard_suspend(self, vm: VM, op_id: str) -> None:
        """A suspended VM becomes a stopped one: its suspend image goes (its next start boots)."""
        shutil.rmtree(self.paths.vm_files(vm.id).suspend_dir, ignore_errors=True)
        self._transition(vm, VMState.STOPPED)
        log.info("VM %s: suspend image discarded", vm.name, extra={"op_id": op_id})

    def _stop_locked(self, vm: VM, op_id: str, force: bool = False) -> VM:
        vm = self._settle(self.store.get_vm(vm.id), op_id)
        if vm.state is VMState.SUSPENDED:  # nothing runs: stopping it drops what it would resume
            self._discard_suspend(vm, op_id)
            return vm
        if not vm.state.live:
            raise BangerError(ErrorCode.BAD_REQUEST, f"VM {vm.name} is not running ({vm.state.value})")
        driver = driver_for(vm.driver, self.cfg.vmm, self.paths)
        if vm.state is VMState.PAUSED and not force:  # a graceful stop needs the guest to run
            vm = self._resume_locked(vm, driver, op_id)
        how = self._stop_vmm(vm, driver, graceful=not force, op_id=op_id)
        log.log(
            logging.WARNING if how == "killed" and not force else logging.INFO, "VM %s: %s", vm.name, how, extra={"op_id": op_id}
        )
        self._finalize_stopped(vm, op_id, CleanupReason.STOP)
        return vm

    def _stop_vmm(self, vm: VM, driver: vmm.Driver, graceful: bool, op_id: str = "") -> str:
        """Graceful: plugin (agent/SSH sync+poweroff) -> ACPI/Ctrl-Alt-Del -> kill."""
        pid = self._pid(vm) or vmm.find_vmm(vm.id)
        if pid is None:
            return "not running"
        timeout = self.cfg.vmm.stop_timeout_s
        run_dir = self.run_dir(vm)
        if graceful:
            try:
                by = self._lifecycle(vm, op_id).request_guest_shutdown()
            except BangerError:
                by = None
            if by and vmm.wait_exit(pid, timeout):
                return f"shut down by {by}"
            try:
                driver.request_shutdown(pid, run_dir)
                if vmm.wait_exit(pid, timeout):
                    return "shut down (ACPI)"
            except BangerError as exc:
                log.warning("VM %s: shutdown request failed: %s", vm.name, exc, extra={"op_id": op_id})
            try:
                if driver.send_ctrl_alt_del(pid, run_dir) and vmm.wait_exit(pid, timeout):
                    return "shut down (Ctrl-Alt-Del)"
            except BangerError as exc:
                log.warning("VM %s: Ctrl-Alt-Del failed: %s", vm.name, exc, extra={"op_id": op_id})
        driver.force_stop(pid, run_dir)
        if not vmm.wait_exit(pid, 5):
            vmm.send_signal(pid, signals.SIGKILL)
            vmm.wait_exit(pid, 5)
        return "killed"

    # --- pause / resume ---------------------------------------------------------------
    def pause(self, vm: VM, op_id: str) -> VM:
        """Stop a running VM's vCPUs; its memory and devices stay in the VMM."""
        with self.lock(vm.id):
            vm = self._settle(self.store.get_vm(vm.id), op_id)
            if vm.state is not VMState.RUNNING:
                raise BangerError(ErrorCode.BAD_REQUEST, f"VM {vm.name} is {vm.state.value}: only a running VM pauses")
            pid = self._pid(vm)
            assert pid is not None  # _settle: a running VM has its VMM
            driver_for(vm.driver, self.cfg.vmm, self.paths).pause(pid, self.run_dir(vm))
            self._transition(vm, VMState.PAUSED)
            log.info("VM %s: paused", vm.name, extra={"op_id": op_id})
            return vm

    def resume(self, vm: VM, op_id: str) -> VM:
        """Let a paused VM run again, where it was."""
        with self.lock(vm.id):
            vm = self._settle(self.store.get_vm(vm.id), op_id)
            if vm.state is not VMState.PAUSED:
                raise BangerError(ErrorCode.BAD_REQUEST, f"VM {vm.name} is {vm.state.value}, not paused")
            return self._resume_locked(vm, driver_for(vm.driver, self.cfg.vmm, self.paths), op_id)

    def _resume_locked(self, vm: VM, driver: vmm.Driver, op_id: str) -> VM:
        pid = self._pid(vm)
        assert pid is not None
        driver.resume(pid, self.run_dir(vm))
        self._transition(vm, VMState.RUNNING)
        log.info("VM %s: resumed", vm.name, extra={"op_id": op_id})
        return vm

    def kill(self, vm: VM, op_id: str, sig: int = signals.SIGKILL) -> VM:
        with self.lock(vm.id):
            vm = self._settle(self.store.get_vm(vm.id), op_id)
            pid = self._pid(vm)
            if not vm.state.live or pid is None:
                raise BangerError(ErrorCode.BAD_REQUEST, f"VM {vm.name} is not running ({vm.state.value})")
            vmm.send_signal(pid, sig)
            if vmm.wait_exit(pid, 10):
                self._finalize_stopped(vm, op_id, CleanupReason.STOP)
            else:
                raise BangerError(
                    ErrorCode.OPERATION_FAILED,
                    f"sent {signals.Signals(sig).name} to VM {vm.name} (pid {pid}); it is still running",
                )
        return vm

    def _finalize_stopped(self, vm: VM, op_id: str, reason: CleanupReason, state: VMState = VMState.STOPPED) -> None:
        """The VMM is gone: undo host state (plugins told ``reason``), drop handles,
        mark stopped."""
        failures: list[tuple[str, BaseException]] = []
        try:
            self._lifecycle(vm, op_id).cleanup(reason)
        except MultiError as exc:
            failures += exc.failures
        except BangerError as exc:  # plugins unusable (config): still finish the rest
            failures.append(("plugins", exc))
        driver = driver_for(vm.driver, self.cfg.vmm, self.paths)
        for f in driver.run_files(self.run_dir(vm)):
            f.unlink(missing_ok=True)
        self.handles.drop(vm.id)
        self._transition(vm, state, "; ".join(f"{w}: {e}" for w, e in failures) or None)
        if failures:
            raise MultiError("cleanup", failures, op_id=op_id)

    def restart(self, vm: VM, op_id: str, progress: Progress, cancel: threading.Event) -> VM:
        """Stop (if running) and start, under one hold of the VM's lock: no other
        operation can slip in between."""
        with self.lock(vm.id):
            vm = self._settle(self.store.get_vm(vm.id), op_id)
            if vm.state.live or vm.state is VMState.SUSPENDED:  # a restart is a new boot
                progress("stop", {})
                vm = self._stop_locked(vm, op_id)
            return self._start_stopped_locked(vm, op_id, progress, cancel)

    # --- delete / prune ------------------------------------------------------------
    def delete(self, vm: VM, op_id: str, force: bool = False) -> VM:
        with self.lock(vm.id):
            vm = self._settle(self.store.get_vm(vm.id), op_id)
            if vm.state.live and not force:
                raise BangerError(
                    ErrorCode.BAD_REQUEST, f"VM {vm.name} is {vm.state.value}: stop it first or delete with --force"
                )
            errors = self._destroy(vm, op_id)
        with self._locks_guard:
            self._locks.pop(vm.id, None)
        if errors:
            raise MultiError("delete", [(str(i), e) for i, e in enumerate(errors)], op_id=op_id)
        return vm

    def _destroy(self, vm: VM, op_id: str, plugins_cleaned: bool = False) -> list[BaseException]:
        """Remove every trace of a VM; keep going past failures and return them.
        ``plugins_cleaned``: the plugins' cleanup already ran for this teardown."""
        errors: list[BaseException] = []
        try:
            driver = driver_for(vm.driver, self.cfg.vmm, self.paths)
            self._stop_vmm(vm, driver, graceful=False, op_id=op_id)
        except Exception as exc:
            errors.append(exc)
        if not plugins_cleaned:
            try:
                self._lifecycle(vm, op_id).cleanup(CleanupReason.DELETE)
            except Exception as exc:
                errors.append(exc)
        self.handles.drop(vm.id)
        try:
            for f in self.driver(vm).run_files(self.run_dir(vm)):  # a driver's files outside the VM's dir too
                f.unlink(missing_ok=True)
        except (OSError, BangerError) as exc:
            errors.append(exc)
        try:
            shutil.rmtree(self.run_dir(vm))
        except FileNotFoundError:
            pass
        except OSError as exc:
            errors.append(exc)
        if errors:
            log.error("VM %s: destroy had failures: %s", vm.name, errors, extra={"op_id": op_id})
        self.store.delete_vm(vm.id)
        try:
            self.snapshots.release(vm.base_snapshot)  # a fork's snapshot goes with its last fork
        except (OSError, BangerError) as exc:
            errors.append(exc)
        return errors

    def prune(self, op_id: str) -> list[VM]:
        gone = []
        for vm in self.store.list_vms():
            vm = self.refresh(vm, op_id)
            if not vm.state.live and vm.state is not VMState.SUSPENDED:  # a suspended VM holds a running state
                gone.append(self.delete(vm, op_id))
        return gone

    # --- set / inspect ----------------------------------------------------------------
    def set(self, vm: VM, params: SetParams, op_id: str, notes: list[str] | None = None) -> VM:
        """Change a stopped VM's spec or options; what the caller should be told goes in ``notes``."""
        notes = [] if notes is None else notes
        with self.lock(vm.id):
            vm = self._settle(self.store.get_vm(vm.id), op_id)
            if vm.state.live:
                raise BangerError(ErrorCode.BAD_REQUEST, f"VM {vm.name} is {vm.state.value}: stop it before changing its spec")
            if params.options:
                merged = {p: {**vm.options.get(p, {}), **values} for p, values in params.options.items()}
                checked = self._lifecycle(vm, op_id).validate_options(merged)
                vm.options = {**vm.options, **stored_options(checked, merged)}
            changes = {k: v for k, v in params.model_dump().items() if k not in ("refs", "options") and v is not None}
            spec = vm.spec.model_copy(update=changes)
            check_host_limits(spec)
            if vm.state is VMState.SUSPENDED:  # its memory no longer fits the VM it would resume
                self._discard_suspend(vm, op_id)
                notes.append(f"VM {vm.name} was suspended: its suspend image is discarded (the next start boots it)")
            if params.root_size_mib and vm.disk_strategy:
                root = disks.root_disk_path(self.run_dir(vm), vm.disk_strategy)
                if root.exists():
                    disks.resize_root_disk(root, params.root_size_mib)
            vm.spec = spec
            self.store.update_vm(vm)
        return vm

    def show(self, vm: VM, detail: bool = True) -> dict[str, Any]:
        """What ``vm show`` (``detail``) and each row of ``vm list`` say about a VM,
        plugins' fields included."""
        vm = self.refresh(vm)
        data = vm.model_dump(mode="json")
        data["fields"] = self.fields(vm, detail)
        h = self.handles.get(vm.id)
        data["pid"] = h.pid if h and vm.state.live else None
        data["console_log"] = str(self.console_log(vm))
        data["dir"] = str(self.run_dir(vm))
        data["machine"] = self.last_machine(vm)
        if vm.base_snapshot and detail:
            found = self.store.find_snapshots(vm.base_snapshot)
            data["base_snapshot_name"] = found[0].name if found else None
        return data

    def fields(self, vm: VM, detail: bool) -> dict[str, dict[str, Any]]:
        """Plugins' ``vm_fields`` for ``vm``; none when its plugin set cannot be resolved
        (e.g. its project's banger.toml became invalid: the next start says why)."""
        if not self.rt.host.implemented_by_any("vm_fields"):
            return {}  # resolving each VM's plugins and settings is then wasted on every list
        try:
            return self._lifecycle(vm, "op-fields").fields(detail)
        except BangerError as exc:
            log.warning("VM %s: no plugin fields: %s", vm.name, exc.message)
            return {}

    def port_endpoints(self, vm: VM, listeners: list[Listener]) -> list[tuple[str, str]]:
        """(endpoint, plugin) for each of a running VM's listeners (``vm_port_endpoint``)."""
        lifecycle = self._lifecycle(vm, "op-ports")
        return [lifecycle.port_endpoint(listener) for listener in listeners]

    def list(self) -> list[dict[str, Any]]:
        return [self.show(vm, detail=False) for vm in self.store.list_vms()]

    def monitor_once(self) -> None:
        for vm in self.store.list_vms():
            if vm.state.live:
                try:
                    self.refresh(vm)
                except BangerError as exc:
                    log.error("VM %s: cleanup after VMM exit failed: %s", vm.name, exc)

    # --- reconcile (daemon start) ---------------------------------------------------
    def _resume_if_left_paused(self, vm: VM, pid: int) -> None:
        """A VM whose row says running but whose guest is paused was being snapshotted
        (or suspended) by a daemon that died: cancel what QEMU may still be writing
        and let it run (its partial snapshot is swept as a staging dir)."""
        driver = self.driver(vm)
        try:
            if not driver.is_paused(pid, self.run_dir(vm)):
                return
            SnapshotService._cont(driver, pid, self.run_dir(vm), vm, "op-reconcile", cut_off=True)
            log.warning("VM %s: found paused by an interrupted snapshot; resumed", vm.name)
        except BangerError as exc:
            log.error("VM %s: could not check or resume its paused guest: %s", vm.name, exc.message)

    def reconcile(self) -> dict[str, Names]:
        """Re-adopt live VMMs; demote dead ones and tear down their leftovers."""
        report: dict[str, Names] = {"adopted": [], "stopped": [], "interrupted": [], "deleted": []}
        self.snapshots.sweep()
        for vm in self.store.list_vms():
            if vm.ephemeral:  # its run died with the daemon that ran it: delete it as promised
                try:
                    self.delete(vm, "op-reconcile", force=True)
                    report["deleted"].append(vm.name)
                except BangerError as exc:
                    log.error("reconcile %s: deleting the ephemeral VM failed: %s", vm.name, exc.message)
                continue
            h = self.handles.get(vm.id) or self.handles.read_file(vm.id)
            pid = h.pid if h and h.pid and vmm.is_vmm_of(h.pid, vm.id) else vmm.find_vmm(vm.id)
            op = "op-reconcile"
            try:
                if vm.state.live and pid is not None:  # a paused VM stays paused
                    self.handles.set((h or VMHandles(vm_id=vm.id, driver=vm.driver)).model_copy(update={"pid": pid}))
                    report["adopted"].append(vm.name)
                    if vm.state is VMState.RUNNING:
                        self._resume_if_left_paused(vm, pid)
                elif vm.state.live:
                    self._finalize_stopped(vm, op, CleanupReason.RECONCILE)
                    report["stopped"].append(vm.name)
                elif vm.state is VMState.CREATED:
                    # a create cut off by a daemon crash: undo it, keep the record visible
                    driver = driver_for(vm.driver, self.cfg.vmm, self.paths)
                    self._stop_vmm(vm, driver, graceful=False, op_id=op)
                    self._lifecycle(vm, op).cleanup(CleanupReason.RECONCILE)
                    self.handles.drop(vm.id)
                    self._transition(vm, VMState.ERROR, "create interrupted by a daemon restart")
                    report["interrupted"].append(vm.name)
                elif pid is not None or h is not None:
                    driver = driver_for(vm.driver, self.cfg.vmm, self.paths)
                    self._stop_vmm(vm, driver, graceful=False, op_id=op)
                    self._lifecycle(vm, op).cleanup(CleanupReason.RECONCILE)
                    self.handles.drop(vm.id)
            except BangerError as exc:
                log.error("reconcile %s: %s", vm.name, exc.message, extra={"op_id": op})
        return report
