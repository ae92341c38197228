"""Every privileged host network operation banger performs, in one typed module.

Bridges, TAP devices, addresses, links (through pyroute2's netlink, never ``ip``
shell-outs), firewall rules (``iptables``, through the one process runner) and sysctls.
Plugins (network, nat) call these and nothing else that needs CAP_NET_ADMIN, so the
whole privileged surface can move behind a root helper later without touching them.

Each call acts in the network namespace of the calling process. ``Namespace`` says which
one that is; ``require_namespace`` refuses to act anywhere but the namespace a plugin
expects (tests name theirs, so a stray daemon never builds a bridge in the host's own).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import ipaddress
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, TypeVar

from banger_core.errors import BangerError, ErrorCode

#: Linux interface names: 1-15 bytes, no '/', ':' or whitespace
IFNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
SYSCTL_RE = re.compile(r"net\.[a-z0-9_.]+(/[A-Za-z0-9_.-]+)?[a-z0-9_.]*")
NETNS_DIR = Path("/run/netns")

Table = Literal["filter", "nat"]


def check_ifname(name: str) -> str:
    if not IFNAME_RE.fullmatch(name):
        raise BangerError(ErrorCode.BAD_REQUEST, f"invalid interface name {name!r}: 1-15 letters, digits, '_', '.', '-'")
    return name


def check_mac(mac: str) -> str:
    if not MAC_RE.fullmatch(mac):
        raise BangerError(ErrorCode.BAD_REQUEST, f"invalid MAC address {mac!r}")
    return mac


# --------------------------------------------------------------------------- namespaces
@dataclass(frozen=True)
class Namespace:
    """A network namespace, by the identity of its nsfs inode."""

    dev: int
    inode: int
    name: str | None = None  # under /run/netns, when it has one

    @property
    def key(self) -> str:
        return f"{self.dev}:{self.inode}"

    def describe(self) -> str:
        return f"{self.name!r} (net:[{self.inode}])" if self.name else f"net:[{self.inode}]"


def current_namespace() -> Namespace:
    """The network namespace this process acts in, named when /run/netns names it."""
    st = os.stat("/proc/self/ns/net")
    name = None
    try:
        for entry in NETNS_DIR.iterdir():
            try:
                e = entry.stat()
            except OSError:
                continue
            if e.st_ino == st.st_ino:  # a bind mount of the nsfs inode (its st_dev differs)
                name = entry.name
                break
    except OSError:
        pass
    return Namespace(st.st_dev, st.st_ino, name)


def named_namespace(name: str) -> Namespace | None:
    try:
        st = (NETNS_DIR / name).stat()
    except OSError:
        return None
    return Namespace(st.st_dev, st.st_ino, name)


def require_namespace(expected: str) -> Namespace:
    """The current namespace if it is ``/run/netns/<expected>``; else a clear refusal."""
    here = current_namespace()
    want = named_namespace(expected)
    if want is None:
        raise BangerError(
            ErrorCode.OPERATION_FAILED,
            f"network namespace {expected!r} (/run/netns/{expected}) does not exist; banger acts only in it",
        )
    if want.inode != here.inode:
        raise BangerError(
            ErrorCode.OPERATION_FAILED,
            f"refusing to change the network: this daemon runs in {here.describe()}, not in {expected!r} "
            f"(net:[{want.inode}]) where it is told to act",
        )
    return here


def may_create_taps() -> tuple[bool, str]:
    """Whether this process may create TAP devices here: /dev/net/tun and CAP_NET_ADMIN."""
    if not os.path.exists("/dev/net/tun"):
        return False, "/dev/net/tun is missing (modprobe tun)"
    try:
        with open("/proc/self/status") as fh:
            caps = next((ln.split()[1] for ln in fh if ln.startswith("CapEff:")), "0")
    except OSError:
        caps = "0"
    if not (int(caps, 16) >> 12) & 1:  # CAP_NET_ADMIN is capability 12
        return False, "no CAP_NET_ADMIN (run bangerd as root, or give it the capability)"
    return True, "CAP_NET_ADMIN and /dev/net/tun"


# --------------------------------------------------------------------------- links
@dataclass(frozen=True)
class Link:
    name: str
    index: int
    kind: str | None  # "bridge", "tun", "veth", ... (None: a plain device)
    master: int | None
    up: bool
    mac: str | None


class NetlinkError(BangerError):
    pass


def _fail(what: str, exc: BaseException) -> NetlinkError:
    return NetlinkError(ErrorCode.OPERATION_FAILED, f"{what}: {type(exc).__name__}: {exc}")


class _Netlink:
    """One rtnetlink socket per thread (pyroute2's IPRoute is not thread-safe). pyroute2
    runs an asyncio loop of its own inside, which cannot run on a thread whose loop is
    running (the daemon's, where RPC handlers and ``status()`` run): calls made there are
    handed to a worker thread (``off_loop``)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def ipr(self) -> Any:
        ipr = getattr(self._local, "ipr", None)
        if ipr is None:
            from pyroute2 import IPRoute

            ipr = IPRoute()
            self._local.ipr = ipr
        return ipr


_NL = _Netlink()
_T = TypeVar("_T")


def off_loop(fn: Callable[..., _T]) -> Callable[..., _T]:
    """Run ``fn`` on a worker thread when called from a thread with a running asyncio
    loop (pyroute2 cannot run there); directly otherwise."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> _T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return fn(*args, **kwargs)
        return _OFF_LOOP.submit(fn, *args, **kwargs).result()

    return wrapper


#: the one thread (and so one netlink socket) that serves calls made on a loop's thread
_OFF_LOOP = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hostnet")


def _link_of(msg: Any) -> Link:
    kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    return Link(
        name=msg.get_attr("IFLA_IFNAME"),
        index=msg["index"],
        kind=kind,
        master=msg.get_attr("IFLA_MASTER"),
        up=bool(msg["flags"] & 1),
        mac=msg.get_attr("IFLA_ADDRESS"),
    )


@off_loop
def links(prefix: str = "") -> list[Link]:
    try:
        found = [_link_of(m) for m in _NL.ipr().get_links()]
    except Exception as exc:
        raise _fail("cannot list network links", exc) from None
    return [lk for lk in found if lk.name.startswith(prefix)]


@off_loop
def link(name: str) -> Link | None:
    check_ifname(name)
    try:
        idx = _NL.ipr().link_lookup(ifname=name)
        if not idx:
            return None
        return _link_of(_NL.ipr().get_links(idx[0])[0])
    except Exception as exc:
        raise _fail(f"cannot look up {name}", exc) from None


def _index(name: str) -> int:
    lk = link(name)
    if lk is None:
        raise NetlinkError(ErrorCode.NOT_FOUND, f"no network link named {name!r}")
    return lk.index


@off_loop
def ensure_bridge(name: str, address: str, mac: str) -> bool:
    """The bridge ``name`` exists, up, with ``address`` (``IP/PREFIX``) and a fixed MAC
    (a bridge otherwise takes its lowest port's MAC, changing as TAPs come and go);
    True when it was created now."""
    check_ifname(name)
    check_mac(mac)
    iface = ipaddress.ip_interface(address)
    ipr = _NL.ipr()
    created = False
    try:
        if not ipr.link_lookup(ifname=name):
            ipr.link("add", ifname=name, kind="bridge", address=mac)
            created = True
        idx = ipr.link_lookup(ifname=name)[0]
        have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=idx, family=2)}
        if (str(iface.ip), iface.network.prefixlen) not in have:
            ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        ipr.link("set", index=idx, state="up")
    except NetlinkError:
        raise
    except Exception as exc:
        raise _fail(f"cannot set up bridge {name} ({address})", exc) from None
    return created


@off_loop
def create_tap(name: str, master: str | None = None, up: bool = True) -> None:
    """A persistent TAP device (QEMU and Firecracker attach to it by name)."""
    check_ifname(name)
    ipr = _NL.ipr()
    try:
        ipr.link("add", ifname=name, kind="tuntap", mode="tap")
        idx = ipr.link_lookup(ifname=name)[0]
        attrs: dict[str, Any] = {"state": "up" if up else "down"}
        if master is not None:
            attrs["master"] = _index(master)
        ipr.link("set", index=idx, **attrs)
    except NetlinkError:
        raise
    except Exception as exc:
        raise _fail(f"cannot create TAP {name}", exc) from None


@off_loop
def rename_link(name: str, new: str, up: bool = True) -> None:
    """Rename (the link goes down for it) and bring it up again unless told not to."""
    check_ifname(new)
    idx = _index(name)
    ipr = _NL.ipr()
    try:
        ipr.link("set", index=idx, state="down")
        ipr.link("set", index=idx, ifname=new)
        if up:
            ipr.link("set", index=idx, state="up")
    except Exception as exc:
        raise _fail(f"cannot rename {name} to {new}", exc) from None


@off_loop
def delete_link(name: str) -> bool:
    """Delete the link; False when there was none (idempotent)."""
    check_ifname(name)
    ipr = _NL.ipr()
    try:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            return False
        ipr.link("del", index=idx[0])
    except Exception as exc:
        if "No such device" in str(exc):
            return False
        raise _fail(f"cannot delete {name}", exc) from None
    return True


@off_loop
def addresses(name: str) -> list[str]:
    """The IPv4 addresses of a link, as ``IP/PREFIX``."""
    idx = _index(name)
    try:
        return [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in _NL.ipr().get_addr(index=idx, family=2)]
    except Exception as exc:
        raise _fail(f"cannot list the addresses of {name}", exc) from None


@off_loop
def default_route_device() -> str | None:
    """The interface of the IPv4 default route (the uplink NAT masquerades out of)."""
    ipr = _NL.ipr()
    try:
        for r in ipr.get_default_routes(family=2):
            oif = r.get_attr("RTA_OIF")
            if oif is None:
                continue
            found = ipr.get_links(oif)
            if found:
                name: str = found[0].get_attr("IFLA_IFNAME")
                return name
    except Exception as exc:
        raise _fail("cannot read the default route", exc) from None
    return None


# --------------------------------------------------------------------------- sysctl
def _sysctl_path(key: str) -> Path:
    if not SYSCTL_RE.fullmatch(key) or ".." in key:
        raise BangerError(ErrorCode.BAD_REQUEST, f"not a network sysctl banger changes: {key!r}")
    return Path("/proc/sys") / key.replace(".", "/")


def sysctl_get(key: str) -> str:
    try:
        return _sysctl_path(key).read_text().strip()
    except OSError as exc:
        raise BangerError(ErrorCode.OPERATION_FAILED, f"cannot read sysctl {key}: {exc.strerror}") from None


def sysctl_set(key: str, value: str) -> None:
    try:
        _sysctl_path(key).write_text(f"{value}\n")
    except OSError as exc:
        raise BangerError(ErrorCode.OPERATION_FAILED, f"cannot set sysctl {key}={value}: {exc.strerror}") from None


# --------------------------------------------------------------------------- firewall
RULE_WORD_RE = re.compile(r"[A-Za-z0-9_.:/!,+=-]{1,64}")


@dataclass(frozen=True)
class Rule:
    """One iptables rule: its table, chain and match/target words (as ``iptables -S``
    prints them after ``-A CHAIN``)."""

    table: Table
    chain: str
    spec: tuple[str, ...]

    def __post_init__(self) -> None:
        for w in (self.chain, *self.spec):
            if not RULE_WORD_RE.fullmatch(w):
                raise BangerError(ErrorCode.BAD_REQUEST, f"iptables word {w!r} is not allowed")


def iptables_binary() -> str | None:
    return shutil.which("iptables")


def _iptables(*args: str, check: bool = True) -> Any:
    from banger_core import proc

    exe = iptables_binary()
    if exe is None:
        raise BangerError(ErrorCode.OPERATION_FAILED, "iptables is not installed (apt install iptables)")
    return proc.run([exe, "-w", "5", *args], check=check, timeout=30, text=True)


def rule_exists(rule: Rule) -> bool:
    return bool(_iptables("-t", rule.table, "-C", rule.chain, *rule.spec, check=False).returncode == 0)


def insert_rule(rule: Rule, position: int = 1) -> bool:
    """Insert unless an identical rule exists; True when inserted now."""
    if rule_exists(rule):
        return False
    _iptables("-t", rule.table, "-I", rule.chain, str(position), *rule.spec)
    return True


def append_rule(rule: Rule) -> bool:
    if rule_exists(rule):
        return False
    _iptables("-t", rule.table, "-A", rule.chain, *rule.spec)
    return True


def delete_rule(rule: Rule) -> int:
    """Delete every copy of the rule; how many there were (0: idempotent)."""
    n = 0
    while rule_exists(rule):
        _iptables("-t", rule.table, "-D", rule.chain, *rule.spec)
        n += 1
        if n > 64:
            raise BangerError(ErrorCode.OPERATION_FAILED, f"cannot delete iptables rule {rule}")
    return n


def list_rules(table: Table, chain: str) -> list[Rule]:
    """The chain's rules as ``iptables -S`` prints them (policies left out)."""
    text = str(_iptables("-t", table, "-S", chain).stdout)
    rules: list[Rule] = []
    for line in text.splitlines():
        words = _split(line)
        if len(words) >= 2 and words[0] == "-A" and words[1] == chain:
            try:
                rules.append(Rule(table, chain, tuple(words[2:])))
            except BangerError:
                continue  # someone else's rule with words banger never writes
    return rules


def rules_matching(table: Table, chain: str, word: str) -> Iterator[Rule]:
    """Rules of the chain that carry ``word`` (e.g. a comment naming a VM)."""
    return (r for r in list_rules(table, chain) if word in r.spec)


def _split(line: str) -> list[str]:
    import shlex

    try:
        return shlex.split(line)
    except ValueError:
        return line.split()
