"""The dns plugin: an authoritative server for the ``vm`` zone (a daemon-lifetime service).

The service class is run on a free loopback port with a fake "net" service and asked
real queries over UDP and TCP; then the real daemon runs it (``[dns] port``) and
answers, shows it in ``daemon status`` and releases the port when it stops.
Every packet goes to 127.0.0.0/8.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from typing import Literal

import pytest
from dnslib import EDNS0, QTYPE, RCODE, Buffer, DNSHeader, DNSRecord

import banger_dns
from banger_core.context import FieldsContext
from banger_core.errors import BangerError, ErrorCode
from banger_core.models import Listener
from banger_core.testing import sample_vm
from banger_dns import Settings, zone
from banger_dns.server import DnsService, ListenError, cache_key
from conftest import BANGER
from netns import Netns

LOOPBACK = "127.0.0.1"


class FakeNet:
    """Stands in for the network plugin's "net" service."""

    def __init__(self, records: dict[str, str]) -> None:
        self._records = dict(records)
        self.generation = 1
        self.calls = 0

    def records(self) -> dict[str, str]:
        self.calls += 1
        return dict(self._records)

    def set(self, name: str, address: str | None) -> None:
        if address is None:
            del self._records[name]
        else:
            self._records[name] = address
        self.generation += 1


def settings(**over: object) -> Settings:
    """Settings on port 0 (the kernel picks; the model itself asks for 1..65535)."""
    return Settings().model_copy(update={"port": 0, **over})


def no_net() -> FakeNet:
    raise BangerError(ErrorCode.PLUGIN, "no 'net' service: network offers none")


@pytest.fixture
def net() -> FakeNet:
    return FakeNet({"web": "172.30.0.2", "db": "172.30.0.3"})


@pytest.fixture
def dns(net: FakeNet) -> Iterator[DnsService]:
    svc = DnsService(settings, lambda: net, tcp_idle_seconds=0.5, tcp_max_connections=3)
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


def udp_raw(port: int, payload: bytes, timeout: float = 2.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(payload, (LOOPBACK, port))
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


def ask(port: int, name: str, qtype: str = "A", **edns: int) -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    if edns:
        q.add_ar(EDNS0(**edns))
    data = udp_raw(port, q.pack())
    assert data is not None, f"no answer for {name} {qtype}"
    reply = DNSRecord.parse(data)
    assert reply.header.id == q.header.id and reply.header.qr == 1
    return reply


def tcp_read(sock: socket.socket) -> DNSRecord:
    head = b""
    while len(head) < 2:
        chunk = sock.recv(2 - len(head))
        assert chunk, "connection closed"
        head += chunk
    (size,) = struct.unpack("!H", head)
    body = b""
    while len(body) < size:
        chunk = sock.recv(size - len(body))
        assert chunk, "connection closed mid-message"
        body += chunk
    return DNSRecord.parse(body)


def framed(q: DNSRecord) -> bytes:
    data = q.pack()
    return struct.pack("!H", len(data)) + data


def rcode(reply: DNSRecord) -> str:
    return str(RCODE[reply.header.rcode])


def answers(reply: DNSRecord) -> list[tuple[str, str, str]]:
    return [(str(rr.rname), str(QTYPE[rr.rtype]), str(rr.rdata)) for rr in reply.rr]


def assert_soa_authority(reply: DNSRecord, apex: str = "vm.") -> None:
    assert [(str(rr.rname), str(QTYPE[rr.rtype])) for rr in reply.auth] == [(apex, "SOA")]


# --- answers over UDP ---------------------------------------------------------------------
def test_a_record_found_and_case_insensitive(dns: DnsService) -> None:
    assert dns.port is not None
    reply = ask(dns.port, "web.vm")
    assert rcode(reply) == "NOERROR" and reply.header.aa == 1
    assert answers(reply) == [("web.vm.", "A", "172.30.0.2")]
    assert reply.rr[0].ttl == 5
    mixed = ask(dns.port, "WeB.Vm")
    assert answers(mixed) == [("WeB.Vm.", "A", "172.30.0.2")]  # the question's spelling comes back
    assert str(mixed.q.qname) == "WeB.Vm."


def test_nxdomain_for_unknown_and_deeper_names(dns: DnsService) -> None:
    assert dns.port is not None
    for name in ("nosuch.vm", "a.web.vm", "x.y.vm"):
        reply = ask(dns.port, name)
        assert rcode(reply) == "NXDOMAIN" and reply.header.aa == 1, name
        assert reply.rr == []
        assert_soa_authority(reply)


def test_refused_outside_the_zone(dns: DnsService) -> None:
    assert dns.port is not None
    for name in ("example.com", "notvm", "web.vmx", "."):
        reply = ask(dns.port, name)
        assert rcode(reply) == "REFUSED" and reply.header.aa == 0, name
        assert reply.rr == [] and reply.auth == []


def test_nodata_for_other_types_of_an_existing_name(dns: DnsService) -> None:
    assert dns.port is not None
    for qtype in ("AAAA", "MX", "TXT"):
        reply = ask(dns.port, "web.vm", qtype)
        assert rcode(reply) == "NOERROR" and reply.header.aa == 1
        assert reply.rr == []
        assert_soa_authority(reply)


def test_apex_soa_and_ns(dns: DnsService, net: FakeNet) -> None:
    assert dns.port is not None
    soa = ask(dns.port, "vm", "SOA")
    assert rcode(soa) == "NOERROR" and soa.header.aa == 1
    ((owner, qtype, rdata),) = answers(soa)
    assert (owner, qtype) == ("vm.", "SOA")
    assert rdata.split()[:3] == ["ns.vm.", "hostmaster.vm.", str(net.generation)]  # the serial is the generation
    assert answers(ask(dns.port, "VM.", "NS")) == [("vm.", "NS", "ns.vm.")]
    apex_a = ask(dns.port, "vm", "A")
    assert rcode(apex_a) == "NOERROR" and apex_a.rr == []
    assert_soa_authority(apex_a)


def test_formerr_notimp_and_dropped_garbage(dns: DnsService) -> None:
    assert dns.port is not None
    # a header claiming one question, then garbage where the question should be
    garbage = struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0) + b"\x3fabc"
    data = udp_raw(dns.port, garbage)
    assert data is not None
    header = DNSHeader.parse(Buffer(data))
    assert header.id == 0xBEEF and header.qr == 1 and header.rcode == RCODE.FORMERR
    # two questions: FORMERR as well
    two = DNSRecord.question("web.vm")
    two.add_question(*DNSRecord.question("db.vm").questions)
    reply = DNSRecord.parse(udp_raw(dns.port, two.pack()))
    assert rcode(reply) == "FORMERR"
    # opcode NOTIFY (4)
    notify = DNSRecord.question("web.vm")
    notify.header.opcode = 4
    reply = DNSRecord.parse(udp_raw(dns.port, notify.pack()))
    assert rcode(reply) == "NOTIMP" and reply.header.opcode == 4 and reply.header.id == notify.header.id
    # shorter than a header: dropped; a response (QR set): dropped; the server lives on
    assert udp_raw(dns.port, b"\x01\x02\x03", timeout=0.3) is None
    response = DNSRecord.question("web.vm")
    response.header.qr = 1
    assert udp_raw(dns.port, response.pack(), timeout=0.3) is None
    assert answers(ask(dns.port, "db.vm")) == [("db.vm.", "A", "172.30.0.3")]


def test_edns_is_answered_with_opt_and_badvers(dns: DnsService) -> None:
    assert dns.port is not None
    for _ in range(2):  # the second one comes from the cache
        reply = ask(dns.port, "web.vm", udp_len=4096)
        assert answers(reply) == [("web.vm.", "A", "172.30.0.2")]
        (opt,) = reply.ar
        assert opt.rtype == QTYPE.OPT and opt.rclass == zone.EDNS_UDP_SIZE
    bad = ask(dns.port, "web.vm", udp_len=1232, version=1)
    (opt,) = bad.ar
    assert ((opt.ttl >> 24) << 4 | bad.header.rcode) == zone.BADVERS and bad.rr == []


def test_cache_serves_repeats_with_their_own_id(dns: DnsService, net: FakeNet) -> None:
    assert dns.port is not None
    q = DNSRecord.question("web.vm")
    first = udp_raw(dns.port, q.pack())
    q.header.id = (q.header.id + 1) % 65536
    second = udp_raw(dns.port, q.pack())
    assert first is not None and second is not None
    assert second[:2] == struct.pack("!H", q.header.id) and second[2:] == first[2:]
    key = cache_key(bytes(q.pack()))
    assert key is not None and key in dns.current().udp  # the repeat was a dict lookup
    assert net.calls == 1  # records() once for this generation


def test_records_follow_generation_changes(dns: DnsService, net: FakeNet) -> None:
    assert dns.port is not None
    assert rcode(ask(dns.port, "cache.vm")) == "NXDOMAIN"
    net.set("cache", "172.30.0.9")
    assert answers(ask(dns.port, "cache.vm")) == [("cache.vm.", "A", "172.30.0.9")]
    net.set("cache", "172.30.0.10")
    assert answers(ask(dns.port, "cache.vm")) == [("cache.vm.", "A", "172.30.0.10")]
    net.set("web", None)
    gone = ask(dns.port, "web.vm")
    assert rcode(gone) == "NXDOMAIN"
    assert str(gone.auth[0].rdata).split()[2] == str(net.generation)
    assert dns.status()["records"] == 2


def test_truncation_over_the_udp_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A-record answers stay far below 512 bytes; with the limit lowered the TC path shows."""
    data = zone.ZoneData("vm", 5, {b"web": "172.30.0.2"}, 1)
    q = DNSRecord.question("web.vm").pack()
    monkeypatch.setattr(zone, "PLAIN_UDP_SIZE", 30)
    cut = DNSRecord.parse(zone.respond(q, data, tcp=False).data)
    assert cut.header.tc == 1 and cut.rr == [] and str(cut.q.qname) == "web.vm."
    whole = DNSRecord.parse(zone.respond(q, data, tcp=True).data)
    assert whole.header.tc == 0 and answers(whole) == [("web.vm.", "A", "172.30.0.2")]


# --- TCP ----------------------------------------------------------------------------------
def test_tcp_several_queries_on_one_connection(dns: DnsService) -> None:
    assert dns.port is not None
    with socket.create_connection((LOOPBACK, dns.port), timeout=2) as s:
        queries = [DNSRecord.question(n, t) for n, t in (("web.vm", "A"), ("nosuch.vm", "A"), ("vm", "SOA"))]
        s.sendall(b"".join(framed(q) for q in queries))  # pipelined in one write
        replies = [tcp_read(s) for _ in queries]
        assert [r.header.id for r in replies] == [q.header.id for q in queries]
        assert [rcode(r) for r in replies] == ["NOERROR", "NXDOMAIN", "NOERROR"]
        assert answers(replies[0]) == [("web.vm.", "A", "172.30.0.2")]
        later = DNSRecord.question("db.vm")
        data = framed(later)
        s.sendall(data[:3])  # a message split across writes
        time.sleep(0.05)
        s.sendall(data[3:])
        assert answers(tcp_read(s)) == [("db.vm.", "A", "172.30.0.3")]
        refused = DNSRecord.question("example.com")
        s.sendall(framed(refused))
        assert rcode(tcp_read(s)) == "REFUSED"
    assert dns.status()["queries"] == 5


def test_tcp_connections_are_bounded_and_idle_ones_closed(dns: DnsService) -> None:
    assert dns.port is not None
    held = [socket.create_connection((LOOPBACK, dns.port), timeout=2) for _ in range(3)]
    try:
        held[0].sendall(framed(DNSRecord.question("web.vm")))  # all three accepted: one answers
        assert rcode(tcp_read(held[0])) == "NOERROR"
        with socket.create_connection((LOOPBACK, dns.port), timeout=2) as extra:
            assert extra.recv(10) == b""  # over the limit (3): closed at once
        start = time.monotonic()
        assert held[1].recv(10) == b""  # idle for tcp_idle_seconds (0.5): closed
        assert 0.3 < time.monotonic() - start < 2.0
        # the others go within their own idle time (held[0] was active last)
        deadline = time.monotonic() + 2.0
        while dns.status()["tcp_connections"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert dns.status()["tcp_connections"] == 0
    finally:
        for s in held:
            s.close()


# --- lifecycle ----------------------------------------------------------------------------
def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            u.bind((LOOPBACK, port))
            t.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((LOOPBACK, 0))
            port = u.getsockname()[1]
        if port_free(port):
            return int(port)
    raise AssertionError("no free loopback port for UDP and TCP")


def test_status_and_stop_releases_the_ports(net: FakeNet) -> None:
    svc = DnsService(settings, lambda: net)
    before = svc.status()
    assert before["udp"] is False and before["tcp"] is False
    svc.start()
    port = svc.port
    assert port is not None and not port_free(port)
    ask(port, "web.vm")
    with socket.create_connection((LOOPBACK, port), timeout=2) as s:  # a connection open at stop
        s.sendall(framed(DNSRecord.question("db.vm")))
        tcp_read(s)
        assert svc.status() == {
            "listen": f"127.0.0.1:{port}",
            "udp": True,
            "tcp": True,
            "zone": "vm",
            "records": 2,
            "queries": 2,
            "tcp_connections": 1,
        }
        t0 = time.monotonic()
        svc.stop()
        assert time.monotonic() - t0 < 1.0
        assert s.recv(10) == b""
    assert port_free(port)
    assert svc.status()["udp"] is False
    svc.stop()  # twice: nothing to do


def test_start_fails_clearly_when_the_port_is_taken(net: FakeNet) -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind((LOOPBACK, port))
        svc = DnsService(lambda: settings(port=port), lambda: net)
        with pytest.raises(ListenError, match=rf"cannot listen on 127\.0\.0\.1:{port}/udp: Address already in use"):
            svc.start()
        assert svc.status()["udp"] is False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind((LOOPBACK, port))
        squatter.listen(1)
        svc = DnsService(lambda: settings(port=port), lambda: net)
        with pytest.raises(ListenError, match=rf"127\.0\.0\.1:{port}/tcp"):
            svc.start()
    assert port_free(port)  # the UDP socket of the failed start was closed


def test_without_a_net_service_the_zone_is_empty() -> None:
    svc = DnsService(lambda: settings(zone="lab.test"), no_net)
    svc.start()
    try:
        assert svc.port is not None
        assert rcode(ask(svc.port, "web.lab.test")) == "NXDOMAIN"
        assert answers(ask(svc.port, "lab.test", "NS")) == [("lab.test.", "NS", "ns.lab.test.")]
        assert rcode(ask(svc.port, "web.vm")) == "REFUSED"  # another zone now
        st = svc.status()
        assert st["records"] == 0 and st["zone"] == "lab.test"
        assert st["net"] == "missing (no 'net' service: network offers none): every name is NXDOMAIN"
    finally:
        svc.stop()


# --- hooks --------------------------------------------------------------------------------
def listener(address: str, port: int = 8080, proto: Literal["tcp", "udp"] = "tcp") -> Listener:
    return Listener(proto=proto, address=address, port=port, family=6 if ":" in address else 4)


def fields_ctx(name: str, service: DnsService | None) -> FieldsContext:
    def lookup(capability: str) -> DnsService:
        assert capability == "dns"
        if service is None:
            raise BangerError(ErrorCode.PLUGIN, "no services outside the daemon")
        return service

    return FieldsContext(
        plugin="dns", vm=sample_vm(name), settings=Settings(), options=None, teardown={}, handles={}, service=lookup
    )


def test_vm_fields_and_port_endpoint(dns: DnsService) -> None:
    web, gone = fields_ctx("web", dns), fields_ctx("gone", dns)
    assert banger_dns.vm_fields(web, True) == {"dns": "web.vm"}
    assert banger_dns.vm_fields(web, False) == {"dns": "web.vm"}
    assert banger_dns.vm_fields(gone, True) is None
    assert banger_dns.vm_port_endpoint(web, listener("0.0.0.0")) == "web.vm:8080"
    assert banger_dns.vm_port_endpoint(web, listener("::", 53, "udp")) == "web.vm:53"
    assert banger_dns.vm_port_endpoint(web, listener("172.30.0.2", 22)) == "web.vm:22"
    assert banger_dns.vm_port_endpoint(web, listener("127.0.0.1")) is None
    assert banger_dns.vm_port_endpoint(web, listener("::1")) is None
    assert banger_dns.vm_port_endpoint(web, listener("10.0.0.5")) is None  # another address of the guest
    assert banger_dns.vm_port_endpoint(gone, listener("0.0.0.0")) is None
    web = fields_ctx("web", None)  # no daemon service: nothing to say
    assert banger_dns.vm_port_endpoint(web, listener("0.0.0.0")) is None and banger_dns.vm_fields(web, True) is None


def test_doctor_port_check(net: FakeNet) -> None:
    port = free_port()
    s = Settings(port=port)
    ok = banger_dns._port_check(s, None)
    assert (ok.status, ok.detail) == ("PASS", f"127.0.0.1:{port} udp and tcp are free")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind((LOOPBACK, port))
        taken = banger_dns._port_check(s, None)
    assert taken.status == "FAIL" and f"127.0.0.1:{port}/udp is taken" in taken.detail and "another program" in taken.detail
    svc = DnsService(lambda: s, lambda: net)
    svc.start()
    try:  # a server for .vm, but no bangerd of this user's says it is its own
        foreign = banger_dns._port_check(s, None)
    finally:
        svc.stop()
    assert foreign.status == "FAIL" and "udp+tcp is taken" in foreign.detail and "not this user's bangerd" in foreign.detail


# --- through the real daemon and CLI ------------------------------------------------------
def test_daemon_runs_the_service_and_releases_the_port(benv) -> None:
    """The daemon in a namespace of its own (where bridge VMs may exist, so DNS listens);
    queries from inside it."""
    ns = Netns.make()
    try:
        port = 42069  # the default: the namespace's loopback is the test's alone
        benv.extra_env["BANGER_NETNS"] = ns.name

        def banger(*args: str) -> subprocess.CompletedProcess:
            return ns.run([BANGER, *args], env=benv.env(), check=True)

        def ask_in_ns(qname: str, qtype: str = "A", tcp: bool = False) -> DNSRecord:
            code = f"""
                import sys
                from dnslib import DNSRecord
                q = DNSRecord.question({qname!r}, {qtype!r})
                sys.stdout.write(q.send("127.0.0.1", {port}, tcp={tcp}, timeout=5).hex())
            """
            return DNSRecord.parse(bytes.fromhex(ns.python(code).stdout))

        banger("daemon", "start")
        st = json.loads(banger("daemon", "status", "--json").stdout)
        dns = st["services"]["dns"]
        assert dns["listen"] == f"127.0.0.1:{port}" and dns["udp"] is True and dns["tcp"] is True, dns
        assert dns["zone"] == "vm" and "error" not in dns and "idle" not in dns
        human = banger("daemon", "status").stdout
        assert f"service dns: listen 127.0.0.1:{port}, udp True, tcp True, zone vm" in human

        nx = ask_in_ns("nosuch.vm")
        assert rcode(nx) == "NXDOMAIN" and nx.header.aa == 1
        assert_soa_authority(nx)
        assert rcode(ask_in_ns("example.com")) == "REFUSED"
        assert answers(ask_in_ns("vm", "SOA", tcp=True))[0][:2] == ("vm.", "SOA")
        after = json.loads(banger("daemon", "status", "--json").stdout)["services"]["dns"]
        assert after["queries"] == 3

        doctor = ns.run([BANGER, "doctor"], env=benv.env())
        line = next(ln for ln in doctor.stdout.splitlines() if "dns: port" in ln)
        assert f"bangerd (pid {st['pid']}) answers on 127.0.0.1:{port} for .vm" in line and "PASS" in line, line

        banger("daemon", "stop")
        r = ns.python(f"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('127.0.0.1', {port}))")
        assert r.returncode == 0  # released
    finally:
        ns.delete()


def test_with_no_bridge_network_possible_the_daemon_takes_no_port(benv) -> None:
    """BANGER_NETNS=none (the test suite's default): no VM can have a bridge address, so
    there is nothing to answer for and no port is taken (test daemons never fight over
    42069, nor with the user's own bangerd)."""
    port = free_port()
    benv.write_config(f"[dns]\nport = {port}\n")
    benv.run("daemon", "start", check=True)
    dns = json.loads(benv.run("daemon", "status", "--json", check=True).stdout)["services"]["dns"]
    assert dns["udp"] is False and dns["tcp"] is False and "BANGER_NETNS = 'none'" in dns["idle"], dns
    assert port_free(port)
