"""The QEMU command line banger builds, and the host TSC rate it hands microvm guests."""

from __future__ import annotations

import os
import platform
import time

import pytest

from banger_core.models import Machine
from banger_core.vmm import tsc
from banger_core.vmm.base import ELF_MAGIC
from banger_core.vmm.qemu import QemuDriver


def machine(tmp_path, elf: bool, boot_args: list[str] | None = None) -> Machine:
    k = tmp_path / ("vmlinux" if elf else "bzImage")
    k.write_bytes((ELF_MAGIC if elf else b"MZ\0\0") + b"\0" * 60)
    return Machine(kernel=str(k), boot_args=boot_args or ["console=ttyS0", "root=/dev/vda"], vcpus=1, memory_mib=128)


def append_of(argv: list[str]) -> list[str]:
    return argv[argv.index("-append") + 1].split()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="reads the x86 TSC")
def test_host_tsc_rate_agrees_with_a_long_measurement():
    quick = tsc.host_tsc_khz()
    assert quick is not None
    slow = tsc.host_tsc_khz.__wrapped__(samples=1, window=1.0)
    assert abs(quick - slow) / slow < 0.002, (quick, slow)
    t0 = time.monotonic()
    assert tsc.host_tsc_khz() == quick  # measured once per process
    assert time.monotonic() - t0 < 0.01


def test_microvm_under_tcg_is_told_the_tsc_rate(tmp_path, monkeypatch):
    monkeypatch.setattr("banger_core.vmm.qemu.host_tsc_khz", lambda: 2_400_123)
    monkeypatch.setattr("banger_core.vmm.qemu.host_tsc_trusted", lambda: False)
    d = QemuDriver()
    micro = d.argv("v1", machine(tmp_path, elf=True), tmp_path, "tcg")
    assert "microvm,acpi=on" in micro and append_of(micro) == ["console=ttyS0", "root=/dev/vda", "tsc_early_khz=2400123"]
    # a host that keeps time with its TSC: the guest's vCPUs (all reading it) may trust it too
    monkeypatch.setattr("banger_core.vmm.qemu.host_tsc_trusted", lambda: True)
    assert append_of(d.argv("v1", machine(tmp_path, elf=True), tmp_path, "tcg"))[-2:] == ["tsc_early_khz=2400123", "tsc=reliable"]
    # -M pc has an HPET and a PM timer to calibrate against; KVM guests get kvmclock
    assert "tsc_early_khz" not in " ".join(d.argv("v1", machine(tmp_path, elf=False), tmp_path, "tcg"))
    assert "tsc_early_khz" not in " ".join(d.argv("v1", machine(tmp_path, elf=True), tmp_path, "kvm"))
    # the user's own value wins
    mine = machine(tmp_path, elf=True, boot_args=["console=ttyS0", "tsc_early_khz=1000000"])
    assert append_of(d.argv("v1", mine, tmp_path, "tcg")) == ["console=ttyS0", "tsc_early_khz=1000000"]
    mine = machine(tmp_path, elf=True, boot_args=["console=ttyS0", "tsc=unstable"])
    assert append_of(d.argv("v1", mine, tmp_path, "tcg")) == ["console=ttyS0", "tsc=unstable", "tsc_early_khz=2400123"]
    # a host where the rate can't be read boots as before
    monkeypatch.setattr("banger_core.vmm.qemu.host_tsc_khz", lambda: None)
    assert append_of(d.argv("v1", machine(tmp_path, elf=True), tmp_path, "tcg")) == ["console=ttyS0", "root=/dev/vda"]


def test_guest_ram_is_a_shared_file_in_the_memory_dir_and_a_foreign_dir_is_refused(tmp_path, monkeypatch):
    from banger_core.errors import BangerError

    mem = tmp_path / "mem"
    d = QemuDriver(memory_dir=mem, tb_size_mib=64)
    run_dir = tmp_path / "vms" / "0123456789abcdef"
    memory = d._own_ram(run_dir, 128)
    assert memory == (mem / "0123456789abcdef.ram", True) and (mem.stat().st_mode & 0o777) == 0o700
    argv = d.argv("0123456789abcdef", machine(tmp_path, elf=True), run_dir, "tcg", memory)
    assert argv[argv.index("-M") + 1] == "microvm,acpi=on,memory-backend=ram"
    assert argv[argv.index("-accel") + 1] == "tcg,tb-size=64"
    assert f"memory-backend-file,id=ram,size=128M,mem-path={mem}/0123456789abcdef.ram,share=on" in argv
    assert memory[0] in d.run_files(run_dir)  # removed with the VMM
    # a restore maps a snapshot's memory privately; KVM ignores the TCG cache size
    argv = d.argv("0123456789abcdef", machine(tmp_path, elf=True), run_dir, "kvm", (tmp_path / "snap" / "memory", False))
    assert argv[argv.index("-accel") + 1] == "kvm" and any(a.endswith("/snap/memory,share=off") for a in argv)
    # a memory dir without room for the VM's memory (a small /dev/shm, as in a container)
    real = os.statvfs

    def small(path):
        st = real(path)
        return os.statvfs_result((st.f_bsize, 4096, st.f_blocks, 1000, 1000, *st[5:]))

    monkeypatch.setattr(os, "statvfs", small)
    with pytest.raises(BangerError) as exc:
        d._own_ram(run_dir, 128)
    assert "has 3 MiB free, less than the VM's 128 MiB" in exc.value.message, exc.value.message
    monkeypatch.undo()
    # a memory dir others can enter (on a world-writable tmpfs: perhaps not ours) is refused
    mem.chmod(0o755)
    with pytest.raises(BangerError) as exc:
        d._own_ram(run_dir, 128)
    assert "must be a directory owned by uid" in exc.value.message and "BANGER_MEMORY_DIR" in exc.value.message
    mem.rmdir()
    mem.symlink_to(tmp_path)
    with pytest.raises(BangerError):
        d._own_ram(run_dir, 128)
