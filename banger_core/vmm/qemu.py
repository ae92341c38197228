"""QEMU driver: one qemu-system-x86_64 per VM, daemonized, controlled over QMP."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from banger_core.paths import VMFiles
from banger_core import proc
from banger_core.fsutil import atomic_write, copy_sparse, not_owner_only
from banger_core.errors import BangerError, ErrorCode
from banger_core.models import NIC, HostForward, Machine
from banger_core.vmm.base import Driver, Launch, cmdline, kernel_is_elf, process_tag
from banger_core.vmm import qemu_stream
from banger_core.vmm.qmp import QMP
from banger_core.vmm.tsc import host_tsc_khz, host_tsc_trusted

log = logging.getLogger("banger.vmm.qemu")


class QemuDriver(Driver):
    name = "qemu"
    nic_kinds = frozenset({"tap", "user"})
    snapshot_format = "2"  # RAM in a file beside a device-state stream (x-ignore-shared)

    def __init__(
        self,
        binary: str = "qemu-system-x86_64",
        accel: str = "auto",
        machine_type: str = "auto",
        kvm_probe_timeout: float = 10.0,
        probe_cache: Path | None = None,
        memory_dir: Path | None = None,
        tb_size_mib: int = 0,
    ) -> None:
        self.binary = binary
        self.memory_dir = memory_dir
        self.tb_size_mib = tb_size_mib
        self.accel = accel
        self.machine_type = machine_type
        self.kvm_probe_timeout = kvm_probe_timeout
        self.probe_cache = probe_cache

    def available(self) -> tuple[bool, str]:
        path = shutil.which(self.binary)
        if path is None:
            return False, f"{self.binary} not found (apt install qemu-system-x86)"
        return True, path

    # --- acceleration -----------------------------------------------------------------
    def choose_accel(self, machine: Machine) -> tuple[str, str]:
        """Pick KVM when a probe boot shows it works, TCG otherwise; say why."""
        if self.accel in ("kvm", "tcg"):
            return self.accel, f"accel={self.accel} set in config"
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "tcg", "/dev/kvm is not usable"
        key = f"{machine.kernel}:{os.stat(machine.kernel).st_mtime_ns}"
        cached = self._read_probe_cache(key)
        if cached is not None:
            return cached["accel"], cached["why"] + " (cached probe)"
        accel, why = self._probe_kvm(machine)
        self._write_probe_cache(key, accel, why)
        return accel, why

    def _read_probe_cache(self, key: str) -> dict[str, Any] | None:
        if not self.probe_cache:
            return None
        try:
            data: dict[str, Any] = json.loads(self.probe_cache.read_text())
            return data if data.get("key") == key else None
        except (OSError, ValueError):
            return None

    def _write_probe_cache(self, key: str, accel: str, why: str) -> None:
        if self.probe_cache:
            atomic_write(self.probe_cache, json.dumps({"key": key, "accel": accel, "why": why}))

    def _probe_kvm(self, machine: Machine) -> tuple[str, str]:
        """Boot the kernel under KVM with no disk; KVM works if it prints within the
        timeout. (Some hosts expose a /dev/kvm on which stock kernels hang.)"""
        args = [
            self.binary,
            "-accel",
            "kvm",
            "-M",
            self._machine_type(machine),
            "-cpu",
            "host",
            "-m",
            "256",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
            "-kernel",
            machine.kernel,
            "-append",
            "console=ttyS0 earlyprintk=serial panic=-1 root=/dev/null",
        ]
        t0 = time.monotonic()
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            os.set_blocking(p.stdout.fileno(), False)  # type: ignore[union-attr]
            seen = b""
            while time.monotonic() - t0 < self.kvm_probe_timeout and p.poll() is None:
                chunk = p.stdout.read(4096) or b""  # type: ignore[union-attr]
                seen += chunk
                if b"Linux version" in seen:
                    return "kvm", f"KVM probe boot printed the kernel banner in {time.monotonic() - t0:.1f}s"
                time.sleep(0.05)
            if p.poll() is not None and b"Linux version" not in seen:
                err = (p.stderr.read() or b"").decode(errors="replace").strip().splitlines()  # type: ignore[union-attr]
                return "tcg", f"KVM probe failed: {err[-1] if err else 'qemu exited'}"
            return "tcg", f"KVM probe boot printed nothing in {self.kvm_probe_timeout:.0f}s (KVM unusable here)"
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()

    def _machine_type(self, machine: Machine) -> str:
        if self.machine_type != "auto":
            return self.machine_type
        # An ELF vmlinux boots via PVH on the lean microvm machine; a bzImage needs pc.
        return "microvm" if kernel_is_elf(machine.kernel) else "pc"

    # --- launch -------------------------------------------------------------------
    @staticmethod
    def boot_args(machine: Machine, micro: bool, accel: str) -> list[str]:
        """The kernel command line. On ``microvm`` under TCG the guest has no HPET or
        PM timer to calibrate its TSC against, only the PIT, which fails on a busy
        host (see vmm/tsc.py): it is told the rate instead."""
        args = list(machine.boot_args)
        if micro and accel == "tcg" and not any(a.startswith("tsc_early_khz=") for a in args):
            khz = host_tsc_khz()
            if khz:
                args.append(f"tsc_early_khz={khz}")
                # every vCPU reads the one host TSC: synchronized if the host trusts it,
                # though a multi-vCPU guest's sync check would say otherwise and fall back
                # to jiffies for its clock
                if host_tsc_trusted() and not any(a.startswith("tsc=") for a in args):
                    args.append("tsc=reliable")
        return args

    def argv(self, vm_id: str, machine: Machine, run_dir: Path, accel: str, memory: tuple[Path, bool] | None = None) -> list[str]:
        """``memory``: the guest's RAM is this file, mapped shared (True: the guest
        writes it) or privately (False: copy-on-write over it, shared with every other
        QEMU mapping it so); None: anonymous memory."""
        mtype = self._machine_type(machine)
        micro = mtype == "microvm"
        dev: Callable[[str], str] = (lambda kind: f"virtio-{kind}-device") if micro else (lambda kind: f"virtio-{kind}-pci")
        console = machine.console_log or str(VMFiles(run_dir).console_log)
        args = [
            self.binary,
            "-name",
            f"{process_tag(vm_id)},process={process_tag(vm_id)}",
            "-M",
            mtype + (",acpi=on" if micro else "") + (",memory-backend=ram" if memory else ""),
            "-accel",
            accel + (f",tb-size={self.tb_size_mib}" if accel == "tcg" and self.tb_size_mib else ""),
            "-cpu",
            "host" if accel == "kvm" else "max",
            "-smp",
            str(machine.vcpus),
            "-m",
            f"{machine.memory_mib}M",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            machine.kernel,
            "-append",
            " ".join(self.boot_args(machine, micro, accel)),
            "-serial",
            f"file:{console}",
            "-qmp",
            f"unix:{VMFiles(run_dir).qmp_socket},server=on,wait=off",
            "-pidfile",
            str(VMFiles(run_dir).vmm_pid),
            "-daemonize",
        ]
        if memory is not None:
            path, share = memory
            args += [
                "-object",
                f"memory-backend-file,id=ram,size={machine.memory_mib}M,mem-path={path},share={'on' if share else 'off'}",
            ]
        if machine.initrd:
            args += ["-initrd", machine.initrd]
        for d in machine.drives:
            fmt = "qcow2" if d.path.endswith(".qcow2") else "raw"
            ro = ",readonly=on" if d.read_only else ""
            args += [
                "-drive",
                f"id={d.id},file={d.path},format={fmt},if=none,cache=writeback,discard=unmap{ro}",
                "-device",
                f"{dev('blk')},drive={d.id}",
            ]
        for n in machine.nics:
            args += [
                "-netdev",
                self.netdev(n),
                "-device",
                f"{dev('net')},netdev={n.id},mac={n.mac}" + ("" if micro else ",romfile="),  # no PXE option ROM to load
            ]
        if machine.agent is not None and machine.agent.kind == "serial":
            args += [
                "-device",
                "virtio-serial-device" if micro else "virtio-serial-pci",
                "-chardev",
                f"socket,id=agent,path={machine.agent.host_path},server=on,wait=off",
                "-device",
                "virtserialport,chardev=agent,name=banger.agent",
            ]
        elif machine.agent is not None and machine.agent.kind == "vsock":
            args += ["-device", f"{'vhost-vsock-device' if micro else 'vhost-vsock-pci'},guest-cid={machine.agent.guest_cid}"]
        return args

    @staticmethod
    def netdev(n: NIC) -> str:
        if n.kind == "user":
            # slirp: the guest is net's .15, .2 leads to the host's loopback, .3 forwards DNS
            fwd = "".join(f",hostfwd={f.spec()}-:{f.guest_port}" for f in n.forwards)
            return f"user,id={n.id},net={n.net},restrict=off{fwd}"
        return f"tap,id={n.id},ifname={n.tap},script=no,downscript=no"

    def _prepare(self, vm_id: str, machine: Machine, run_dir: Path, what: str) -> str:
        """Before a QEMU starts (``what``: boot, restore): the binary, a clean run dir;
        the accelerator it gets."""
        ok, why = self.available()
        if not ok:
            raise BangerError(ErrorCode.OPERATION_FAILED, f"cannot {what} with QEMU: {why}")
        self.check_machine(machine)
        run_dir.mkdir(parents=True, exist_ok=True)
        for f in self.run_files(run_dir):
            f.unlink(missing_ok=True)
        accel, why = self.choose_accel(machine)
        log.info("QEMU for %s uses %s: %s", vm_id, accel.upper(), why)
        return accel

    # --- guest RAM in a file ------------------------------------------------------------
    def ram_file(self, run_dir: Path) -> Path | None:
        """Where a VM booted here keeps its RAM (shared mapping, on a tmpfs): named
        after its directory, which is named after the VM. None: no memory dir set."""
        return self.memory_dir / f"{run_dir.name}.ram" if self.memory_dir else None

    def _own_ram(self, run_dir: Path, memory_mib: int) -> tuple[Path, bool] | None:
        """A fresh RAM file for a VM about to start, in a memory dir that is this user's
        alone (it is on a world-writable tmpfs: one made by anyone else is refused) and
        has room for the VM's memory (a full tmpfs would kill the VMM with SIGBUS when
        the guest touches a page it has no room for)."""
        ram = self.ram_file(run_dir)
        if ram is None:
            return None
        ram.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if why := not_owner_only(ram.parent):
            raise BangerError(
                ErrorCode.OPERATION_FAILED,
                f"{ram.parent} (guest RAM files) must be a directory owned by uid {os.getuid()} with mode 0700: "
                f"it {why}; remove it, or set BANGER_MEMORY_DIR",
            )
        fs = os.statvfs(ram.parent)
        free_mib = fs.f_bavail * fs.f_frsize // 2**20
        if free_mib < memory_mib:
            raise BangerError(
                ErrorCode.OPERATION_FAILED,
                f"{ram.parent} (guest RAM files) has {free_mib} MiB free, less than the VM's {memory_mib} MiB; "
                "set BANGER_MEMORY_DIR to a larger tmpfs, or give the VM less memory",
            )
        return ram, True

    def shares_ram(self, pid: int, run_dir: Path) -> Path | None:
        """The RAM file QEMU ``pid`` writes its guest's memory to, if it runs so."""
        ram = self.ram_file(run_dir)
        if ram is None or not ram.exists():
            return None
        return ram if any(f"mem-path={ram},share=on" in a for a in cmdline(pid)) else None

    def launch(self, vm_id: str, machine: Machine, run_dir: Path) -> Launch:
        accel = self._prepare(vm_id, machine, run_dir, "boot")
        # -daemonize: QEMU forks once it has initialised, so configuration errors come
        # back here as an exit status, and the VM is not our child: it outlives both
        # this request and the daemon.
        argv = self.argv(vm_id, machine, run_dir, accel, self._own_ram(run_dir, machine.memory_mib))
        proc.run(argv, timeout=60, what="starting QEMU")
        pid = int(VMFiles(run_dir).vmm_pid.read_text().strip())
        return Launch(pid=pid, api_socket=str(VMFiles(run_dir).qmp_socket))

    def request_shutdown(self, pid: int, run_dir: Path) -> None:
        with QMP(str(VMFiles(run_dir).qmp_socket)) as q:
            q.execute("system_powerdown")

    def send_ctrl_alt_del(self, pid: int, run_dir: Path) -> bool:
        # systemd maps it to reboot, and -no-reboot makes QEMU exit on reboot: a clean stop.
        keys = [{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")]
        with QMP(str(VMFiles(run_dir).qmp_socket)) as q:
            q.execute("send-key", keys=keys)
        return True

    def status(self, run_dir: Path) -> str:
        with QMP(str(VMFiles(run_dir).qmp_socket)) as q:
            return str(q.execute("query-status").get("status"))

    def force_stop(self, pid: int, run_dir: Path) -> None:
        try:
            with QMP(str(VMFiles(run_dir).qmp_socket), timeout=2) as q:
                q.execute("quit")
                return
        except (BangerError, OSError):
            pass
        super().force_stop(pid, run_dir)

    def pause(self, pid: int, run_dir: Path) -> None:
        with QMP(str(VMFiles(run_dir).qmp_socket)) as q:
            q.execute("stop")

    def resume(self, pid: int, run_dir: Path) -> None:
        with QMP(str(VMFiles(run_dir).qmp_socket)) as q:
            q.execute("cont")

    # --- host forwards (slirp's hostfwd, through the human monitor: QMP has no command) ---
    def _hmp(self, run_dir: Path, command: str) -> str:
        with QMP(str(VMFiles(run_dir).qmp_socket)) as q:
            args: dict[str, Any] = {"command-line": command}
            return str(q.execute("human-monitor-command", **args)).strip()

    def add_forward(self, pid: int, run_dir: Path, nic_id: str, forward: HostForward) -> None:
        out = self._hmp(run_dir, f"hostfwd_add {nic_id} {forward.spec()}-:{forward.guest_port}")
        if out.startswith("Could not set up host forwarding rule"):
            raise BangerError(
                ErrorCode.BUSY, f"{forward.proto} {forward.host_address}:{forward.host_port} cannot be bound (in use?)"
            )
        if out:
            raise BangerError(ErrorCode.OPERATION_FAILED, f"QEMU refused forward {forward.spec()}: {out}")

    def remove_forward(self, pid: int, run_dir: Path, nic_id: str, forward: HostForward) -> bool:
        out = self._hmp(run_dir, f"hostfwd_remove {nic_id} {forward.spec()}")
        if out.endswith(" removed"):
            return True
        if out.endswith(" not found"):
            return False
        raise BangerError(ErrorCode.OPERATION_FAILED, f"QEMU could not remove forward {forward.spec()}: {out}")

    # --- snapshots: QEMU's migration stream to a file, and back -----------------------
    STATE = "vmstate"  # in a snapshot's directory: the migration stream
    MEMORY = "memory"  # beside it when the guest's RAM was file-backed: a copy of that file

    def snapshot(self, pid: int, run_dir: Path, dest: Path) -> None:
        """Migrate the paused guest into ``dest`` through an fd QEMU writes itself
        (``fd:``: 7.2 has no ``file:`` URI; ``exec:cat`` is several times slower), with
        ``x-ignore-shared``: ``dest/vmstate`` holds device state and ``dest/memory``
        the guest's RAM, which restores map privately (N of them share its pages). A
        guest whose RAM is a shared file (every booted one) has that file copied (its
        data only) and QEMU leaves it out of the stream; a guest whose RAM is a private
        mapping (a restored one) has it in the stream, which is split on its way to
        disk (``qemu_stream.split``): its RAM is copied once. The guest stays paused."""
        ram = self.shares_ram(pid, run_dir)
        if ram is not None:
            copy_sparse(ram, dest / self.MEMORY)
            fd = os.open(dest / self.STATE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            self._migrate(run_dir, fd)
            return
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        failed: list[BaseException] = []

        def splitter() -> None:
            try:
                with os.fdopen(rfd, "rb", buffering=1 << 20) as src, open(dest / self.STATE, "wb") as out:
                    qemu_stream.split(src, out, str(dest / self.MEMORY))
            except BaseException as exc:  # reported by the snapshot, below
                failed.append(exc)

        worker = threading.Thread(target=splitter, name="snapshot-split", daemon=True)
        worker.start()
        try:
            self._migrate(run_dir, wfd)
        except BangerError:
            worker.join(timeout=60)  # QEMU closed its end: the splitter sees the stream end
            if failed:  # what went wrong, rather than "migration failed"
                raise failed[0] from None
            raise
        worker.join(timeout=600)
        if failed or worker.is_alive():
            raise failed[0] if failed else BangerError(ErrorCode.OPERATION_FAILED, "splitting the snapshot stream hung")

    def _migrate(self, run_dir: Path, fd: int) -> None:
        """Hand QEMU ``fd`` (closed here) and migrate the paused guest into it."""
        try:
            with QMP(str(VMFiles(run_dir).qmp_socket), timeout=30) as q:
                self._ignore_shared(q, True)
                # the default cap (128 MiB/s) is for live migration over a network
                cap: dict[str, Any] = {"max-bandwidth": 64 << 30}
                q.execute("migrate-set-parameters", **cap)
                q.send_fd("banger-snapshot", fd)
                os.close(fd)
                fd = -1
                q.execute("migrate", uri="fd:banger-snapshot")
                status = self._wait_migration(q, "snapshot")
        finally:
            if fd >= 0:
                os.close(fd)
        if status != "completed":
            raise BangerError(ErrorCode.OPERATION_FAILED, f"QEMU could not write the snapshot: migration {status}")

    @staticmethod
    def _ignore_shared(q: QMP, on: bool) -> None:
        """Both ends of a migration agree on ``x-ignore-shared`` (it changes the
        stream's RAM header)."""
        caps: dict[str, Any] = {"capabilities": [{"capability": "x-ignore-shared", "state": on}]}
        q.execute("migrate-set-capabilities", **caps)

    @staticmethod
    def _wait_migration(q: QMP, what: str, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = q.execute("query-migrate")
            status = str(info.get("status", ""))
            if status == "failed":
                raise BangerError(
                    ErrorCode.OPERATION_FAILED, f"QEMU {what}: migration failed: {info.get('error-desc', 'no reason given')}"
                )
            if status in ("completed", "cancelled"):
                return status
            time.sleep(0.01)
        q.execute("migrate_cancel")
        raise BangerError(ErrorCode.OPERATION_FAILED, f"QEMU {what}: the migration did not finish in {timeout:.0f}s")

    def restore(self, vm_id: str, machine: Machine, run_dir: Path, src: Path) -> Launch:
        """A new QEMU with the same devices, ``-incoming defer``, then the snapshot's
        stream through an fd; once it is loaded (the stream says paused: it was made
        paused), ``cont``. A snapshot with a memory file: the guest's RAM is a private
        mapping of it and the stream holds device state only; without one, the RAM
        comes from the stream into a shared file of the VM's own, as a boot's."""
        accel = self._prepare(vm_id, machine, run_dir, "restore")
        image = src / self.MEMORY
        private = image.exists()
        memory = (image, False) if private else self._own_ram(run_dir, machine.memory_mib)
        argv = self.argv(vm_id, machine, run_dir, accel, memory) + ["-incoming", "defer"]
        proc.run(argv, timeout=60, what="starting QEMU to restore")
        pid = int(VMFiles(run_dir).vmm_pid.read_text().strip())
        try:
            with QMP(str(VMFiles(run_dir).qmp_socket), timeout=30) as q:
                self._ignore_shared(q, private)
                fd = os.open(src / self.STATE, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    q.send_fd("banger-restore", fd)
                finally:
                    os.close(fd)
                q.execute("migrate-incoming", uri="fd:banger-restore")
                deadline = time.monotonic() + 600
                while (status := str(q.execute("query-status").get("status"))) == "inmigrate":
                    if time.monotonic() > deadline:
                        raise BangerError(ErrorCode.OPERATION_FAILED, "QEMU did not load the snapshot in 600s")
                    time.sleep(0.005)
                if status not in ("paused", "running"):
                    info = q.execute("query-migrate")
                    raise BangerError(
                        ErrorCode.OPERATION_FAILED,
                        f"QEMU could not load the snapshot ({status}): {info.get('error-desc', 'see the VM log')}",
                    )
                if status == "paused":
                    q.execute("cont")
        except BaseException:
            super().force_stop(pid, run_dir)
            raise
        return Launch(pid=pid, api_socket=str(VMFiles(run_dir).qmp_socket))

    def is_paused(self, pid: int, run_dir: Path) -> bool:
        return self.status(run_dir) in ("paused", "postmigrate", "finish-migrate")

    def cancel_snapshot(self, pid: int, run_dir: Path) -> None:
        with QMP(str(VMFiles(run_dir).qmp_socket)) as q:
            q.execute("migrate_cancel")

    def run_files(self, run_dir: Path) -> list[Path]:
        ram = self.ram_file(run_dir)
        return [VMFiles(run_dir).qmp_socket, VMFiles(run_dir).vmm_pid] + ([ram] if ram else [])
