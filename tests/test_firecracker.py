"""The Firecracker driver against Firecracker's real API contract (firecracker.yaml).

No Firecracker binary can run here; `firecracker_fake.py` serves the API per the spec
and the driver's whole start/stop sequence runs against it. A test with the real
binary runs wherever one is on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest

from banger_core.errors import BangerError
from banger_core.models import NIC, AgentChannel, Drive, Machine
from banger_core.vmm.firecracker import FirecrackerAPI, FirecrackerDriver
from conftest import fake_binary, fake_firecracker_env, pid_alive, wait_for
from fcspec import find_operation, validate_request


def rich_machine(tmp: Path) -> Machine:
    for f in ("vmlinux", "initrd", "root.img", "data.img"):
        (tmp / f).write_bytes(b"\0" * 1024)
    (tmp / "vmlinux").write_bytes(b"\x7fELF" + b"\0" * 1020)
    return Machine(
        kernel=str(tmp / "vmlinux"),
        initrd=str(tmp / "initrd"),
        boot_args=["console=ttyS0", "reboot=k", "panic=1", "pci=off"],
        vcpus=2,
        memory_mib=512,
        drives=[
            Drive(id="root", path=str(tmp / "root.img"), root=True),
            Drive(id="data", path=str(tmp / "data.img"), read_only=True),
        ],
        nics=[NIC(id="eth0", tap="tap-test0", mac="02:fc:00:00:00:01")],
        agent=AgentChannel(kind="vsock", host_path=str(tmp / "v.sock"), guest_cid=3),
    )


def test_spec_validator_is_not_vacuous():
    assert validate_request("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}) == "putMachineConfiguration"
    for bad in (
        {"vcpu_count": "two", "mem_size_mib": 256},
        {"mem_size_mib": 256},
        {"vcpu_count": 1, "mem_size_mib": 1, "nope": 1},
    ):
        with pytest.raises(jsonschema.ValidationError):
            validate_request("PUT", "/machine-config", bad)
    with pytest.raises(AssertionError, match="not an operation"):
        validate_request("POST", "/machine-config", {})
    with pytest.raises(AssertionError, match="drive_id in body != path"):
        validate_request(
            "PUT", "/drives/root", {"drive_id": "other", "path_on_host": "/x", "is_root_device": True, "is_read_only": False}
        )


def test_every_request_the_driver_sends_matches_the_spec(tmp_path):
    sent: list[tuple[str, str, object]] = []

    class Recorder(FirecrackerAPI):
        def request(self, method, path, body=None):
            sent.append((method, path, body))
            validate_request(method, path, body)

    api = Recorder("/nonexistent")
    FirecrackerDriver.configure(api, rich_machine(tmp_path), tmp_path)
    api.action("SendCtrlAltDel")
    api.describe()
    ops = [find_operation(m, p)[1]["operationId"] for m, p, _ in sent]
    assert ops == [
        "putLogger",
        "putMachineConfiguration",
        "putGuestBootSource",
        "putGuestDriveByID",
        "putGuestDriveByID",
        "putGuestNetworkInterfaceByID",
        "putGuestVsock",
        "createSyncAction",
        "createSyncAction",
        "describeInstance",
    ]
    assert sent[7][2] == {"action_type": "InstanceStart"} and sent[8][2] == {"action_type": "SendCtrlAltDel"}
    # without an initrd the boot source must not carry an initrd_path
    sent.clear()
    m = rich_machine(tmp_path).model_copy(update={"initrd": None, "nics": [], "agent": None})
    FirecrackerDriver.configure(api, m, tmp_path)
    boot = next(b for meth, p, b in sent if p == "/boot-source")
    assert "initrd_path" not in boot


def test_driver_start_stop_sequence_against_spec_server(tmp_path):
    record = tmp_path / "requests.jsonl"
    os.environ["FC_FAKE_RECORD"] = str(record)
    try:
        driver = FirecrackerDriver(binary=str(fake_binary(tmp_path)))
        run = tmp_path / "run"
        launch = driver.launch("0123456789abcdef", rich_machine(tmp_path), run)
        assert pid_alive(launch.pid)
        assert any("banger-0123456789abcdef" in a for a in open(f"/proc/{launch.pid}/cmdline").read().split("\0"))
        assert FirecrackerAPI(launch.api_socket).describe()["state"] == "Running"
        driver.request_shutdown(launch.pid, run)
        wait_for(lambda: not pid_alive(launch.pid), timeout=10)
    finally:
        os.environ.pop("FC_FAKE_RECORD", None)
    reqs = [json.loads(ln) for ln in record.read_text().splitlines()]
    assert all(r["result"] == "ok" for r in reqs), reqs
    assert [r["op"] for r in reqs if r["op"] != "describeInstance"][-2:] == ["createSyncAction", "createSyncAction"]


def test_api_errors_surface_with_fault_message(tmp_path):
    driver = FirecrackerDriver(binary=str(fake_binary(tmp_path)))
    m = rich_machine(tmp_path)
    Path(m.initrd).unlink()  # InstanceStart must fail: initrd missing
    with pytest.raises(BangerError, match=r"PUT /actions: 400 initrd_path .* does not exist"):
        driver.launch("fedcba9876543210", m, tmp_path / "run")


def test_boots_the_elf_vmlinux_and_refuses_a_bzimage_only_kernel(tmp_path):
    """Firecracker on x86 boots only an ELF vmlinux: given a bzImage kernel with its
    vmlinux beside it, the boot source names the vmlinux; with no ELF at all the
    driver refuses before any process starts."""
    m = rich_machine(tmp_path)
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(b"MZ" + b"\0" * 1022)
    sent: list[tuple[str, str, object]] = []

    class Recorder(FirecrackerAPI):
        def request(self, method, path, body=None):
            sent.append((method, path, body))
            validate_request(method, path, body)

    FirecrackerDriver.configure(Recorder("/nonexistent"), m.model_copy(update={"kernel": str(bz), "vmlinux": m.kernel}), tmp_path)
    boot = next(b for _, p, b in sent if p == "/boot-source")
    assert boot["kernel_image_path"] == m.kernel
    run = tmp_path / "run"
    with pytest.raises(BangerError, match=r"boots only an ELF vmlinux .* microvm-6.1") as exc:
        FirecrackerDriver(binary=str(fake_binary(tmp_path))).launch(
            "00000000000000aa", m.model_copy(update={"kernel": str(bz)}), run
        )
    assert exc.value.code == "bad_request"
    assert not (run / "vmm.pid").exists() and not (run / "firecracker.sock").exists()


def test_vm_lifecycle_through_cli_with_firecracker_driver(benv, tmp_path):
    fake_firecracker_env(benv, tmp_path)
    r = benv.run(
        "vm",
        "create",
        "--name",
        "fc1",
        "--image",
        "fcimg",
        "--driver",
        "firecracker",
        "--vcpu",
        "1",
        "--memory",
        "128",
        "--root-size",
        "32M",
        check=True,
    )
    assert "fc1 running" in r.stdout and "| firecracker |" in r.stderr and "ready in" in r.stderr
    vm = json.loads(benv.run("vm", "show", "fc1", "--json", check=True).stdout)
    assert vm["state"] == "running" and vm["driver"] == "firecracker" and pid_alive(vm["pid"])
    assert "fake firecracker: guest 'booted'" in benv.run("vm", "logs", "fc1", check=True).stdout
    r = benv.run("vm", "stop", "fc1", check=True)
    assert "fc1: stopped" in r.stdout and not pid_alive(vm["pid"])
    benv.run("vm", "delete", "fc1", check=True)
    assert not Path(vm["dir"]).exists()


@pytest.mark.skipif(
    shutil.which("firecracker") is None, reason="no firecracker binary on PATH (none can be installed on this machine)"
)
def test_real_firecracker_binary_answers_describe(tmp_path):
    sock = tmp_path / "fc.sock"
    p = subprocess.Popen(["firecracker", "--api-sock", str(sock), "--id", "banger-realtest"])
    try:
        wait_for(sock.exists, timeout=10)
        info = FirecrackerAPI(str(sock)).describe()
        validate_request("GET", "/", None)
        assert info["id"] == "banger-realtest"
    finally:
        p.kill()
        p.wait()


def test_pause_resume_and_the_graceful_stop_of_a_paused_vm(benv, tmp_path):
    """vm pause/resume through daemon and CLI: PATCH /vm against the spec-checked fake,
    the paused state refused where it must be, kept across a daemon restart, and a
    graceful stop of a paused VM resumes it first (a frozen guest cannot shut down)."""
    record = tmp_path / "requests.jsonl"
    benv.extra_env["FC_FAKE_RECORD"] = str(record)  # before the daemon starts: its firecrackers inherit it
    fake_firecracker_env(benv, tmp_path)
    spec = ["--image", "fcimg", "--driver", "firecracker", "--vcpu", "1", "--memory", "128", "--root-size", "32M"]
    benv.run("vm", "create", "--name", "fcp", *spec, check=True)
    try:
        assert "fcp: paused" in benv.run("vm", "pause", "fcp", check=True).stdout
        vm = json.loads(benv.run("vm", "show", "fcp", "--json", check=True).stdout)
        assert vm["state"] == "paused" and pid_alive(vm["pid"])
        for argv, said in (
            (["vm", "pause", "fcp"], "VM fcp is paused: only a running VM pauses"),
            (["vm", "start", "fcp"], "VM fcp is paused: banger vm resume fcp"),
            (["vm", "set", "fcp", "--vcpu", "2"], "VM fcp is paused: stop it before changing its spec"),
            (["vm", "delete", "fcp"], "VM fcp is paused: stop it first or delete with --force"),
        ):
            r = benv.run(*argv)
            assert r.returncode == 1 and said in r.stderr, (argv, r.stderr)
        benv.stop_daemon()  # a new daemon adopts the paused VM as paused
        assert json.loads(benv.run("vm", "show", "fcp", "--json", check=True).stdout)["state"] == "paused"
        assert "fcp: running" in benv.run("vm", "resume", "fcp", check=True).stdout
        r = benv.run("vm", "resume", "fcp")
        assert r.returncode == 1 and "VM fcp is running, not paused" in r.stderr
        benv.run("vm", "pause", "fcp", check=True)
        assert "fcp: stopped" in benv.run("vm", "stop", "fcp", check=True).stdout
        assert not pid_alive(vm["pid"])
    finally:
        benv.run("vm", "delete", "fcp", "--force", timeout=60)
    reqs = [json.loads(line) for line in record.read_text().splitlines()]
    assert all(q["result"] == "ok" for q in reqs), [q for q in reqs if q["result"] != "ok"]
    seq = [(q["op"], (q["body"] or {}).get("state") or (q["body"] or {}).get("action_type")) for q in reqs]
    seq = [s for s in seq if s[0] in ("patchVm", "createSyncAction")]
    assert seq == [
        ("createSyncAction", "InstanceStart"),
        ("patchVm", "Paused"),
        ("patchVm", "Resumed"),
        ("patchVm", "Paused"),
        ("patchVm", "Resumed"),  # the stop resumed it first
        ("createSyncAction", "SendCtrlAltDel"),
    ]
