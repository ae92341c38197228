"""Ask a DNS server on loopback for the zone's SOA (``banger doctor``: who holds the port)."""

from __future__ import annotations

import socket

from dnslib import QTYPE, RCODE, DNSError, DNSRecord


def answers_for_zone(host: str, port: int, zone: str, timeout: float = 1.0) -> bool:
    """Whether the server at host:port (UDP) answers the zone's SOA authoritatively."""
    query = DNSRecord.question(f"{zone}.", "SOA")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(query.pack(), (host, port))
            data, _addr = sock.recvfrom(4096)
            reply = DNSRecord.parse(data)
        except (OSError, DNSError):
            return False
    apex = str(query.q.qname).lower()
    return bool(
        reply.header.id == query.header.id
        and reply.header.qr
        and reply.header.aa
        and reply.header.rcode == RCODE.NOERROR
        and any(rr.rtype == QTYPE.SOA and str(rr.rname).lower() == apex for rr in reply.rr)
    )
