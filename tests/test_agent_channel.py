"""The guest agent and the host's channel, end to end over a socketpair: the real agent
process (banger_guest.agent) and the real host side (banger_agent.channel), no VM.

What a VM adds (the virtio-serial port, the agent disk, boot) is tested by the booting
tests; here, everything about sessions: argv intact, binary-safe streams, exit status
and 128+N, concurrent sessions, and process groups killed when a session is closed or
the host side goes away.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from banger_agent.channel import Channel, ChannelClosed
from banger_guest import protocol as P

GUEST = Path(__file__).resolve().parent.parent / "guest"


@contextmanager
def agent_process(**env: str) -> Iterator[socket.socket]:
    """An agent process (``env`` added to its environment) serving one end of a
    socketpair; yields the other end."""
    host, guest = socket.socketpair()
    full = {**os.environ, "BANGER_AGENT_FD": str(guest.fileno()), "PYTHONPATH": str(GUEST), **env}
    proc = subprocess.Popen([sys.executable, "-m", "banger_guest.agent"], pass_fds=[guest.fileno()], env=full)
    guest.close()
    try:
        yield host
    finally:
        host.close()
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def agent():
    with agent_process() as host:
        yield host


def connect(sock: socket.socket):
    async def opener():
        return await asyncio.open_unix_connection(sock=sock)

    return Channel.connect(opener, timeout=10)


async def run(ch: Channel, argv: list[str], stdin: bytes = b"", **extra) -> tuple[int, bytes, bytes]:
    s = await ch.open({"op": "exec", "argv": argv, **extra})
    if stdin:
        await s.stdin(stdin)
    await s.stdin_eof()
    out, err = bytearray(), bytearray()
    async for f in s.events():
        if f.kind == P.STDOUT:
            out += f.payload
        elif f.kind == P.STDERR:
            err += f.payload
        elif f.kind == P.EXIT:
            return f.obj()["status"], bytes(out), bytes(err)
        elif f.kind == P.ERROR:
            return f.obj().get("status", 255), bytes(out), f.obj()["message"].encode()
    raise AssertionError("no exit")


def test_health_exec_status_and_argv(agent):
    async def main():
        ch = await connect(agent)
        assert ch.welcome["version"] == P.VERSION and ch.welcome["agent"]
        health = await ch.call({"op": "health"}, timeout=10)
        assert health["version"] == P.VERSION and health["uptime"] > 0 and health["boot_id"]
        weird = ["a b", "'q'", '"dq"', "$HOME", "*", "", "line\nbreak", "ünïcødé ✓"]
        status, out, _ = await run(ch, [sys.executable, "-c", "import sys, json; print(json.dumps(sys.argv[1:]))", *weird])
        assert status == 0 and out.decode().strip() == __import__("json").dumps(weird)
        assert (await run(ch, ["sh", "-c", "exit 42"]))[0] == 42
        assert (await run(ch, ["sh", "-c", "kill -TERM $$"]))[0] == 143
        status, _out, err = await run(ch, ["/nonexistent/cmd"])
        assert status == 127 and b"/nonexistent/cmd" in err
        status, out, err = await run(ch, ["sh", "-c", 'echo "$FOO" in "$(pwd)"; echo oops >&2'], env={"FOO": "bar"}, cwd="/tmp")
        assert status == 0 and out == b"bar in /tmp\n" and err == b"oops\n"
        await ch.close()

    asyncio.run(main())


def test_a_mebibyte_of_random_bytes_round_trips(agent):
    data = os.urandom(1 << 20)

    async def main():
        ch = await connect(agent)
        status, out, _ = await run(ch, ["cat"], stdin=data)
        assert status == 0 and hashlib.sha256(out).hexdigest() == hashlib.sha256(data).hexdigest()
        await ch.close()

    asyncio.run(main())


def test_eight_sessions_run_at_once(agent, tmp_path):
    """Each creates a file and waits until all 8 exist: a serial agent cannot pass."""
    script = f"touch {tmp_path}/$0; for i in $(seq 100); do [ $(ls {tmp_path} | wc -l) -ge 8 ] && exit 0; sleep 0.1; done; exit 9"

    async def main():
        ch = await connect(agent)
        results = await asyncio.gather(*(run(ch, ["sh", "-c", script, f"f{i}"]) for i in range(8)))
        assert [r[0] for r in results] == [0] * 8
        await ch.close()

    asyncio.run(main())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_dead(pid: int, timeout: float = 5) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if not pid_alive(pid) or open(f"/proc/{pid}/stat").read().split()[2] == "Z":
                return True
        except OSError:  # gone between the two looks (ENOENT, or ESRCH reading it)
            return True
        time.sleep(0.05)
    return False


async def started_pids(ch: Channel) -> tuple[object, list[int]]:
    """A session whose command starts a background child and prints both pids."""
    s = await ch.open({"op": "exec", "argv": ["sh", "-c", "sleep 300 & echo $$ $!; wait"]})
    async for f in s.events():
        if f.kind == P.STDOUT:
            return s, [int(p) for p in f.payload.split()]
    raise AssertionError("no pids")


def test_closing_a_session_kills_its_process_group(agent):
    async def main():
        ch = await connect(agent)
        s, pids = await started_pids(ch)
        await s.close()
        assert all(wait_dead(p) for p in pids), pids  # the background child too
        assert (await run(ch, ["true"]))[0] == 0  # the channel still serves
        await ch.close()

    asyncio.run(main())


def test_signals_reach_the_process_group(agent):
    async def main():
        ch = await connect(agent)
        s, pids = await started_pids(ch)
        await s.signal(signal.SIGTERM)  # (a shell's background jobs ignore SIGINT)
        frames = [f async for f in s.events()]
        assert frames[-1].kind == P.EXIT and frames[-1].obj()["status"] == 143
        assert all(wait_dead(p) for p in pids)
        await ch.close()

    asyncio.run(main())


def test_the_host_going_away_kills_every_session(agent):
    async def main():
        ch = await connect(agent)
        _s, pids = await started_pids(ch)
        await ch.close()
        return pids

    pids = asyncio.run(main())
    assert all(wait_dead(p) for p in pids), pids


def test_a_background_child_holding_stdout_does_not_hold_the_exit(agent):
    async def main():
        ch = await connect(agent)
        t = time.monotonic()
        status, out, _ = await run(ch, ["sh", "-c", "sleep 30 & echo started; exit 3"])
        assert status == 3 and out == b"started\n" and time.monotonic() - t < 10
        await ch.close()

    asyncio.run(main())


def test_a_session_of_a_closed_channel_raises(agent):
    async def main():
        ch = await connect(agent)
        s, _pids = await started_pids(ch)
        ch._abort("test: the VM stopped")
        with pytest.raises(ChannelClosed, match="the VM stopped"):
            async for _f in s.events():
                pass

    asyncio.run(main())
