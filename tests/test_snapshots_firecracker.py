"""Firecracker snapshots through the daemon and the CLI, against the spec-checked fake
`firecracker` (tests/firecracker_fake.py) running the real guest agent off the agent
disk: `vm snapshot`, `vm restore` (twice, each restored VM on its own disk and with its
own identity from the agent's `resume` op), `snapshot list|show|delete`, `vm stop
--suspend` then `vm start` (a snapshot load, not a boot), and bad input refused with
nothing left behind.

One source VM for the module; the tests run in file order, each building on the last.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from banger_guest.identity import RECORD
from conftest import BangerEnv, fake_firecracker_env, isolated_env, pid_alive
from test_agent_vsock import agent_image

HOST_FILES = ("/etc/machine-id", "/etc/hostname")
ARGS = ["--driver", "firecracker", "--vcpu", "1", "--memory", "128", "--root-size", "32M"]


def host_bytes() -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for f in HOST_FILES:
        try:
            out[f] = Path(f).read_bytes()
        except OSError:
            out[f] = None
    return out


@dataclass
class FC:
    env: BangerEnv
    record: Path  # the fake's request record (every fake firecracker the daemon starts)
    src: dict[str, Any]  # `vm show src --json` after its create

    def requests(self) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in self.record.read_text().splitlines()]

    def run(self, *args: str, check: bool = False):
        return self.env.run(*args, check=check)

    def show(self, name: str) -> dict[str, Any]:
        return json.loads(self.run("vm", "show", name, "--json", check=True).stdout)

    def snapshots(self) -> list[dict[str, Any]]:
        return json.loads(self.run("snapshot", "list", "--json", check=True).stdout)

    @property
    def snapshots_dir(self) -> Path:
        return self.env.state_dir / "snapshots"

    @property
    def links(self) -> Path:
        return self.env.runtime_dir / "fc"


@pytest.fixture(scope="module")
def fc(tmp_path_factory, example_plugin_dir) -> Iterator[FC]:
    before = host_bytes()
    tmp = tmp_path_factory.mktemp("fcsnap")
    with isolated_env() as env:
        record = tmp / "requests.jsonl"
        env.extra_env["FC_FAKE_RECORD"] = str(record)  # before the daemon starts: its firecrackers inherit it
        env.extra_path.append(str(example_plugin_dir))  # its vm_resumed records what every plugin is told
        fake_firecracker_env(env, tmp)
        env.config_file.write_text(env.config_file.read_text() + f"[example]\nrecord = '{tmp / 'hooks.jsonl'}'\n")
        agent_image(env, tmp)
        r = env.run("vm", "create", "--name", "src", "--image", "fcagent", *ARGS, check=True)
        assert "src running" in r.stdout and "no agent" not in r.stderr, r.stderr
        src = json.loads(env.run("vm", "show", "src", "--json", check=True).stdout)
        yield FC(env, record, src)
        for name in ("r1", "r2", "src"):  # whatever a failed test left
            env.run("vm", "delete", name, "--force")
    # the fake guests' `resume` applied under their own roots, never to this host
    assert host_bytes() == before


def opened(vm: dict[str, Any]) -> dict[str, Any]:
    """What the VM's fake firecracker opened (drives with symlinks resolved, vsock, TAPs)."""
    return json.loads((Path(vm["dir"]) / "fake-opened.json").read_text())


def identity_root(vm: dict[str, Any]) -> Path:
    return Path(vm["dir"]) / "fake-guest" / "root"


def identity_calls(vm: dict[str, Any]) -> list[dict[str, Any]]:
    f = identity_root(vm) / RECORD
    return [json.loads(ln) for ln in f.read_text().splitlines()] if f.exists() else []


def root_disk(vm: dict[str, Any]) -> str:
    return next(d["path"] for d in vm["machine"]["drives"] if d["root"])


def test_snapshot_then_two_restores_each_on_its_own_disk(fc):
    src = fc.src
    r = fc.run("vm", "snapshot", "src", "--name", "s1", check=True)
    assert "s1: snapshot of src" in r.stdout and "src is running" in r.stdout, r.stdout
    snaps = fc.snapshots()
    assert [(s["name"], s["vm_name"], s["driver"], s["vms"]) for s in snaps] == [("s1", "src", "firecracker", [])]
    snap_dir = Path(snaps[0]["dir"])
    assert {"vmstate", "memory", "firecracker.json", "machine.json"} <= {p.name for p in snap_dir.iterdir()}
    assert fc.show("src")["state"] == "running"

    for name in ("r1", "r2"):
        r = fc.run("vm", "restore", "s1", "--name", name, check=True)
        assert f"{name} running" in r.stdout and "restored from s1" in r.stdout, (r.stdout, r.stderr)
    r1, r2, src_now = fc.show("r1"), fc.show("r2"), fc.show("src")
    assert r1["state"] == r2["state"] == src_now["state"] == "running"
    assert pid_alive(r1["pid"]) and pid_alive(r2["pid"]) and len({r1["pid"], r2["pid"], src["pid"]}) == 3
    ex = fc.run("vm", "exec", "r1", "--", "true")
    assert ex.returncode == 0, ex.stderr
    ex = fc.run("vm", "exec", "r2", "--", "sh", "-c", "echo hi from r2")
    assert (ex.returncode, ex.stdout) == (0, "hi from r2\n"), ex.stderr

    # each VM's firecracker opened its OWN root disk: a file in its own dir
    disks = {}
    for vm in (src_now, r1, r2):
        got = opened(vm)
        disks[vm["name"]] = got["drives"]["root"]
        assert Path(got["drives"]["root"]).parent == Path(vm["dir"]), (vm["name"], got)
        assert got["drives"]["root"] == os.path.realpath(root_disk(vm))
        assert got["vsock"] == str(Path(vm["dir"]) / "agent.vsock")
        assert got["drives"]["agent"] == opened(src_now)["drives"]["agent"]  # the one shared read-only agent disk
    assert len(set(disks.values())) == 3, disks
    for vm in (r1, r2):
        assert opened(vm)["restored_from"] == os.path.realpath(snap_dir / "vmstate")
    assert opened(src_now)["restored_from"] is None
    # the source's link (whose id the restored VMs inherit) points back at the source
    assert os.readlink(fc.links / src["id"]) == src["dir"]
    for vm in (r1, r2):
        assert json.loads((Path(vm["dir"]) / "firecracker-link").read_text())["link_id"] == src["id"]
    assert sorted(s for s in fc.snapshots()[0]["vms"]) == ["r1", "r2"]

    reqs = fc.requests()
    assert [r for r in reqs if r["result"] != "ok"] == []  # every request passed the spec and the fake's rules
    loads = [r for r in reqs if r["op"] == "loadSnapshot"]
    assert len(loads) == 2 and all(ld["body"]["snapshot_path"] == str(snap_dir / "vmstate") for ld in loads), loads
    assert all(ld["body"]["resume_vm"] is True for ld in loads)
    assert len([r for r in reqs if r["op"] == "createSnapshot"]) == 1
    starts = [r for r in reqs if r["op"] == "createSyncAction" and r["body"]["action_type"] == "InstanceStart"]
    assert len(starts) == 1  # the source's boot only: the restores did not boot


def test_the_resume_op_gave_each_restored_vm_its_own_identity(fc):
    r1, r2 = fc.show("r1"), fc.show("r2")
    ids = {}
    for vm in (r1, r2):
        root = identity_root(vm)
        mid = root / "etc" / "machine-id"
        assert mid.is_file(), sorted(str(p) for p in root.rglob("*"))
        ids[vm["name"]] = mid.read_text().strip()
        assert len(ids[vm["name"]]) == 32 and int(ids[vm["name"]], 16)
        calls = identity_calls(vm)
        assert [c["arg"] for c in calls if c["call"] == "set_hostname"] == [vm["name"]], calls
        assert [c["call"] for c in calls][:2] == ["set_clock", "feed_rng"], calls
        assert f"127.0.1.1\t{vm['name']}" in (root / "etc" / "hosts").read_text().splitlines()
    assert ids["r1"] != ids["r2"]
    # different RNG seeds too
    seeds = [next(c["arg"] for c in identity_calls(vm) if c["call"] == "feed_rng") for vm in (r1, r2)]
    assert seeds[0] != seeds[1]
    # the source booted: it got no resume op
    assert identity_calls(fc.show("src")) == [] and not (identity_root(fc.show("src")) / "etc" / "machine-id").exists()
    log = (fc.env.state_dir / "bangerd.log").read_text()
    assert "VM r1 resumed from s1" in log and "VM r2 resumed from s1" in log


def hooks(fc: FC) -> list[dict[str, Any]]:
    """What the example plugin's hooks were told, in order."""
    f = fc.record.parent / "hooks.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines()] if f.exists() else []


def test_every_plugin_is_told_the_vm_resumed_in_order_with_what_the_core_knew(fc):
    seen = hooks(fc)
    resumed = [e for e in seen if e["hook"] == "vm_resumed"]
    assert [e["vm"] for e in resumed] == ["r1", "r2"]  # the source booted: not told
    assert all(
        e["snapshot"] == "s1" and e["kind"] == "restore" and e["source_vm"] == "src" and e["new_identity"] for e in resumed
    ), resumed
    assert {e["source_vm_id"] for e in resumed} == {fc.src["id"]}
    for vm in ("r1", "r2"):
        order = [e["hook"] for e in seen if e.get("vm") == vm]
        assert (
            order.index("prepare_host") < order.index("configure_machine") < order.index("vm_resumed") < order.index("post_boot")
        )


def test_a_fork_is_n_restores_of_one_snapshot_that_goes_with_the_last_fork(fc):
    """`vm fork` on Firecracker: one createSnapshot, then a loadSnapshot per fork, all of
    one memory file (Firecracker maps it privately: the forks share its pages); each
    fork on its own disk with its own identity; the source runs on."""
    before = len(fc.requests())
    r = fc.run("vm", "fork", "src", "--count", "2", "--name", "k", "--json", check=True)
    forks = [v["name"] for v in json.loads(r.stdout)["vms"]]
    assert forks == ["k-1", "k-2"]
    (snap,) = [s for s in fc.snapshots() if s["kind"] == "fork"]
    assert snap["vm_name"] == "src" and sorted(snap["vms"]) == forks
    reqs = fc.requests()[before:]
    assert [r for r in reqs if r["result"] != "ok"] == []
    assert len([r for r in reqs if r["op"] == "createSnapshot"]) == 1
    loads = [r for r in reqs if r["op"] == "loadSnapshot"]
    assert len(loads) == 2
    assert {ld["body"]["mem_backend"]["backend_path"] for ld in loads} == {str(Path(snap["dir"]) / "memory")}
    shown = [fc.show(f) for f in forks]
    assert len({root_disk(v) for v in shown}) == 2 and all(Path(root_disk(v)).parent == Path(v["dir"]) for v in shown)
    ids = {(identity_root(fc.show(f)) / "etc" / "machine-id").read_text() for f in forks}
    assert len(ids) == 2
    told = [e for e in hooks(fc) if e["hook"] == "vm_resumed" and e["vm"] in forks]
    assert sorted(e["vm"] for e in told) == forks
    assert all(e["kind"] == "fork" and e["source_vm_id"] == fc.src["id"] and e["new_identity"] for e in told), told
    assert fc.show("src")["state"] == "running" and fc.run("vm", "exec", "k-2", "--", "true").returncode == 0
    fc.run("vm", "delete", "k-1", check=False)  # running: refused without --force
    fc.run("vm", "delete", "k-1", "--force", check=True)
    assert [s["kind"] for s in fc.snapshots()].count("fork") == 1  # k-2 still stands on it
    fc.run("vm", "delete", "k-2", "--force", check=True)
    assert [s["name"] for s in fc.snapshots()] == ["s1"] and not Path(snap["dir"]).exists()
    # a stopped VM is not forked: refused by name, nothing made
    fc.run("vm", "create", "--name", "cold", "--image", "fcagent", *ARGS, check=True)
    fc.run("vm", "stop", "cold", "--force", check=True)
    r = fc.run("vm", "fork", "cold", "--count", "2")
    assert r.returncode != 0 and "VM cold is stopped: only a running or paused VM is forked" in r.stderr, r.stderr
    assert [s["name"] for s in fc.snapshots()] == ["s1"]
    assert "cold-1" not in fc.run("vm", "list", check=True).stdout
    fc.run("vm", "delete", "cold", check=True)


BAD_INPUT = [
    (["vm", "snapshot", "nope", "--name", "s2"], "no VM named or with ID prefix 'nope'"),
    # the snapshot's name, not a VM's, is what is wrong: the error says so
    (["vm", "snapshot", "src", "--name", "Bad Name"], "invalid snapshot name 'Bad Name'"),
    (["vm", "snapshot", "src", "--name", "s1"], "a snapshot named 's1' already exists"),
    (["vm", "restore", "nope", "--name", "r3"], "no snapshot named or with ID prefix 'nope'"),
    (["vm", "stop", "--suspend", "--force", "src"], "--suspend and --force exclude each other"),
]


@pytest.mark.parametrize("argv, error", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_refused_and_leaves_nothing(fc, argv, error):
    snaps, dirs = fc.snapshots(), {p.name for p in fc.snapshots_dir.iterdir()}
    vms = sorted(v["name"] for v in json.loads(fc.run("vm", "list", "--json", check=True).stdout))
    r = fc.run(*argv)
    assert r.returncode != 0 and error in r.stderr, (r.stdout, r.stderr)
    assert fc.snapshots() == snaps
    assert {p.name for p in fc.snapshots_dir.iterdir()} == dirs  # no snapshot dir, not even a staging one
    assert sorted(v["name"] for v in json.loads(fc.run("vm", "list", "--json", check=True).stdout)) == vms
    src = fc.show("src")
    assert src["state"] == "running" and not (Path(src["dir"]) / "suspend").exists()
    assert not [p for p in Path(src["dir"]).iterdir() if p.name.startswith(".")]
    assert fc.run("vm", "exec", "src", "--", "true").returncode == 0  # left running, not paused


def test_the_default_name_of_a_long_named_vms_snapshot_is_a_valid_name(fc):
    """Without --name a snapshot is named <vm>-YYYYmmdd-HHMMSS: for a VM named near the
    63-character limit that must still be a valid name (not a pydantic error's URL)."""
    long = "long-" + "x" * 55  # 60 characters: a valid VM name
    fc.run("vm", "restore", "s1", "--name", long, check=True)
    try:
        r = fc.run("vm", "snapshot", long)
        assert "errors.pydantic.dev" not in r.stderr, r.stderr
        assert r.returncode == 0, (r.stdout, r.stderr)
        made = [s for s in fc.snapshots() if s["vm_name"] == long]
        assert len(made) == 1 and len(made[0]["name"]) <= 63 and made[0]["name"].startswith("long-xxx"), made
        fc.run("snapshot", "delete", made[0]["name"], check=True)
    finally:
        fc.run("vm", "delete", long, "--force")
        for s in fc.snapshots():
            if s["vm_name"] == long:
                fc.run("snapshot", "delete", s["name"])
    assert [s["name"] for s in fc.snapshots()] == ["s1"]


def test_suspend_then_start_loads_the_suspend_image(fc):
    src = fc.show("src")
    r = fc.run("vm", "stop", "--suspend", "src")
    assert r.returncode == 0, (r.stdout, r.stderr)
    rows = {v["name"]: v for v in json.loads(fc.run("vm", "list", "--json", check=True).stdout)}
    assert rows["src"]["state"] == "suspended" and rows["src"]["pid"] is None
    assert not pid_alive(src["pid"])
    suspend = Path(src["dir"]) / "suspend"
    assert {"vmstate", "memory", "firecracker.json", "machine.json"} <= {p.name for p in suspend.iterdir()}
    assert fc.show("r1")["state"] == fc.show("r2")["state"] == "running"  # the restored VMs are not the source

    n = len(fc.requests())
    r = fc.run("vm", "start", "src")
    assert r.returncode == 0, (r.stdout, r.stderr)
    now = fc.show("src")
    assert now["state"] == "running" and pid_alive(now["pid"]) and now["pid"] != src["pid"]
    assert fc.run("vm", "exec", "src", "--", "true").returncode == 0
    assert not suspend.exists()  # consumed

    start_reqs = fc.requests()[n:]
    assert [r for r in start_reqs if r["result"] != "ok"] == []
    ops = [r["op"] for r in start_reqs]
    loads = [r for r in start_reqs if r["op"] == "loadSnapshot"]
    assert len(loads) == 1 and loads[0]["body"]["snapshot_path"] == str(suspend / "vmstate"), start_reqs
    assert "putGuestBootSource" not in ops and "putGuestDriveByID" not in ops, ops
    assert not [r for r in start_reqs if r["op"] == "createSyncAction" and r["body"]["action_type"] == "InstanceStart"]
    got = opened(now)
    assert got["restored_from"] == os.path.realpath(suspend / "vmstate")
    assert got["drives"]["root"] == os.path.realpath(root_disk(now)) and Path(got["drives"]["root"]).parent == Path(now["dir"])
    # the same VM continues: clock and RNG, no new identity
    calls = [c["call"] for c in identity_calls(now)]
    assert calls[:2] == ["set_clock", "feed_rng"] and "set_hostname" not in calls, calls
    assert not (identity_root(now) / "etc" / "machine-id").exists()
    told = [e for e in hooks(fc) if e["hook"] == "vm_resumed" and e["vm"] == "src"]
    assert told == [
        {
            "hook": "vm_resumed",
            "vm": "src",
            "snapshot": "",
            "kind": "suspend",
            "source_vm": "src",
            "source_vm_id": fc.src["id"],
            "new_identity": False,
        }
    ]


def test_a_suspended_vm_survives_prune_stop_discards_it_and_restart_boots(fc):
    assert fc.run("vm", "stop", "--suspend", "src").returncode == 0
    suspend = Path(fc.show("src")["dir"]) / "suspend"
    r = fc.run("vm", "prune", "--force")
    assert r.returncode == 0 and fc.show("src")["state"] == "suspended" and suspend.is_dir(), r.stdout
    r = fc.run("vm", "stop", "src")  # nothing runs: stopping drops what it would resume
    assert r.returncode == 0 and fc.show("src")["state"] == "stopped" and not suspend.exists(), (r.stdout, r.stderr)
    assert fc.run("vm", "start", "src").returncode == 0
    assert fc.run("vm", "stop", "--suspend", "src").returncode == 0
    n = len(fc.requests())
    assert fc.run("vm", "restart", "src").returncode == 0  # a restart is a new boot, not a resume
    ops = [r["op"] for r in fc.requests()[n:]]
    assert "loadSnapshot" not in ops and "putGuestBootSource" in ops, ops
    assert fc.show("src")["state"] == "running" and not suspend.exists()
    assert "from:" in fc.run("vm", "show", "r1", check=True).stdout  # where it came from: the snapshot
    assert "snapshot s1" in fc.run("vm", "show", "r1", check=True).stdout


def test_delete_is_refused_while_vms_stand_on_it_then_everything_goes(fc):
    snap = json.loads(fc.run("snapshot", "show", "s1", "--json", check=True).stdout)
    snap_dir = Path(snap["dir"])
    r = fc.run("snapshot", "delete", "s1")
    assert r.returncode != 0 and "VMs stand on it" in r.stderr and "r1" in r.stderr and "r2" in r.stderr, r.stderr
    assert snap_dir.is_dir() and [s["name"] for s in fc.snapshots()] == ["s1"]

    vm_dirs = [Path(fc.show(n)["dir"]) for n in ("r1", "r2", "src")]
    fc.run("vm", "delete", "r1", "r2", "--force", check=True)
    r = fc.run("snapshot", "delete", "s1")
    assert r.returncode == 0 and "s1: deleted" in r.stdout, (r.stdout, r.stderr)
    assert not snap_dir.exists() and fc.snapshots() == []

    fc.run("vm", "delete", "src", "--force", check=True)
    assert not any(d.exists() for d in vm_dirs)
    assert [p for p in fc.snapshots_dir.rglob("*")] == []
    # no link is left (only lock files, which the next launch's sweep removes)
    left = list(fc.links.iterdir()) if fc.links.exists() else []
    assert [p for p in left if p.is_symlink() or not (p.is_file() and p.suffix == ".lock")] == [], left
    reqs = fc.requests()
    assert reqs and [r for r in reqs if r["result"] != "ok"] == []
