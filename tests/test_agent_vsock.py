"""The agent over Firecracker's vsock: the guest agent's listener (AF_VSOCK in a guest,
the same code over AF_UNIX here), the host's hybrid-vsock handshake (``CONNECT
<port>`` / ``OK <hostport>``) against the fake firecracker, which bridges accepted
connections to the real agent it runs off the agent disk, and a Firecracker VM whose
image carries the launcher, through the daemon and CLI: ready, exec, health, stop and
delete leaving no socket behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger_agent.channel import VSOCK_PORT, Channel, ChannelClosed, unix_opener, vsock_opener
from banger_agent.guestfiles import LAUNCHER, agent_disk
from banger_core.images import ext4_from_tree
from banger_core.models import AgentChannel, Drive, Machine
from banger_core.vmm.firecracker import FirecrackerDriver
from banger_guest import agent as guest_agent
from banger_guest import protocol as P
from conftest import fake_binary, fake_firecracker_env, pid_alive, wait_for

GUEST = Path(__file__).resolve().parent.parent / "guest"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory (unix socket paths are limited to 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="bgv-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def connect_when_ready(opener, deadline: float = 20) -> Channel:
    """A channel once the agent answers (the fake's agent takes a moment to listen)."""
    end = time.monotonic() + deadline
    while True:
        try:
            return await Channel.connect(opener, 5)
        except (OSError, asyncio.TimeoutError):
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.1)


async def run(ch: Channel, argv: list[str]) -> tuple[int, bytes]:
    s = await ch.open({"op": "exec", "argv": argv, "stdin": False})
    out = bytearray()
    async for f in s.events():
        if f.kind == P.STDOUT:
            out += f.payload
        elif f.kind == P.EXIT:
            return f.obj()["status"], bytes(out)
        elif f.kind == P.ERROR:
            raise AssertionError(f.obj())
    raise AssertionError("no exit")


def test_listen_address_names_vsock_or_unix():
    assert guest_agent.listen_address(f"vsock:{VSOCK_PORT}") == (socket.AF_VSOCK, (socket.VMADDR_CID_ANY, VSOCK_PORT))
    assert guest_agent.listen_address("unix:/run/a.sock") == (socket.AF_UNIX, "/run/a.sock")
    for bad in ("vsock:", "vsock:x", "serial", "unix:"):
        with pytest.raises(ValueError, match="not vsock:PORT or unix:PATH"):
            guest_agent.listen_address(bad)


def test_the_listener_serves_one_connection_at_a_time_and_drops_sessions_when_it_ends(short_dir):
    """The AF_VSOCK code path over AF_UNIX: a host connection ending kills its sessions'
    processes, and the next connection is served; a second one waits its turn."""
    sock = short_dir / "agent.sock"
    env = {**os.environ, "PYTHONPATH": str(GUEST), "BANGER_AGENT_LISTEN": f"unix:{sock}"}
    proc = subprocess.Popen([sys.executable, "-m", "banger_guest.agent"], env=env)
    try:

        async def main() -> None:
            ch = await connect_when_ready(unix_opener(str(sock)))
            assert (await ch.call({"op": "health"}, 10))["version"] == P.VERSION
            s = await ch.open({"op": "exec", "argv": ["sh", "-c", "echo $$; exec sleep 300"], "stdin": False})
            pid = int((await s.next()).payload)
            assert pid_alive(pid)
            # a second host waits (the listen backlog) while the first is served
            waiting = asyncio.ensure_future(Channel.connect(unix_opener(str(sock)), 30))
            await asyncio.sleep(1.5)
            assert not waiting.done()
            await ch.close()
            wait_for(lambda: not pid_alive(pid), timeout=10)
            ch2 = await waiting
            assert await run(ch2, ["sh", "-c", "echo hi; exit 3"]) == (3, b"hi\n")
            await ch2.close()
            ch3 = await connect_when_ready(unix_opener(str(sock)))  # and the next
            assert (await ch3.call({"op": "health"}, 10))["agent"]
            await ch3.close()

        asyncio.run(main())
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(timeout=10)


def agent_machine(d: Path, agent_args: bool = True) -> Machine:
    """A machine as configure_machine makes it for Firecracker: the agent disk attached,
    banger.agent=vsock:PORT on the command line, the vsock socket in the VM's dir."""
    (d / "vmlinux").write_bytes(b"\x7fELF" + b"\0" * 1020)
    (d / "root.img").write_bytes(b"\0" * 1024)
    disk = agent_disk(d / "cache", {"banger": "test", "commit": None, "build_time": None})
    args = ["console=ttyS0", "reboot=k", "panic=1", "pci=off"]
    return Machine(
        kernel=str(d / "vmlinux"),
        boot_args=[*args, f"banger.agent=vsock:{VSOCK_PORT}"] if agent_args else args,
        vcpus=1,
        memory_mib=128,
        drives=[Drive(id="root", path=str(d / "root.img"), root=True), Drive(id="agent", path=str(disk), read_only=True)],
        agent=AgentChannel(kind="vsock", host_path=str(d / "run" / "agent.vsock"), guest_cid=3),
    )


@pytest.fixture
def fake_vm(short_dir) -> Iterator[tuple[Path, Path, FirecrackerDriver, int]]:
    """The fake firecracker booted with the agent: (run dir, vsock socket, driver, pid)."""
    record = short_dir / "requests.jsonl"
    os.environ["FC_FAKE_RECORD"] = str(record)
    driver = FirecrackerDriver(binary=str(fake_binary(short_dir)))
    run_dir = short_dir / "run"
    try:
        launch = driver.launch("00000000000000fc", agent_machine(short_dir), run_dir)
    finally:
        os.environ.pop("FC_FAKE_RECORD", None)
    try:
        yield run_dir, run_dir / "agent.vsock", driver, launch.pid
    finally:
        if pid_alive(launch.pid):
            os.kill(launch.pid, 9)
        reqs = [json.loads(ln) for ln in record.read_text().splitlines()]
        assert reqs and all(r["result"] == "ok" for r in reqs), reqs


def raw_connect(uds: Path, request: bytes) -> bytes:
    """What the fake answers a raw request with, up to EOF or a newline."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(uds))
        s.sendall(request)
        got = b""
        while not got.endswith(b"\n"):
            try:
                chunk = s.recv(1)
            except ConnectionResetError:  # closed with bytes of ours unread
                break
            if not chunk:
                break
            got += chunk
        return got


def test_the_handshake_against_the_fake(fake_vm):
    run_dir, uds, driver, pid = fake_vm

    async def main() -> None:
        ch = await connect_when_ready(vsock_opener(str(uds)))
        h = await ch.call({"op": "health"}, 10)
        assert h["version"] == P.VERSION and h["build"]["banger"] == "test"  # the agent off the agent disk
        assert await run(ch, ["sh", "-c", "echo hi; exit 3"]) == (3, b"hi\n")
        await ch.close()
        # a port nothing in the guest listens on: Firecracker closes the connection
        with pytest.raises(ChannelClosed, match=r"closed at CONNECT 9999 \(nothing in the guest listens on port 9999"):
            await Channel.connect(vsock_opener(str(uds), 9999), 5)

    asyncio.run(main())
    # the raw protocol: OK <hostport>, host ports from 2**30 up; "connect" in any case
    first = raw_connect(uds, f"CONNECT {VSOCK_PORT}\n".encode())
    assert first.startswith(b"OK ") and first.endswith(b"\n") and int(first.split()[1]) > 1 << 30
    second = raw_connect(uds, f"connect {VSOCK_PORT}\n".encode())
    assert int(second.split()[1]) == int(first.split()[1]) + 1
    # no reply, only a closed connection: no listener, not a CONNECT, not a port
    for bad in (b"CONNECT 9999\n", b"HELLO 10240\n", b"CONNECT port\n", b"GET / HTTP/1.1\r\n\r\n"):
        assert raw_connect(uds, bad) == b"", bad
    # the guest powers off: the fake exits, its agent with it; the socket stays (as Firecracker leaves it)
    driver.request_shutdown(pid, run_dir)
    wait_for(lambda: not pid_alive(pid), timeout=10)
    assert uds.exists() and not (run_dir / "fake-guest").exists()


def test_a_reply_that_is_not_ok_is_an_error_naming_it(short_dir):
    uds = short_dir / "other.vsock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(uds))
    srv.listen(4)
    got: list[bytes] = []

    def answer() -> None:
        for reply in (b"HTTP/1.1 400 Bad Request\r\n", b"OK\n", b"x" * 200):
            conn, _ = srv.accept()
            with conn:
                got.append(conn.recv(64))
                conn.sendall(reply)
                time.sleep(0.2)

    t = threading.Thread(target=answer, daemon=True)
    t.start()

    async def main() -> None:
        with pytest.raises(ChannelClosed, match=r"CONNECT 10240 was answered b'HTTP/1.1 400 Bad Request\\r\\n', not 'OK <port>'"):
            await Channel.connect(vsock_opener(str(uds)), 5)
        with pytest.raises(ChannelClosed, match=r"answered b'OK\\n'"):
            await Channel.connect(vsock_opener(str(uds)), 5)
        with pytest.raises(ChannelClosed, match=r"answered b'x{64}'"):  # read no further than a reply's length
            await Channel.connect(vsock_opener(str(uds)), 5)

    try:
        asyncio.run(main())
    finally:
        t.join(timeout=10)
        srv.close()
    assert got == [f"CONNECT {VSOCK_PORT}\n".encode()] * 3


def agent_image(benv, tmp_path: Path) -> None:
    """Image `fcagent`: an ext4 carrying banger's launcher and a python3, which is what
    agent_support looks for (the fake runs the agent itself)."""
    tree = tmp_path / "agent-tree"
    for path, text in ((LAUNCHER, "#!/bin/sh\n"), ("/usr/bin/python3", "#!/bin/sh\n")):
        f = tree / path.lstrip("/")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
        f.chmod(0o755)
    rootfs = tmp_path / "agent-rootfs.ext4"
    ext4_from_tree(tree, rootfs, size_mib=32)
    benv.run("image", "register", "fcagent", "--rootfs", str(rootfs), "--kernel-ref", "fck", check=True)


def test_a_firecracker_vm_gets_the_agent_over_vsock_through_daemon_and_cli(benv, tmp_path):
    record = tmp_path / "requests.jsonl"
    benv.extra_env["FC_FAKE_RECORD"] = str(record)  # before the daemon starts: its firecrackers inherit it
    fake_firecracker_env(benv, tmp_path)
    agent_image(benv, tmp_path)
    args = ["--driver", "firecracker", "--vcpu", "1", "--memory", "128", "--root-size", "32M"]
    r = benv.run("vm", "create", "--name", "fcv", "--image", "fcagent", *args, check=True)
    assert "fcv running" in r.stdout and "no agent" not in r.stderr, r.stderr
    vm = json.loads(benv.run("vm", "show", "fcv", "--json", check=True).stdout)
    uds = Path(vm["dir"]) / "agent.vsock"
    assert uds.exists() and not (Path(vm["dir"]) / "agent.sock").exists()
    machine = json.loads((Path(vm["dir"]) / "machine.json").read_text())
    assert machine["agent"] == {"kind": "vsock", "host_path": str(uds), "guest_cid": 3}
    assert f"banger.agent=vsock:{VSOCK_PORT}" in machine["boot_args"]
    assert any(d["id"] == "agent" and d["read_only"] for d in machine["drives"])

    r = benv.run("vm", "exec", "fcv", "--", "sh", "-c", "echo hi; exit 3")
    assert (r.returncode, r.stdout) == (3, "hi\n"), r.stderr
    h = json.loads(benv.run("vm", "health", "fcv", "--json", check=True).stdout)
    assert h["vm"] == "fcv" and h["version"] == P.VERSION and h["build"]["banger"]

    r = benv.run("vm", "stop", "fcv", check=True)
    assert "VM fcv: shut down by agent" in (benv.state_dir / "bangerd.log").read_text()  # its sync + poweroff
    assert "fcv: stopped" in r.stdout and not pid_alive(vm["pid"])
    assert not uds.exists() and not list(Path(vm["dir"]).glob("*.sock")) and not (Path(vm["dir"]) / "fake-guest").exists()
    assert "Traceback" not in benv.run("vm", "logs", "fcv", check=True).stdout  # the agent's stderr goes there

    # a second boot binds the vsock socket afresh (a stale one would fail PUT /vsock)
    benv.run("vm", "start", "fcv", check=True)
    assert benv.run("vm", "exec", "fcv", "--", "true").returncode == 0
    benv.run("vm", "delete", "fcv", "--force", check=True)
    assert not Path(vm["dir"]).exists()

    reqs = [json.loads(ln) for ln in record.read_text().splitlines()]
    assert [r for r in reqs if r["result"] != "ok"] == []
    vsock = [r for r in reqs if r["op"] == "putGuestVsock"]
    # given through the VM's link (<runtime>/fc/<id> -> its dir: a restore repoints it), landing at uds
    link = benv.runtime_dir / "fc" / vm["id"] / "agent.vsock"
    assert len(vsock) == 2 and all(r["body"] == {"guest_cid": 3, "uds_path": str(link)} for r in vsock)
    assert not link.parent.exists() and not link.parent.is_symlink()  # the link went with the VM
