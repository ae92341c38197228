#!/usr/bin/env python3
"""A stand-in `firecracker` binary for tests: serves the API on --api-sock, checks every
request against firecracker.yaml and Firecracker's pre-boot rules, and records them.

It boots nothing (no Firecracker binary can run on this machine). InstanceStart flips
the state to Running; SendCtrlAltDel makes the process exit, as Firecracker does when
its guest shuts down.

The vsock device, as Firecracker's docs/vsock.md and its muxer (src/vmm/src/devices/
virtio/vsock/unix/muxer.rs) describe it, host-initiated connections only:

- ``PUT /vsock`` binds ``uds_path`` at once (a 400 when the path exists: Firecracker
  cannot bind over an old socket); Firecracker never removes it, not even on exit.
- From InstanceStart, connections to ``uds_path`` are accepted. Each must open with
  ``CONNECT <port>\n``: read as Firecracker does (10 bytes, then a byte at a time up to
  a newline or 32 bytes; whitespace-separated words, the first ``connect`` in any case,
  the second a u32). A request that does not parse, or that names a port nothing in the
  guest listens on (the guest answers the vsock request with RST), gets no reply: the
  host connection is closed. Otherwise the guest's listener got the connection, the
  host reads ``OK <hostport>\n`` (host-side ports are handed out from 2**30 up) and the
  stream is the guest's from then on.

The guest: when the boot args carry ``banger.agent=vsock:PORT`` and a drive is the
agent disk (the ext4 labelled banger-agent), the fake does what banger's launcher would:
it copies the agent off that disk (debugfs) and runs it, with the agent's own AF_UNIX
listener mode (``BANGER_AGENT_LISTEN``) standing in for its AF_VSOCK listener on PORT;
connections to PORT are bridged to it. Its stderr goes to the console log. The agent's
``poweroff`` finds a stand-in ``systemctl``/``poweroff``/``busybox`` (signalling this
process) first on its PATH, never the host's. When the guest goes (SendCtrlAltDel, its
poweroff), every process under the fake (a child subreaper) is killed first; if the
fake itself is killed, the agent dies with it (PR_SET_PDEATHSIG).

Drives are opened at ``PUT /drives`` (a 400 if the file cannot be), as Firecracker opens
them there: symlinks in ``path_on_host`` are resolved at that moment and never again.
What the VM opened (each drive's resolved path, the bound vsock socket's, the TAPs) is
written to ``fake-opened.json`` in the API socket's directory when the guest starts.

Snapshots: ``PUT /snapshot/create`` (a booted, paused VM only) writes a state file (JSON
naming the configuration as it was given: drive paths and the vsock ``uds_path`` as
sent, not resolved) and a memory file (a recognisable header and the machine config).
``PUT /snapshot/load`` is accepted only on a fresh process, before anything but the
logger and metrics is configured; it reads both files, opens every drive and binds the
vsock socket at the paths the state recorded (``vsock_override`` and
``network_overrides`` applied), resolving symlinks then, and runs the guest as
InstanceStart does, paused unless ``resume_vm``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fcspec import validate_request

PRE_BOOT_ONLY = {
    "putGuestBootSource",
    "putMachineConfiguration",
    "putLogger",
    "putGuestVsock",
    "putGuestNetworkInterfaceByID",
    "putGuestDriveByID",
}


class State:
    started = False
    paused = False  # patchVm {"state": "Paused"}; "Resumed" clears it
    configured: set[str] = set()
    record: Path | None = None
    boot: dict[str, Any]  # the putGuestBootSource body; set in __main__
    machine: dict[str, Any] = {}  # the putMachineConfiguration body
    drives: dict[str, dict[str, Any]] = {}
    drive_fds: dict[str, int] = {}  # each drive's backing file, open from PUT /drives (or load) on
    opened: dict[str, str] = {}  # drive id -> the file that fd is (symlinks resolved when opened)
    nics: dict[str, dict[str, Any]] = {}  # the putGuestNetworkInterfaceByID bodies
    vsock_cfg: dict[str, Any] | None = None  # the putGuestVsock body
    vsock_opened: str | None = None  # where its socket really is (resolved when bound)
    restored_from: str | None = None  # the snapshot_path of a loadSnapshot
    vsock: socket.socket | None = None  # listening on the putGuestVsock uds_path
    guest_ports: dict[int, str] = {}  # a vsock port the guest listens on -> the AF_UNIX path standing in for it
    host_port = (1 << 30) - 1  # the last host-side port handed out (Firecracker's local_port_last)
    lock = threading.Lock()


AGENT_LABEL = b"banger-agent"
_libc = ctypes.CDLL(None, use_errno=True)


def guest_dir() -> Path:
    return Path(ARGS.api_sock).resolve().parent / "fake-guest"


def read_connect(conn: socket.socket) -> int | None:
    """The port of a ``CONNECT <port>\n`` request, read and parsed as Firecracker's
    read_local_stream_port does; None if it is not one."""
    buf = b""
    try:
        while len(buf) < 10:  # b"connect 0\n": the shortest valid request
            chunk = conn.recv(10 - len(buf))
            if not chunk:
                return None
            buf += chunk
        while not buf.endswith(b"\n") and len(buf) < 32:
            chunk = conn.recv(1)
            if not chunk:
                return None
            buf += chunk
        words = buf.decode("utf-8").split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(words) < 2 or words[0].lower() != "connect":
        return None
    try:
        port = int(words[1])  # Rust's u32 parse: digits only (a leading + allowed)
    except ValueError:
        return None
    if not words[1].lstrip("+").isdigit() or not 0 <= port < 1 << 32:
        return None
    return port


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def host_connection(conn: socket.socket) -> None:
    """One host-initiated vsock connection: the handshake, then the bridge to the guest."""
    port = read_connect(conn)
    path = State.guest_ports.get(port) if port is not None else None
    guest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if path is None:
            raise ConnectionRefusedError(f"nothing in the guest listens on vsock port {port}")
        guest.connect(path)
    except OSError:  # the guest answers RST; Firecracker drops the host connection
        guest.close()
        conn.close()
        return
    with State.lock:
        State.host_port = (State.host_port + 1) & ~(1 << 31) | (1 << 30)
        host_port = State.host_port
    try:
        conn.sendall(f"OK {host_port}\n".encode())
    except OSError:
        guest.close()
        conn.close()
        return
    back = threading.Thread(target=pump, args=(guest, conn), daemon=True)
    back.start()
    pump(conn, guest)
    back.join()
    guest.close()
    conn.close()


def serve_vsock(listener: socket.socket) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=host_connection, args=(conn,), daemon=True).start()


def agent_disk() -> str | None:
    """The agent disk among the drives, as opened (not as named: a name may have been
    a link repointed since)."""
    for path in State.opened.values():
        try:
            with open(path, "rb") as fh:
                fh.seek(1144)  # the ext4 volume label, where the launcher looks
                if fh.read(len(AGENT_LABEL)) == AGENT_LABEL:
                    return path
        except OSError:
            continue
    return None


def open_drive(body: dict[str, Any]) -> str | None:
    """Open a drive's backing file as Firecracker does (read-write unless read-only),
    replacing the drive's previous one; None, or why it cannot be opened."""
    try:
        fd = os.open(body["path_on_host"], os.O_RDONLY if body.get("is_read_only") else os.O_RDWR)
    except OSError as exc:
        return f"Unable to open the drive's backing file {body['path_on_host']}: {exc.strerror} (os error {exc.errno})"
    old = State.drive_fds.pop(body["drive_id"], None)
    if old is not None:
        os.close(old)
    State.drive_fds[body["drive_id"]] = fd
    State.opened[body["drive_id"]] = os.readlink(f"/proc/self/fd/{fd}")
    return None


def bind_vsock(uds_path: str) -> str | None:
    """Bind the vsock device's socket (replacing a previous device's); None, or why not."""
    if State.vsock is not None:  # a new device replaces the old one and its socket
        State.vsock.close()
        os.unlink(State.vsock.getsockname())
        State.vsock = None
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    where = os.path.join(os.path.realpath(os.path.dirname(uds_path)), os.path.basename(uds_path))
    try:
        listener.bind(uds_path)
    except OSError as exc:
        listener.close()
        return (
            "Cannot create backend for vsock device: "
            f"Error binding to the host-side Unix socket: {exc.strerror} (os error {exc.errno})"
        )
    listener.listen(64)
    State.vsock = listener
    State.vsock_opened = where
    return None


def write_opened() -> None:
    """What this VM's devices really are, for tests: fake-opened.json beside the API socket."""
    out = Path(ARGS.api_sock).resolve().parent / "fake-opened.json"
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(
        json.dumps(
            {
                "drives": dict(State.opened),
                "vsock": State.vsock_opened,
                "taps": {i: n["host_dev_name"] for i, n in State.nics.items()},
                "restored_from": State.restored_from,
            }
        )
    )
    os.replace(tmp, out)


def run_guest() -> None:
    """The guest runs (InstanceStart, or a snapshot loaded)."""
    State.started = True
    write_opened()
    print("fake firecracker: guest 'booted'", flush=True)
    if State.vsock is not None:
        threading.Thread(target=serve_vsock, args=(State.vsock,), daemon=True).start()
    threading.Thread(target=boot_guest, daemon=True).start()


STATE_MAGIC = "fake-firecracker-vmstate"
MEMORY_MAGIC = b"FAKE FIRECRACKER GUEST MEMORY\n"


def create_snapshot(body: dict[str, Any]) -> str | None:
    """Write the state and memory files; None, or why not."""
    state = {
        "magic": STATE_MAGIC,
        "id": ARGS.id,
        "machine_config": State.machine,
        "boot_source": State.boot,
        "drives": list(State.drives.values()),  # path_on_host as given: Firecracker reopens these names
        "network_interfaces": list(State.nics.values()),
        "vsock": State.vsock_cfg,
    }
    try:
        Path(body["snapshot_path"]).write_text(json.dumps(state))
        Path(body["mem_file_path"]).write_bytes(MEMORY_MAGIC + json.dumps(State.machine).encode() + b"\n")
    except OSError as exc:
        return f"Cannot create snapshot: {exc}"
    return None


def load_snapshot(body: dict[str, Any]) -> str | None:
    """Restore the devices a state file names, then run the guest; None, or why not."""
    if ("mem_backend" in body) == ("mem_file_path" in body):
        return "Exactly one of mem_backend or mem_file_path must be given"
    backend = body.get("mem_backend") or {"backend_type": "File", "backend_path": body["mem_file_path"]}
    if backend["backend_type"] != "File":
        return "this fake serves guest memory from a File backend only"
    try:
        state = json.loads(Path(body["snapshot_path"]).read_text())
        if not isinstance(state, dict) or state.get("magic") != STATE_MAGIC:
            raise ValueError("not a microVM state file")
        with open(backend["backend_path"], "rb") as fh:
            if fh.read(len(MEMORY_MAGIC)) != MEMORY_MAGIC:
                raise ValueError(f"{backend['backend_path']} is not guest memory")
    except (OSError, ValueError) as exc:
        return f"Cannot load snapshot: {exc}"
    nics = {n["iface_id"]: dict(n) for n in state["network_interfaces"]}
    for o in body.get("network_overrides", []):
        if o["iface_id"] not in nics:
            return f"Invalid network override: no interface {o['iface_id']} in the snapshot"
        nics[o["iface_id"]]["host_dev_name"] = o["host_dev_name"]
    for d in state["drives"]:
        why = open_drive(d)
        if why:
            return f"Cannot restore devices: {why}"
    vsock = state["vsock"]
    if vsock is not None:
        uds = (body.get("vsock_override") or {}).get("uds_path", vsock["uds_path"])
        why = bind_vsock(uds)
        if why:
            return f"Cannot restore devices: {why}"
        State.vsock_cfg = {**vsock, "uds_path": uds}
    State.drives = {d["drive_id"]: d for d in state["drives"]}
    State.nics = nics
    State.machine = state["machine_config"]
    State.boot = state["boot_source"]
    State.restored_from = os.path.realpath(body["snapshot_path"])
    State.paused = not body.get("resume_vm", False)
    run_guest()
    return None


def boot_guest() -> None:
    """What the guest's launcher does: the agent off its disk, listening on the vsock
    port the kernel command line names. Runs in a thread that lives as long as the
    process (PR_SET_PDEATHSIG follows the thread that forked)."""
    spec = next((w.split("=", 1)[1] for w in State.boot.get("boot_args", "").split() if w.startswith("banger.agent=")), "")
    disk = agent_disk()
    if not spec.startswith("vsock:") or disk is None:
        return
    port = int(spec.split(":", 1)[1])
    gdir = guest_dir()
    shutil.rmtree(gdir, ignore_errors=True)
    (gdir / "bin").mkdir(parents=True)
    (gdir / "root" / "etc").mkdir(parents=True)
    for request in (f"rdump /agent {gdir}", f"dump /build.json {gdir / 'build.json'}"):  # the disk, as mounted
        subprocess.run(["debugfs", "-R", request, disk], capture_output=True, check=True)
    for name in ("systemctl", "poweroff", "busybox"):  # the agent's poweroff: the guest's, not the host's
        shim = gdir / "bin" / name
        shim.write_text(f"#!/bin/sh\nkill -USR1 {os.getpid()}\n")
        shim.chmod(0o755)
    listen = gdir / f"vsock-{port}.sock"
    env = {
        "PATH": f"{gdir / 'bin'}:/usr/bin:/bin",
        "PYTHONPATH": str(gdir / "agent"),
        "PYTHONDONTWRITEBYTECODE": "1",
        "BANGER_AGENT_LISTEN": f"unix:{listen}",
        # a restored VM gets the agent's `resume` op: it must apply to this fake guest's
        # tree, never to the host the fake runs on (hostname, machine-id, SSH host keys)
        "BANGER_AGENT_IDENTITY_ROOT": str(gdir / "root"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-s", "-B", "-m", "banger_guest.agent"],
        env=env,
        cwd="/",
        stdin=subprocess.DEVNULL,
        preexec_fn=lambda: _libc.prctl(1, int(signal.SIGKILL)),  # PR_SET_PDEATHSIG
    )
    State.guest_ports[port] = str(listen)
    proc.wait()


def power_off() -> None:
    """The guest is gone: every process under this one, then the process itself."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo, mine = [os.getpid()], []
    while todo:
        for c in children.get(todo.pop(), []):
            mine.append(c)
            todo.append(c)
    for pid in mine:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    shutil.rmtree(guest_dir(), ignore_errors=True)
    os._exit(0)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a) -> None:  # quiet
        pass

    def _reply(self, code: int, body: dict | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(code)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    def _handle(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body: Any = json.loads(raw) if raw else None  # validated against the spec below
        try:
            op = validate_request(method, self.path, body)
        except Exception as exc:
            self._record(method, body, None, f"invalid: {exc}")
            return self._reply(400, {"fault_message": f"invalid request: {str(exc).splitlines()[0]}"})
        with State.lock:
            if op in PRE_BOOT_ONLY and State.started:
                self._record(method, body, op, "after start")
                return self._reply(400, {"fault_message": "The requested operation is not supported after starting the microVM."})
            if op == "putLogger" and not os.path.exists(body["log_path"]):
                return self._reply(400, {"fault_message": "log_path does not exist"})
            if op == "loadSnapshot":  # a fresh process only: nothing but the logger and metrics configured
                configured = {o for o in State.configured if o.startswith(("put", "patch"))} - {"putLogger", "putMetrics"}
                if State.started or configured:
                    self._record(method, body, op, "load after configuring")
                    return self._reply(
                        400,
                        {"fault_message": "Loading a microVM snapshot not allowed after configuring boot-specific resources."},
                    )
                why = load_snapshot(body)
                if why:
                    self._record(method, body, op, "load failed")
                    return self._reply(400, {"fault_message": why})
            if op == "createSnapshot":  # a booted VM, paused
                if not State.started or not State.paused:
                    self._record(method, body, op, "not paused")
                    return self._reply(400, {"fault_message": "Cannot create a snapshot: the microVM is not paused"})
                why = create_snapshot(body)
                if why:
                    self._record(method, body, op, "create failed")
                    return self._reply(400, {"fault_message": why})
            if op == "createSyncAction":
                action = body["action_type"]
                if action == "InstanceStart":
                    missing = {"putGuestBootSource"} - State.configured
                    if missing or State.started:
                        self._record(method, body, op, "bad start")
                        return self._reply(400, {"fault_message": "cannot start: boot source missing or already started"})
                    for path in ("kernel_image_path", "initrd_path"):
                        p = State.boot.get(path)
                        if p and not os.path.exists(p):
                            return self._reply(400, {"fault_message": f"{path} {p} does not exist"})
                    run_guest()
                elif action == "SendCtrlAltDel":
                    if not State.started:
                        return self._reply(400, {"fault_message": "not started"})
                    threading.Timer(0.3, power_off).start()
            if op == "patchVm":  # Paused/Resumed: only once started, as Firecracker refuses before
                if not State.started:
                    self._record(method, body, op, "not started")
                    return self._reply(
                        400, {"fault_message": "The requested operation is not supported before starting the microVM."}
                    )
                State.paused = body["state"] == "Paused"
            if op == "putGuestVsock":
                why = bind_vsock(body["uds_path"])
                if why:
                    self._record(method, body, op, "bind failed")
                    return self._reply(400, {"fault_message": why})
                State.vsock_cfg = body
            if op == "putGuestDriveByID":
                why = open_drive(body)
                if why:
                    self._record(method, body, op, "open failed")
                    return self._reply(400, {"fault_message": why})
                State.drives[body["drive_id"]] = body
            State.configured.add(op)
            if op == "putGuestBootSource":
                State.boot = body
            if op == "putMachineConfiguration":
                State.machine = body
            if op == "putGuestNetworkInterfaceByID":
                State.nics[body["iface_id"]] = body
        self._record(method, body, op, "ok")
        if op == "describeInstance":
            return self._reply(
                200,
                {
                    "id": ARGS.id,
                    "state": ("Paused" if State.paused else "Running") if State.started else "Not started",
                    "vmm_version": "1.17.0-dev",
                    "app_name": "Firecracker",
                },
            )
        self._reply(204)

    def _record(self, method, body, op, result) -> None:
        if State.record:
            with State.record.open("a") as fh:
                fh.write(json.dumps({"method": method, "path": self.path, "body": body, "op": op, "result": result}) + "\n")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_GET(self) -> None:
        self._handle("GET")


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--api-sock", required=True)
    ap.add_argument("--id", required=True)
    ARGS = ap.parse_args()
    State.boot = {}
    State.record = Path(os.environ["FC_FAKE_RECORD"]) if os.environ.get("FC_FAKE_RECORD") else None
    _libc.prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: what the guest's commands leave behind stays ours to kill
    signal.signal(signal.SIGUSR1, lambda *_: threading.Timer(0.2, power_off).start())  # the agent's poweroff
    with Server(ARGS.api_sock, Handler) as srv:
        srv.serve_forever()
