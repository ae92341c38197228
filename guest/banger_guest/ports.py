"""What listens in the guest (``vm ports``): every TCP and UDP listener, v4 and v6.

Read from the kernel's own tables, /proc/net/{tcp,tcp6,udp,udp6}, and mapped to the
process holding each socket through /proc/*/fd (no ``ss`` or ``netstat`` needed in the
image). A process listening on the same port on both wildcards (0.0.0.0 and ::) is one
listener. TCP listeners are probed from inside the guest, HTTPS first (a TLS handshake),
then HTTP (a request answered with ``HTTP/``): a TLS server that answers cleartext
with an HTTP error is still https, because its handshake is tried first.

Standard library only (the guest agent runs it); ``ssl`` is optional.
"""

from __future__ import annotations

import glob
import ipaddress
import json
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

PROBE_TIMEOUT = 1.0
TABLES = (("tcp", "/proc/net/tcp", 4), ("tcp", "/proc/net/tcp6", 6), ("udp", "/proc/net/udp", 4), ("udp", "/proc/net/udp6", 6))
TCP_LISTEN, UDP_UNCONNECTED = "0A", "07"
WILDCARDS = ("0.0.0.0", "::")


def _address(hexaddr: str, family: int) -> str:
    """/proc/net's hex address (32-bit words in host byte order: little-endian here)."""
    raw = bytes.fromhex(hexaddr)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words if family == 6 else words[:4]))


def _socket_owners() -> dict[str, int]:
    """socket inode -> the lowest pid holding it."""
    owners: dict[str, int] = {}
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        pid = int(fd_dir.split("/")[2])
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for n in names:
            try:
                target = os.readlink(f"{fd_dir}/{n}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = target[8:-1]
                if inode not in owners or pid < owners[inode]:
                    owners[inode] = pid
    return owners


def _process(pid: int | None) -> tuple[str, str]:
    if pid is None:
        return "", ""
    try:
        with open(f"/proc/{pid}/comm") as fh:
            comm = fh.read().strip()
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "", ""
    return comm, cmd


def _sockets() -> list[tuple[str, int, str, int, str]]:
    """(proto, family, address, port, inode) of every listening socket in the tables."""
    out = []
    for proto, table, family in TABLES:
        try:
            with open(table) as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[3] != (TCP_LISTEN if proto == "tcp" else UDP_UNCONNECTED):
                continue
            hexaddr, hexport = f[1].split(":")
            port = int(hexport, 16)
            if port != 0:
                out.append((proto, family, _address(hexaddr, family), port, f[9]))
    return out


def listeners(probe: bool = True) -> list[dict[str, Any]]:
    """Every listener: proto, address, port, family (4, 6 or "4+6"), pid, process,
    command, and scheme ("https", "http" or "") for TCP."""
    return _listeners(_sockets(), probe)


def _listeners(sockets: list[tuple[str, int, str, int, str]], probe: bool) -> list[dict[str, Any]]:
    owners = _socket_owners()
    found: dict[tuple[str, str, int, int | None], dict[str, Any]] = {}
    for proto, family, address, port, inode in sockets:
        pid = owners.get(inode)
        # the same process on both wildcards: one dual-stack listener
        key = (proto, "*" if address in WILDCARDS else address, port, pid)
        if key in found:
            found[key]["family"] = "4+6"
            if address == "::":
                found[key]["address"] = "::"
            continue
        process, command = _process(pid)
        found[key] = {
            "proto": proto,
            "address": address,
            "port": port,
            "family": family,
            "pid": pid,
            "process": process,
            "command": command,
            "scheme": "",
        }
    result = sorted(found.values(), key=lambda d: (d["proto"], d["port"], d["address"]))
    if probe:
        threads = [threading.Thread(target=_probe, args=(d,)) for d in result if d["proto"] == "tcp"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return result


def watch(write: Callable[[bytes], None], interval: float = 0.5) -> None:
    """The listeners (not probed) as one JSON array per line: now, and again each time
    the set of listening sockets changes (the tables are read every ``interval``
    seconds: the kernel has no event for a new listener). Runs until ``write`` fails
    (the host went) or the process is killed (the host closed the session)."""
    last: set[tuple[str, str, int]] | None = None
    while True:
        sockets = _sockets()
        now = {(proto, address, port) for proto, _f, address, port, _i in sockets}
        if now != last:
            write(json.dumps(_listeners(sockets, probe=False)).encode() + b"\n")
            last = now
        time.sleep(interval)


def connect_relay(host: str, port: int, fd_in: int = 0, fd_out: int = 1) -> None:
    """Connect to ``host:port`` in the guest and relay: what arrives on ``fd_in`` goes
    to the socket (its end: the socket's write side is shut), what the socket sends
    goes to ``fd_out``; returns when the socket's peer is done. ``host`` must be an IP
    address. Raises OSError when nothing listens there."""
    ipaddress.ip_address(host)
    s = socket.create_connection((host, port), timeout=10)
    s.settimeout(None)
    sel = selectors.DefaultSelector()
    sel.register(fd_in, selectors.EVENT_READ, "in")
    sel.register(s, selectors.EVENT_READ, "sock")
    try:
        while True:
            for key, _ in sel.select():
                if key.data == "in":
                    data = os.read(fd_in, 65536)
                    if data:
                        s.sendall(data)
                    else:
                        sel.unregister(fd_in)
                        s.shutdown(socket.SHUT_WR)
                    continue
                data = s.recv(65536)
                if not data:
                    return
                view = memoryview(data)
                while view:
                    view = view[os.write(fd_out, view) :]
    finally:
        s.close()


def _target(d: dict[str, Any]) -> tuple[str, int]:
    if d["address"] == "0.0.0.0":
        return "127.0.0.1", d["port"]
    if d["address"] == "::":
        return "::1", d["port"]
    return d["address"], d["port"]


def _probe(d: dict[str, Any]) -> None:
    d["scheme"] = "https" if _is_tls(*_target(d)) else "http" if _is_http(*_target(d)) else ""


def _is_tls(host: str, port: int) -> bool:
    try:
        import ssl
    except ImportError:
        return False
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost"):
                return True
    except (OSError, ValueError):
        return False


def _is_http(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT) as s:
            s.sendall(b"HEAD / HTTP/1.0\r\nHost: localhost\r\nUser-Agent: banger-ports\r\n\r\n")
            return s.recv(5) == b"HTTP/"
    except OSError:
        return False
