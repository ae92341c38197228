"""Snapshots, restores, suspend and warm starts of real QEMU guests, through the CLI and
the daemon as a user runs them.

One source VM (the default Debian image: systemd's machine-id tools and sshd are the
point) boots for the module; one cold `vm run` makes the warm-start template; one VM
is booted again after its VMM was killed mid-snapshot. Everything else is restored,
not booted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import guest_assets as ga
from conftest import BANGER, isolated_env, pid_alive, wait_for

SRC = "snapsrc"
LONG = 1500
# a counter writing to a file every 100 ms (replaced whole: a reader never sees it empty)
COUNTER = (
    'nohup sh -c "while true; do i=\\$((i+1)); echo \\$i > /root/.count; mv /root/.count /root/count; sleep 0.1; done"'
    " >/dev/null 2>&1 & echo $!"
)


@pytest.fixture(scope="module")
def env():
    # no example plugin here: its guest payload would make the default image another
    # build in the shared cache (tests/test_snapshots_firecracker.py checks the hook
    # through it, on a registered image)
    with isolated_env() as e:
        e.extra_env["BANGER_CACHE_DIR"] = str(ga.default_cache_dir() / "banger-cache")
        e.write_config("[vmm]\naccel = 'tcg'\nstop_timeout_s = 60\n")
        e.run("vm", "create", "--name", SRC, "--vcpu", "1", "--memory", "1G", check=True, timeout=LONG)
        e.counter_pid = int(sh(e, SRC, COUNTER))
        yield e
        for vm in json.loads(e.run("vm", "list", "--json", timeout=120).stdout or "[]"):
            e.run("vm", "delete", vm["name"], "--force", timeout=120)


def sh(env, vm: str, script: str, check: bool = True) -> str:
    r = env.run("vm", "exec", vm, "--", "sh", "-c", script, timeout=120)
    if check:
        assert r.returncode == 0, f"{vm}: {script}: {r.returncode} {r.stderr}"
    return r.stdout.strip()


def js(env, *argv: str, timeout: float = 300):
    return json.loads(env.run(*argv, "--json", check=True, timeout=timeout).stdout)


def count(env, vm: str) -> int:
    return int(sh(env, vm, "cat /root/count"))


def snapshot_dirs(env) -> list[str]:
    d = env.state_dir / "snapshots"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_a_restored_vm_goes_on_from_the_snapshot_as_a_vm_of_its_own(env):
    sh(env, SRC, "echo before > /root/before")
    shown = js(env, "vm", "snapshot", SRC, "--name", "s1")
    assert shown["snapshot"]["name"] == "s1" and shown["snapshot"]["size_bytes"] > 0
    assert shown["vm"]["state"] == "running"  # the source runs on
    sh(env, SRC, "echo after > /root/after")
    for name in ("r1", "r2"):
        vm = js(env, "vm", "restore", "s1", "--name", name)
        assert vm["state"] == "running" and vm["base_snapshot"] == shown["snapshot"]["id"]

    # the counter started before the snapshot counts on in the restored VM
    assert sh(env, "r1", f"kill -0 {env.counter_pid} && echo alive") == "alive"
    first = count(env, "r1")
    time.sleep(1.5)
    assert count(env, "r1") > first
    # files: as they were at the snapshot
    assert sh(env, "r1", "cat /root/before") == "before"
    assert sh(env, "r1", "test -e /root/after && echo yes || echo no") == "no"
    # no boot happened: the boot id is the source's
    boot_id = sh(env, SRC, "cat /proc/sys/kernel/random/boot_id")
    assert sh(env, "r1", "cat /proc/sys/kernel/random/boot_id") == boot_id

    # its own identity
    ids = {vm: sh(env, vm, "cat /etc/machine-id") for vm in (SRC, "r1", "r2")}
    assert len(set(ids.values())) == 3
    for vm in ("r1", "r2"):
        assert sh(env, vm, "hostname") == vm
        assert sh(env, vm, "systemd-id128 machine-id") == ids[vm]  # a new process agrees
        assert abs(int(sh(env, vm, "date +%s")) - time.time()) < 10  # the clock was stepped
    # two VMs restored from one snapshot read different random streams
    rand = {vm: sh(env, vm, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'") for vm in ("r1", "r2")}
    assert rand["r1"] != rand["r2"]
    # new SSH host keys, ed25519 only
    keys = {vm: sh(env, vm, "cat /etc/ssh/ssh_host_ed25519_key.pub") for vm in (SRC, "r1", "r2")}
    assert len(set(keys.values())) == 3
    assert sh(env, "r1", "ls /etc/ssh/ | grep -c '^ssh_host_.*_key$'") == "1"

    # the agent plugin's vm_resumed did the identity, the ssh plugin's the host keys (its
    # own, pinned under the VM's name), and each said so
    log = (env.state_dir / "bangerd.log").read_text()
    pinned = dict(ln.split(" ", 1) for ln in (env.state_dir / "ssh" / "known_hosts").read_text().splitlines())
    for vm in ("r1", "r2"):
        assert f"VM {vm} resumed from s1: clock, rng, hostname, machine_id (" in log
        assert f"VM {vm}: SSH host key pinned as {vm}.vm" in log
        assert pinned[f"{vm}.vm"] == " ".join(keys[vm].split()[:2])


def test_a_snapshot_a_vm_stands_on_cannot_be_deleted(env):
    r = env.run("snapshot", "delete", "s1")
    assert r.returncode != 0 and "r1" in r.stderr and "r2" in r.stderr and "stand on it" in r.stderr
    assert [s["name"] for s in js(env, "snapshot", "list")] == ["s1"]
    assert js(env, "snapshot", "show", "s1")["vms"] == ["r1", "r2"]


def test_bad_input_is_refused_and_leaves_nothing(env):
    before = (snapshot_dirs(env), sorted(p.name for p in (env.state_dir / "vms").iterdir()))
    for argv, says in [
        (["vm", "snapshot", "nope"], "no VM named"),
        (["vm", "snapshot", SRC, "--name", "Bad Name"], "invalid snapshot name"),
        (["vm", "snapshot", SRC, "--name", "s1"], "already exists"),
        (["vm", "restore", "nope"], "no snapshot named"),
        (["vm", "restore", "s1", "--name", "r1"], "already exists"),
        (["vm", "stop", "--suspend", "--force", SRC], "exclude each other"),
        (["snapshot", "delete", "nope"], "no snapshot named"),
    ]:
        r = env.run(*argv, timeout=120)
        assert r.returncode != 0 and says in r.stderr, (argv, r.stderr)
    assert (snapshot_dirs(env), sorted(p.name for p in (env.state_dir / "vms").iterdir())) == before
    assert [s["name"] for s in js(env, "snapshot", "list")] == ["s1"]
    assert js(env, "vm", "show", SRC)["state"] == "running"


def test_suspend_then_start_resumes_the_same_boot(env):
    boot_id = sh(env, "r1", "cat /proc/sys/kernel/random/boot_id")
    pid = js(env, "vm", "show", "r1")["pid"]
    env.run("vm", "stop", "--suspend", "r1", check=True, timeout=120)
    shown = js(env, "vm", "show", "r1")
    assert shown["state"] == "suspended" and shown["pid"] is None and not pid_alive(pid)
    start = env.run("vm", "start", "r1", check=True, timeout=300)
    assert "restore from its suspend image" in start.stderr
    assert sh(env, "r1", "cat /proc/sys/kernel/random/boot_id") == boot_id
    assert sh(env, "r1", f"kill -0 {env.counter_pid} && echo alive") == "alive"
    first = count(env, "r1")
    time.sleep(1.5)
    assert count(env, "r1") > first
    assert not (Path(shown["dir"]) / "suspend").exists()  # consumed

    # `vm set` on a suspended VM discards the image, saying so
    env.run("vm", "stop", "--suspend", "r1", check=True, timeout=120)
    r = env.run("vm", "set", "r1", "--memory", "768M", check=True)
    assert "suspend image is discarded" in r.stderr
    assert js(env, "vm", "show", "r1")["state"] == "stopped" and not (Path(shown["dir"]) / "suspend").exists()


def test_warm_runs_restore_the_template_and_boot_nothing(env):
    args = ["--vcpu", "1", "--memory", "1G"]
    # two runs at once, no template yet: one boots and makes it, the other waits for it
    runs = [
        subprocess.Popen(
            [BANGER, "vm", "run", "--rm", *args, "--", "cat", "/proc/sys/kernel/random/boot_id"],
            env=env.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    done = [(p.wait(timeout=LONG), *p.communicate()) for p in runs]
    assert all(rc == 0 for rc, _, _ in done), done
    templates = js(env, "snapshot", "list", "--kind", "template")
    assert len(templates) == 1 and templates[0]["vms"] == []
    cold = [d for d in done if "cold: boots, then becomes the warm-start template" in d[2]]
    warm = [d for d in done if f"warm: restores template {templates[0]['name']}" in d[2]]
    assert len(cold) == 1 and len(warm) == 1, [d[2] for d in done]
    boot_id = cold[0][1].strip()
    assert warm[0][1].strip() == boot_id  # the template's boot: nothing booted
    # a template whose kernel changed since is not restored: the VM boots, says why,
    # and becomes the template in its place
    compat = env.state_dir / "snapshots" / templates[0]["id"] / "compat.json"
    compat.write_text(json.dumps({**json.loads(compat.read_text()), "kernel": "/boot/another:1:1"}))
    r = env.run("vm", "create", "--warm", "--name", "w1", *args, check=True, timeout=LONG)
    assert f"booting: template {templates[0]['name']} cannot be used: the kernel changed" in r.stderr, r.stderr
    new_boot = sh(env, "w1", "cat /proc/sys/kernel/random/boot_id")
    assert new_boot != boot_id
    now = js(env, "snapshot", "list", "--kind", "template")
    assert len(now) == 1 and now[0]["id"] != templates[0]["id"] and now[0]["vm_name"] == "w1"

    env.run("vm", "create", "--warm", "--name", "w2", *args, check=True, timeout=300)
    assert sh(env, "w2", "cat /proc/sys/kernel/random/boot_id") == new_boot
    console = Path(js(env, "vm", "show", "w2")["console_log"]).read_text(errors="replace")
    assert "Linux version" not in console  # no kernel booted in it
    assert sh(env, "w2", "hostname") == "w2"

    # the template is in use: image warm --rm keeps it, then removes it
    r = env.run("image", "warm", "--rm", check=True)
    assert "kept (VMs stand on it)" in r.stderr
    env.run("vm", "delete", "w1", "w2", "--force", check=True, timeout=120)
    assert now[0]["name"] in env.run("image", "warm", "--rm", check=True).stdout
    assert js(env, "snapshot", "list", "--kind", "template") == []


def _kill_mid_snapshot(env, vm: str, name: str, victim) -> tuple[subprocess.CompletedProcess, bool]:
    """Start `vm snapshot`, kill ``victim()``'s pid while the snapshot is being written
    (its staging dir exists); the CLI's result, and whether the kill landed mid-way."""
    staging = env.state_dir / "snapshots"
    pid = victim()  # before the snapshot starts: a small guest's is written before a `vm show` returns
    p = subprocess.Popen(
        [BANGER, "vm", "snapshot", vm, "--name", name], env=env.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    mid = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None:
        if staging.is_dir() and any(".staging-" in d.name for d in staging.iterdir()):
            os.kill(pid, signal.SIGKILL)
            mid = True
            break
        time.sleep(0.001)
    out, err = p.communicate(timeout=120)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err), mid


def test_a_daemon_killed_mid_snapshot_leaves_the_vm_running_and_no_snapshot(env):
    known = set(snapshot_dirs(env))
    r, mid = _kill_mid_snapshot(env, SRC, "crash1", lambda: env.daemon_pid())
    assert mid and r.returncode != 0
    # the next daemon resumes the guest the dead one left paused, and sweeps the partial snapshot
    vms = {v["name"]: v for v in js(env, "vm", "list")}
    assert vms[SRC]["state"] == "running"
    first = count(env, SRC)
    time.sleep(1.5)
    assert count(env, SRC) > first  # the guest runs again
    assert "crash1" not in [s["name"] for s in js(env, "snapshot", "list")]
    assert set(snapshot_dirs(env)) == known


def test_a_vmm_killed_mid_snapshot_leaves_no_snapshot_and_a_vm_that_starts(env):
    known = set(snapshot_dirs(env))
    r, mid = _kill_mid_snapshot(env, "r2", "crash2", lambda: js(env, "vm", "show", "r2")["pid"])
    assert mid and r.returncode != 0 and r.stderr.strip()
    assert "crash2" not in [s["name"] for s in js(env, "snapshot", "list")]
    assert set(snapshot_dirs(env)) == known
    wait_for(lambda: js(env, "vm", "show", "r2")["state"] == "stopped", timeout=30, interval=0.5)
    env.run("vm", "start", "r2", check=True, timeout=LONG)  # a boot: its memory went with its VMM
    assert sh(env, "r2", "cat /root/before") == "before"


def test_a_snapshot_with_stop_leaves_the_source_stopped(env):
    shown = js(env, "vm", "snapshot", SRC, "--name", "s2", "--stop")
    assert shown["vm"]["state"] == "stopped" and js(env, "vm", "show", SRC)["pid"] is None
    js(env, "vm", "restore", "s2", "--name", "r3")
    assert sh(env, "r3", "cat /root/after") == "after"  # written after s1, before s2
    assert sh(env, "r3", f"kill -0 {env.counter_pid} && echo alive") == "alive"
    env.run("vm", "delete", "r3", "--force", check=True, timeout=120)
    env.run("snapshot", "delete", "s2", check=True)


def test_deleting_every_vm_and_snapshot_leaves_nothing(env):
    for vm in js(env, "vm", "list"):
        env.run("vm", "delete", vm["name"], "--force", check=True, timeout=120)
    # s1's disk layer is an overlay of the image's rootfs: the image stays while s1 does
    image = js(env, "snapshot", "show", "s1")["image"]
    r = env.run("image", "delete", image)
    assert r.returncode != 0 and "under snapshot(s) s1" in r.stderr, r.stderr
    env.run("snapshot", "delete", "s1", check=True)
    assert js(env, "snapshot", "list") == [] and js(env, "vm", "list") == []
    assert snapshot_dirs(env) == []
    assert list((env.state_dir / "vms").iterdir()) == []
    assert not list(env.runtime_dir.glob("fc/*"))
