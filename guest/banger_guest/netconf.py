"""The guest's network configuration: address, gateway, resolver (and MAC). Stdlib only.

The host says it two ways, with the same values:

- at boot, on the kernel command line: ``banger.net=ADDR/PREFIX,GATEWAY,RESOLVER,MAC``
  (fields may be empty; MAC names the interface). A kernel with IP autoconfiguration
  (banger's microVM kernel) has already applied ``ip=``; Debian's cloud kernel has not
  (no CONFIG_IP_PNP), so the agent applies it when it starts (``apply_at_boot``).
- after a restore from a snapshot, as the ``net`` op (the VM continues with its source's
  MAC and address; the host gave it its own)::

    {"op": "net", "address": "A.B.C.D/P", "gateway": "A.B.C.D" | null,
     "resolver": "A.B.C.D" | null, "mac": "02:..." | null}

  answered with ``{"interface": "eth0", "applied": [...], "ms": float}``.

Changes go through ``ip`` (busybox's or iproute2's, whichever the image has), argv only.
"""

from __future__ import annotations

import glob
import ipaddress
import os
import re
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
FIELDS = ("op", "address", "gateway", "resolver", "mac")

Runner = Callable[[list[str]], None]


class BadRequest(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class NetConf:
    address: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address | None = None
    resolver: ipaddress.IPv4Address | None = None
    mac: str | None = None


def _addr(field: str, v: object) -> ipaddress.IPv4Address | None:
    if v is None or v == "":
        return None
    try:
        return ipaddress.IPv4Address(str(v))
    except ValueError:
        raise BadRequest(field, f"net: {field} must be an IPv4 address, not {str(v)[:60]!r}") from None


def parse(req: dict[str, object]) -> NetConf:
    """A checked ``net`` request (BadRequest names the bad field; nothing applied)."""
    unknown = sorted(set(req) - set(FIELDS))
    if unknown:
        raise BadRequest(unknown[0], f"net: unknown field {unknown[0]!r}")
    try:
        address = ipaddress.IPv4Interface(str(req.get("address")))
    except ValueError:
        raise BadRequest("address", f"net: address must be IPv4 ADDR/PREFIX, not {str(req.get('address'))[:60]!r}") from None
    if "/" not in str(req.get("address")):
        raise BadRequest("address", "net: address needs its prefix length (ADDR/PREFIX)")
    mac = req.get("mac")
    if mac is not None and (not isinstance(mac, str) or not MAC_RE.fullmatch(mac)):
        raise BadRequest("mac", f"net: mac must be lowercase aa:bb:cc:dd:ee:ff, not {str(mac)[:60]!r}")
    return NetConf(address, _addr("gateway", req.get("gateway")), _addr("resolver", req.get("resolver")), mac)


def from_cmdline(value: str) -> NetConf:
    """``banger.net=ADDR/PREFIX,GATEWAY,RESOLVER,MAC``."""
    parts = (value.split(",") + ["", "", "", ""])[:4]
    return parse({"address": parts[0], "gateway": parts[1] or None, "resolver": parts[2] or None, "mac": parts[3] or None})


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def interfaces() -> dict[str, str]:
    """Ethernet-like interfaces: name -> MAC (loopback and virtual ones left out)."""
    out = {}
    for p in glob.glob("/sys/class/net/*"):
        name = os.path.basename(p)
        if name == "lo" or not os.path.exists(os.path.join(p, "device")):
            continue
        out[name] = _read(os.path.join(p, "address")).lower()
    return out


def find_interface(mac: str | None, wait_s: float = 0.0) -> str | None:
    """The interface with ``mac`` (else the only/first ethernet one), waiting up to
    ``wait_s`` for its driver (virtio_net may still be loading at boot)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = interfaces()
        for name, have in sorted(found.items()):
            if mac and have == mac:
                return name
        if found and not mac:
            return sorted(found)[0]
        if time.monotonic() >= deadline:
            return sorted(found)[0] if found else None
        time.sleep(0.05)


def run_ip(argv: list[str]) -> None:
    r = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise OSError(f"ip {' '.join(argv)}: {(r.stderr or r.stdout).strip() or f'exit {r.returncode}'}")


def has_address(iface: str, address: ipaddress.IPv4Interface) -> bool:
    r = subprocess.run(["ip", "-4", "addr", "show", "dev", iface], capture_output=True, text=True, timeout=10)
    return f" {address.with_prefixlen} " in r.stdout.replace("\n", " ")


def write_resolver(resolver: ipaddress.IPv4Address, root: str = "/") -> None:
    """/etc/resolv.conf names only ``resolver`` (a symlink, e.g. to a stub, is replaced)."""
    path = os.path.join(root, "etc/resolv.conf")
    tmp = path + ".banger-tmp"
    with open(tmp, "w") as fh:
        fh.write(f"# written by banger's agent\nnameserver {resolver}\n")
    os.replace(tmp, path)


def apply(conf: NetConf, iface: str, change_mac: bool, run: Runner = run_ip, root: str = "/") -> list[str]:
    """Configure ``iface``: (new MAC), the address alone, the default route, the
    resolver; what was done, in order."""
    done = []
    if change_mac and conf.mac:
        run(["link", "set", "dev", iface, "down"])
        run(["link", "set", "dev", iface, "address", conf.mac])
        done.append("mac")
    run(["addr", "flush", "dev", iface])
    run(["addr", "add", conf.address.with_prefixlen, "dev", iface])
    run(["link", "set", "dev", iface, "up"])
    done.append("address")
    if conf.gateway is not None:
        run(["route", "replace", "default", "via", str(conf.gateway), "dev", iface])
        done.append("gateway")
    if conf.resolver is not None:
        write_resolver(conf.resolver, root)
        done.append("resolver")
    return done


def apply_at_boot(value: str, log: Callable[[str], None]) -> None:
    """At agent start: apply ``banger.net=`` unless the kernel's ``ip=`` already did
    (then only the resolver file, which ``ip=`` does not write)."""
    try:
        conf = from_cmdline(value)
    except BadRequest as exc:
        log(f"banger.net={value}: {exc}")
        return
    iface = find_interface(conf.mac, wait_s=15)
    if iface is None:
        log("banger.net: no network interface appeared within 15 s")
        return
    t = time.monotonic()
    try:
        if has_address(iface, conf.address):
            done = []
            if conf.resolver is not None:
                write_resolver(conf.resolver)
                done.append("resolver")
            log(f"network: {iface} {conf.address} set by the kernel; {', '.join(done) or 'nothing else to do'}")
            return
        done = apply(conf, iface, change_mac=False)
    except OSError as exc:
        log(f"network: cannot configure {iface}: {exc}")
        return
    log(f"network: {iface} {conf.address} via {conf.gateway} ({', '.join(done)}) in {(time.monotonic() - t) * 1000:.0f} ms")


def handle(req: dict[str, object]) -> dict[str, object]:
    """The ``net`` op (BadRequest for a bad request; OSError when ``ip`` fails)."""
    conf = parse(req)
    t = time.monotonic()
    iface = find_interface(None)
    if iface is None:
        raise OSError("no network interface in this VM")
    done = apply(conf, iface, change_mac=True)
    return {"interface": iface, "applied": done, "ms": round((time.monotonic() - t) * 1000, 1)}
