"""The agent in a real VM: `vm create` returns once the agent answers, `vm exec` runs
commands with their streams and statuses, sessions run at once, and a killed CLI or
daemon leaves no guest process and no broken VM.

One VM (the default Debian image, whose build carries the agent launcher) for the
module, plus one short boot that must fail. The shared test cache keeps the image
build across runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time

import pytest

import guest_assets as ga
from banger_guest import protocol as P
from conftest import BANGER, isolated_env, pid_alive, wait_for

VM = "agentvm"
LONG = 1500


@pytest.fixture(scope="module")
def env():
    with isolated_env() as e:
        e.extra_env["BANGER_CACHE_DIR"] = str(ga.default_cache_dir() / "banger-cache")
        e.write_config("[vmm]\naccel = 'tcg'\nstop_timeout_s = 60\n")
        e.run("vm", "create", "--name", VM, "--vcpu", "1", "--memory", "1G", check=True, timeout=LONG)
        yield e
        e.run("vm", "delete", VM, "--force", timeout=120)


def ex(env, *argv: str, stdin: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BANGER, "vm", "exec", VM, "--", *argv], input=stdin, env=env.env(), capture_output=True, timeout=timeout
    )


def test_the_first_exec_after_create_succeeds_with_no_retry(env):
    r = ex(env, "true")
    assert r.returncode == 0, r.stderr


def test_identity_and_health(env):
    assert ex(env, "hostname").stdout.decode().strip() == VM
    assert f"\t{VM}" in ex(env, "cat", "/etc/hosts").stdout.decode()
    h = json.loads(env.run("vm", "health", VM, "--json", check=True).stdout)
    assert h["vm"] == VM and h["version"] == P.VERSION and h["uptime"] > 0 and h["build"]["banger"]
    assert {"commit", "build_time", "disk"} <= set(h["build"])  # the banger build that made the agent disk
    shown = json.loads(env.run("version", "--json", check=True).stdout)["build"]
    assert shown["version"] == h["build"]["banger"] and "commit" in shown
    assert "Linux" in ex(env, "uname", "-a").stdout.decode()


def test_statuses(env):
    assert ex(env, "sh", "-c", "exit 42").returncode == 42
    assert ex(env, "sh", "-c", "kill -TERM $$").returncode == 143
    r = ex(env, "no-such-command")
    assert r.returncode == 127 and b"no-such-command" in r.stderr


def test_argv_and_streams_arrive_intact(env):
    weird = ["a b", "'q'", '"dq"', "$HOME", "*", "", "line\nbreak", "ünïcødé ✓"]
    r = ex(env, "python3", "-c", "import sys, json; print(json.dumps(sys.argv[1:]))", *weird)
    assert r.returncode == 0 and json.loads(r.stdout) == weird, r.stderr
    assert ex(env, "cat", stdin=b"hi\n").stdout == b"hi\n"
    data = os.urandom(1 << 20)
    r = ex(env, "cat", stdin=data, timeout=300)
    assert r.returncode == 0 and hashlib.sha256(r.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
    r = ex(env, "sh", "-c", "echo out; echo err >&2", "-w")
    assert (r.stdout, r.stderr) == (b"out\n", b"err\n")


def test_eight_execs_run_at_once(env):
    """Each creates a file and waits until all 8 exist: a serial implementation cannot pass."""
    assert ex(env, "mkdir", "-p", "/tmp/eight").returncode == 0
    script = "touch /tmp/eight/$0; i=0; while [ $(ls /tmp/eight | wc -l) -lt 8 ]; do i=$((i+1)); [ $i -gt 600 ] && exit 9; sleep 0.1; done"
    procs = [
        subprocess.Popen([BANGER, "vm", "exec", VM, "--", "sh", "-c", script, f"f{i}"], env=env.env(), stderr=subprocess.PIPE)
        for i in range(8)
    ]
    assert [p.wait(timeout=180) for p in procs] == [0] * 8


# (the Debian minbase image has no procps: read /proc)
SLEEPERS = """
import os
for p in os.listdir("/proc"):
    try:
        argv = open(f"/proc/{p}/cmdline", "rb").read().split(b"\\0")
    except OSError:
        continue
    if argv[:1] == [b"sleep"] and argv[1:2] in ([b"300"], [b"301"]):
        print(p)
"""


def guest_sleepers(env) -> list[str]:
    return ex(env, "python3", "-c", SLEEPERS).stdout.decode().split()


def test_killing_the_cli_kills_the_guest_process_group(env):
    p = subprocess.Popen([BANGER, "vm", "exec", VM, "--", "sh", "-c", "sleep 300 & sleep 301"], env=env.env())
    wait_for(lambda: len(guest_sleepers(env)) == 2, timeout=60, interval=0.5)
    p.kill()
    p.wait()
    t = time.monotonic()
    wait_for(lambda: guest_sleepers(env) == [], timeout=10, interval=0.3)  # the background child too
    assert time.monotonic() - t < 5 + 1


def test_killing_the_daemon_mid_exec_leaves_the_vm_running(env):
    p = subprocess.Popen([BANGER, "vm", "exec", VM, "--", "sleep", "300"], env=env.env(), stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(guest_sleepers(env)) == 1, timeout=60, interval=0.5)
    pid = int((env.runtime_dir / "bangerd.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    _out, err = p.communicate(timeout=60)
    assert p.returncode == 255 and "daemon went away" in err, err
    assert not pid_alive(pid)
    r = ex(env, "echo", "still here")  # a new daemon, a new channel: the VM never stopped
    assert r.returncode == 0 and r.stdout == b"still here\n", r.stderr
    wait_for(lambda: guest_sleepers(env) == [], timeout=10, interval=0.3)  # the old session's command is gone


def test_vm_run_rm_runs_a_command_in_a_fresh_vm_and_leaves_nothing(env):
    r = subprocess.run(
        [BANGER, "vm", "run", "--rm", "--name", "once", "--vcpu", "1", "--memory", "512M", "--", "sh", "-c", "uname -s; exit 7"],
        env=env.env(),
        capture_output=True,
        text=True,
        timeout=LONG,
    )
    assert r.returncode == 7 and r.stdout == "Linux\n", r.stderr  # stdout is the command's alone
    assert "spec:" in r.stderr and "ran in" in r.stderr.splitlines()[-1]
    assert [v["name"] for v in json.loads(env.run("vm", "list", "--json", check=True).stdout)] == [VM]
    assert sorted(p.name for p in (env.state_dir / "vms").iterdir()) == [
        json.loads(env.run("vm", "show", VM, "--json", check=True).stdout)["id"]
    ]
    for args in (["-d", "--rm"], ["-d", "--", "true"]):  # refused before any VM exists
        r = env.run("vm", "run", *args)
        assert r.returncode == 1 and "-d leaves the VM running" in r.stderr, r.stderr


def test_an_ephemeral_vm_whose_daemon_died_is_deleted_by_the_next(env):
    """`vm run --rm`'s intent is durable: the daemon killed mid-run, the next one deletes
    the VM when it reconciles."""
    p = subprocess.Popen(
        [BANGER, "vm", "run", "--rm", "--name", "orphan", "--vcpu", "1", "--memory", "512M", "--", "sleep", "300"],
        env=env.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: "orphan" in [v["name"] for v in json.loads(env.run("vm", "list", "--json", check=True).stdout)], timeout=120)
    shown = json.loads(env.run("vm", "show", "orphan", "--json", check=True).stdout)
    assert shown["ephemeral"] is True
    os.kill(int((env.runtime_dir / "bangerd.pid").read_text()), signal.SIGKILL)
    p.wait(timeout=60)
    names = [v["name"] for v in json.loads(env.run("vm", "list", "--json", check=True).stdout)]  # a new daemon
    assert names == [VM]
    wait_for(lambda: subprocess.run(["pgrep", "-f", f"banger-{shown['id']}"], capture_output=True).stdout == b"", timeout=30)
    assert not (env.state_dir / "vms" / shown["id"]).exists()
    log = (env.state_dir / "bangerd.log").read_text()
    assert "'deleted': ['orphan']" in log, log[-2000:]


def test_graceful_stop_saves_what_only_the_agents_sync_can(env):
    """The guest writes 2,000 files without syncing and its own shutdown is made to hang
    (poweroff, reboot and Ctrl-Alt-Del masked): `vm stop` with a 2 s stop timeout ends in
    SIGKILL, yet after `vm start` every file is there: the agent synced first."""
    mask = "systemctl mask --runtime poweroff.target reboot.target ctrl-alt-del.target halt.target >/dev/null 2>&1"
    write = "mkdir -p /root/many && i=0; while [ $i -lt 2000 ]; do echo $i > /root/many/$i; i=$((i+1)); done"
    assert ex(env, "sh", "-c", f"{mask}; {write}").returncode == 0
    env.write_config("[vmm]\naccel = 'tcg'\nstop_timeout_s = 2\n")
    try:
        env.run("vm", "stop", VM, check=True, timeout=120)
    finally:
        env.write_config("[vmm]\naccel = 'tcg'\nstop_timeout_s = 60\n")
    log = (env.state_dir / "bangerd.log").read_text()
    assert f'"msg": "VM {VM}: killed"' in log, log[-3000:]  # the guest's own shutdown never came
    env.run("vm", "start", VM, check=True, timeout=LONG)
    r = ex(env, "sh", "-c", "ls /root/many | wc -l; cat /root/many/1999")
    assert r.stdout.split() == [b"2000", b"1999"], r.stdout


def test_exec_on_a_stopped_vm_is_refused(env):
    env.run("vm", "stop", VM, check=True, timeout=120)
    r = ex(env, "true")
    assert r.returncode == 1 and f"VM {VM} is stopped: start it first" in r.stderr.decode()


def test_an_agent_that_never_answers_fails_create_naming_the_console_log(env):
    """The agent's deadline (3 s here, before the guest is up) fails `vm create`, naming
    the console log, and the failed VM leaves nothing behind."""
    env.write_config("[vmm]\naccel = 'tcg'\n[agent]\nwait_timeout_s = 3\n")
    try:
        r = env.run("vm", "create", "--name", "noagent", "--vcpu", "1", "--memory", "512M", timeout=300)
        assert r.returncode == 1
        assert "the guest agent did not answer within 3s" in r.stderr and "console.log" in r.stderr, r.stderr
        names = [v["name"] for v in json.loads(env.run("vm", "list", "--json", check=True).stdout)]
        assert names == [VM]
        assert subprocess.run(["pgrep", "-f", "banger-.*noagent"], capture_output=True).stdout == b""
    finally:
        env.write_config("[vmm]\naccel = 'tcg'\nstop_timeout_s = 60\n")
