"""Firecracker snapshots through the driver (snapshot, restore, is_paused) against the
spec-checked fake `firecracker`.

Firecracker reopens a snapshot's drives and rebinds its vsock socket at the paths it
recorded; the driver names them through a per-VM link that a restore repoints at the
restoring VM's directory while the state loads. The fake opens what the state names the
way Firecracker does (symlinks resolved at that moment) and writes what it opened to
``fake-opened.json``: these tests check each restored VM got its own disk.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from banger_core.errors import BangerError
from banger_core.models import NIC, AgentChannel, Drive, Machine
from banger_core.vmm.base import Launch, find_vmm, process_tag
from banger_core.vmm.firecracker import FirecrackerAPI, FirecrackerDriver
from conftest import fake_binary, pid_alive, wait_for
from fcspec import validate_request
from leftovers import kill_processes_using

SOURCE = "00000000000000a1"


@pytest.fixture
def root(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A short directory (unix socket paths are limited to 108 bytes); every fake
    firecracker started under it is killed afterwards, and the fakes must have accepted
    every request (unless the test asks for ``refusals_expected``)."""
    d = Path(tempfile.mkdtemp(prefix="fcs-", dir="/tmp"))
    record = d / "requests.jsonl"
    os.environ["FC_FAKE_RECORD"] = str(record)
    try:
        yield d
    finally:
        os.environ.pop("FC_FAKE_RECORD", None)
        kill_processes_using(d)
        reqs = [json.loads(ln) for ln in record.read_text().splitlines()] if record.exists() else []
        shutil.rmtree(d, ignore_errors=True)
    assert reqs
    if "refusals_expected" not in request.fixturenames:
        assert all(r["result"] == "ok" for r in reqs), [r for r in reqs if r["result"] != "ok"]


@pytest.fixture
def refusals_expected() -> None:
    """The test makes the fake refuse requests on purpose."""


def driver(root: Path) -> FirecrackerDriver:
    return FirecrackerDriver(binary=str(fake_binary(root)), links_dir=root / "fc")


def machine(root: Path, vm_id: str) -> Machine:
    """A VM as the core gives it: its root disk, vsock socket and TAP its own, a shared
    read-only data disk and kernel."""
    run = run_dir(root, vm_id)
    run.mkdir(parents=True, exist_ok=True)
    if not (root / "vmlinux").exists():
        (root / "vmlinux").write_bytes(b"\x7fELF" + b"\0" * 1020)
        (root / "data.img").write_bytes(b"data" * 256)
    disk = run / "root.img"
    if not disk.exists():
        disk.write_bytes(b"\0" * 1024)
    return Machine(
        kernel=str(root / "vmlinux"),
        boot_args=["console=ttyS0", "reboot=k", "panic=1", "pci=off"],
        vcpus=1,
        memory_mib=128,
        drives=[
            Drive(id="root", path=str(disk), root=True),
            Drive(id="data", path=str(root / "data.img"), read_only=True),
        ],
        nics=[NIC(id="eth0", tap=f"tap-{vm_id[-4:]}", mac="02:fc:00:00:00:01")],
        agent=AgentChannel(kind="vsock", host_path=str(run / "agent.vsock"), guest_cid=3),
    )


def run_dir(root: Path, vm_id: str) -> Path:
    return root / "vms" / vm_id


def opened(run: Path) -> dict:
    """What the fake firecracker of ``run`` opened (drives, vsock socket, TAPs)."""
    return json.loads((run / "fake-opened.json").read_text())


def state(launch: Launch) -> str:
    assert launch.api_socket
    return FirecrackerAPI(launch.api_socket).describe()["state"]


def link(root: Path, link_id: str = SOURCE) -> str | None:
    try:
        return os.readlink(root / "fc" / link_id)
    except FileNotFoundError:
        return None


def clone_for(root: Path, vm_id: str) -> Machine:
    """A VM to restore into: its own root disk, a copy of the source's (the core's job:
    the disks hold what the source's held when it paused)."""
    m = machine(root, vm_id)
    shutil.copyfile(run_dir(root, SOURCE) / "root.img", m.drives[0].path)
    return m


def snapshot_source(root: Path) -> tuple[FirecrackerDriver, Launch, Path]:
    """The source VM booted, paused and snapshotted into ``root/snap``."""
    drv = driver(root)
    src = drv.launch(SOURCE, machine(root, SOURCE), run_dir(root, SOURCE))
    (run_dir(root, SOURCE) / "root.img").write_bytes(b"source disk" + b"\0" * 1013)
    drv.pause(src.pid, run_dir(root, SOURCE))
    snap = root / "snap"
    snap.mkdir()
    drv.snapshot(src.pid, run_dir(root, SOURCE), snap)
    return drv, src, snap


def assert_own_devices(root: Path, vm_id: str, link_id: str = SOURCE) -> None:
    run = run_dir(root, vm_id)
    got = opened(run)
    assert got["drives"] == {"root": str(run / "root.img"), "data": str(root / "data.img")}
    assert got["vsock"] == str(run / "agent.vsock") and (run / "agent.vsock").is_socket()
    assert got["taps"] == {"eth0": f"tap-{vm_id[-4:]}"}  # network_overrides: its own TAP
    assert json.loads((run / "firecracker-link").read_text())["link_id"] == link_id


def test_a_cold_boot_names_its_devices_through_its_link(root):
    drv = driver(root)
    run = run_dir(root, SOURCE)
    launch = drv.launch(SOURCE, machine(root, SOURCE), run)
    assert link(root) == str(run)
    assert (run / "drives" / "root").resolve() == run / "root.img"
    reqs = [json.loads(ln) for ln in (root / "requests.jsonl").read_text().splitlines()]
    given = {r["body"]["drive_id"]: r["body"]["path_on_host"] for r in reqs if r["op"] == "putGuestDriveByID"}
    assert given == {d: str(root / "fc" / SOURCE / "drives" / d) for d in ("root", "data")}
    vsock = next(r["body"]["uds_path"] for r in reqs if r["op"] == "putGuestVsock")
    assert vsock == str(root / "fc" / SOURCE / "agent.vsock")
    assert_own_devices(root, SOURCE, SOURCE)
    assert not drv.is_paused(launch.pid, run)
    # the VMM gone, its link goes with the run files; a vsock socket elsewhere gets a vsock-dir link
    os.kill(launch.pid, 9)
    wait_for(lambda: not pid_alive(launch.pid))
    assert root / "fc" / SOURCE in drv.run_files(run)
    for f in drv.run_files(run):
        f.unlink(missing_ok=True)
    assert link(root) is None
    m = machine(root, SOURCE).model_copy(update={"agent": AgentChannel(kind="vsock", host_path=str(root / "x.sock"))})
    launch = drv.launch(SOURCE, m, run)
    assert opened(run)["vsock"] == str(root / "x.sock") and (root / "x.sock").is_socket()
    os.kill(launch.pid, 9)


def test_a_launch_sweeps_the_links_of_deleted_vms(root):
    """`vm delete --force` kills the VMM and removes its directory, not its link: the
    next launch or restore removes links whose directory is gone, and lock files with no
    link, but not one whose lock is held (it is in use)."""
    drv = driver(root)
    launch = drv.launch(SOURCE, machine(root, SOURCE), run_dir(root, SOURCE))
    os.kill(launch.pid, 9)
    wait_for(lambda: not pid_alive(launch.pid))
    shutil.rmtree(run_dir(root, SOURCE))
    busy = "00000000000000bb"
    os.symlink(root / "gone", root / "fc" / busy)
    held = os.open(root / "fc" / f"{busy}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        other = "00000000000000cc"
        launch = drv.launch(other, machine(root, other), run_dir(root, other))
        assert sorted(os.listdir(root / "fc")) == [busy, f"{busy}.lock", other, f"{other}.lock"]
        os.kill(launch.pid, 9)
    finally:
        os.close(held)


def test_snapshot_of_a_paused_vm(root, refusals_expected):
    drv, src, snap = snapshot_source(root)
    run = run_dir(root, SOURCE)
    assert drv.is_paused(src.pid, run) and state(src) == "Paused"  # the guest stays paused
    vmstate = json.loads((snap / "vmstate").read_text())
    assert {d["path_on_host"] for d in vmstate["drives"]} == {str(root / "fc" / SOURCE / "drives" / d) for d in ("root", "data")}
    assert (snap / "memory").read_bytes().startswith(b"FAKE FIRECRACKER GUEST MEMORY\n")
    meta = json.loads((snap / "firecracker.json").read_text())
    assert meta == {"link_id": SOURCE, "drives": ["data", "root"], "vsock": "agent.vsock"}
    drv.resume(src.pid, run)
    assert not drv.is_paused(src.pid, run)
    # Firecracker snapshots only a paused guest: the fake refuses, the error says why
    with pytest.raises(BangerError, match="PUT /snapshot/create: 400 .*not paused"):
        drv.snapshot(src.pid, run, snap)


def test_two_restores_each_open_their_own_disk(root):
    drv, src, snap = snapshot_source(root)
    restored = {}
    for vm_id in ("00000000000000b1", "00000000000000b2"):
        restored[vm_id] = drv.restore(vm_id, clone_for(root, vm_id), run_dir(root, vm_id), snap)
        assert state(restored[vm_id]) == "Running"  # resume_vm
        assert_own_devices(root, vm_id)
        assert opened(run_dir(root, vm_id))["restored_from"] == str(snap / "vmstate")
        assert link(root) == str(run_dir(root, SOURCE))  # back at the source
        assert find_vmm(vm_id) == restored[vm_id].pid
        assert (run_dir(root, vm_id) / "vmm.pid").read_text().strip() == str(restored[vm_id].pid)
    assert opened(run_dir(root, SOURCE))["drives"]["root"] == str(run_dir(root, SOURCE) / "root.img")
    assert state(src) == "Paused"
    # a restored VM's link is the source's: its run files never include it
    b1 = run_dir(root, "00000000000000b1")
    assert root / "fc" / SOURCE not in drv.run_files(b1)
    assert root / "fc" / SOURCE in drv.run_files(run_dir(root, SOURCE))


def test_a_restore_after_the_source_is_gone_leaves_no_dangling_link(root):
    drv, src, snap = snapshot_source(root)
    os.kill(src.pid, 9)
    wait_for(lambda: not pid_alive(src.pid))
    shutil.copyfile(run_dir(root, SOURCE) / "root.img", root / "root.copy")
    shutil.rmtree(run_dir(root, SOURCE))  # deleted without its run files cleaned: the link dangles
    assert link(root) == str(run_dir(root, SOURCE))
    vm_id = "00000000000000c1"
    m = machine(root, vm_id)
    shutil.copyfile(root / "root.copy", m.drives[0].path)
    drv.restore(vm_id, m, run_dir(root, vm_id), snap)
    assert_own_devices(root, vm_id)
    assert link(root) is None
    assert sorted(p.name for p in (root / "fc").iterdir()) == [f"{SOURCE}.lock"]


def test_a_snapshot_of_a_restored_vm_restores(root):
    drv, _, snap = snapshot_source(root)
    b, c = "00000000000000d1", "00000000000000d2"
    lb = drv.restore(b, clone_for(root, b), run_dir(root, b), snap)
    drv.pause(lb.pid, run_dir(root, b))
    snap2 = root / "snap2"
    snap2.mkdir()
    drv.snapshot(lb.pid, run_dir(root, b), snap2)
    assert json.loads((snap2 / "firecracker.json").read_text())["link_id"] == SOURCE  # the chain keeps the link id
    m = machine(root, c)
    shutil.copyfile(run_dir(root, b) / "root.img", m.drives[0].path)
    lc = drv.restore(c, m, run_dir(root, c), snap2)
    assert state(lc) == "Running" and state(lb) == "Paused"
    assert_own_devices(root, c)
    assert opened(run_dir(root, c))["restored_from"] == str(snap2 / "vmstate")
    assert link(root) == str(run_dir(root, SOURCE))


def test_concurrent_restores_from_one_snapshot(root):
    drv, _, snap = snapshot_source(root)
    ids = [f"00000000000000e{i}" for i in range(3)]
    machines = {vm_id: clone_for(root, vm_id) for vm_id in ids}
    results: dict[str, Launch | BaseException] = {}

    def restore(vm_id: str) -> None:
        try:
            results[vm_id] = drv.restore(vm_id, machines[vm_id], run_dir(root, vm_id), snap)
        except BaseException as exc:
            results[vm_id] = exc

    threads = [threading.Thread(target=restore, args=(vm_id,)) for vm_id in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(isinstance(r, Launch) for r in results.values()) and len(results) == len(ids), results
    for vm_id in ids:
        assert_own_devices(root, vm_id)
    assert link(root) == str(run_dir(root, SOURCE))


def test_a_failed_load_leaves_no_process_and_the_link_as_it_was(root, refusals_expected):
    drv, src, snap = snapshot_source(root)
    (snap / "memory").unlink()
    vm_id = "00000000000000f1"
    run = run_dir(root, vm_id)
    with pytest.raises(BangerError, match=r"restoring the Firecracker snapshot .*PUT /snapshot/load: 400 .*memory") as exc:
        drv.restore(vm_id, clone_for(root, vm_id), run, snap)
    assert exc.value.code == "operation_failed"
    assert find_vmm(vm_id) is None and not (run / "vmm.pid").exists()
    assert not (run / "firecracker.sock").exists() and not (run / "agent.vsock").exists()
    assert link(root) == str(run_dir(root, SOURCE))
    assert not (run / "firecracker-link").exists()
    # a disk that cannot be opened fails the load the same way
    (snap / "memory").write_bytes(b"FAKE FIRECRACKER GUEST MEMORY\n")
    m = clone_for(root, vm_id)
    os.unlink(m.drives[0].path)
    with pytest.raises(BangerError, match=r"Unable to open the drive's backing file"):
        drv.restore(vm_id, m, run, snap)
    assert find_vmm(vm_id) is None and link(root) == str(run_dir(root, SOURCE))
    # a machine that is not the snapshot's device set is refused before anything starts
    m = clone_for(root, vm_id)
    with pytest.raises(BangerError, match=r"has drives \['data', 'root'\].*this VM has drives \['root'\]"):
        drv.restore(vm_id, m.model_copy(update={"drives": m.drives[:1]}), run, snap)
    assert state(src) == "Paused"


def test_snapshot_requests_are_checked_against_the_spec(root, refusals_expected):
    """The driver's snapshot bodies match firecracker.yaml, and the fake's validation
    bites: a wrong field name, a load after configuring, are refused."""
    sent: list[tuple[str, str, object]] = []

    class Recorder(FirecrackerAPI):
        def request(self, method, path, body=None):
            sent.append((method, path, body))
            return validate_request(method, path, body)

    api = Recorder("/nonexistent")
    api.create_snapshot("/s/vmstate", "/s/memory")
    api.load_snapshot("/s/vmstate", "/s/memory", {"eth0": "tap-x"})
    api.load_snapshot("/s/vmstate", "/s/memory", {})
    assert sent[0][2] == {"snapshot_type": "Full", "snapshot_path": "/s/vmstate", "mem_file_path": "/s/memory"}
    assert sent[1][2] == {
        "snapshot_path": "/s/vmstate",
        "mem_backend": {"backend_type": "File", "backend_path": "/s/memory"},
        "resume_vm": True,
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap-x"}],
    }
    assert "network_overrides" not in sent[2][2]
    with pytest.raises(jsonschema.ValidationError):
        validate_request("PUT", "/snapshot/load", {"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "path": "/m"}})
    # against the fake: a wrong field name is a 400, and so is a load on a configured process
    _, _, snap = snapshot_source(root)
    exe, sock = fake_binary(root), root / "fresh.sock"
    p = subprocess.Popen([str(exe), "--api-sock", str(sock), "--id", process_tag("00000000000000aa")])
    try:
        wait_for(sock.exists)
        fresh = FirecrackerAPI(str(sock))
        wait_for(lambda: fresh.describe())
        with pytest.raises(BangerError, match="400 invalid request: Additional properties are not allowed .'mem_file'"):
            fresh.request("PUT", "/snapshot/load", {"snapshot_path": str(snap / "vmstate"), "mem_file": str(snap / "memory")})
        fresh.put_machine_config(1, 128)
        with pytest.raises(BangerError, match="not allowed after configuring boot-specific resources"):
            fresh.load_snapshot(str(snap / "vmstate"), str(snap / "memory"), {})
    finally:
        p.kill()
        p.wait()
