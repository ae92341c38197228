"""SQLite state: numbered idempotent migrations; handles.json written before the cache."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest

from banger_core import fsutil
from banger_core import store as store_mod
from banger_core.errors import BangerError, ErrorCode

from banger_core.vm.handles import HandleStore
from banger_core.models import VM, Image, Kernel, VMHandles, VMSpec, VMState
from banger_core.paths import Paths
from banger_core.store import Store
from banger_core.testing import sample_vm

ALL = [number for number, _name, _fn in store_mod.MIGRATIONS]  # every migration, in order


@pytest.fixture
def paths(tmp_path):
    return Paths(tmp_path / "c", tmp_path / "s", tmp_path / "k", tmp_path / "r")


def test_migrations_recorded_and_idempotent(paths):
    s = Store(paths.db_file)
    assert s.applied_migrations() == [n for n, _, _ in store_mod.MIGRATIONS]
    assert s.migrate() == []
    s.close()
    s2 = Store(paths.db_file)  # reopening applies nothing again
    assert s2.migrate() == []
    rows = list(s2.db["migrations"].rows)
    assert [r["number"] for r in rows] == ALL and rows[0]["name"].startswith("initial")
    assert {"vms", "images", "kernels"} <= set(s2.tables())


def test_a_failing_migration_rolls_back_and_is_not_recorded(paths, monkeypatch):
    s = Store(paths.db_file)

    def boom(db):
        db["half_done"].create({"x": int})
        raise RuntimeError("migration 2 failed")

    n = len(store_mod.MIGRATIONS) + 1
    monkeypatch.setattr(store_mod, "MIGRATIONS", [*store_mod.MIGRATIONS, (n, "broken", boom)])
    with pytest.raises(RuntimeError):
        s.migrate()
    assert s.applied_migrations() == list(range(1, n))
    assert "half_done" not in set(s.tables())


def test_upgrade_from_schema_1_keeps_rows(paths, monkeypatch):
    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:1])
    old = Store(paths.db_file)
    old.db["vms"].insert(
        {
            "id": "abc",
            "name": "keep",
            "state": "stopped",
            "spec": '{"vcpus":1,"memory_mib":1,"disk_size_mib":3}',
            "teardown": "{}",
        }
    )
    old.db["kernels"].insert(
        {"name": "k1", "kernel": "/k/vmlinuz", "initrd": "/k/initrd.img", "created_at": "2026-11-01T00:00:00+00:00"}
    )
    old.close()
    monkeypatch.undo()
    new = Store(paths.db_file)
    assert new.applied_migrations() == ALL
    vm = new.get_vm("abc")
    assert vm.name == "keep" and vm.disk_strategy is None and vm.last_error is None
    assert vm.spec.root_size_mib == 3  # migration 9: disk_size_mib sized the root disk
    assert vm.options == {}  # migration 5: no per-VM plugin options yet
    assert vm.ephemeral is False  # migration 7: nothing made by a vm run --rm yet
    vm.options = {"example": {"motto": "kept"}}
    new.update_vm(vm)
    assert new.get_vm("abc").options == {"example": {"motto": "kept"}}
    k = new.get_kernel("k1")  # kernels gained vmlinux and source in migration 4
    # migration 6: a kernel from before sources were recorded counts as pulled under its name
    assert (k.kernel, k.initrd, k.vmlinux, k.source) == ("/k/vmlinuz", "/k/initrd.img", None, "k1#")


def test_root_size_renamed_in_vms_and_snapshots(paths, monkeypatch):
    """Migration 9: ``disk_size_mib`` (the root disk's size before 0.7) reads as
    ``root_size_mib`` in a VM's spec and in a snapshot's; other keys untouched."""
    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:8])
    old = Store(paths.db_file)
    old.db["vms"].insert({"id": "v", "name": "n", "state": "stopped", "spec": '{"vcpus":2,"memory_mib":5,"disk_size_mib":7}'})
    old.db["snapshots"].insert({"id": "s", "name": "s", "kind": "manual", "data": '{"x":1,"spec":{"vcpus":2,"disk_size_mib":9}}'})
    old.close()
    monkeypatch.undo()
    new = Store(paths.db_file)
    assert json.loads(next(new.db.query("SELECT spec FROM vms"))["spec"]) == {"vcpus": 2, "memory_mib": 5, "root_size_mib": 7}
    assert json.loads(next(new.db.query("SELECT data FROM snapshots"))["data"]) == {
        "x": 1,
        "spec": {"vcpus": 2, "root_size_mib": 9},
    }


def test_pull_records_from_before_sources_become_ref_and_revision(paths, monkeypatch):
    """Migration 6: the catalog's and OCI's records from before 0.3 read as REF#REVISION
    with the revision unchanged (so staleness is); what no pull made keeps its record."""
    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:5])
    old = Store(paths.db_file)
    digest = "sha256:" + "a" * 64
    for name, managed, source in [
        ("debian-bookworm", 1, "recipe:debian-bookworm/4;modules:6.1.0-28-cloud-amd64"),
        ("bb", 1, "bundle:" + "b" * 64),
        ("alpine-3", 1, f"127.0.0.1:5000/alpine:3@{digest}"),
        ("mine", 0, "/home/me/rootfs.ext4"),
    ]:
        old.db["images"].insert({"name": name, "rootfs": "/r", "managed": managed, "source": source})
    for name, source in [("debian-cloud", "recipe:debian-cloud-kernel/3"), ("own", "import:/home/me/k")]:
        old.db["kernels"].insert({"name": name, "kernel": "/k/vmlinuz", "source": source})
    old.close()
    monkeypatch.undo()
    new = Store(paths.db_file)
    images = {i.name: i.source for i in new.list_images()}
    assert images == {
        "debian-bookworm": "debian-bookworm#recipe:debian-bookworm/4;modules:6.1.0-28-cloud-amd64",
        "bb": "bb#bundle:" + "b" * 64,
        "alpine-3": f"127.0.0.1:5000/alpine:3#{digest}",
        "mine": "/home/me/rootfs.ext4",
    }
    kernels = {k.name: k.source for k in new.list_kernels()}
    assert kernels == {"debian-cloud": "debian-cloud#recipe:debian-cloud-kernel/3", "own": "import:/home/me/k"}


def test_vm_round_trip_and_unique_name(paths):
    s = Store(paths.db_file)
    vm = sample_vm("alpha", teardown={"nat": {"rule": "x"}})
    s.insert_vm(vm)
    got = s.get_vm(vm.id)
    assert got.name == "alpha" and got.spec == vm.spec and got.teardown == {"nat": {"rule": "x"}}
    with pytest.raises(BangerError) as ei:
        s.insert_vm(sample_vm("alpha"))
    assert ei.value.code is ErrorCode.ALREADY_EXISTS
    got.state = VMState.RUNNING
    s.update_vm(got)
    assert s.get_vm(vm.id).state is VMState.RUNNING
    s.delete_vm(vm.id)
    with pytest.raises(BangerError) as ei:
        s.get_vm(vm.id)
    assert ei.value.code is ErrorCode.NOT_FOUND
    assert s.list_vms() == []


def test_images_and_kernels(paths):
    s = Store(paths.db_file)
    s.upsert_kernel(Kernel(name="k1", kernel="/k/vmlinuz", initrd="/k/initrd"))
    s.upsert_image(Image(name="debian", rootfs="/i/rootfs.ext4", kernel_ref="k1"))
    assert [k.name for k in s.list_kernels()] == ["k1"]
    assert s.list_images()[0].kernel_ref == "k1"


@pytest.mark.parametrize("name", ["", "-a", "a-", "A", "a_b", "a" * 64, "a.b"])
def test_vm_names_are_dns_labels(name):
    with pytest.raises(ValueError, match="invalid VM name"):
        VM(id="x", name=name, spec=VMSpec(vcpus=1, memory_mib=1, root_size_mib=1))


@pytest.mark.parametrize("field", ["vcpus", "memory_mib", "root_size_mib"])
@pytest.mark.parametrize("value", [0, -1])
def test_specs_must_be_positive(field, value):
    spec = {"vcpus": 1, "memory_mib": 1, "root_size_mib": 1, field: value}
    with pytest.raises(ValueError, match="greater than 0"):
        VMSpec(**spec)


def test_handles_file_written_before_cache(paths, monkeypatch):
    hs = HandleStore(paths)
    h = VMHandles(vm_id="abc", pid=123, devices={"tap": "tap0"})
    hs.set(h)
    assert json.loads(paths.vm_handles("abc").read_text())["pid"] == 123
    assert os.stat(paths.vm_handles("abc")).st_mode & 0o777 == 0o600

    # A failure writing the file leaves the cache untouched (disk never behind memory).
    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsutil.os, "replace", fail)
    with pytest.raises(OSError):
        hs.set(VMHandles(vm_id="abc", pid=456))
    assert hs.get("abc").pid == 123
    assert json.loads(paths.vm_handles("abc").read_text())["pid"] == 123
    assert [p.name for p in paths.vm_dir("abc").iterdir()] == ["handles.json"]  # no temp file left


def test_handles_reload_skips_corrupt_files(paths):
    hs = HandleStore(paths)
    hs.set(VMHandles(vm_id="good", pid=1))
    paths.vm_dir("bad").mkdir(parents=True)
    paths.vm_handles("bad").write_text("{not json")
    fresh = HandleStore(paths)
    assert set(fresh.load_all()) == {"good"}
    assert fresh.read_file("bad") is None and fresh.read_file("missing") is None
    fresh.drop("good")
    fresh.drop("good")  # idempotent
    assert fresh.get("good") is None and not paths.vm_handles("good").exists()


def test_db_is_real_sqlite_on_disk(paths):
    s = Store(paths.db_file)
    s.insert_vm(sample_vm("beta"))
    s.close()
    conn = sqlite3.connect(paths.db_file)
    assert conn.execute("select name from vms").fetchall() == [("beta",)]
