"""The agent's terminal sessions, copies, port listing and backpressure, over a
socketpair with the real agent process and the real host channel (no VM: the booting
tests in test_agent_tools.py take these through the daemon and CLI).

The agent runs in a network namespace of its own (``unshare -n``), so the listeners
it reports are the ones these tests open there, and nothing listens on the host.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from banger_guest import protocol as P
from banger_guest import transfer
from test_agent_channel import connect

GUEST = Path(__file__).resolve().parent.parent / "guest"


@pytest.fixture
def agent():
    """An agent in a fresh network namespace (loopback up) serving one end of a
    socketpair; yields (host end, the agent's pid)."""
    host, guest = socket.socketpair()
    env = {**os.environ, "BANGER_AGENT_FD": str(guest.fileno()), "PYTHONPATH": str(GUEST)}
    script = "ip link set lo up && exec " + sys.executable + " -m banger_guest.agent"
    proc = subprocess.Popen(["unshare", "-n", "sh", "-c", script], pass_fds=[guest.fileno()], env=env)
    guest.close()
    try:
        yield host, proc.pid
    finally:
        host.close()
        proc.kill()
        proc.wait(timeout=10)


async def collect(s, timeout: float = 60) -> tuple[int, bytes, bytes, str]:
    """Everything a session sends: (status, stdout, stderr, error message)."""
    out, err = bytearray(), bytearray()
    deadline = time.monotonic() + timeout
    while True:
        try:
            f = await asyncio.wait_for(s.next(), max(0.1, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise AssertionError(
                f"no end of session {s.sid} in {timeout}s: stdout {bytes(out)[-500:]!r} stderr {bytes(err)[-500:]!r}"
            ) from None
        if f.kind == P.STDOUT:
            out += f.payload
        elif f.kind == P.STDERR:
            err += f.payload
        elif f.kind == P.EXIT:
            return f.obj()["status"], bytes(out), bytes(err), ""
        elif f.kind == P.ERROR:
            return f.obj().get("status", 255), bytes(out), bytes(err), f.obj()["message"]


async def read_until(s, needle: bytes, seen: bytearray, timeout: float = 10, count: int = 1) -> None:
    """Read the session's output into ``seen`` until it holds ``count`` ``needle``s."""
    deadline = time.monotonic() + timeout
    while seen.count(needle) < count:
        try:
            f = await asyncio.wait_for(s.next(), max(0.1, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise AssertionError(f"no {needle!r} (x{count}) in {timeout}s: {bytes(seen)[-500:]!r}") from None
        assert f.kind == P.STDOUT, f
        seen += f.payload


def test_a_terminal_session_has_its_size_follows_resizes_and_exits_with_its_status(agent):
    host, _pid = agent

    async def main():
        ch = await connect(host)
        s = await ch.open(
            {
                "op": "exec",
                "argv": ["sh", "-c", "tty; stty size; echo TERM=$TERM; exit 7"],
                "tty": {"rows": 30, "cols": 101, "term": "vt100"},
            }
        )
        status, out, err, _ = await collect(s)
        assert status == 7 and err == b""  # on a terminal everything comes on stdout
        assert out.splitlines()[0].startswith(b"/dev/pts/") and b"30 101\r\n" in out and b"TERM=vt100" in out

        s = await ch.open({"op": "exec", "argv": ["sh", "-i"], "tty": {"rows": 24, "cols": 80}, "env": {"PS1": "PROMPT> "}})
        seen = bytearray()
        await read_until(s, b"PROMPT> ", seen)
        await s.resize(41, 132)
        await s.stdin(b"stty size\n")
        await read_until(s, b"41 132\r\nPROMPT> ", seen)
        prompts = seen.count(b"PROMPT> ")
        await s.stdin(b"\x03")  # Ctrl-C reaches the shell as a terminal's interrupt, not as banger's
        # its new prompt first: what is typed before the shell handles the interrupt is
        # flushed with the line, as on any terminal
        await read_until(s, b"PROMPT> ", seen, count=prompts + 1)
        await s.stdin(b"exit 3\n")
        status, *_ = await collect(s)
        assert status == 3
        await ch.close()

    asyncio.run(main())


def _tree(root: Path) -> Path:
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "exec.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "exec.sh").chmod(0o750)
    (root / "secret").write_bytes(bytes(range(256)) * 1000)
    (root / "secret").chmod(0o600)
    (root / "sub" / "deep" / "empty").write_bytes(b"")
    (root / "sub").chmod(0o711)
    (root / "link").symlink_to("sub/deep")
    return root


def _snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        kind = "link:" + os.readlink(p) if p.is_symlink() else "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        out[str(p.relative_to(root))] = (kind, oct(st.st_mode & 0o7777))
    return out


def test_cp_out_and_in_round_trip_a_tree_with_modes_and_bytes_intact(agent, tmp_path):
    host, _pid = agent
    src = _tree(tmp_path / "src")

    async def main():
        ch = await connect(host)
        # out: the tree as a tar stream, extracted here as `back`
        s = await ch.open({"op": "cp_out", "path": str(src)})
        status, stream, err, msg = await collect(s)
        assert (status, err, msg) == (0, b"", "")
        (tmp_path / "out").mkdir()
        transfer.tar_in(io.BytesIO(stream), str(tmp_path / "out"), "back")
        assert _snapshot(tmp_path / "out" / "back") == _snapshot(src)

        # in: a tar stream written to the session's stdin lands at dest (renamed), whole
        buf = io.BytesIO()
        transfer.tar_out(str(src), buf)
        (tmp_path / "in").mkdir()
        s = await ch.open({"op": "cp_in", "dest": str(tmp_path / "in" / "copy")})
        await s.stdin(buf.getvalue())
        await s.stdin_eof()
        assert (await collect(s))[0] == 0
        assert _snapshot(tmp_path / "in" / "copy") == _snapshot(src)
        assert [p.name for p in (tmp_path / "in").iterdir()] == ["copy"]  # no staging left

        # a missing path on either side: an error naming it, nothing written
        s = await ch.open({"op": "cp_out", "path": str(tmp_path / "nope")})
        status, _, _, msg = await collect(s)
        assert status == 1 and msg == f"{tmp_path / 'nope'}: no such file or directory in the VM"
        s = await ch.open({"op": "cp_in", "dest": str(tmp_path / "missing" / "x")})
        status, _, _, msg = await collect(s)
        assert status == 1 and msg.startswith(f"{tmp_path / 'missing'}: no such directory in the VM")

        # a stream cut short: the copy fails, and nothing half-written is left
        s = await ch.open({"op": "cp_in", "dest": str(tmp_path / "in" / "cut")})
        await s.stdin(buf.getvalue()[: len(buf.getvalue()) // 2])
        await s.stdin_eof()
        status, _, err, _ = await collect(s)
        assert status != 0 and b"cp_in" in err
        assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["copy"]
        await ch.close()

    asyncio.run(main())


SERVERS = r"""
import http.server, socket, ssl, sys, threading
class Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self): self.send_response(200); self.end_headers()
    do_HEAD = do_GET
    def log_message(self, *a): pass
def serve(sock, tls=False):
    srv = http.server.HTTPServer(("127.0.0.1", 0), Quiet, bind_and_activate=False)
    srv.socket.close(); srv.socket = sock
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[1], sys.argv[2])
        srv.socket = ctx.wrap_socket(sock, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
def listen(family, addr, port, v6only=None, kind=socket.SOCK_STREAM):
    s = socket.socket(family, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if v6only is not None: s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
    s.bind((addr, port))
    if kind == socket.SOCK_STREAM: s.listen()
    return s
serve(listen(socket.AF_INET6, "::", 8080, v6only=0))               # dual-stack, one socket: http
serve(listen(socket.AF_INET, "0.0.0.0", 8443), tls=True)             # https
serve(listen(socket.AF_INET, "0.0.0.0", 9000)); serve(listen(socket.AF_INET6, "::", 9000, v6only=1))  # both wildcards: once
raw = listen(socket.AF_INET, "127.0.0.1", 7000)                      # speaks nothing
udp = listen(socket.AF_INET6, "::", 5353, kind=socket.SOCK_DGRAM)
print("ready", flush=True)
sys.stdin.read()
"""


def test_ports_lists_every_listener_once_with_its_process_and_scheme(agent, tmp_path):
    host, _pid = agent
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
            key,
            "-out",
            cert,
        ],
        check=True,
        capture_output=True,
    )

    async def main():
        ch = await connect(host)
        srv = await ch.open({"op": "exec", "argv": [sys.executable, "-c", SERVERS, str(cert), str(key)]})
        seen = bytearray()
        await read_until(srv, b"ready", seen)
        s = await ch.open({"op": "ports"})
        status, out, err, _ = await collect(s)
        assert status == 0, err
        got = {(d["proto"], d["port"]): d for d in json.loads(out)}
        assert sorted(got) == [("tcp", 7000), ("tcp", 8080), ("tcp", 8443), ("tcp", 9000), ("udp", 5353)]
        assert got[("tcp", 8080)]["scheme"] == "http" and got[("tcp", 8080)]["address"] == "::"
        assert got[("tcp", 8443)]["scheme"] == "https"
        assert got[("tcp", 9000)]["family"] == "4+6" and got[("tcp", 9000)]["scheme"] == "http"
        assert got[("tcp", 7000)]["scheme"] == "" and got[("tcp", 7000)]["address"] == "127.0.0.1"
        assert got[("udp", 5353)]["family"] == 6
        for d in got.values():
            assert d["process"].startswith("python") and "http.server" in d["command"] and d["pid"] > 1
        await srv.close()
        await ch.close()

    asyncio.run(main())


def _rss_kib(pid: int, field: str = "VmHWM") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_a_slow_reader_holds_the_agent_back_instead_of_growing_its_memory(agent):
    host, agent_pid = agent  # unshare and sh exec: the same process

    async def main():
        ch = await connect(host)
        before = _rss_kib(agent_pid)
        s = await ch.open({"op": "exec", "argv": ["head", "-c", str(256 << 20), "/dev/zero"], "stdin": False})
        await asyncio.sleep(3)  # not reading: head could write all 256 MiB meanwhile
        total = 0
        while True:
            f = await s.next()
            if f.kind == P.STDOUT:
                total += len(f.payload)
            elif f.kind == P.EXIT:
                break
        assert total == 256 << 20
        grew = (_rss_kib(agent_pid) - before) / 1024
        assert grew < 32, f"the agent grew by {grew:.0f} MiB while nobody read"
        await ch.close()

    asyncio.run(main())


@pytest.mark.parametrize("term", ["x y", "bad/term", "", "x" * 65, "vt100\n"])
def test_a_terminal_name_is_checked_as_a_whole(term, monkeypatch):
    from pydantic import ValidationError

    from banger_agent import rpc, terminal

    with pytest.raises(ValidationError, match="expected a TERM name"):
        rpc.Terminal(term=term)
    monkeypatch.setenv("TERM", term)
    assert terminal.request()["term"] == "xterm-256color"  # the client asks for the default instead
    assert rpc.Terminal(**terminal.request()).term == "xterm-256color"


def test_cp_arguments_name_the_vm_side_by_a_prefix():
    from banger_agent import cp
    from banger_core.errors import BangerError

    assert cp.split("box:/root/x") == ("box", "/root/x")
    assert cp.split("box:rel/x") == ("box", "rel/x")
    assert cp.split("./a:b") == (None, "./a:b") and cp.split("/abs/a:b") == (None, "/abs/a:b")
    assert cp.split("plain") == (None, "plain")
    with pytest.raises(BangerError, match="no path after the VM name"):
        cp.split("box:")


def test_stdin_has_a_window_a_command_that_never_reads_costs_the_agent_little_and_stalls_no_one(agent):
    host, agent_pid = agent

    async def main():
        ch = await connect(host)
        before = _rss_kib(agent_pid)
        idle = await ch.open({"op": "exec", "argv": ["sleep", "60"]})
        sender = asyncio.ensure_future(idle.stdin(b"x" * (64 << 20)))
        await asyncio.sleep(2)
        assert not sender.done() and idle.sent - idle.acked == P.STDIN_WINDOW  # held at the window
        status, out, *_ = await collect(await ch.open({"op": "exec", "argv": ["echo", "meanwhile"]}))
        assert (status, out) == (0, b"meanwhile\n")  # the channel is not stalled for others
        grew = (_rss_kib(agent_pid) - before) / 1024
        assert grew < 16, f"the agent grew by {grew:.0f} MiB for a command that reads nothing"
        await idle.close()
        await asyncio.wait_for(sender, 10)  # the session ended: the sender gives up
        # a slow reader still gets every byte, in order
        data = os.urandom(1 << 20) * 24
        slow = await ch.open({"op": "exec", "argv": ["sh", "-c", "sleep 1; sha256sum"]})
        await slow.stdin(data)
        await slow.stdin_eof()
        status, out, *_ = await collect(slow)
        assert status == 0 and out.split()[0].decode() == hashlib.sha256(data).hexdigest()
        assert slow.acked == len(data)
        await ch.close()

    asyncio.run(main())


def test_watch_ports_pushes_the_listeners_when_they_change(agent):
    """The guest pushes: a line now, one when a listener appears, one when it goes, and
    nothing while nothing changes; closing the session ends the watcher."""
    host, pid = agent

    async def next_line(s, timeout: float = 5) -> list:
        f = await asyncio.wait_for(s.next(), timeout)
        assert f.kind == P.STDOUT and f.payload.endswith(b"\n") and f.payload.count(b"\n") == 1, f
        return json.loads(f.payload)

    async def main():
        ch = await connect(host)
        before = _children(pid)
        w = await ch.open({"op": "watch_ports", "interval": 0.2})
        assert await next_line(w) == []
        code = "import socket,time; s=socket.socket(); s.bind(('0.0.0.0', 8080)); s.listen(); print('ready', flush=True); time.sleep(60)"
        srv = await ch.open({"op": "exec", "argv": [sys.executable, "-c", code]})
        seen = bytearray()
        await read_until(srv, b"ready", seen)
        t0 = time.monotonic()
        got = await next_line(w)
        assert time.monotonic() - t0 < 3
        assert [(d["proto"], d["address"], d["port"], d["scheme"]) for d in got] == [("tcp", "0.0.0.0", 8080, "")]
        assert got[0]["process"].startswith("python")
        with pytest.raises(asyncio.TimeoutError):  # no change, no line
            await asyncio.wait_for(w.next(), 1.0)
        await srv.close()  # kills the server
        assert await next_line(w) == []
        await w.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _children(pid) != before:  # the watcher's process is gone
            await asyncio.sleep(0.1)
        assert _children(pid) == before, subprocess.run(
            ["ps", "-o", "pid,ppid,pgid,stat,cmd", "--ppid", str(pid)], capture_output=True, text=True
        ).stdout
        await ch.close()

    asyncio.run(main())


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    kids = [int(p) for p in out.split()]
    return [k for grand in kids for k in [grand, *_children(grand)]]


def test_tcp_connect_relays_a_guest_loopback_port_both_ways(agent):
    """The op the host's relay for a loopback-only listener uses: bytes both ways, the
    host's end of input shuts the socket's write side, a refused port exits 1."""
    host, _pid = agent
    echo = (
        "import socket; s=socket.socket(); s.bind(('127.0.0.1', 7000)); s.listen(); print('ready', flush=True)\n"
        "c, _ = s.accept(); data = b''\n"
        "while (chunk := c.recv(65536)): data += chunk\n"
        "c.sendall(data[::-1] + b'|' + str(len(data)).encode()); c.close()"
    )

    async def main():
        ch = await connect(host)
        srv = await ch.open({"op": "exec", "argv": [sys.executable, "-c", echo]})
        await read_until(srv, b"ready", bytearray())
        s = await ch.open({"op": "tcp_connect", "port": 7000})
        payload = os.urandom(300_000)  # more than a frame, less than the window
        await s.stdin(payload)
        await s.stdin_eof()  # the server sees EOF, answers, closes
        status, out, err, _ = await collect(s)
        assert status == 0, err
        assert out == payload[::-1] + b"|300000"
        s = await ch.open({"op": "tcp_connect", "port": 7001})  # nothing listens
        status, out, err, _ = await collect(s)
        assert status == 1 and b"refused" in err.lower(), err
        for bad in (
            {"op": "tcp_connect", "port": 0},
            {"op": "tcp_connect", "port": "80"},
            {"op": "tcp_connect", "port": 1, "host": "x"},
        ):
            s = await ch.open(bad)
            status, _out, err, message = await collect(s)
            assert status != 0 and (message or err), bad
        await srv.close()
        await ch.close()

    asyncio.run(main())


@contextmanager
def agent_behind(sock_path: Path) -> Iterator[None]:
    """An agent for each connection to a unix socket at ``sock_path``, as a VM's channel
    socket is (what the agent plugin's service connects to)."""
    import threading

    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(sock_path))
    srv.listen()
    procs: list[subprocess.Popen[bytes]] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            env = {**os.environ, "BANGER_AGENT_FD": str(conn.fileno()), "PYTHONPATH": str(GUEST)}
            procs.append(subprocess.Popen([sys.executable, "-m", "banger_guest.agent"], pass_fds=[conn.fileno()], env=env))
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield
    finally:
        srv.shutdown(socket.SHUT_RDWR)
        srv.close()
        for p in procs:
            p.kill()
            p.wait(timeout=10)


def test_the_agent_service_sends_a_stream_into_cp_in_making_its_parents(tmp_path):
    """AgentService.send (what plugins get from ctx.service("agent")) and cp_in's
    ``parents``: a file lands in directories cp_in made, with the tar header's mode; an
    op that refuses, a writer that fails and a VM without a channel each say so."""
    import tarfile

    from banger_agent.service import AgentService
    from banger_core.paths import Paths

    paths = Paths(tmp_path / "c", tmp_path / "s", tmp_path / "k", tmp_path / "r")
    vm_dir = Path(paths.vm_files("vm1").dir)
    vm_dir.mkdir(parents=True)
    svc = AgentService()

    def one_file(name: str, data: bytes, mode: int):
        def write(out) -> None:
            with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), mode
                tar.addfile(info, io.BytesIO(data))

        return write

    with agent_behind(vm_dir / "agent.sock"):
        dest = tmp_path / "guest" / "root" / ".config" / "tool"
        big = os.urandom(300 * 1024)  # beyond the STDIN window: the writes wait for acks
        status, why = svc.send(paths, "vm1", {"op": "cp_in", "dest": str(dest), "parents": True}, one_file("auth", big, 0o640))
        assert (status, why) == (0, "")
        assert (dest / "auth").read_bytes() == big and (dest / "auth").stat().st_mode & 0o7777 == 0o640
        assert oct(dest.stat().st_mode & 0o777) == "0o755" and sorted(p.name for p in dest.iterdir()) == ["auth"]
        # again, a new version: replaced in place
        assert svc.send(paths, "vm1", {"op": "cp_in", "dest": str(dest), "parents": True}, one_file("auth", b"v2", 0o600))[0] == 0
        assert (dest / "auth").read_bytes() == b"v2" and (dest / "auth").stat().st_mode & 0o7777 == 0o600

        # a part of the destination is a file: the agent refuses before reading anything
        (tmp_path / "guest" / "flat").write_text("x")
        status, why = svc.send(
            paths,
            "vm1",
            {"op": "cp_in", "dest": str(tmp_path / "guest" / "flat" / "sub"), "parents": True},
            one_file("a", b"", 0o600),
        )
        assert status == 1 and why.startswith(f"{tmp_path / 'guest' / 'flat' / 'sub'}: cannot make this directory in the VM")
        # without parents, a missing directory is refused as before
        status, why = svc.send(
            paths, "vm1", {"op": "cp_in", "dest": str(tmp_path / "guest" / "nope" / "x")}, one_file("a", b"", 0o600)
        )
        assert status == 1 and "no such directory in the VM" in why

        # the writer fails halfway: the error is the caller's, and nothing lands
        def broken(out) -> None:
            out.write(b"\0" * 100_000)
            raise OSError("the host file went away")

        with pytest.raises(OSError, match="the host file went away"):
            svc.send(paths, "vm1", {"op": "cp_in", "dest": str(dest), "parents": True}, broken)
        assert sorted(p.name for p in dest.iterdir()) == ["auth"]  # no staging dir left behind

    with pytest.raises(OSError):  # no channel at all (a VM without the agent)
        svc.send(paths, "vm2", {"op": "cp_in", "dest": str(dest)}, one_file("a", b"", 0o600))
