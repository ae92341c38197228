"""The daemon-lifetime DNS service: UDP and TCP sockets served by one thread.

Records come from the "net" service (``records()``, ``generation``). Answers are
cached as packed bytes per query key, per generation; a repeated query costs a dict
lookup and a 2-byte transaction id patch.
"""

from __future__ import annotations

import ipaddress
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from banger_dns.zone import ZoneData, respond

if TYPE_CHECKING:
    from banger_dns import Settings
    from banger_dns.netapi import NetService

log = logging.getLogger("banger.plugin.dns")

#: cached responses per transport and generation; cleared when full
MAX_CACHED = 4096
#: TCP: connections served at once, idle seconds before one is closed, bytes of
#: unsent responses before the connection stops being read
TCP_MAX_CONNECTIONS = 64
TCP_IDLE_SECONDS = 10.0
TCP_MAX_PENDING = 256 * 1024
#: datagrams handled per wake-up before the TCP side gets a turn
UDP_BATCH = 256

_ONE_QUESTION = b"\x00\x01\x00\x00\x00\x00\x00\x00"  # QD=1 AN=0 NS=0 AR=0
_ONE_QUESTION_OPT = b"\x00\x01\x00\x00\x00\x00\x00\x01"  # ... AR=1 (an OPT, when EDNS)
_OPT_HEAD = b"\x00\x00\x29"  # the root name and type 41


class ListenError(RuntimeError):
    """The DNS sockets could not be bound."""


def cache_key(data: bytes) -> bytes | None:
    """What a query's response depends on besides its id, or None (not cacheable).

    A plain one-question query: everything after the id. With an OPT record: up to the
    OPT's fixed part (its options, such as cookies, don't change the answer). The name's
    end is found as its first zero byte; ``key_is_exact`` checks that on a miss."""
    if len(data) < 17 or data[2] & 0xF8:  # a response, or an opcode other than QUERY
        return None
    counts = data[4:12]
    if counts == _ONE_QUESTION:
        return data[2:]
    if counts == _ONE_QUESTION_OPT:
        end = data.find(0, 12)
        if end > 0 and data[end + 5 : end + 8] == _OPT_HEAD and len(data) >= end + 16:
            return data[2 : end + 14]
    return None


def _name_end(data: bytes, off: int) -> int:
    """The offset just past the uncompressed name at ``off``, or -1."""
    while off < len(data):
        n = data[off]
        if n == 0:
            return off + 1
        if n > 63:
            return -1
        off += n + 1
    return -1


def key_is_exact(data: bytes, key: bytes) -> bool:
    """Whether ``key`` (from ``cache_key``) covers exactly one question: a label holding
    a zero byte would make the first-zero rule cut the name short."""
    if data[4:12] == _ONE_QUESTION:
        return True
    return _name_end(data, 12) == data.find(0, 12) + 1


@dataclass(frozen=True)
class _View:
    """One generation of the records, and the responses cached for it."""

    generation: int | None
    zone: ZoneData
    udp: dict[bytes, bytes] = field(default_factory=dict)
    tcp: dict[bytes, bytes] = field(default_factory=dict)


class _Conn:
    __slots__ = ("eof", "inbuf", "last", "outbuf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.last = time.monotonic()
        self.eof = False


def _format_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DnsService:
    """The "dns" service: an authoritative server for ``<name>.<zone>``.

    ``settings`` and ``net`` are called at ``start`` (not at construction): the first
    gives the plugin's settings, the second the "net" service or raises (no provider:
    the zone is served empty and ``status`` says why)."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        net: Callable[[], NetService],
        *,
        tcp_max_connections: int = TCP_MAX_CONNECTIONS,
        tcp_idle_seconds: float = TCP_IDLE_SECONDS,
    ) -> None:
        self._settings_fn = settings
        self._net_fn = net
        self.tcp_max_connections = tcp_max_connections
        self.tcp_idle_seconds = tcp_idle_seconds
        self._lock = threading.Lock()
        self._net: NetService | None = None
        self._net_error: str | None = None
        self._net_looked_up = False
        self._idle: str | None = None  # why start() did not listen (no bridge network here)
        self._settings: Settings | None = None
        self._view = _View(None, ZoneData("vm", 0))
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._conns: dict[int, _Conn] = {}
        self.queries = 0
        self.port: int | None = None

    # --- records ------------------------------------------------------------------------
    def _lookup_net(self) -> NetService | None:
        if not self._net_looked_up:
            try:
                self._net, self._net_error = self._net_fn(), None
            except Exception as exc:
                self._net, self._net_error = None, getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            self._net_looked_up = True
        return self._net

    def _settings_now(self) -> Settings:
        if self._settings is None:
            self._settings = self._settings_fn()
        return self._settings

    def current(self) -> _View:
        """The view for the net service's current generation (made when it changed)."""
        view = self._view
        net = self._net if self._net_looked_up else self._lookup_net()
        if net is None:
            return view
        if net.generation != view.generation:
            view = self._refresh(net)
        return view

    def _refresh(self, net: NetService) -> _View:
        with self._lock:
            generation = net.generation  # before records(): a change in between refreshes again
            if generation == self._view.generation:
                return self._view
            s = self._settings_now()
            names = {name.lower().encode(): addr for name, addr in net.records().items()}
            self._view = _View(generation, ZoneData(s.zone, s.ttl, names, generation))
            return self._view

    def address_of(self, vm_name: str) -> str | None:
        """The VM's address in the zone (None: not there)."""
        return self.current().zone.names.get(vm_name.lower().encode())

    def zone_name(self) -> str:
        return self._settings_now().zone

    # --- answering (the hot path) ---------------------------------------------------------
    def answer(self, data: bytes, tcp: bool) -> bytes | None:
        """The response to one query message (None: drop it)."""
        view = self._view
        net = self._net
        if net is not None and net.generation != view.generation:
            view = self._refresh(net)
        self.queries += 1
        cache = view.tcp if tcp else view.udp
        key = cache_key(data)
        if key is not None:
            hit = cache.get(key)
            if hit is not None:
                return data[:2] + hit
        out = respond(data, view.zone, tcp=tcp)
        if out.data is not None and key is not None and out.parsed and key_is_exact(data, key):
            if len(cache) >= MAX_CACHED:
                cache.clear()
            cache[key] = out.data[2:]
        return out.data

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._settings = None
            s = self._settings_now()
        self._net_looked_up = False
        self._lookup_net()
        self._view = _View(None, ZoneData(s.zone, s.ttl))
        if self._net is None:
            log.warning("dns: no net service (%s): the %s zone is served empty", self._net_error, s.zone)
        possible = getattr(self._net, "bridge_possible", None)
        self._idle = None
        if callable(possible):
            ok, why = possible()
            if not ok:  # no VM can have a bridge address here: nothing to answer for, no port taken
                self._idle = f"no bridge network here ({why})"
                log.info("dns: not listening: %s", self._idle)
                return
        udp, tcp = self._bind(s.listen, s.port)
        self._udp, self._tcp = udp, tcp
        self.port = udp.getsockname()[1]
        self._wake = socket.socketpair()
        for sock in (udp, tcp, *self._wake):
            sock.setblocking(False)
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="banger-dns", daemon=True)
        self._thread.start()
        log.info("dns: answering for %s on %s (udp, tcp)", s.zone, _format_addr(s.listen, self.port))

    def _bind(self, host: str, port: int) -> tuple[socket.socket, socket.socket]:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        tries = 5 if port == 0 else 1  # port 0: the UDP port's TCP twin may be taken; pick again
        for attempt in range(tries):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            try:
                udp.bind((host, port))
            except OSError as exc:
                udp.close()
                raise ListenError(self._taken(host, port, "udp", exc)) from exc
            chosen = udp.getsockname()[1]
            tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((host, chosen))
                tcp.listen(128)
            except OSError as exc:
                tcp.close()
                udp.close()
                if attempt + 1 < tries:
                    continue
                raise ListenError(self._taken(host, chosen, "tcp", exc)) from exc
            return udp, tcp
        raise AssertionError("unreachable")

    @staticmethod
    def _taken(host: str, port: int, proto: str, exc: OSError) -> str:
        return (
            f"cannot listen on {_format_addr(host, port)}/{proto}: {exc.strerror or exc}; "
            "another program (or another bangerd) holds it: stop it, or set [dns] port in config.toml"
        )

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping = True
        if self._wake is not None:
            try:
                self._wake[1].send(b"x")
            except OSError:
                pass
        thread.join(timeout=2.0)
        if thread.is_alive():
            log.warning("dns: the server thread did not stop within 2s; closing its sockets anyway")
        self._close_all()

    def _close_all(self) -> None:
        for conn in list(self._conns.values()):
            conn.sock.close()
        self._conns.clear()
        for sock in (self._udp, self._tcp, *(self._wake or ())):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = self._wake = None

    def status(self) -> dict[str, object]:
        try:
            s = self._settings_now()
        except Exception as exc:
            return {"settings_error": getattr(exc, "message", None) or str(exc)}
        running = self._thread is not None
        view = self.current()
        out: dict[str, object] = {
            "listen": _format_addr(s.listen, self.port if running and self.port is not None else s.port),
            "udp": running and self._udp is not None,
            "tcp": running and self._tcp is not None,
            "zone": s.zone,
            "records": len(view.zone.names),
            "queries": self.queries,
        }
        if running:
            out["tcp_connections"] = len(self._conns)
        if self._net_looked_up and self._net is None:
            out["net"] = f"missing ({self._net_error}): every name is NXDOMAIN"
        if self._idle:
            out["idle"] = self._idle
        return out

    # --- the server thread ----------------------------------------------------------------
    def _serve(self) -> None:
        udp, tcp, wake = self._udp, self._tcp, self._wake
        assert udp is not None and tcp is not None and wake is not None
        sel = selectors.DefaultSelector()
        sel.register(udp, selectors.EVENT_READ, "udp")
        sel.register(tcp, selectors.EVENT_READ, "accept")
        sel.register(wake[0], selectors.EVENT_READ, "wake")
        try:
            while not self._stopping:
                for key, mask in sel.select(timeout=min(1.0, self.tcp_idle_seconds) if self._conns else None):
                    what = key.data
                    if what == "udp":
                        self._serve_udp(udp)
                    elif what == "accept":
                        self._accept(sel, tcp)
                    elif isinstance(what, _Conn):
                        self._serve_conn(sel, what, mask)
                if self._conns:
                    self._close_idle(sel)
        except Exception:
            log.exception("dns: the server thread failed")
        finally:
            sel.close()

    def _serve_udp(self, udp: socket.socket) -> None:
        recv, send, answer = udp.recvfrom, udp.sendto, self.answer
        for _ in range(UDP_BATCH):
            try:
                data, addr = recv(4096)
            except BlockingIOError:
                return
            except OSError:  # e.g. an ICMP error for an earlier reply: nothing to do
                continue
            try:
                out = answer(data, False)
            except Exception:
                log.exception("dns: answering a UDP query failed")
                continue
            if out is not None:
                try:
                    send(out, addr)
                except OSError:
                    pass  # a full buffer or a client gone: UDP drops it

    def _accept(self, sel: selectors.BaseSelector, tcp: socket.socket) -> None:
        try:
            sock, _addr = tcp.accept()
        except OSError:
            return
        if len(self._conns) >= self.tcp_max_connections:
            sock.close()  # bounded: the client retries, or falls back
            return
        sock.setblocking(False)
        conn = _Conn(sock)
        self._conns[sock.fileno()] = conn
        sel.register(sock, selectors.EVENT_READ, conn)

    def _drop(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        self._conns.pop(conn.sock.fileno(), None)
        try:
            sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _serve_conn(self, sel: selectors.BaseSelector, conn: _Conn, mask: int) -> None:
        conn.last = time.monotonic()
        if mask & selectors.EVENT_READ:
            try:
                chunk = conn.sock.recv(65536)
            except BlockingIOError:
                chunk = None
            except OSError:
                self._drop(sel, conn)
                return
            if chunk == b"":
                conn.eof = True
            elif chunk:
                conn.inbuf += chunk
                while len(conn.inbuf) >= 2:
                    size = int.from_bytes(conn.inbuf[:2], "big")
                    if len(conn.inbuf) < size + 2:
                        break
                    message = bytes(conn.inbuf[2 : size + 2])
                    del conn.inbuf[: size + 2]
                    try:
                        out = self.answer(message, True)
                    except Exception:
                        log.exception("dns: answering a TCP query failed")
                        out = None
                    if out is None:  # not a DNS message: this connection is done
                        self._drop(sel, conn)
                        return
                    conn.outbuf += len(out).to_bytes(2, "big") + out
        if conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._drop(sel, conn)
                return
            del conn.outbuf[:sent]
        if conn.eof and not conn.outbuf:
            self._drop(sel, conn)
            return
        events = 0 if conn.eof or len(conn.outbuf) > TCP_MAX_PENDING else selectors.EVENT_READ
        if conn.outbuf:
            events |= selectors.EVENT_WRITE
        sel.modify(conn.sock, events, conn)

    def _close_idle(self, sel: selectors.BaseSelector) -> None:
        cutoff = time.monotonic() - self.tcp_idle_seconds
        for conn in [c for c in self._conns.values() if c.last < cutoff]:
            self._drop(sel, conn)
