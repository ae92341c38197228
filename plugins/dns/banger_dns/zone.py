"""Answers for the zone, built with dnslib: one query message in, one response out.

Pure functions of (query bytes, zone snapshot): the server caches what they return,
so nothing here is on the hot path of a repeated query.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dnslib import (
    EDNS0,
    NS,
    OPCODE,
    QTYPE,
    RCODE,
    RR,
    SOA,
    A,
    Buffer,
    DNSError,
    DNSHeader,
    DNSLabel,
    DNSRecord,
)

#: the UDP payload size this server advertises (EDNS) and honours at most
EDNS_UDP_SIZE = 1232
#: a UDP response to a query without EDNS is at most this long (RFC 1035)
PLAIN_UDP_SIZE = 512
#: SOA timers (seconds): refresh, retry, expire; the minimum (negative TTL) is the zone's ttl
SOA_TIMERS = (3600, 600, 86400)
BADVERS = 16
CLASS_IN, CLASS_ANY = 1, 255


@dataclass(frozen=True)
class ZoneData:
    """One generation of the zone: names (lowercase label bytes) -> IPv4 address."""

    zone: str
    ttl: int
    names: dict[bytes, str] = field(default_factory=dict)
    serial: int = 0

    @property
    def labels(self) -> tuple[bytes, ...]:
        return tuple(self.zone.encode().split(b"."))


@dataclass(frozen=True)
class Answer:
    """A response (None: drop the query) and whether it may be cached for its key
    (the query parsed completely: a FORMERR is not cached)."""

    data: bytes | None
    parsed: bool


def _error(header: DNSHeader, rcode: int, query: DNSRecord | None = None) -> bytes:
    reply = DNSRecord(DNSHeader(id=header.id, qr=1, opcode=header.opcode, rd=header.rd, cd=header.cd, rcode=rcode))
    if query is not None:
        reply.add_question(*query.questions)
    return bytes(reply.pack())


def respond(data: bytes, zone: ZoneData, *, tcp: bool) -> Answer:
    """The response to the DNS message ``data`` (sent over TCP or UDP)."""
    if len(data) < 12:
        return Answer(None, False)  # not even a header: nobody to answer
    header = DNSHeader.parse(Buffer(data))
    if header.qr:
        return Answer(None, False)  # a response, not a query: never answer those (no loops)
    if header.opcode != OPCODE.QUERY:
        return Answer(_error(header, RCODE.NOTIMP), True)
    try:
        query = DNSRecord.parse(data)
    except (DNSError, ValueError, IndexError, UnicodeError):
        return Answer(_error(header, RCODE.FORMERR), False)
    opts = [rr for rr in query.ar if rr.rtype == QTYPE.OPT]
    if len(query.questions) != 1 or len(opts) > 1:
        return Answer(_error(header, RCODE.FORMERR, query if len(query.questions) == 1 else None), True)
    opt = opts[0] if opts else None
    if opt is not None and (opt.ttl >> 16) & 0xFF != 0:  # an EDNS version other than 0
        reply = DNSRecord(DNSHeader(id=header.id, qr=1, opcode=header.opcode, rd=header.rd, cd=header.cd))
        reply.add_question(query.q)
        reply.add_ar(EDNS0(udp_len=EDNS_UDP_SIZE, ext_rcode=BADVERS >> 4))
        reply.header.rcode = BADVERS & 0xF
        return Answer(bytes(reply.pack()), True)
    reply = _answer(query, zone)
    if opt is not None:
        reply.add_ar(EDNS0(udp_len=EDNS_UDP_SIZE))
    packed = bytes(reply.pack())
    limit = (max(PLAIN_UDP_SIZE, min(opt.rclass, EDNS_UDP_SIZE)) if opt is not None else PLAIN_UDP_SIZE) if not tcp else 65535
    if len(packed) > limit:  # truncated: the question (and OPT) only, TC set; the client asks again over TCP
        cut = DNSRecord(DNSHeader(id=header.id, qr=1, aa=reply.header.aa, tc=1, rd=header.rd, cd=header.cd))
        cut.header.rcode = reply.header.rcode
        cut.add_question(query.q)
        if opt is not None:
            cut.add_ar(EDNS0(udp_len=EDNS_UDP_SIZE))
        packed = bytes(cut.pack())
    return Answer(packed, True)


def soa_rr(zone: ZoneData) -> RR:
    apex = DNSLabel(zone.zone)
    soa = SOA(f"ns.{zone.zone}.", f"hostmaster.{zone.zone}.", (zone.serial & 0xFFFFFFFF, *SOA_TIMERS, zone.ttl))
    return RR(apex, QTYPE.SOA, ttl=zone.ttl, rdata=soa)


def ns_rr(zone: ZoneData) -> RR:
    return RR(DNSLabel(zone.zone), QTYPE.NS, ttl=zone.ttl, rdata=NS(f"ns.{zone.zone}."))


def _answer(query: DNSRecord, zone: ZoneData) -> DNSRecord:
    q = query.q
    header = DNSHeader(id=query.header.id, qr=1, opcode=OPCODE.QUERY, rd=query.header.rd, cd=query.header.cd)
    reply = DNSRecord(header)
    reply.add_question(q)
    labels = tuple(label.lower() for label in q.qname.label)
    apex = zone.labels
    inside = len(labels) >= len(apex) and labels[len(labels) - len(apex) :] == apex
    if not inside or q.qclass not in (CLASS_IN, CLASS_ANY):
        header.rcode = RCODE.REFUSED  # not ours: this server does no recursion
        return reply
    header.aa = 1
    rel = labels[: len(labels) - len(apex)]
    qtype = q.qtype
    if not rel:  # the apex: SOA and NS
        if qtype in (QTYPE.SOA, QTYPE.ANY):
            reply.add_answer(soa_rr(zone))
        if qtype in (QTYPE.NS, QTYPE.ANY):
            reply.add_answer(ns_rr(zone))
        if not reply.rr:
            reply.add_auth(soa_rr(zone))  # NODATA
        return reply
    address = zone.names.get(rel[0]) if len(rel) == 1 else None
    if address is None:
        header.rcode = RCODE.NXDOMAIN
        reply.add_auth(soa_rr(zone))
        return reply
    if qtype in (QTYPE.A, QTYPE.ANY):
        reply.add_answer(RR(q.qname, QTYPE.A, ttl=zone.ttl, rdata=A(address)))
    else:
        reply.add_auth(soa_rr(zone))  # NODATA: the name exists, without this type
    return reply
