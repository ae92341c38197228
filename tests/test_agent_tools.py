"""The agent's tools in a real VM, through the daemon and the CLI as a user runs them:
`vm exec -t` on a terminal, `vm run` opening a shell, `vm cp` both ways, `vm ports`
with endpoints from a plugin (the example plugin's `vm_port_endpoint`).

One VM (the default Debian image) for the module, and one `vm run --rm` boot. The CLI
runs on a pseudo-terminal the test owns, so the test sees what a user's terminal would:
the prompt, a resize, the exit status, and the terminal's settings afterwards.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

import guest_assets as ga
from conftest import BANGER, isolated_env
from test_agent_ops import SERVERS, _snapshot

VM = "toolsvm"
LONG = 1500


@pytest.fixture(scope="module")
def env(example_plugin_dir):
    with isolated_env() as e:
        e.extra_env["BANGER_CACHE_DIR"] = str(ga.default_cache_dir() / "banger-cache")
        e.extra_path.append(str(example_plugin_dir))
        e.write_config("[vmm]\naccel = 'tcg'\nstop_timeout_s = 60\n[example]\nport_host = 'example.test'\n")
        e.run("vm", "create", "--name", VM, "--vcpu", "1", "--memory", "1G", check=True, timeout=LONG)
        yield e
        e.run("vm", "delete", VM, "--force", timeout=120)


def banger(env, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([BANGER, *argv], env=env.env(), capture_output=True, text=True, timeout=timeout)


class Pty:
    """The CLI on a terminal of the test's own: the CLI leads a session whose
    controlling terminal is the pty, as in a user's shell."""

    def __init__(self, env, argv: list[str], rows: int = 24, cols: int = 80) -> None:
        self.master, self.slave = os.openpty()
        self.winsize(rows, cols)
        self.before = termios.tcgetattr(self.slave)
        self.proc = subprocess.Popen(
            argv,
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            env=env.env(),
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        self.seen = b""

    def winsize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))  # SIGWINCH to the CLI

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, needle: bytes, timeout: float = 60, poke: bytes | None = None) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {needle!r} in {self.seen[-2000:]!r}"
            if poke is not None:
                self.send(poke)
            ready, _, _ = select.select([self.master], [], [], 1.0 if poke else left)
            if ready:
                try:
                    self.seen += os.read(self.master, 65536)
                except OSError:  # EIO: the CLI exited and the terminal hung up
                    time.sleep(0.1)

    def wait(self, timeout: float = 60) -> int:
        rc = self.proc.wait(timeout=timeout)
        return rc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


def test_exec_t_gets_a_prompt_follows_a_resize_exits_with_the_shells_status_and_restores_the_terminal(env):
    t = Pty(env, [BANGER, "vm", "exec", "-t", "-e", "PS1=P> ", VM, "--", "sh", "-i"])
    try:
        t.expect(b"P> ")
        assert not termios.tcgetattr(t.slave)[3] & termios.ICANON  # raw while the command runs
        t.winsize(50, 132)
        t.expect(b"50 132", poke=b"stty size\n")  # the resize reached the guest's terminal
        t.send(b"exit 7\n")
        assert t.wait() == 7
        assert termios.tcgetattr(t.slave) == t.before  # the user's terminal is as it was
    finally:
        t.close()


def test_vm_run_with_no_command_on_a_terminal_opens_a_shell(env):
    t = Pty(env, [BANGER, "vm", "run", "--rm", "--name", "shellvm", "--vcpu", "1", "--memory", "1G"])
    try:
        t.expect(b"shellvm", timeout=LONG)  # bash's prompt names the host: the VM
        t.expect(b"# ")
        t.send(b"echo $((6 * 7)); exit 5\n")
        t.expect(b"42")
        assert t.wait(timeout=300) == 5
        assert termios.tcgetattr(t.slave) == t.before
    finally:
        t.close()
    assert "shellvm" not in banger(env, "vm", "list").stdout  # --rm: gone


def test_cp_round_trips_a_tree_with_a_100_mib_file(env, tmp_path):
    src = tmp_path / "tree"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    (src / "bin" / "tool").chmod(0o755)
    with open(src / "big.bin", "wb") as fh:
        for _ in range(100):
            fh.write(os.urandom(1 << 20))
    (src / "big.bin").chmod(0o640)
    (src / "private").write_text("key\n")
    (src / "private").chmod(0o600)
    (src / "current").symlink_to("bin")
    big_sha = hashlib.sha256((src / "big.bin").read_bytes()).hexdigest()

    r = banger(env, "vm", "cp", str(src), f"{VM}:/root/")
    assert r.returncode == 0, r.stderr
    assert "copied 6 entries, 100.0 MiB" in r.stderr
    r = banger(
        env,
        "vm",
        "exec",
        VM,
        "--",
        "sh",
        "-c",
        "cd /root/tree && sha256sum big.bin && stat -c '%a %n' bin/tool big.bin private && readlink current",
    )
    assert r.stdout.split() == [big_sha, "big.bin", "755", "bin/tool", "640", "big.bin", "600", "private", "bin"], r.stdout

    out = tmp_path / "back"
    r = banger(env, "vm", "cp", f"{VM}:/root/tree", str(out))  # out does not exist: the tree becomes it
    assert r.returncode == 0, r.stderr
    assert _snapshot(out) == _snapshot(src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "tree"]  # no staging left

    r = banger(env, "vm", "cp", f"{VM}:/root/nope", str(tmp_path))
    assert r.returncode == 1 and "/root/nope: no such file or directory in the VM" in r.stderr
    r = banger(env, "vm", "cp", str(tmp_path / "nope"), f"{VM}:/root/")
    assert r.returncode == 1 and f"{tmp_path / 'nope'}: no such file or directory on this host" in r.stderr
    r = banger(env, "vm", "cp", str(src), f"{VM}:/no/such/dir/x")
    assert r.returncode == 1 and "/no/such/dir: no such directory in the VM" in r.stderr
    r = banger(env, "vm", "cp", str(src), str(tmp_path / "x"))
    assert r.returncode == 1 and "name the VM on exactly one side" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "tree"]


def test_ports_lists_listeners_with_schemes_and_endpoints_from_a_plugin(env, tmp_path):
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
        + ["-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
        check=True,
        capture_output=True,
    )
    assert banger(env, "vm", "exec", VM, "--", "mkdir", "-p", "/root/tls").returncode == 0
    for f in ("key.pem", "cert.pem"):
        assert banger(env, "vm", "cp", str(tmp_path / f), f"{VM}:/root/tls/").returncode == 0
    servers = subprocess.Popen(
        [BANGER, "vm", "exec", VM, "--", "python3", "-c", SERVERS, "/root/tls/cert.pem", "/root/tls/key.pem"],
        env=env.env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert servers.stdout is not None and servers.stdout.readline() == b"ready\n"
        r = banger(env, "vm", "ports", VM, "--json")
        assert r.returncode == 0, r.stderr
        got = {(d["proto"], d["port"]): d for d in json.loads(r.stdout)}
        assert {("tcp", 22), ("tcp", 7000), ("tcp", 8080), ("tcp", 8443), ("tcp", 9000), ("udp", 5353)} <= set(got)
        assert [k for k in json.loads(r.stdout) if k["port"] == 9000] == [got[("tcp", 9000)]]  # both wildcards: once
        assert got[("tcp", 9000)]["family"] == "4+6"
        assert got[("tcp", 8080)]["scheme"] == "http" and got[("tcp", 8443)]["scheme"] == "https"
        assert got[("tcp", 22)]["process"] == "sshd" and got[("tcp", 22)]["scheme"] == ""
        # endpoints: the example plugin reaches TCP on a wildcard; nothing reaches loopback or UDP
        assert (got[("tcp", 8443)]["endpoint"], got[("tcp", 8443)]["via"]) == ("example.test:8443", "example")
        assert (got[("tcp", 7000)]["endpoint"], got[("tcp", 7000)]["via"]) == ("guest:7000", "")
        assert got[("udp", 5353)]["endpoint"] == "guest:5353"

        table = banger(env, "vm", "ports", VM).stdout.splitlines()
        assert table[0].split() == ["PROTO", "ENDPOINT", "PROCESS", "COMMAND"]
        https = next(line for line in table if "8443" in line).split()
        assert https[:2] == ["https", "example.test:8443"] and https[2].startswith("python3[")
    finally:
        servers.kill()
        servers.wait(timeout=30)


def test_exec_t_forces_a_terminal_without_one_and_user_runs_as_that_user(env):
    r = subprocess.run(
        [BANGER, "vm", "exec", "-t", VM, "--", "sh", "-c", "read x; tty; echo got $x; exit 4"],
        env=env.env(),
        input=b"word\n",
        capture_output=True,
        timeout=120,
    )
    assert r.returncode == 4 and b"/dev/pts/" in r.stdout and b"got word" in r.stdout, r
    r = subprocess.run(
        [BANGER, "vm", "exec", "-u", "nobody", VM, "--", "id", "-un"], env=env.env(), capture_output=True, timeout=120
    )
    assert (r.returncode, r.stdout) == (0, b"nobody\n"), r


def test_the_terminal_is_restored_when_the_daemon_dies_mid_session(env):
    t = Pty(env, [BANGER, "vm", "exec", "-t", "-e", "PS1=Q> ", VM, "--", "sh", "-i"])
    try:
        t.expect(b"Q> ")
        assert not termios.tcgetattr(t.slave)[3] & termios.ICANON
        pid = env.daemon_pid()
        assert pid
        os.kill(pid, 9)
        assert t.wait() == 255
        t.expect(b"daemon went away")
        assert termios.tcgetattr(t.slave) == t.before
    finally:
        t.close()
    r = banger(env, "vm", "exec", VM, "--", "echo", "back")  # a new daemon; the VM never stopped
    assert (r.returncode, r.stdout) == (0, "back\n"), r.stderr


def test_pause_freezes_the_guest_and_resume_continues_it(env):
    from banger_core.paths import VMFiles
    from banger_core.vmm.qmp import QMP

    vm = json.loads(banger(env, "vm", "show", VM, "--json").stdout)
    qmp = str(VMFiles(Path(vm["dir"])).qmp_socket)
    r = banger(env, "vm", "pause", VM)
    assert r.returncode == 0 and f"{VM}: paused" in r.stdout, r.stderr
    with QMP(qmp) as q:
        assert q.execute("query-status")["status"] == "paused"  # the VMM's own view: vCPUs stopped
    r = banger(env, "vm", "exec", VM, "--", "true")
    assert r.returncode == 1 and f"VM {VM} is paused: resume it first (banger vm resume {VM})" in r.stderr
    r = banger(env, "vm", "resume", VM)
    assert r.returncode == 0 and f"{VM}: running" in r.stdout, r.stderr
    with QMP(qmp) as q:
        assert q.execute("query-status")["status"] == "running"
    r = banger(env, "vm", "exec", VM, "--", "echo", "alive")  # the agent's channel lived through it
    assert (r.returncode, r.stdout) == (0, "alive\n"), r.stderr
