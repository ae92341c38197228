"""The driver interface every VMM implements."""

from __future__ import annotations

import os
import shutil
import signal
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from banger_core.errors import BangerError, ErrorCode
from banger_core.models import HostForward, Machine


ELF_MAGIC = b"\x7fELF"


def kernel_is_elf(path: str | os.PathLike[str]) -> bool:
    """An uncompressed ELF kernel (vmlinux), as opposed to a bzImage."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == ELF_MAGIC
    except OSError:
        return False


def process_tag(vm_id: str) -> str:
    """A string on the VMM's command line that identifies the VM it runs."""
    return f"banger-{vm_id}"


@dataclass
class Launch:
    pid: int
    api_socket: str | None = None


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def is_vmm_of(pid: int, vm_id: str) -> bool:
    """``pid`` is alive and is the VMM process banger started for ``vm_id``."""
    return alive(pid) and any(process_tag(vm_id) in a for a in cmdline(pid))


def find_vmm(vm_id: str) -> int | None:
    """Find a VM's VMM by process inspection (when its handles file is lost)."""
    tag = process_tag(vm_id)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            pid = int(entry.name)
            if any(tag in a for a in cmdline(pid)) and alive(pid) and pid != os.getpid():
                return pid
    return None


def wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            _reap(pid)
            return True
        time.sleep(0.05)
    return not alive(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def send_signal(pid: int, sig: int = signal.SIGKILL) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


class Driver(ABC):
    """One VMM. Instances are cheap; every method takes what it needs explicitly."""

    name: str
    binary: str  # the VMM's executable (a name on PATH, or a path)
    #: the NIC kinds (``banger_core.models.NIC.kind``) this VMM can give a guest
    nic_kinds: ClassVar[frozenset[str]] = frozenset({"tap"})
    #: what this driver's snapshot files are (``compat``): one written in another
    #: format is not restored
    snapshot_format: ClassVar[str] = "1"

    def check_machine(self, machine: Machine) -> None:
        """Refuse, before anything starts, a machine with devices this VMM lacks."""
        for n in machine.nics:
            if n.kind not in self.nic_kinds:
                raise BangerError(
                    ErrorCode.BAD_REQUEST,
                    f"the {self.name} VMM has no {n.kind}-mode networking (NIC {n.id}); it has: {', '.join(sorted(self.nic_kinds))}",
                )

    @abstractmethod
    def available(self) -> tuple[bool, str]:
        """Whether this VMM can run here, and why (binary, KVM...)."""

    @abstractmethod
    def launch(self, vm_id: str, machine: Machine, run_dir: Path) -> Launch:
        """Start the VMM for ``machine``, detached so it outlives the daemon and the
        request that started it. Returns once the guest is booting."""

    @abstractmethod
    def request_shutdown(self, pid: int, run_dir: Path) -> None:
        """Ask the guest to shut down (ACPI power button / Ctrl-Alt-Del)."""

    def send_ctrl_alt_del(self, pid: int, run_dir: Path) -> bool:
        """Second graceful attempt; False when this VMM has no such thing."""
        return False

    def force_stop(self, pid: int, run_dir: Path) -> None:
        send_signal(pid, signal.SIGKILL)

    def pause(self, pid: int, run_dir: Path) -> None:
        """Stop the guest's vCPUs; its memory and devices stay in the VMM."""
        raise BangerError(ErrorCode.BAD_REQUEST, f"the {self.name} driver cannot pause a VM")

    def resume(self, pid: int, run_dir: Path) -> None:
        """Let a paused guest's vCPUs run again."""
        raise BangerError(ErrorCode.BAD_REQUEST, f"the {self.name} driver cannot resume a VM")

    # --- host forwards of user-mode NICs ----------------------------------------------
    def add_forward(self, pid: int, run_dir: Path, nic_id: str, forward: HostForward) -> None:
        """Make ``forward`` lead to the running guest through its user-mode NIC
        ``nic_id``. A host port that is taken raises ``BangerError`` with code
        ``BUSY``; anything else that fails, ``OPERATION_FAILED``."""
        raise BangerError(ErrorCode.BAD_REQUEST, f"the {self.name} driver has no user-mode networking to forward ports through")

    def remove_forward(self, pid: int, run_dir: Path, nic_id: str, forward: HostForward) -> bool:
        """Undo ``add_forward`` (by protocol, host address and port); False when there
        was no such forward."""
        raise BangerError(ErrorCode.BAD_REQUEST, f"the {self.name} driver has no user-mode networking to forward ports through")

    # --- snapshots (issue 13) ------------------------------------------------------
    def snapshot(self, pid: int, run_dir: Path, dest: Path) -> None:
        """With the guest paused (``pause``): write its device state and memory into
        the directory ``dest`` (files of the driver's choosing; the directory exists and
        is the snapshot's own). The guest stays paused. The caller owns the disks: they
        do not change while the guest is paused."""
        raise BangerError(ErrorCode.BAD_REQUEST, f"the {self.name} driver cannot snapshot a VM")

    def restore(self, vm_id: str, machine: Machine, run_dir: Path, src: Path) -> Launch:
        """Start a VMM for ``vm_id`` that continues from what ``snapshot`` wrote in
        ``src``, and let its guest run. ``machine`` is the snapshot's device set (the
        core checked it) with this VM's own paths: its disks hold what the source's
        held when it paused. Returns once the guest runs; on failure nothing of this
        VMM is left running."""
        raise BangerError(ErrorCode.BAD_REQUEST, f"the {self.name} driver cannot restore a snapshot")

    def cancel_snapshot(self, pid: int, run_dir: Path) -> None:
        """Stop writing a snapshot that nobody waits for any more (before resuming);
        a VMM whose snapshot request returns only when written has nothing to stop."""
        return None

    def is_paused(self, pid: int, run_dir: Path) -> bool:
        """Whether the VMM's guest is paused (a daemon that died mid-snapshot leaves it so)."""
        return False

    def identity(self) -> str:
        """What a snapshot made by this VMM depends on (its binary: path, size, mtime):
        a snapshot is only restored by the VMM that made it."""
        path = shutil.which(self.binary)
        if not path:
            return self.name
        st = os.stat(path)
        return f"{self.name}:{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"

    def run_files(self, run_dir: Path) -> list[Path]:
        """Per-boot files to remove once the VMM is gone (sockets, pid files)."""
        return []
