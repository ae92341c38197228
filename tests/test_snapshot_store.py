"""Snapshots without a VMM: their rows, the templates kept (LRU cap, stale ones, never
one a VM stands on), what a restore must match, the daemon's sweep of leftovers, and
an image under snapshots."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

import pytest

from banger_core.errors import BangerError
from banger_core.images import refuse_if_snapshotted
from banger_core.models import Image, Snapshot, SnapshotKind, VMSpec, utcnow
from banger_core.paths import Paths
from banger_core.store import Store
from banger_core.testing import sample_vm
from banger_core.vm.snapshots import SnapshotService, compat_diff


@pytest.fixture
def snaps(tmp_path):
    paths = Paths(tmp_path / "c", tmp_path / "s", tmp_path / "k", tmp_path / "r")
    store = Store(paths.db_file)
    store.upsert_image(Image(name="img", rootfs=str(tmp_path / "rootfs.ext4")))
    vms = SimpleNamespace(store=store, paths=paths, cfg=SimpleNamespace(snapshots=SimpleNamespace(templates_max=2)))
    yield SnapshotService(vms)
    store.close()


def add(
    svc: SnapshotService, name: str, kind=SnapshotKind.TEMPLATE, image="img", used_minutes_ago=0, base: str | None = None
) -> Snapshot:
    snap = Snapshot(
        id=name.replace("-", "")[:16].ljust(16, "0"),
        name=name,
        kind=kind,
        vm_id="0" * 16,
        vm_name="src",
        image=image,
        spec=VMSpec(vcpus=1, memory_mib=256, root_size_mib=1024),
        driver="qemu",
        disk_strategy="qcow2",
        key=name if kind is SnapshotKind.TEMPLATE else None,
        last_used_at=utcnow() - timedelta(minutes=used_minutes_ago),
        base_snapshot=base,
    )
    svc.store.insert_snapshot(snap)
    d = svc.paths.snapshot_dir(snap.id)
    d.mkdir(parents=True)
    (d / "root.qcow2").write_bytes(b"layer")
    return snap


def names(svc: SnapshotService, kind: str | None = None) -> list[str]:
    return [s.name for s in svc.store.list_snapshots(kind)]


def test_templates_beyond_the_cap_go_least_recently_used_first_never_one_in_use(snaps):
    old = add(snaps, "t-old", used_minutes_ago=30)
    mid = add(snaps, "t-mid", used_minutes_ago=20)
    add(snaps, "t-new", used_minutes_ago=1)
    user = add(snaps, "mine", kind=SnapshotKind.USER, used_minutes_ago=60)
    vm = sample_vm("onit")
    vm.base_snapshot = old.id
    snaps.store.insert_vm(vm)
    assert snaps.evict() == ["t-mid"]  # t-old is stood on; user snapshots are never evicted
    assert sorted(names(snaps)) == ["mine", "t-new", "t-old"]
    assert not snaps.paths.snapshot_dir(mid.id).exists()
    assert snaps.evict() == []  # two templates: at the cap
    snaps.store.delete_vm(vm.id)
    snaps.vms.cfg.snapshots.templates_max = 1
    assert snaps.evict() == ["t-old"] and sorted(names(snaps)) == ["mine", "t-new"]
    assert snaps.paths.snapshot_dir(user.id).is_dir()


def test_a_template_whose_image_is_gone_is_stale_and_goes(snaps):
    add(snaps, "t-gone", image="deleted-image")
    add(snaps, "t-ok")
    assert snaps.evict() == ["t-gone"] and names(snaps) == ["t-ok"]


def test_a_snapshot_a_vm_stands_on_is_not_deleted_and_the_vms_are_named(snaps):
    s = add(snaps, "s1", kind=SnapshotKind.USER)
    for n in ("a", "b"):
        vm = sample_vm(n)
        vm.base_snapshot = s.id
        snaps.store.insert_vm(vm)
    with pytest.raises(BangerError, match=r"snapshot s1: VMs stand on it \(a, b\)"):
        snaps.delete(s)
    assert names(snaps) == ["s1"] and snaps.paths.snapshot_dir(s.id).is_dir()


def test_an_image_under_snapshots_its_unused_templates_go_its_snapshots_must(snaps):
    add(snaps, "t1")
    s = add(snaps, "s1", kind=SnapshotKind.USER)
    with pytest.raises(BangerError, match=r"image 'img' is under snapshot\(s\) s1: delete them before deleting it"):
        refuse_if_snapshotted(snaps.store, snaps.paths, "img", "deleting it")
    assert names(snaps) == ["s1"]  # the template went: it would restore onto other bytes
    snaps.delete(s)
    refuse_if_snapshotted(snaps.store, snaps.paths, "img", "deleting it")  # nothing left: no error


def test_the_sweep_removes_snapshot_dirs_without_a_row(snaps):
    kept = add(snaps, "kept", kind=SnapshotKind.USER)
    orphan = snaps.paths.snapshot_dir("feedfacefeedface")
    orphan.mkdir(parents=True)
    assert snaps.sweep() == ["feedfacefeedface"]
    assert not orphan.exists() and snaps.paths.snapshot_dir(kept.id).is_dir()
    staging = Paths.staging_dir(snaps.paths.snapshot_dir("0123456789abcdef"))
    assert staging in snaps.paths.transient_leftovers()  # a cut-off write: the daemon's start removes it


def test_compat_says_what_changed():
    then = {"kernel": "k:1:1", "vcpus": 1, "drives": [{"id": "root"}], "vmm": "qemu:1"}
    assert compat_diff(then, dict(then)) is None
    assert compat_diff(then, {**then, "kernel": "k:2:2"}) == "the kernel changed"
    assert compat_diff(then, {**then, "vcpus": 2, "vmm": "qemu:2"}) == "the vCPU count changed; the VMM binary changed"
    assert compat_diff(then, {**then, "drives": [{"id": "root"}, {"id": "agent"}]}) == "the devices changed (disks, or the agent)"
    assert compat_diff({}, then) is not None  # an image with no record of what it needs is never trusted


def test_a_snapshot_of_a_restored_vm_keeps_the_one_it_stands_on(snaps):
    """The restored VM's disk was an overlay of s1's layer, so s2's layer (a copy of
    that overlay) is too: s1 stays while s2 does, templates included."""
    s1 = add(snaps, "s1", kind=SnapshotKind.USER)
    t1 = add(snaps, "t1", used_minutes_ago=50)
    add(snaps, "s2", kind=SnapshotKind.USER, base=s1.id)
    add(snaps, "s3", kind=SnapshotKind.USER, base=t1.id)
    with pytest.raises(BangerError, match=r"snapshot s1: snapshots of VMs restored from it stand on it \(s2\)"):
        snaps.delete(s1)
    assert snaps.show(s1)["snapshots"] == ["s2"]
    snaps.vms.cfg.snapshots.templates_max = 0
    assert snaps.evict() == [] and snaps.remove_templates(None) == ([], ["t1"])  # s3 stands on t1
    assert "t1" in names(snaps)
    snaps.delete(snaps.store.find_snapshot("s2"))
    snaps.delete(s1)
    assert sorted(names(snaps)) == ["s3", "t1"]
