"""User-mode NICs at the driver level: the NIC model's rules, QEMU's ``-netdev user``
argument, host forwards added and removed at runtime on a real QEMU (no guest needed:
slirp binds the host side itself), and Firecracker's refusal."""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest
from pydantic import ValidationError

from banger_core.errors import BangerError, ErrorCode
from banger_core.models import NIC, HostForward, Machine, user_net
from banger_core.paths import VMFiles
from banger_core.vmm.base import wait_exit
from banger_core.vmm.firecracker import FirecrackerDriver
from banger_core.vmm.qemu import QemuDriver

MAC = "52:54:00:12:34:56"


def test_nic_kinds_are_checked_as_a_class():
    user = NIC(id="net0", kind="user", mac=MAC)
    assert user.net == "10.0.2.0/24" and user.tap is None
    assert user_net(user.net).model_dump() == {
        "network": "10.0.2.0/24",
        "prefixlen": 24,
        "guest": "10.0.2.15",
        "gateway": "10.0.2.2",
        "dns": "10.0.2.3",
    }
    bad = [
        {"id": "net0", "mac": MAC},  # a tap NIC without its TAP
        {"id": "net0", "kind": "user", "tap": "tap0", "mac": MAC},
        {"id": "net0", "tap": "tap0", "mac": MAC, "net": "10.0.2.0/24"},
        {"id": "net0", "kind": "user", "mac": MAC, "net": "10.0.2.0/28"},  # too small for .15
        {"id": "net0", "kind": "user", "mac": MAC, "net": "10.0.2.1/24"},  # host bits set
        {"id": "net0", "kind": "user", "mac": "52:54:00:12:34"},
        {"id": "net0", "kind": "user", "mac": "52:54:00:12:34:5G"},
        {"id": "net 0", "kind": "user", "mac": MAC},
        {"id": "net0", "kind": "slirp", "mac": MAC},
    ]
    for spec in bad:
        with pytest.raises(ValidationError):
            NIC(**spec)
    for spec in [
        {"proto": "sctp", "host_port": 1, "guest_port": 1},
        {"proto": "tcp", "host_port": 70000, "guest_port": 1},
        {"proto": "tcp", "host_port": 1, "guest_port": 0},
        {"proto": "tcp", "host_address": "localhost", "host_port": 1, "guest_port": 1},
    ]:
        with pytest.raises(ValidationError):
            HostForward(**spec)


def test_qemu_netdev_for_each_kind():
    fwd = [HostForward(proto="tcp", host_port=8080, guest_port=80), HostForward(proto="udp", host_port=5353, guest_port=53)]
    assert QemuDriver.netdev(NIC(id="net0", tap="bt-1", mac=MAC)) == "tap,id=net0,ifname=bt-1,script=no,downscript=no"
    assert QemuDriver.netdev(NIC(id="net0", kind="user", mac=MAC, net="10.7.0.0/24", forwards=fwd)) == (
        "user,id=net0,net=10.7.0.0/24,restrict=off,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=udp:127.0.0.1:5353-:53"
    )


def test_firecracker_refuses_user_mode_before_starting_anything(tmp_path):
    k = tmp_path / "vmlinux"
    k.write_bytes(b"\x7fELF" + b"\0" * 60)
    m = Machine(kernel=str(k), vcpus=1, memory_mib=128, nics=[NIC(id="net0", kind="user", mac=MAC)])
    fc = FirecrackerDriver(binary="firecracker", links_dir=tmp_path / "links")
    for call in (lambda: fc.launch("v1", m, tmp_path / "run"), lambda: fc.restore("v1", m, tmp_path / "run", tmp_path / "snap")):
        with pytest.raises(BangerError) as e:
            call()
        assert e.value.code == ErrorCode.BAD_REQUEST and "no user-mode networking" in e.value.message
    assert not (tmp_path / "run").exists()
    assert "user" in QemuDriver.nic_kinds and "user" not in FirecrackerDriver.nic_kinds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int, proto: str = "tcp") -> bool:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")
def test_qemu_adds_and_removes_forwards_at_runtime(tmp_path):
    """A paused QEMU with a user-mode NIC (no kernel: slirp binds the host side itself)."""
    run = tmp_path / "run"
    run.mkdir()
    files = VMFiles(run)
    start = HostForward(proto="tcp", host_port=_free_port(), guest_port=22)
    nic = NIC(id="net0", kind="user", mac=MAC, forwards=[start])
    subprocess.run(
        ["qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-nodefaults", "-display", "none", "-S",
         "-netdev", QemuDriver.netdev(nic), "-device", "virtio-net-device,netdev=net0",
         "-qmp", f"unix:{files.qmp_socket},server=on,wait=off", "-pidfile", str(files.vmm_pid), "-daemonize"],
        check=True, timeout=30,
    )  # fmt: skip
    pid = int(files.vmm_pid.read_text())
    d = QemuDriver()
    try:
        assert _listening(start.host_port)  # from the command line
        port = _free_port()
        tcp = HostForward(proto="tcp", host_port=port, guest_port=8080)
        udp = HostForward(proto="udp", host_port=port, guest_port=8080)
        d.add_forward(pid, run, "net0", tcp)
        d.add_forward(pid, run, "net0", udp)
        assert _listening(port) and _listening(port, "udp")
        with pytest.raises(BangerError) as e:  # the host port is taken (by the forward just made)
            d.add_forward(pid, run, "net0", HostForward(proto="tcp", host_port=port, guest_port=9090))
        assert e.value.code == ErrorCode.BUSY and str(port) in e.value.message
        with pytest.raises(BangerError) as e:
            d.add_forward(pid, run, "nosuch", HostForward(proto="tcp", host_port=_free_port(), guest_port=1))
        assert e.value.code == ErrorCode.OPERATION_FAILED and "nosuch" in e.value.message
        assert d.remove_forward(pid, run, "net0", tcp) is True
        assert d.remove_forward(pid, run, "net0", tcp) is False  # idempotent: already gone
        assert not _listening(port) and _listening(port, "udp")
        assert d.remove_forward(pid, run, "net0", udp) is True and not _listening(port, "udp")
    finally:
        d.force_stop(pid, run)
        wait_exit(pid, 10)
