"""bangerd through its socket and the CLI: start on demand, survive bad input, typed errors."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys

import pytest

from banger_core import PROTOCOL_VERSION, __version__
from conftest import BANGER, pid_alive, recv_lines, wait_for


def raw(benv, payload: bytes, shutdown: bool = True, timeout: float = 10) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(benv.socket))
    s.sendall(payload)
    if shutdown:
        s.shutdown(socket.SHUT_WR)
    data = recv_lines(s)
    s.close()
    return json.loads(data)


def request(method: str, params=None, v=PROTOCOL_VERSION, op_id="op-0123456789ab") -> bytes:
    return json.dumps({"v": v, "method": method, "params": params or {}, "op_id": op_id}).encode() + b"\n"


@pytest.fixture
def daemon(benv):
    r = benv.run("daemon", "start", check=True)
    assert "running" in r.stdout
    return benv


def test_started_on_demand_owner_only(benv):
    assert "not running" in benv.run("daemon", "status", check=True).stdout
    benv.run("daemon", "start", check=True)
    pid = benv.daemon_pid()
    assert pid and pid_alive(pid)
    assert stat.S_IMODE(os.stat(benv.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(benv.runtime_dir).st_mode) == 0o700
    st = json.loads(benv.run("daemon", "status", "--json", check=True).stdout)
    assert st["running"] and st["pid"] == pid and st["version"] == __version__
    from banger_core.builtin import BUILTIN

    builtins = [name for name, _module in BUILTIN]
    assert st["plugins"][: len(builtins)] == builtins and st["plugins"][len(builtins)] == "agent"
    assert "daemon.hello" in st["methods"]
    assert benv.run("daemon", "socket", check=True).stdout.strip() == str(benv.socket)
    v = json.loads(benv.run("version", "--json", check=True).stdout)
    assert (v["cli"], v["daemon"]) == (__version__, __version__)
    assert v["build"]["version"] == __version__ and set(v["build"]) == {"version", "commit", "build_time"}
    assert st["build"] == v["build"]  # daemon status shows the same build


def test_the_daemon_does_not_import_banger_from_the_clis_directory(benv, tmp_path):
    """`python -m` puts the cwd first on sys.path: a banger checkout (or anything named
    banger_core) where the CLI runs must not become the daemon's code."""
    (tmp_path / "banger_core").mkdir()
    (tmp_path / "banger_core" / "__init__.py").write_text("raise ImportError('banger_core imported from the cwd')\n")
    r = subprocess.run(
        [BANGER, "image", "list"],
        env=benv.env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "imported from the cwd" not in (benv.state_dir / "bangerd.stderr").read_text()


def test_stop_is_idempotent_and_cleans_up(daemon):
    pid = daemon.daemon_pid()
    assert f"stopped (pid {pid})" in daemon.run("daemon", "stop", check=True).stdout
    assert not pid_alive(pid)
    assert not daemon.socket.exists() and not (daemon.runtime_dir / "bangerd.pid").exists()
    assert "not running" in daemon.run("daemon", "stop", check=True).stdout


def test_kill_9_then_cli_just_works(daemon):
    pid = daemon.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid))
    assert daemon.socket.exists()  # stale socket left behind by the crash
    assert "not running" in daemon.run("daemon", "status", check=True).stdout
    r = daemon.run("daemon", "start", check=True)
    new = daemon.daemon_pid()
    assert new != pid and pid_alive(new) and f"pid {new}" in r.stdout
    assert json.loads(daemon.run("daemon", "status", "--json", check=True).stdout)["pid"] == new


def test_concurrent_cli_starts_make_one_daemon(benv):
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "banger_core.cli.entry", "daemon", "start"],
            env=benv.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    pids = {o[0].strip().rsplit(" ", 1)[-1] for o in outs}
    assert len(pids) == 1 and pids == {str(benv.daemon_pid())}


BAD_INPUTS = {
    "random bytes": (os.urandom(64).replace(b"\n", b"x") + b"\n", "bad_request", "not valid JSON"),
    "random bytes no newline": (b"\x00\xff\xfe garbage", "bad_request", "truncated frame"),
    "truncated frame": (request("daemon.hello")[:20], "bad_request", "truncated frame: 20 bytes"),
    "not an object": (b"[1, 2, 3]\n", "bad_request", "request must be a JSON object"),
    "no method": (f'{{"v": {PROTOCOL_VERSION}}}\n'.encode(), "bad_request", "request has no method"),
    "wrong version": (request("daemon.hello", v=99), "bad_version", "protocol version 99 not supported"),
    "unknown method": (request("vm.teleport"), "unknown_method", "unknown method 'vm.teleport'"),
    "params not object": (
        json.dumps({"v": PROTOCOL_VERSION, "method": "daemon.hello", "params": [1]}).encode() + b"\n",
        "bad_request",
        "params must be a JSON object",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_typed_error_and_daemon_stays_up(daemon, case):
    payload, code, text = BAD_INPUTS[case]
    pid = daemon.daemon_pid()
    reply = raw(daemon, payload)
    assert reply["ok"] is False
    err = reply["error"]
    assert err["code"] == code and text in err["message"]
    assert err["op_id"] and err["op_id"].startswith("op-") and reply["op_id"] == err["op_id"]
    ok = raw(daemon, request("daemon.hello"))
    assert ok["ok"] and ok["result"]["pid"] == pid and ok["op_id"] == "op-0123456789ab"


MIB = 1024 * 1024


def test_request_frames_are_bounded_at_1_mib(daemon):
    # Without a newline: refused once 1 MiB is buffered, not after 16.
    reply = raw(daemon, b"x" * (MIB + 10), shutdown=False)
    assert reply["error"]["code"] == "bad_request" and f"exceeds {MIB} bytes" in reply["error"]["message"]
    # A complete, valid frame just over the bound is refused too.
    reply = raw(daemon, request("daemon.hello", {"pad": "x" * MIB}), shutdown=False)
    assert reply["error"]["code"] == "bad_request" and f"exceeds {MIB} bytes" in reply["error"]["message"]
    # Just under it is read and answered (here: unknown method, its name echoed clipped).
    name = "m" * (MIB - 100)
    reply = raw(daemon, request(name), shutdown=False)
    assert reply["error"]["code"] == "unknown_method"
    assert len(reply["error"]["message"]) < 2048 and "daemon.hello" in reply["error"]["details"]["known"]
    assert raw(daemon, request("daemon.hello"))["ok"]


def _nest(depth: int, inner: bytes = b"1") -> bytes:
    return b'{"a":' * depth + inner + b"}" * depth


DEEP = {
    "array 100k deep": b"[" * 100_000 + b"]" * 100_000 + b"\n",
    "unclosed array 100k deep": b"[" * 100_000 + b"\n",
    "params 50k deep": b'{"v":1,"method":"daemon.hello","params":' + _nest(50_000) + b"}\n",
    "params 500 deep": b'{"v":1,"method":"daemon.hello","params":' + _nest(500) + b"}\n",
    "method 900 deep": b'{"v":1,"method":' + b"[" * 900 + b"]" * 900 + b"}\n",
}


@pytest.mark.parametrize("case", sorted(DEEP))
def test_deeply_nested_frames_get_a_typed_reply(daemon, case):
    reply = raw(daemon, DEEP[case], shutdown=False)
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
    assert "nest" in reply["error"]["message"] or "not valid JSON" in reply["error"]["message"]
    assert raw(daemon, request("daemon.hello"))["ok"]
    log = (daemon.state_dir / "bangerd.log").read_text()
    assert "RecursionError" not in log and "Traceback" not in log


def test_logged_strings_are_clipped(daemon):
    log = daemon.state_dir / "bangerd.log"
    big = MIB - 1000
    frames = [
        request("m" * big),  # unknown method, name logged
        request("daemon.hello", v="v" * big),  # bad version, version echoed
        request("vm.show", {"ref": "r" * big}),  # not found, ref echoed by the handler
        request("vm.show", {"ref": "\x01" * (big // 7)}),  # each char 6 bytes once JSON-escaped
        request("vm.show", {"ref": "\u00e9" * (big // 7)}),
        request("vm.show", {"k" * (big // 2): 1}),  # an unknown key in the error's location
        request("vm.show", {f"k{i}": 1 for i in range(big // 16)}),  # thousands of errors
        json.dumps({"v": PROTOCOL_VERSION, "method": "daemon.hello", "params": {}, "op_id": "o" * big}).encode() + b"\n",
    ]
    before = log.stat().st_size
    for frame in frames:
        assert len(frame) <= MIB
        assert "ok" in raw(daemon, frame, shutdown=False)
    assert raw(daemon, request("daemon.hello"))["ok"]
    grown = log.stat().st_size - before
    lines = log.read_bytes().splitlines()
    assert max(len(ln) for ln in lines) <= 8192, sorted(len(ln) for ln in lines)[-5:]
    assert grown <= 4096 * len(frames), grown
    for ln in lines:
        json.loads(ln)  # still one JSON object per line


def _idle(benv) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(benv.socket))  # blocking: a full backlog waits rather than fails (EAGAIN)
    s.settimeout(15)
    return s


def _reply(s: socket.socket) -> dict:
    data = recv_lines(s)
    return json.loads(data)


def test_connections_are_bounded_beyond_that_busy(daemon):
    idle = [_idle(daemon) for _ in range(256)]
    try:
        # The 257th connection is refused with a typed error, not queued or dropped.
        reply = wait_for(lambda: (r := raw(daemon, request("daemon.hello"), shutdown=False))["ok"] is False and r, timeout=5)
        assert reply["error"]["code"] == "busy" and "256" in reply["error"]["message"]
        assert reply["op_id"].startswith("op-")  # refused unread: the op id is the daemon's
        for s in idle[:8]:
            s.close()
        assert wait_for(lambda: raw(daemon, request("daemon.hello"), shutdown=False)["ok"], timeout=5)
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: raw(daemon, request("daemon.status"))["result"]["inflight"] == 0)


@pytest.fixture
def xdaemon(benv, example_plugin_dir):
    benv.extra_path.append(str(example_plugin_dir))
    benv.run("daemon", "start", check=True)
    return benv


def test_first_request_line_has_a_deadline_streams_after_it_do_not(xdaemon, tmp_path):
    import time

    marker = tmp_path / "marker"
    t0 = time.monotonic()
    idle = _idle(xdaemon)
    slow = _idle(xdaemon)
    waiting = _idle(xdaemon)
    waiting.sendall(request("example.wait", {"marker": str(marker)}, op_id="op-abcabcabcabc"))
    wait_for(lambda: marker.exists() and marker.read_text().startswith("started"))
    # A client that trickles bytes without a newline is no better than a silent one.
    while time.monotonic() - t0 < 8:
        slow.sendall(b"{")
        time.sleep(0.5)
    for s in (idle, slow):
        reply = _reply(s)
        assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
        assert "no complete request within 10 s" in reply["error"]["message"]
        s.close()
    assert 9 < time.monotonic() - t0 < 14
    # The request that was read in time runs on: no reply, not cancelled.
    waiting.settimeout(1.0)
    with pytest.raises(socket.timeout):
        waiting.recv(1)
    assert marker.read_text().startswith("started")
    waiting.close()
    wait_for(lambda: marker.read_text().startswith("cancelled"))


def test_connect_and_leave_does_not_hurt(daemon):
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(daemon.socket))
        s.close()
    assert raw(daemon, request("daemon.hello"))["ok"]


def _connect_as(uid: int, path: str) -> str:
    """Connect to the socket from a child running as ``uid``; return what happened."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            try:
                s.connect(path)
                s.sendall(request("daemon.hello"))
                out = s.makefile("rb").readline().decode()
            except OSError as exc:
                out = f"oserror {exc.errno}"
            os.write(w, out.encode())
        except BaseException as exc:  # report, never escape the child
            os.write(w, f"child error {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        out = fh.read().decode()
    os.waitpid(pid, 0)
    return out


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_other_users_are_refused(daemon):
    import errno

    # The filesystem refuses first: runtime dir 0700, socket 0600.
    assert _connect_as(65533, str(daemon.socket)) == f"oserror {errno.EACCES}"
    # With the permissions opened up by mistake, SO_PEERCRED still refuses.
    for d in (daemon.root, daemon.runtime_dir):
        os.chmod(d, 0o755)
    os.chmod(daemon.socket, 0o666)
    try:
        reply = json.loads(_connect_as(65533, str(daemon.socket)))
    finally:
        os.chmod(daemon.socket, 0o600)
        for d in (daemon.root, daemon.runtime_dir):
            os.chmod(d, 0o700)
    assert reply["ok"] is False and reply["error"]["code"] == "unauthorized"
    assert "uid 65533 may not use the banger daemon of uid 0" in reply["error"]["message"]
    assert raw(daemon, request("daemon.hello"))["ok"]


def test_every_log_record_of_a_request_carries_its_op_id(daemon):
    op = "op-feedfacecafe"
    raw(daemon, request("daemon.status", op_id=op))
    raw(daemon, request("no.such", op_id="op-0badc0de0bad"))
    lines = [json.loads(ln) for ln in (daemon.state_dir / "bangerd.log").read_text().splitlines()]
    mine = [ln for ln in lines if ln["op_id"] == op]
    assert [m["msg"] for m in mine][0] == "request daemon.status"
    assert mine[-1]["msg"].startswith("request daemon.status ok")
    bad = [ln for ln in lines if ln["op_id"] == "op-0badc0de0bad"]
    assert bad and "unknown_method" in bad[-1]["msg"]
    # no request-scoped record without an op id
    assert not [ln for ln in lines if ln["msg"].startswith("request ") and not ln["op_id"]]


FAKE_OLD_DAEMON = r"""
import json, os, socket, sys
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen(8)
open(sys.argv[2], "w").write(str(os.getpid()))
while True:
    c, _ = s.accept()
    req = json.loads(c.makefile("rb").readline())
    if req["method"] == "daemon.hello":
        res = {"version": "0.0.1-old", "protocol": 1, "pid": os.getpid(), "fingerprint": "old"}
    else:
        res = {"pid": os.getpid()}
    c.sendall(json.dumps({"v": 1, "op_id": req["op_id"], "ok": True, "result": res}).encode() + b"\n")
    c.close()
    if req["method"] == "daemon.shutdown":
        os.unlink(path)
        sys.exit(0)
"""


# What a bangerd of protocol 1 (banger 0.1) does with this CLI's requests: refuses
# them all (bad_version) and exits on SIGTERM.
PROTOCOL_1_DAEMON = r"""
import json, os, signal, socket, sys
path, pidfile = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGTERM, lambda *_: (os.unlink(path), sys.exit(0)))
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen(8)
open(pidfile, "w").write(str(os.getpid()))
while True:
    c, _ = s.accept()
    req = json.loads(c.makefile("rb").readline())
    err = {"code": "bad_version", "message": f"protocol version {req['v']} not supported; this daemon speaks 1",
           "op_id": req["op_id"], "details": {}}
    c.sendall(json.dumps({"v": 1, "op_id": req["op_id"], "ok": False, "error": err}).encode() + b"\n")
    c.close()
"""


def test_a_daemon_of_another_protocol_is_replaced_by_any_command(benv, tmp_path):
    benv.runtime_dir.mkdir(parents=True, mode=0o700)
    script = tmp_path / "v1.py"
    script.write_text(PROTOCOL_1_DAEMON)
    old = subprocess.Popen([sys.executable, str(script), str(benv.socket), str(benv.runtime_dir / "bangerd.pid")])
    try:
        wait_for(lambda: benv.socket.exists() and benv.daemon_pid() == old.pid)
        d = benv.run("doctor")
        assert "WARN  daemon" in d.stdout and f"pid {old.pid} runs another protocol; replaced on next use" in d.stdout
        assert json.loads(benv.run("vm", "list", "--json", check=True).stdout) == []
        assert old.wait(timeout=30) == 0  # told to stop (SIGTERM), and did
        assert benv.daemon_pid() != old.pid and pid_alive(benv.daemon_pid())
    finally:
        old.kill()
        benv.stop_daemon()


def test_daemon_of_another_version_is_replaced(benv, tmp_path):
    benv.runtime_dir.mkdir(parents=True, mode=0o700)
    script = tmp_path / "old.py"
    script.write_text(FAKE_OLD_DAEMON)
    pidfile = tmp_path / "old.pid"
    old = subprocess.Popen([sys.executable, str(script), str(benv.socket), str(pidfile)])
    try:
        wait_for(lambda: benv.socket.exists() and pidfile.exists())
        assert json.loads(benv.run("version", "--json", check=True).stdout)["daemon"] == "0.0.1-old"
        r = benv.run("daemon", "start", check=True)
        assert old.wait(timeout=30) == 0  # asked to shut down, and did
        assert f"bangerd {__version__}: running" in r.stdout
        assert json.loads(benv.run("version", "--json", check=True).stdout)["daemon"] == __version__
    finally:
        old.kill()


def test_config_change_replaces_daemon(daemon):
    pid = daemon.daemon_pid()
    daemon.run("daemon", "start", check=True)
    assert daemon.daemon_pid() == pid  # same config: reused
    daemon.write_config("[daemon]\nlog_level = 'debug'\n")
    daemon.run("daemon", "start", check=True)
    new = daemon.daemon_pid()
    assert new != pid and not pid_alive(pid)


def test_bad_config_core_value_stops_start_plugin_value_is_reported(benv):
    # A bad plugin setting concerns that plugin only: the daemon runs, doctor names it.
    benv.write_config("[dns]\nport = 0\n")
    benv.run("daemon", "start", check=True)
    d = benv.run("doctor")
    assert d.returncode == 1
    assert re.search(
        rf"^FAIL +settings dns +{re.escape(str(benv.config_file))}: \[dns\] port: Input should be greater than or equal to 1",
        d.stdout,
        re.M,
    ), d.stdout
    assert "1 fail" in d.stdout
    # A bad core value: nothing can start, and the error says where.
    benv.write_config("[daemon]\nlog_level = 3\n")
    r = benv.run("daemon", "start")
    assert r.returncode == 1
    assert f"banger: {benv.config_file}: [daemon] log_level: Input should be" in r.stderr


def test_replies_the_client_reads_are_not_bound_by_the_request_limit(benv):
    """1 MiB bounds what the daemon reads; a reply or event line may be far longer."""
    import threading

    from banger_core.client import Client
    from banger_core.paths import Paths

    benv.runtime_dir.mkdir(parents=True, mode=0o700)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(benv.socket))
    server.listen(1)
    big = "z" * (5 * MIB)

    def serve() -> None:
        conn, _ = server.accept()
        req = json.loads(conn.makefile("rb").readline())
        for frame in ({"event": {"chunk": big}}, {"ok": True, "result": {"text": big}}):
            conn.sendall(json.dumps({"v": 1, "op_id": req["op_id"], **frame}).encode() + b"\n")
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    events: list[dict] = []
    client = Client(Paths.from_env(benv.env()))
    try:
        result = client.call("vm.logs", {"ref": "x"}, on_event=events.append, autostart=False)
    finally:
        t.join(10)
        server.close()
    assert result["text"] == big and events == [{"chunk": big}]


def test_a_request_from_a_cli_with_another_fingerprint_is_refused_before_it_runs(daemon):
    """The CLI sends its fingerprint with each request: one round trip when the daemon is
    current; a stale daemon refuses (running nothing) and the CLI replaces it."""
    pid = daemon.daemon_pid()
    req = json.loads(request("vm.prune"))
    req["fingerprint"] = "0000000000000000"
    reply = raw(daemon, json.dumps(req).encode() + b"\n")
    assert reply["error"]["code"] == "stale_daemon" and "replaces it" in reply["error"]["message"]
    assert daemon.daemon_pid() == pid and pid_alive(pid)
    daemon.write_config("[daemon]\nlog_level = 'info'\n")  # the CLI's fingerprint changes
    assert json.loads(daemon.run("vm", "list", "--json", check=True).stdout) == []
    assert daemon.daemon_pid() != pid and not pid_alive(pid)  # replaced on the first call
