"""The catalog and the default image: a fresh state goes from nothing to a booted
Debian VM by itself (kernel and image built on the host from Debian's packages).

Builds are cached per host under the test cache (BANGER_CACHE_DIR), as a user's are
under ~/.cache/banger, so only the first run on a machine pays for mmdebstrap.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from pathlib import Path

import pytest

import guest_assets as ga
from banger_debian import debian_image
from banger_debian.common import mounts_under
from banger_core.errors import Cancelled
from conftest import BANGER, wait_for
from leftovers import kill_processes_using

LONG = 1200


@pytest.fixture
def denv(benv):
    benv.extra_env["BANGER_CACHE_DIR"] = str(ga.default_cache_dir() / "banger-cache")
    benv.write_config("[vmm]\naccel = 'tcg'\nstop_timeout_s = 60\n")
    return benv


def test_catalog_lists_and_unknown_names(denv):
    avail = json.loads(denv.run("kernel", "list", "--available", "--json", check=True).stdout)
    assert [(a["name"], a["pulled"]) for a in avail] == [("debian-cloud", False), ("microvm-6.1", False)]
    r = denv.run("kernel", "pull", "nope")
    assert r.returncode == 1 and "no kernel source claims 'nope' (available by name: debian-cloud, microvm-6.1;" in r.stderr
    r = denv.run("image", "pull", "nope")
    assert r.returncode == 1 and "no image source claims 'nope' (available by name: debian-bookworm;" in r.stderr
    r = denv.run("vm", "create", "--image", "nope")
    assert r.returncode == 1 and "no image named 'nope'" in r.stderr
    assert json.loads(denv.run("vm", "list", "--json", check=True).stdout) == []


@pytest.mark.slow
def test_parallel_pulls_of_the_same_image_pull_once(denv):
    procs = [
        subprocess.Popen(
            [BANGER, "image", "pull", "debian-bookworm", "--json"],
            env=denv.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=LONG) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    rootfs = {json.loads(o[0])["rootfs"] for o in outs}
    assert len(rootfs) == 1 and Path(rootfs.pop()).is_file()
    log = (denv.state_dir / "bangerd.log").read_text()
    copies = [ln for ln in log.splitlines() if '"msg": "ran cp --reflink=auto --sparse=always' in ln]
    assert len(copies) == 1, copies
    imports = json.loads(denv.run("kernel", "list", "--json", check=True).stdout)
    assert [k["name"] for k in imports] == ["debian-cloud"]


@pytest.mark.slow
def test_create_with_no_image_pulls_default_and_boots_debian(denv):
    r = denv.run("vm", "create", "--name", "deb", "--vcpu", "2", "--memory", "1G", timeout=LONG, check=True)
    assert "pull kernel debian-cloud" in r.stderr and "pull image debian-bookworm" in r.stderr
    assert "image debian-bookworm" in r.stderr
    vm = json.loads(denv.run("vm", "show", "deb", "--json", check=True).stdout)
    assert vm["image"] == "debian-bookworm" and vm["state"] == "running"
    text = wait_for(
        lambda: (t := denv.run("vm", "logs", "deb", "-n", "0").stdout) and "login:" in t and t, timeout=300, interval=1
    )
    assert "Debian GNU/Linux 12" in text
    # what a VM has no use for stays out of its boot (masked units, blacklisted modules)
    for absent in ("getty@tty1", "e2scrub", "Kernel Debug File System", "ata_piix", "kvm: Nested"):
        assert absent not in text, absent
    assert "Started serial-getty@ttyS0" in text and "Started systemd-logind" in text
    # graceful stop: the agent syncs and powers off (systemctl poweroff: a clean shutdown)
    denv.run("vm", "stop", "deb", timeout=300, check=True)
    log = (denv.state_dir / "bangerd.log").read_text()
    assert re.search(r'"msg": "VM deb: shut down by agent"', log), log[-2000:]
    # a second create reuses the pulled image and kernel
    r = denv.run("vm", "create", "--name", "deb2", "--vcpu", "1", "--memory", "512M", timeout=300, check=True)
    assert "pull " not in r.stderr
    denv.run("vm", "delete", "--force", "deb", "deb2", timeout=120, check=True)


@pytest.mark.slow
def test_cancelled_image_build_stops_mmdebstrap_and_leaves_nothing(tmp_path):
    """Cancelled once dpkg is at work inside the chroot (its /proc, /sys and /dev
    mounted there): mmdebstrap's process group is stopped, mounts are gone, and no
    staging dir or manifest is left."""
    cancel = threading.Event()
    steps: list[int] = []
    lines: list[str] = []

    def work(done: int, total: int) -> None:
        steps.append(done)
        assert total == debian_image.EXPECTED_STEPS
        if done >= 40:
            cancel.set()

    dest = tmp_path / "out" / "image-debian-bookworm"
    with pytest.raises(Cancelled):
        debian_image.build_debian_image(dest, log=lines.append, cancel=cancel, work=work)
    assert steps == sorted(steps) and 40 <= steps[-1] < debian_image.EXPECTED_STEPS
    assert "installing essential packages..." in lines  # mmdebstrap's stages reach the log
    assert list((tmp_path / "out").iterdir()) == []
    assert mounts_under(tmp_path) == []
    assert kill_processes_using(tmp_path) == []


def test_masking_units_in_a_tree_without_systemd_running(tmp_path):
    wants = tmp_path / "etc/systemd/system/timers.target.wants"
    wants.mkdir(parents=True)
    (wants / "fstrim.timer").symlink_to("/lib/systemd/system/fstrim.timer")
    (tmp_path / "etc/systemd/system/getty@tty1.service").write_text("[Service]\n")  # a local override
    debian_image.mask_units(tmp_path, ("fstrim.timer", "getty@tty1.service", "dev-hugepages.mount"))
    etc = tmp_path / "etc/systemd/system"
    assert not (wants / "fstrim.timer").is_symlink()
    for unit in ("fstrim.timer", "getty@tty1.service", "dev-hugepages.mount"):
        assert os.readlink(etc / unit) == "/dev/null", unit
    debian_image.mask_units(tmp_path, ("fstrim.timer",))  # again: nothing changes, nothing fails
    assert os.readlink(etc / "fstrim.timer") == "/dev/null"
