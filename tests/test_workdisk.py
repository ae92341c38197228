"""The workdisk plugin: /root on a per-VM ext4 cloned from the image's work-seed.

Unit: a seed holds the image's /root (modes, owners); parallel creates of one image
build one seed and never read a torn one; a changed rootfs gets a new seed and the old
one goes. Through the daemon and CLI on a busybox image pulled from a local registry
(so it carries banger's agent) on the microVM kernel: /root is the work disk, sized by
--disk-size; 2,000 files written without a sync survive a stop whose guest shutdown
hangs, with a 2 s stop timeout; vm set --disk-size grows it; a second VM starts from
the seed, not from the first's disk; a restore continues on its own copy; delete
removes the disk.

Boots: wd (a boot and a start), wd2 (a boot), wd3 (a restore).
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

import guest_assets as ga
from conftest import isolated_env
from oci_fixtures import push_layers
from test_agent_anyimage import busybox_layer
from banger_workdisk import disks as wd

LONG = 1800
ARGS = ["--image", "bb-work", "--vcpu", "1", "--memory", "256M"]


def root_layer() -> bytes:
    """/root of the image: a 0600 file of root's and a 0700 dir owned by 1000:1000."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, mode, uid, data in (("root/seeded.txt", 0o600, 0, b"from the image\n"), ("root/own/x", 0o640, 1000, b"x\n")):
            if name == "root/own/x":
                ti = tarfile.TarInfo("root/own")
                ti.type, ti.mode, ti.uid, ti.gid = tarfile.DIRTYPE, 0o700, 1000, 1000
                tar.addfile(ti)
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.uid, ti.gid = len(data), mode, uid, uid
            tar.addfile(ti, io.BytesIO(data))
    return out.getvalue()


def tree_of(image: Path, path: str = "/") -> dict[str, tuple[int, int, int]]:
    """name -> (mode, uid, gid) of what ``debugfs`` lists in ``path`` of an ext4."""
    out = subprocess.run(["debugfs", "-R", f"ls -p {path}", str(image)], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():  # /ino/mode/uid/gid/name/size/
        parts = line.strip().strip("/").split("/")
        if len(parts) >= 5 and parts[4] not in (".", "..", "lost+found"):
            found[parts[4]] = (int(parts[1], 8), int(parts[2]), int(parts[3]))
    return found


def label_of(image: Path) -> str:
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True).stdout
    return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Filesystem volume name"))


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory) -> Path:
    """An ext4 with a /root like the pulled image's (mkfs -d of a tree made here)."""
    from banger_core.images import ext4_from_tree

    tree = tmp_path_factory.mktemp("tree")
    with tarfile.open(fileobj=io.BytesIO(root_layer())) as tar:
        for m in tar.getmembers():
            dest = tree / m.name
            if m.isdir():
                dest.mkdir(parents=True)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tar.extractfile(m).read())  # type: ignore[union-attr]
            os.chown(dest, m.uid, m.gid)
            os.chmod(dest, m.mode)
    os.chmod(tree / "root", 0o700)
    out = tmp_path_factory.mktemp("img") / "rootfs.ext4"
    ext4_from_tree(tree, out, size_mib=64)
    return out


def test_the_seed_is_the_images_root_with_modes_and_owners(tmp_path, rootfs):
    seed = wd.seed_for(tmp_path, "img", rootfs)
    assert label_of(seed) == wd.LABEL
    top = tree_of(seed)
    assert top["seeded.txt"] == (0o100600, 0, 0) and top["own"] == (0o40700, 1000, 1000)
    assert tree_of(seed, "/own")["x"] == (0o100640, 1000, 1000)
    root = subprocess.run(["debugfs", "-R", "stat /", str(seed)], capture_output=True, text=True, check=True).stdout
    assert "Mode:  0700" in root  # /root's own mode
    disk = tmp_path / "vm" / wd.DISK
    wd.make_disk(tmp_path, "img", rootfs, disk, 96)
    assert disk.stat().st_size == 96 * wd.MIB and tree_of(disk)["seeded.txt"] == (0o100600, 0, 0)
    assert not wd.grow(disk, 96) and wd.grow(disk, 128) and disk.stat().st_size == 128 * wd.MIB
    with pytest.raises(Exception, match="cannot shrink to 64 MiB"):
        wd.grow(disk, 64)
    with pytest.raises(Exception, match="too small"):
        wd.make_disk(tmp_path, "img", rootfs, tmp_path / "tiny.img", 16)
    assert not (tmp_path / "tiny.img").exists() and not list(tmp_path.glob(".tiny*"))  # nothing half made


def test_parallel_creates_build_one_seed_and_a_changed_image_gets_a_new_one(tmp_path, rootfs, monkeypatch):
    builds = []
    real = wd.build_seed

    def counting(src, out):
        builds.append(out)
        time.sleep(0.3)  # a slow build: the others must wait for it, not read it half written
        return real(src, out)

    monkeypatch.setattr(wd, "build_seed", counting)
    outs, errors = [], []

    def create(i: int) -> None:
        try:
            d = tmp_path / f"vm{i}" / wd.DISK
            wd.make_disk(tmp_path, "img", rootfs, d, 64)
            outs.append(tree_of(d)["seeded.txt"])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and outs == [(0o100600, 0, 0)] * 4 and len(builds) == 1
    first = wd.seed_for(tmp_path, "img", rootfs)
    os.utime(rootfs, ns=(time.time_ns(), time.time_ns()))  # the image was re-pulled
    second = wd.seed_for(tmp_path, "img", rootfs)
    assert second != first and second.exists() and not first.exists() and len(builds) == 2
    assert not [p for p in wd.seeds_dir(tmp_path, "img").iterdir() if p.name.endswith(".tmp")]


# --- through the daemon ------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(oci_registry, tmp_path_factory):
    pushed = push_layers(
        oci_registry, "banger/workbusybox", "1", [busybox_layer(), root_layer()], tmp_path_factory.mktemp("wimg")
    )
    with isolated_env() as e:
        e.extra_env["BANGER_CACHE_DIR"] = str(ga.default_cache_dir() / "banger-cache")
        e.write_config("[vmm]\naccel = 'tcg'\nstop_timeout_s = 2\n[workdisk]\nsize_mib = 80\n")
        e.run("kernel", "pull", "microvm-6.1", check=True, timeout=LONG)
        e.run("image", "pull", pushed["ref"], "--name", "bb-work", "--kernel-ref", "microvm-6.1", check=True, timeout=600)
        yield e
        names = [v["name"] for v in json.loads(e.run("vm", "list", "--json").stdout or "[]")]
        if names:
            e.run("vm", "delete", "--force", *names, timeout=120)


def sh(env, vm: str, script: str, timeout: float = 120) -> str:
    r = env.run("vm", "exec", vm, "--", "sh", "-c", script, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def show(env, vm: str) -> dict:
    return json.loads(env.run("vm", "show", vm, "--json", check=True).stdout)


def size_mib(env, vm: str) -> int:
    """The size of /root's filesystem in the guest, in MiB (df's 1M-blocks)."""
    return int(sh(env, vm, "df -m /root | tail -n 1").split()[1])


def test_root_is_the_work_disk_and_survives_a_hung_shutdown(env):
    env.run("vm", "create", "--name", "wd", *ARGS, "--disk-size", "64M", check=True, timeout=600)
    mounts = sh(env, "wd", "grep ' /root ' /proc/mounts")
    assert mounts.startswith("/dev/vd") and " ext4 " in mounts, mounts
    assert sh(env, "wd", "cat /root/seeded.txt; stat -c '%a %u' /root/seeded.txt /root/own") == "from the image\n600 0\n700 1000"
    assert 48 <= size_mib(env, "wd") <= 64
    disk = Path(show(env, "wd")["fields"]["workdisk"]["disk"])
    assert disk.name == wd.DISK and disk.stat().st_size == 64 * wd.MIB

    # 2,000 files the guest never syncs; its own poweroff made to hang: only the agent's
    # sync (before the stop kills the VMM, 2 s a phase) can save them
    sh(env, "wd", "mkdir /root/many && i=0; while [ $i -lt 2000 ]; do echo $i > /root/many/f$i; i=$((i+1)); done")
    sh(env, "wd", "rm /bin/poweroff && printf '#!/bin/sh\\nexec sleep 3600\\n' > /bin/poweroff && chmod 755 /bin/poweroff")
    t0 = time.monotonic()
    r = env.run("vm", "stop", "wd", timeout=120)
    assert r.returncode == 0, r.stderr
    took = time.monotonic() - t0
    log = env.run("vm", "logs", "wd").stdout
    assert show(env, "wd")["state"] == "stopped"
    assert took >= 2, f"the stop took {took:.1f}s: the guest's hanging poweroff was not waited for ({log[-500:]})"

    env.run("vm", "set", "wd", "--disk-size", "96M", check=True)
    env.run("vm", "start", "wd", check=True, timeout=600)
    assert sh(env, "wd", "ls /root/many | wc -l; cat /root/many/f* | wc -l; cat /root/many/f1999") == "2000\n2000\n1999"
    assert 80 <= size_mib(env, "wd") <= 96 and disk.stat().st_size == 96 * wd.MIB
    r = env.run("vm", "set", "wd", "--disk-size", "32M")  # a running VM: refused, nothing changed
    assert r.returncode != 0


def test_a_second_vm_starts_from_the_seed_and_a_restore_has_its_own_copy(env):
    env.run("vm", "create", "--name", "wd2", *ARGS, check=True, timeout=600)  # [workdisk] size_mib = 80
    assert sh(env, "wd2", "ls /root | grep -v lost+found; cat /root/seeded.txt") == "own\nseeded.txt\nfrom the image"
    assert 64 <= size_mib(env, "wd2") <= 80
    sh(env, "wd2", "echo before > /root/marker")
    env.run("vm", "snapshot", "wd2", "--name", "wds", check=True, timeout=300)
    sh(env, "wd2", "echo after > /root/marker")
    env.run("vm", "restore", "wds", "--name", "wd3", check=True, timeout=600)
    assert sh(env, "wd3", "cat /root/marker") == "before"
    sh(env, "wd3", "echo mine > /root/marker; sync")
    assert sh(env, "wd2", "cat /root/marker") == "after"  # each its own disk
    d2, d3 = (Path(show(env, n)["fields"]["workdisk"]["disk"]) for n in ("wd2", "wd3"))
    assert d2 != d3 and d3.exists() and stat.S_IMODE(d3.stat().st_mode) == 0o644

    env.run("vm", "delete", "wd3", "--force", check=True, timeout=120)
    assert not d3.exists() and d2.exists()
    env.run("snapshot", "delete", "wds", check=True)
    env.run("vm", "delete", "wd2", "--force", check=True, timeout=120)
    assert not d2.exists()


def test_four_parallel_creates_of_one_image_after_a_key_rotation(env):
    """They race to make the image's seed (removed first) and to pin their host keys;
    each gets its own /root from the seed, its own host key, and only the new key
    (the rotated-out one revoked, also in a VM that was stopped during the rotation)."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    env.run("vm", "create", "--name", "old", *ARGS, check=True, timeout=600)
    env.run("vm", "stop", "old", check=True, timeout=120)
    old_key = json.loads(env.run("ssh-key", "--json", check=True).stdout)["public"]
    shutil.rmtree(wd.seeds_dir(env.state_dir, "bb-work"))
    new_key = json.loads(env.run("ssh-key", "--rotate", "--json", check=True).stdout)["public"]
    assert new_key != old_key
    names = [f"p{i}" for i in range(1, 5)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda n: env.run("vm", "create", "--name", n, *ARGS, timeout=900), names))
    assert all(r.returncode == 0 for r in results), [r.stderr[-800:] for r in results if r.returncode]
    env.run("vm", "start", "old", check=True, timeout=600)
    ours = {f"{n}.vm" for n in [*names, "old"]}
    lines = (env.state_dir / "ssh" / "known_hosts").read_text().splitlines()
    pinned = {k: v for k, v in (ln.split(" ", 1) for ln in lines) if k in ours}
    assert set(pinned) == ours and len(lines) == len({ln.split()[0] for ln in lines})  # one line per VM
    for n in [*names, "old"]:
        out = sh(env, n, "cat /root/seeded.txt /root/.ssh/authorized_keys; [ -e /etc/ssh ] || echo no-etc-ssh")
        assert out.split("\n") == ["from the image", new_key, "no-etc-ssh"], (n, out)  # no sshd here: no host keys
        vm_dir = env.state_dir / "vms" / show(env, n)["id"]
        own = (vm_dir / "ssh_host_ed25519_key.pub").read_text().split()
        assert pinned[f"{n}.vm"] == f"{own[0]} {own[1]}"  # pinned to the key made for it
    assert len(set(pinned.values())) == 5  # each its own
    assert len(list(wd.seeds_dir(env.state_dir, "bb-work").glob("*.ext4"))) == 1
    env.run("vm", "delete", "--force", *names, "old", check=True, timeout=300)
