"""`cleanup` is told why it runs (ctx.reason: stop, failed_start, delete, reconcile), and
`vm show --json` shows the machine description the VM was last booted with.

Three levels: the stage runner with in-process fake plugins; the daemon and CLI with
the pip-installed example plugin and the fake `firecracker` (no guest boots, so the
paths that cost a boot elsewhere are cheap: delete --force, a failed create, a daemon
restart); and two real busybox boots under QEMU/TCG (stop, failed start, VMM killed
behind banger's back, delete, and the machine in `vm show`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import guest_assets as ga
from banger_core import hookimpl
from banger_core.context import CleanupReason
from banger_core.errors import BangerError
from banger_core.vm.stages import Lifecycle
from banger_core.models import Machine
from banger_core.testing import sample_vm
from conftest import BangerEnv, fc_create, isolated_env, pid_alive, wait_for
from test_plugin_host import _runtime_for, host_with

BOOT_TIMEOUT = 180
MICROVM_VMLINUX = ga.default_cache_dir() / "banger-cache" / "builds" / "kernel-microvm-6.1" / "vmlinux"


# --- the stage runner ---------------------------------------------------------------


def reason_plugin(name: str, seen: list, fail_in: str | None = None) -> types.ModuleType:
    """A plugin recording (stage, ctx.reason) for every lifecycle stage."""
    mod: Any = types.ModuleType(f"plug_{name}")
    mod.requires = []

    def note(ctx, stage):
        seen.append((stage, ctx.reason))
        if stage == fail_in:
            raise RuntimeError(f"{name} broke in {stage}")

    mod.prepare_host = hookimpl(lambda ctx: note(ctx, "prepare_host"), specname="prepare_host")
    mod.configure_machine = hookimpl(lambda ctx, machine: note(ctx, "configure_machine"), specname="configure_machine")
    mod.post_boot = hookimpl(lambda ctx: note(ctx, "post_boot"), specname="post_boot")
    mod.cleanup = hookimpl(lambda ctx: note(ctx, "cleanup"), specname="cleanup")
    return mod


def machine() -> Machine:
    return Machine(kernel="k", vcpus=1, memory_mib=128)


def test_setup_stages_have_no_reason_and_cleanup_gets_the_one_given(tmp_path):
    seen: list = []
    rt = _runtime_for(host_with(reason_plugin("a", seen)), tmp_path)
    lc = Lifecycle(rt, sample_vm(), op_id="op-abcdef")
    lc.start(machine(), lambda m: None)
    assert seen == [("prepare_host", None), ("configure_machine", None), ("post_boot", None)]
    for reason in CleanupReason:
        seen.clear()
        lc.cleanup(reason)
        assert seen == [("cleanup", reason)]
    assert CleanupReason("failed_start") is CleanupReason.FAILED_START and CleanupReason.DELETE == "delete"


@pytest.mark.parametrize("given, told", [(None, CleanupReason.FAILED_START), (CleanupReason.DELETE, CleanupReason.DELETE)])
def test_a_failed_start_cleans_up_once_with_its_failure_reason(tmp_path, given, told):
    seen: list = []
    rt = _runtime_for(host_with(reason_plugin("a", seen), reason_plugin("b", seen, fail_in="post_boot")), tmp_path)
    lc = Lifecycle(rt, sample_vm(), op_id="op-abcdef")
    with pytest.raises(BangerError, match="b broke in post_boot"):
        lc.start(machine(), lambda m: None, *([given] if given else []))
    cleanups = [r for stage, r in seen if stage == "cleanup"]
    assert cleanups == [told, told]  # each plugin once (b and a), with the same reason


# --- the daemon, with the fake firecracker (nothing boots) -------------------------


def cleanup_log(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def project(root: Path, log: Path, **extra: str) -> Path:
    root.mkdir(exist_ok=True)
    lines = [f"cleanup_log = '{log}'", "greeting = 'reasons'"] + [f"{k} = '{v}'" for k, v in extra.items()]
    (root / "banger.toml").write_text("[example]\n" + "\n".join(lines) + "\n")
    return root


def show(env, name) -> dict:
    return json.loads(env.run("vm", "show", name, "--json", check=True).stdout)


def test_delete_force_kill_failed_create_and_daemon_restart_reasons(fcenv, tmp_path):
    env, log = fcenv, tmp_path / "cleanups.log"
    proj = project(tmp_path / "proj", log)

    # a running VM deleted with --force: its plugins are told delete, once (no stop first)
    fc_create(env, "gone", proj)
    env.run("vm", "delete", "gone", "--force", check=True)
    assert cleanup_log(log) == ["gone delete"]

    # vm kill is a stop
    fc_create(env, "killed", proj)
    pid = show(env, "killed")["pid"]
    env.run("vm", "kill", "killed", check=True)
    assert not pid_alive(pid) and cleanup_log(log)[1:] == ["killed stop"]
    env.run("vm", "delete", "killed", check=True)
    assert cleanup_log(log)[2:] == ["killed delete"]

    # a create that fails in a plugin removes the VM: delete, once (not failed_start too)
    failing = project(tmp_path / "failing", log, fail_in="post_boot")
    r = fc_create(env, "nope", failing, check=False)
    assert r.returncode == 1 and "failing in post_boot as configured" in r.stderr
    assert cleanup_log(log)[3:] == ["nope delete"]
    assert "nope" not in env.run("vm", "list", check=True).stdout

    # the daemon dies, the VMM too: the daemon's start-up reconcile cleans up
    fc_create(env, "orphan", proj)
    pid = show(env, "orphan")["pid"]
    os.kill(env.daemon_pid(), signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid))
    assert show(env, "orphan")["state"] == "stopped"  # any command restarts the daemon
    assert cleanup_log(log)[4:] == ["orphan reconcile"]
    # the machine of its last boot is still shown while stopped
    m = show(env, "orphan")["machine"]
    assert m["kernel"].endswith("vmlinux") and "example.greeting=reasons" in m["boot_args"]
    env.run("vm", "delete", "orphan", check=True)
    assert cleanup_log(log)[5:] == ["orphan delete"]


# --- real guests: busybox under QEMU/TCG, two boots -----------------------------------


@contextmanager
def busybox_env(tmp_path_factory, *extra_path: str) -> Iterator[BangerEnv]:
    """An isolated banger booting under QEMU/TCG, with the kernel `k` (banger's microVM
    kernel when the test cache has it, else the test kernel) and the image `busybox`
    on it; the VMs left are deleted afterwards. Also used by test_config."""
    with isolated_env() as env:
        env.extra_path += extra_path
        env.write_config("[vmm]\naccel = 'tcg'\nstop_timeout_s = 60\n")
        assets = ga.busybox_assets()
        if MICROVM_VMLINUX.exists():  # banger's microVM kernel, as the test cache has it: no initrd
            kdir = tmp_path_factory.mktemp("microvm")
            (kdir / "vmlinux").symlink_to(MICROVM_VMLINUX)
        else:
            kdir = assets["kernel_dir"]
        env.run("kernel", "import", "k", "--from", str(kdir), check=True)
        env.run("image", "register", "busybox", "--rootfs", str(assets["rootfs"]), "--kernel-ref", "k", check=True)
        yield env
        names = [v["name"] for v in json.loads(env.run("vm", "list", "--json").stdout or "[]")]
        if names:
            env.run("vm", "delete", "--force", *names, timeout=120)


@pytest.fixture(scope="module")
def qenv(example_plugin_dir, tmp_path_factory):
    with busybox_env(tmp_path_factory, str(example_plugin_dir)) as env:
        yield env


def wait_boot(env, name, count: int) -> None:
    def booted():
        text = env.run("vm", "logs", name, "-n", "0").stdout
        return len(re.findall(ga.BOOT_MARKER, text)) >= count

    wait_for(booted, timeout=BOOT_TIMEOUT, interval=0.5)


@pytest.mark.slow
def test_real_vm_reasons_and_machine_shown(qenv, tmp_path):
    env, log = qenv, tmp_path / "cleanups.log"
    proj = project(tmp_path / "proj", log)
    args = ["--image", "busybox", "--vcpu", "1", "--memory", "256M", "--root-size", "256M", "--project", str(proj)]
    env.run("vm", "create", "--name", "real", *args, timeout=300, check=True)  # boot 1

    # what the VMM got: the kernel, the plugins' boot args, the root disk
    vm = show(env, "real")
    kernel = json.loads(env.run("kernel", "show", "k", "--json", check=True).stdout)
    m = vm["machine"]
    assert m["kernel"] == kernel["kernel"] and m["vcpus"] == 1 and m["memory_mib"] == 256
    assert "example.greeting=reasons" in m["boot_args"] and "banger.vm=real" in m["boot_args"]
    root = [d for d in m["drives"] if d["root"]]
    assert len(root) == 1 and root[0]["id"] == "root" and Path(root[0]["path"]).parent == Path(vm["dir"])
    assert Path(root[0]["path"]).exists()
    human = env.run("vm", "show", "real", check=True).stdout
    assert "last boot:" in human and kernel["kernel"] in human and root[0]["path"] in human
    assert "example.greeting=reasons" in human
    assert cleanup_log(log) == []

    wait_boot(env, "real", 1)
    env.run("vm", "stop", "real", timeout=180, check=True)
    assert cleanup_log(log) == ["real stop"]
    assert show(env, "real")["machine"] == m  # kept while stopped

    # a start that fails in a plugin (before any boot): failed_start; the VM stays
    project(proj, log, fail_in="prepare_host")
    r = env.run("vm", "start", "real", timeout=120)
    assert r.returncode == 1 and "failing in prepare_host as configured" in r.stderr
    assert cleanup_log(log) == ["real stop", "real failed_start"]
    assert show(env, "real")["state"] == "error"

    # the VMM killed behind banger's back: the monitor (or the next command) cleans up
    project(proj, log)
    env.run("vm", "start", "real", timeout=300, check=True)  # boot 2
    pid = show(env, "real")["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), timeout=30)
    wait_for(lambda: len(cleanup_log(log)) >= 3, timeout=30, interval=0.2)  # the monitor, unprompted
    assert show(env, "real")["state"] == "stopped"
    assert cleanup_log(log) == ["real stop", "real failed_start", "real reconcile"]

    env.run("vm", "delete", "real", timeout=120, check=True)
    assert cleanup_log(log) == ["real stop", "real failed_start", "real reconcile", "real delete"]
    assert show_or_none(env, "real") is None


def show_or_none(env, name) -> dict | None:
    r = env.run("vm", "show", name, "--json")
    return json.loads(r.stdout) if r.returncode == 0 else None
