"""A build's scratch tree is removed without reaching through mounts left inside it
(what a chroot builder killed mid-way leaves: /proc, /sys, /dev binds)."""

from __future__ import annotations

import subprocess

import pytest

from banger_debian.common import ArtifactBuildError, mounts_under, remove_tree


def test_remove_tree_unmounts_before_deleting(tmp_path):
    precious = tmp_path / "host-dir"
    precious.mkdir()
    (precious / "keep").write_text("host data")
    scratch = tmp_path / "scratch"
    (scratch / "tree/dev").mkdir(parents=True)
    (scratch / "tree/proc").mkdir()
    (scratch / "tree/etc").mkdir()
    (scratch / "tree/etc/hostname").write_text("x")
    subprocess.run(["mount", "--bind", str(precious), str(scratch / "tree/dev")], check=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(scratch / "tree/proc")], check=True)
    try:
        assert set(mounts_under(scratch)) == {scratch / "tree/dev", scratch / "tree/proc"}
        remove_tree(scratch)
        assert not scratch.exists()
        assert (precious / "keep").read_text() == "host data"  # not deleted through the bind mount
        assert mounts_under(tmp_path) == []
    finally:
        for p in mounts_under(tmp_path):
            subprocess.run(["umount", "-l", str(p)], check=False)


def test_remove_tree_refuses_when_a_mount_will_not_go(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    (scratch / "m").mkdir(parents=True)
    (scratch / "file").write_text("x")
    stuck = [scratch / "m"]
    monkeypatch.setattr("banger_debian.common.mounts_under", lambda _p: stuck)
    with pytest.raises(ArtifactBuildError, match=r"cannot unmount .*/scratch/m: .*/scratch left in place"):
        remove_tree(scratch)
    assert (scratch / "file").exists()


def test_mount_points_with_spaces_and_non_ascii_names_are_decoded(tmp_path):
    odd = tmp_path / "with space, tab\tand ü"
    odd.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(odd)], check=True)
    try:
        assert mounts_under(tmp_path) == [odd]
    finally:
        subprocess.run(["umount", str(odd)], check=True)
