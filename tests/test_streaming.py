"""Streaming methods through the real daemon and the pip-installed example plugin:
binary frames both ways (example.pipe, `banger example pipe`), bounded and cancellable."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time

import pytest
from conftest import BANGER, isolated_env, wait_for

from banger_core import PROTOCOL_VERSION, protocol
from banger_core.client import Client
from banger_core.errors import BangerError
from banger_core.paths import Paths

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def sd(example_plugin_dir):
    """One daemon with the example plugin for the whole module."""
    with isolated_env() as env:
        env.extra_path.append(str(example_plugin_dir))
        env.run("daemon", "start", check=True)
        yield env


def client(env) -> Client:
    # autostart=False everywhere: this process does not see the example plugin, so its
    # fingerprint differs and ensure_daemon would replace the daemon with one without it.
    return Client(Paths.from_env(env.env()))


def status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def collect(stream) -> tuple[dict[int, bytes], list[protocol.Frame]]:
    """Data per channel and every frame received, up to the final reply."""
    data: dict[int, bytes] = {}
    frames = []
    for f in stream:
        frames.append(f)
        if f.kind == protocol.DATA:
            data[f.channel] = data.get(f.channel, b"") + f.data
    return data, frames


def raw_stream(env, params: dict, payload: bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(15)
    s.connect(str(env.socket))
    req = {"v": PROTOCOL_VERSION, "method": "example.pipe", "params": params, "op_id": "op-0123456789ab", "stream": True}
    s.sendall(json.dumps(req).encode() + b"\n" + payload)
    return s


def read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def frames_of(data: bytes) -> list[protocol.Frame]:
    import io

    fh = io.BytesIO(data)
    out = []
    while (f := protocol.read_frame(fh)) is not None:
        out.append(f)
    return out


def test_8_mib_through_the_cli_come_back_identical(sd, tmp_path):
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(8 * MiB))
    t0 = time.perf_counter()
    with open(src, "rb") as fin:
        proc = subprocess.run([BANGER, "example", "pipe"], stdin=fin, capture_output=True, env=sd.env(), timeout=60)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert hashlib.sha256(proc.stdout).hexdigest() == hashlib.sha256(src.read_bytes()).hexdigest()
    print(f"\n8 MiB through `banger example pipe`: {elapsed:.2f} s including CLI start-up")


def test_8_mib_leave_the_daemon_memory_flat(sd, tmp_path):
    """The same pump() the CLI uses, in process: the CLI may replace the daemon (a
    stale fingerprint), which would measure a new process."""
    src = tmp_path / "in.bin"
    dst = tmp_path / "out.bin"
    src.write_bytes(os.urandom(8 * MiB))

    def through_pipe() -> tuple[dict, float]:
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            t0 = time.perf_counter()
            result = client(sd).open_stream("example.pipe", autostart=False).pump(fin.fileno(), fout.fileno(), 2)
            return result, time.perf_counter() - t0

    through_pipe()  # first use: imports, code paths, buffers
    pid = sd.daemon_pid()
    before = status(pid)
    try:  # reset the peak (VmHWM) to the current RSS, so the peak below is this call's
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
        before = status(pid)
    except OSError:
        pass
    result, elapsed = through_pipe()
    after = status(pid)
    assert result == {"exit_status": 0, "bytes": 8 * MiB}
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    print(
        f"\n8 MiB through example.pipe in process: {8 / elapsed:.0f} MiB/s;"
        f" daemon RSS {before['VmRSS']} KiB -> peak {after['VmHWM']} KiB, then {after['VmRSS']} KiB"
    )
    assert after["VmHWM"] - before["VmRSS"] < 4 * 1024, (before, after)


def test_throughput_in_process(sd):
    chunk = os.urandom(protocol.MAX_CHUNK)
    total = 64 * MiB
    with client(sd).open_stream("example.pipe", autostart=False) as st:
        import threading

        def feed():
            for _ in range(total // len(chunk)):
                st.send(protocol.STDIN, chunk)
            st.end()

        t0 = time.perf_counter()
        threading.Thread(target=feed, daemon=True).start()
        got = 0
        for f in st:
            if f.kind == protocol.DATA and f.channel == protocol.STDOUT:
                got += len(f.data)
        elapsed = time.perf_counter() - t0
    assert got == total and st.result == {"exit_status": 0, "bytes": total}
    print(f"\n64 MiB through example.pipe in process: {total / MiB / elapsed:.0f} MiB/s")


def test_half_close_then_output_goes_on(sd, tmp_path):
    marker = tmp_path / "m"
    with client(sd).open_stream("example.pipe", {"trailer": "after eof\n", "marker": str(marker)}, autostart=False) as st:
        st.send(protocol.STDIN, b"abc")
        st.end(protocol.STDIN)
        data, frames = collect(st)
    assert st.result == {"exit_status": 0, "bytes": 3}
    assert frames[0].kind == protocol.EVENT and frames[0].obj["event"] == {"pipe": "started"}
    assert data[protocol.STDOUT] == b"abc" + b"after eof\n"  # written after stdin's end
    ends = [f.channel for f in frames if f.kind == protocol.END]
    assert ends == [protocol.STDOUT, protocol.STDERR]
    assert frames.index(protocol.Frame(protocol.END, protocol.STDOUT)) == len(frames) - 2  # after all stdout data
    assert marker.read_text() == "done 3\n"  # a half-close is a frame, not a disconnect


def test_controls_arrive_in_order_and_a_signal_ends_with_128_plus_n(sd):
    with client(sd).open_stream("example.pipe", autostart=False) as st:
        st.resize(24, 80)
        st.send(protocol.STDIN, b"x")
        st.control({"type": "resize", "rows": 50, "cols": 132})
        st.control({"type": "hello"})
        st.signal("TERM")
        st.send(protocol.STDIN, b"not echoed: the call ended")
        data, _ = collect(st)
    assert data[protocol.STDOUT] == b"x"
    assert data[protocol.STDERR] == b'resize 24x80\nresize 50x132\nignored control {"type": "hello"}\nsignal TERM\n'
    assert st.result == {"exit_status": 128 + signal.SIGTERM, "bytes": 1}
    assert st.send(protocol.STDIN, b"late") is False  # dropped, not raised: the outcome is the reply


def test_cli_forwards_a_signal_and_exits_with_its_status(sd, tmp_path):
    marker = tmp_path / "m"
    proc = subprocess.Popen(
        [BANGER, "example", "pipe", "--marker", str(marker)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=sd.env(),
    )
    try:
        proc.stdin.write(b"ping\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"ping\n"  # the pipe is up, stdin still open
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)  # stdin left open: the signal alone ends it
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err == b"signal TERM\n" and out == b""
    assert marker.read_text() == "signalled TERM\n"


@pytest.mark.parametrize(
    "payload, problem",
    [
        (protocol.HEADER.pack(protocol.DATA, 0, protocol.MAX_CHUNK + 1), f"data frame of {protocol.MAX_CHUNK + 1} bytes exceeds"),
        (b"GARBAGE, not a frame" * 10, "unexpected frame kind 0x47"),
        (b'{"v": 1}\n', "unexpected frame kind 0x7b (a JSON line?)"),
        (protocol.frame(protocol.CONTROL, 0, b"{not json"), "control frame is not valid JSON"),
        (protocol.frame(protocol.CONTROL, 0, b"[1, 2]"), "control frame must hold a JSON object"),
        (protocol.frame(protocol.CONTROL, 0, b"[" * 100 + b"]" * 100), "must hold a JSON object"),
        (protocol.frame(protocol.CONTROL, 0, b'{"a":' * 70 + b"1" + b"}" * 70), "nests deeper than 64"),
        (protocol.frame(protocol.REPLY, 0, b"{}"), "unexpected frame kind 0x05"),
        (protocol.frame(protocol.END, 0, b"x"), "end frame with a 1-byte payload"),
    ],
)
def test_a_bad_frame_gets_a_typed_error_and_the_daemon_keeps_serving(sd, tmp_path, payload, problem):
    marker = tmp_path / "m"
    s = raw_stream(sd, {"marker": str(marker)}, protocol.frame(protocol.DATA, 0, b"ok") + payload)
    frames = frames_of(read_all(s))
    s.close()
    assert frames[0].kind == protocol.EVENT
    assert frames[1] == protocol.Frame(protocol.DATA, protocol.STDOUT, b"ok")  # frames before it were served
    reply = frames[-1]
    assert reply.kind == protocol.REPLY and reply.obj["ok"] is False, frames
    err = reply.obj["error"]
    assert err["code"] == "bad_request" and problem in err["message"] and reply.obj["op_id"] == "op-0123456789ab", err
    assert marker.read_text() == "cancelled op-0123456789ab\n"  # the handler was cancelled, its cleanup ran
    assert client(sd).call("daemon.hello", autostart=False)["pid"] == sd.daemon_pid()


def test_requests_that_do_not_match_the_method_are_refused_before_any_frame(sd):
    c = client(sd)
    with pytest.raises(BangerError) as exc:
        c.call("example.pipe", autostart=False)
    assert exc.value.code.value == "bad_request" and "is a streaming method" in exc.value.message
    with pytest.raises(BangerError) as exc:
        c.open_stream("daemon.hello", autostart=False).wait()
    assert exc.value.code.value == "bad_request" and "is not a streaming method" in exc.value.message
    with pytest.raises(BangerError) as exc:
        c.open_stream("example.nope", autostart=False).wait()
    assert exc.value.code.value == "unknown_method"
    with pytest.raises(BangerError) as exc:  # params are validated as for any method: a REPLY frame
        c.open_stream("example.pipe", {"bogus": 1}, autostart=False).wait()
    assert exc.value.code.value == "bad_request" and "invalid params" in exc.value.message


def test_a_client_that_disconnects_mid_stream_cancels_the_handler(sd, tmp_path):
    marker = tmp_path / "m"
    st = client(sd).open_stream("example.pipe", {"marker": str(marker)}, autostart=False)
    st.send(protocol.STDIN, b"hello")
    it = iter(st)
    assert next(it).kind == protocol.EVENT
    assert next(it).data == b"hello"
    st.close()
    wait_for(lambda: marker.read_text().startswith("cancelled"))
    assert client(sd).call("example.greet", {"name": "x"}, autostart=False)["text"].startswith("hello")
    log = client(sd).paths.daemon_log.read_text()
    assert "request example.pipe cancelled: client disconnected" in log


def test_backpressure_bounds_what_a_client_can_push_and_a_stalled_client_leaving_cancels(sd, tmp_path):
    """A client that writes and never reads: the daemon stops reading too (its handler
    is blocked writing the echo), so sends block after a bounded amount; leaving then
    cancels the handler although nothing reads the socket any more."""
    marker = tmp_path / "m"
    pid = sd.daemon_pid()
    before = status(pid)["VmRSS"]
    s = raw_stream(sd, {"marker": str(marker)}, b"")
    wait_for(lambda: marker.exists())
    s.settimeout(2)
    chunk = protocol.frame(protocol.DATA, 0, b"\0" * protocol.MAX_CHUNK)
    sent = 0
    try:
        while sent < 256 * MiB:
            s.sendall(chunk)
            sent += len(chunk)
    except socket.timeout:
        pass
    assert sent < 24 * MiB, sent  # socket buffers both ways, the echo's, STREAM_QUEUE frames
    assert status(pid)["VmRSS"] - before < 8 * 1024
    assert marker.read_text() == "started\n"
    s.close()
    wait_for(lambda: marker.read_text().startswith("cancelled"))
    assert client(sd).call("daemon.status", autostart=False)["inflight"] == 0


def test_ordinary_methods_are_unaffected_while_a_stream_is_open(sd):
    c = client(sd)
    with c.open_stream("example.pipe", autostart=False) as st:
        st.send(protocol.STDIN, b"a")
        assert c.call("example.greet", {"name": "bob"}, autostart=False)["text"] == "hello, bob!"
        events = []
        msgs = list(c.stream("daemon.hello"))
        assert len(msgs) == 1 and msgs[0]["ok"] is True
        assert c.call("daemon.status", autostart=False, on_event=events.append)["inflight"] == 1
        st.end()
        assert st.wait() == {"exit_status": 0, "bytes": 1}
