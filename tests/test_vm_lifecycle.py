"""Real guests under QEMU/TCG: create, stop, start, set, restart, kill, delete, reconcile.

The kernel (Debian's cloud kernel + an initrd banger builds) and a busybox root disk
are prepared once per host and cached (tests/guest_assets.py); each boot takes
~10-30 s under TCG, so the boots here are few and shared.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

import guest_assets as ga
from conftest import isolated_env, pid_alive, wait_for

BOOT_TIMEOUT = 180


@pytest.fixture(scope="session")
def assets():
    return ga.busybox_assets()


@pytest.fixture(scope="module")
def venv_(assets):
    with isolated_env() as env:
        env.write_config("[vmm]\naccel = 'tcg'\nstop_timeout_s = 60\n")
        env.run("kernel", "import", "debian-cloud", "--from", str(assets["kernel_dir"]), check=True)
        env.run("image", "register", "busybox", "--rootfs", str(assets["rootfs"]), "--kernel-ref", "debian-cloud", check=True)
        yield env
        if vms(env):
            env.run("vm", "delete", "--force", *[v["name"] for v in vms(env)], timeout=120)


def create_small(env, name: str):
    """`vm create` of a 1-vCPU, 256 MiB busybox VM with a 256 MiB root filesystem."""
    args = ["--image", "busybox", "--vcpu", "1", "--memory", "256M", "--root-size", "256M"]
    return env.run("vm", "create", "--name", name, *args, timeout=300, check=True)


def vms(env) -> list[dict]:
    r = env.run("vm", "list", "--json")
    return json.loads(r.stdout) if r.returncode == 0 else []


def show(env, name) -> dict:
    return json.loads(env.run("vm", "show", name, "--json", check=True).stdout)


def console(env, name) -> str:
    return env.run("vm", "logs", name, "-n", "0", check=True).stdout


def boots(env, name) -> list[str]:
    return re.findall(rf"{ga.BOOT_MARKER} nproc=(\d+)", console(env, name))


def wait_boot(env, name, count=1) -> list[str]:
    return wait_for(lambda: (b := boots(env, name)) and len(b) >= count and b, timeout=BOOT_TIMEOUT, interval=0.5)


def qemu_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "process=banger-"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def db_rows(env) -> list:
    return sqlite3.connect(env.state_dir / "banger.db").execute("select name, state from vms").fetchall()


@pytest.mark.slow
def test_create_stop_set_start_restart_delete(venv_):
    env = venv_
    r = create_small(env, "life")
    for stage in ("reserve", "prepare_host", "boot", "ready"):
        assert re.search(rf"\]\s+{stage}$", r.stderr, re.M), r.stderr
    assert "spec: 1 vcpu | 256 MiB | 256 MiB root | image busybox | qemu" in r.stderr
    vm = show(env, "life")
    assert vm["state"] == "running" and pid_alive(vm["pid"])
    assert wait_boot(env, "life") == ["1"]
    assert "banger.vm=life" in console(env, "life")
    image_before = Path(env.state_dir / "banger.db").exists()

    # errors that change nothing
    r = env.run("vm", "start", "life")
    assert r.returncode == 1 and "VM life is already running" in r.stderr
    r = env.run("vm", "delete", "life")
    assert r.returncode == 1 and "is running: stop it first or delete with --force" in r.stderr
    r = env.run("vm", "set", "life", "--vcpu", "2")
    assert r.returncode == 1 and "stop it before changing its spec" in r.stderr
    assert show(env, "life")["state"] == "running" and image_before

    # graceful stop: the guest sees the ACPI power button and powers off itself
    r = env.run("vm", "stop", "life", timeout=180, check=True)
    assert "life: stopped" in r.stdout
    assert f"{ga.POWEROFF_MARKER}" in console(env, "life")
    assert not pid_alive(vm["pid"]) and show(env, "life")["pid"] is None

    # vm set changes what the guest sees; disks only grow
    r = env.run("vm", "set", "life", "--vcpu", "2", "--memory", "384M", "--root-size", "512M", check=True)
    assert "vcpu=2 memory=384MiB root=512MiB" in r.stdout
    from banger_core.vm import disks

    root = next(Path(vm["dir"]).glob("root.*"))
    assert disks.disk_size_mib(root) == 512
    r = env.run("vm", "set", "life", "--root-size", "128M")
    assert r.returncode == 1 and "disks only grow" in r.stderr
    assert show(env, "life")["spec"]["root_size_mib"] == 512
    env.run("vm", "start", "life", timeout=300, check=True)
    assert wait_boot(env, "life") == ["2"]
    first_pid = show(env, "life")["pid"]

    # restart is a real new boot: a new VMM process and a fresh console
    env.run("vm", "restart", "life", timeout=400, check=True)
    assert wait_boot(env, "life") == ["2"]
    second_pid = show(env, "life")["pid"]
    assert second_pid != first_pid and not pid_alive(first_pid) and pid_alive(second_pid)

    # delete --force: no VMM, no per-VM files, no row
    vm = show(env, "life")
    env.run("vm", "delete", "life", "--force", timeout=120, check=True)
    assert not pid_alive(second_pid)
    assert not Path(vm["dir"]).exists()
    assert db_rows(env) == []
    assert not [p for p in qemu_pids() if vm["id"] in open(f"/proc/{p}/cmdline").read()]


@pytest.mark.slow
def test_daemon_kill9_adopts_vm_and_vmm_death_cleans_up(venv_):
    env = venv_
    create_small(env, "adopt")
    vm = show(env, "adopt")
    pid = vm["pid"]
    # daemon dies hard while the VM runs, and its handles file is lost too
    os.kill(env.daemon_pid(), signal.SIGKILL)
    handles = Path(vm["dir"]) / "handles.json"
    assert handles.exists()
    handles.unlink()
    listed = {v["name"]: v for v in vms(env)}  # any CLI command: daemon restarts
    assert listed["adopt"]["state"] == "running" and listed["adopt"]["pid"] == pid and pid_alive(pid)
    assert handles.exists()  # rewritten from process inspection

    # the VMM dies behind banger's back: the VM shows stopped, its host state is gone
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: show(env, "adopt")["state"] == "stopped", timeout=30)
    assert not handles.exists() and not (Path(vm["dir"]) / "qmp.sock").exists()
    log = (env.state_dir / "bangerd.log").read_text()
    assert "VMM exited behind banger's back" in log

    # VMM killed again, and a start right away (before any monitor pass) just works
    env.run("vm", "start", "adopt", timeout=300, check=True)
    dead = show(env, "adopt")["pid"]
    os.kill(dead, signal.SIGKILL)
    wait_for(lambda: not pid_alive(dead))
    env.run("vm", "start", "adopt", timeout=300, check=True)
    pid = show(env, "adopt")["pid"]
    assert pid != dead and pid_alive(pid)

    # kill --signal on a running VM
    r = env.run("vm", "kill", "adopt", "--signal", "TERM", check=True)
    assert "adopt: stopped" in r.stdout and not pid_alive(pid)
    env.run("vm", "prune", "-f", check=True)
    assert db_rows(env) == [] and not Path(vm["dir"]).exists()


def test_bad_input_changes_nothing(venv_):
    env = venv_
    before = set((env.state_dir / "vms").iterdir()) if (env.state_dir / "vms").exists() else set()
    cases = [
        (["--name", "Bad_Name"], "invalid VM name 'Bad_Name'"),
        (["--name", "-lead"], "invalid VM name '-lead'"),
        (["--name", "a" * 64], "invalid VM name"),
        (["--vcpu", "0"], "--vcpu must be greater than 0, got 0"),
        (["--vcpu", "-2"], "--vcpu must be greater than 0"),
        (["--memory", "0"], "--memory: size must be at least 1 MiB, got '0'"),
        (["--root-size", "0G"], "--root-size: size must be at least 1 MiB, got '0G'"),
        (["--memory", "lots"], "cannot parse size 'lots'"),
        (["--vcpu", "4096"], "exceeds this host's"),
        (["--image", "nope"], "no image named 'nope'"),
        (["--driver", "vmware"], "unknown VMM driver 'vmware'"),
    ]
    for args, msg in cases:
        # later options win: each case overrides one part of a valid command line
        r = env.run("vm", "create", "--name", "ok-name", "--image", "busybox", "--memory", "128", *args)
        assert r.returncode != 0 and msg in r.stderr, (args, r.stderr)
    # the daemon validates too (a client that skips the CLI's checks)
    from banger_core.client import Client
    from banger_core.errors import BangerError
    from banger_core.paths import Paths

    client = Client(Paths.from_env(env.env()))
    for params, msg in [
        ({"name": "UPPER", "image": "busybox"}, "invalid VM name"),
        ({"name": "zero", "image": "busybox", "vcpus": 0}, "greater than 0"),
        ({"name": "neg", "image": "busybox", "memory_mib": -1}, "size must be at least 1 MiB, got -1"),
    ]:
        with pytest.raises(BangerError, match=msg) as ei:
            client.call("vm.create", params)
        assert ei.value.code.value == "bad_request" and ei.value.op_id
    for verb in ("start", "stop", "delete", "restart", "kill"):
        r = env.run("vm", verb, "ghost")
        assert r.returncode == 1 and "no VM named or with ID prefix 'ghost'" in r.stderr and "(not_found, op-" in r.stderr
    assert db_rows(env) == []
    after = set((env.state_dir / "vms").iterdir()) if (env.state_dir / "vms").exists() else set()
    assert after == before


def test_failed_boot_leaves_nothing(venv_, tmp_path):
    env = venv_
    kdir = tmp_path / "k"
    kdir.mkdir()
    (kdir / "vmlinuz").write_bytes(b"not a kernel")
    env.run("kernel", "import", "junk", "--from", str(kdir), check=True)
    env.run(
        "image",
        "register",
        "junkimg",
        "--rootfs",
        str(ga.default_cache_dir() / "rootfs-busybox.ext4"),
        "--kernel-ref",
        "junk",
        check=True,
    )
    # break the kernel after import: QEMU refuses to start
    k = json.loads(env.run("kernel", "list", "--json", check=True).stdout)
    Path(next(x for x in k if x["name"] == "junk")["kernel"]).unlink()
    r = env.run("vm", "create", "--name", "broken", "--image", "junkimg", "--vcpu", "1", "--memory", "128", timeout=120)
    assert r.returncode == 1 and "starting QEMU failed" in r.stderr
    assert db_rows(env) == []
    assert not any((env.state_dir / "vms").iterdir())
    env.run("image", "delete", "junkimg", check=True)
    env.run("kernel", "rm", "junk", check=True)


def test_refs_fan_out_in_input_order(venv_):
    env = venv_
    r = env.run("vm", "stop", "ghost-a", "ghost-b", "--json")
    res = json.loads(r.stdout)
    assert [x["ref"] for x in res] == ["ghost-a", "ghost-b"] and not any(x["ok"] for x in res)
    assert r.returncode == 1


@pytest.mark.slow
def test_accel_auto_probes_kvm_and_says_which(venv_, tmp_path):
    with isolated_env() as env:
        env.write_config("[vmm]\naccel = 'auto'\nkvm_probe_timeout_s = 8\n")
        kdir = json.loads(venv_.run("kernel", "list", "--json", check=True).stdout)[0]
        env.run("kernel", "import", "k", "--from", str(Path(kdir["kernel"]).parent), check=True)
        env.run(
            "image",
            "register",
            "bb",
            "--rootfs",
            str(ga.default_cache_dir() / "rootfs-busybox.ext4"),
            "--kernel-ref",
            "k",
            check=True,
        )
        env.run("vm", "create", "--name", "probe", "--image", "bb", "--vcpu", "1", "--memory", "192M", timeout=300, check=True)
        lines = [json.loads(ln)["msg"] for ln in (env.state_dir / "bangerd.log").read_text().splitlines()]
        chosen = [m for m in lines if m.startswith("QEMU for ")]
        assert len(chosen) == 1, lines
        assert re.match(
            r"QEMU for \w+ uses (KVM: KVM probe boot printed the kernel banner|TCG: (KVM probe|/dev/kvm))", chosen[0]
        ), chosen
        probe = json.loads((env.state_dir / "kvm-probe.json").read_text())
        assert probe["accel"] in ("kvm", "tcg") and probe["why"] in chosen[0]
        doctor = env.run("doctor").stdout
        assert re.search(rf"^(PASS|WARN) +kvm +{re.escape(probe['why'])}", doctor, re.M), doctor
        wait_boot(env, "probe")
        env.run("vm", "delete", "probe", "--force", timeout=120, check=True)


@pytest.mark.slow
def test_extracted_vmlinux_boots_through_pvh_on_microvm(venv_, assets, tmp_path):
    """The cloud kernel's vmlinux (extracted from its bzImage, what Firecracker would
    boot) really boots: imported alone with the initrd, QEMU runs it on -M microvm,
    where the initrd's virtio_mmio finds the root disk through ACPI."""
    env = venv_
    src = assets["kernel_dir"]
    assert (src / "vmlinux").read_bytes()[:4] == b"\x7fELF"
    kdir = tmp_path / "pvh"
    kdir.mkdir()
    for name in ("vmlinux", "initrd.img"):
        (kdir / name).symlink_to(src / name)
    (kdir / "modules").symlink_to(src / "modules")
    env.run("kernel", "import", "cloud-pvh", "--from", str(kdir), check=True)
    k = json.loads(env.run("kernel", "show", "cloud-pvh", "--json", check=True).stdout)
    assert Path(k["kernel"]).name == "vmlinux" and k["vmlinux"] == k["kernel"] and k["source"] == f"import:{kdir}"
    env.run("image", "register", "bb-pvh", "--rootfs", str(assets["rootfs"]), "--kernel-ref", "cloud-pvh", check=True)
    env.run("vm", "create", "--name", "pvh", "--image", "bb-pvh", "--vcpu", "1", "--memory", "256M", timeout=300, check=True)
    try:
        assert wait_boot(env, "pvh") == ["1"]
        argv = Path(f"/proc/{show(env, 'pvh')['pid']}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"-M") + 1].startswith(b"microvm,acpi=on") and any(a.endswith(b"/vmlinux") for a in argv)
    finally:
        env.run("vm", "delete", "pvh", "--force", timeout=120, check=True)
        env.run("image", "delete", "bb-pvh", check=True)
        env.run("kernel", "rm", "cloud-pvh", check=True)
