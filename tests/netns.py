"""Network namespaces the tests make (the network safety rule: bridges, TAPs, firewall
rules and the daemons under test live inside namespaces a test created, and go with it).

``Netns.make()`` adds ``bgt-<random>`` with its loopback up; ``ns.run(argv)`` runs a
command inside; ``ns.python(code)`` runs Python inside (banger's venv); ``ns.veth_to``
joins two namespaces; ``ns.delete()`` removes it (and every device in it) — idempotent.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@dataclass
class Netns:
    name: str

    @classmethod
    def make(cls, prefix: str = "bgt") -> "Netns":
        ns = cls(f"{prefix}-{secrets.token_hex(4)}")
        _ip("netns", "add", ns.name)
        ns.run(["ip", "link", "set", "lo", "up"], check=True)
        return ns

    def exists(self) -> bool:
        return Path("/run/netns", self.name).exists()

    def delete(self) -> None:
        if self.exists():
            # processes still inside keep a namespace alive: kill them first
            pids = _ip("netns", "pids", self.name, check=False).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], capture_output=True)
            _ip("netns", "delete", self.name, check=False)

    def argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list[str], check: bool = False, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(self.argv(argv), capture_output=True, text=True, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} in {self.name} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def python(self, code: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-c", textwrap.dedent(code)], check=check, timeout=timeout, **kw)

    def links(self) -> list[dict]:
        return json.loads(self.run(["ip", "-j", "-d", "link", "show"], check=True).stdout)

    def link_names(self) -> set[str]:
        return {lk["ifname"] for lk in self.links()}

    def iptables_save(self) -> str:
        return self.run(["iptables-save"], check=True).stdout

    def veth_to(self, other: "Netns", here: str, there: str, here_addr: str, there_addr: str) -> None:
        """A veth pair: ``here`` (with ``here_addr``, IP/PREFIX) in this namespace, ``there``
        in ``other``; both up."""
        self.run(["ip", "link", "add", here, "type", "veth", "peer", "name", there, "netns", other.name], check=True)
        self.run(["ip", "addr", "add", here_addr, "dev", here], check=True)
        self.run(["ip", "link", "set", here, "up"], check=True)
        other.run(["ip", "addr", "add", there_addr, "dev", there], check=True)
        other.run(["ip", "link", "set", there, "up"], check=True)


@contextmanager
def uplinked(host_prefix: str, inet_prefix: str, uplink: str, internet: str) -> Iterator[tuple["Netns", "Netns"]]:
    """Two namespaces: ``host`` (where a daemon under test runs), whose default route
    leads over a veth (``up0``, ``uplink``/24) to ``inet`` (``wan0``, ``internet``/24),
    where tests/peer_http.py answers GETs on ``internet``:8080 with the client's
    address. Both go afterwards."""
    host, inet = Netns.make(host_prefix), Netns.make(inet_prefix)
    server = None
    try:
        host.veth_to(inet, "up0", "wan0", f"{uplink}/24", f"{internet}/24")
        host.run(["ip", "route", "add", "default", "via", internet], check=True)
        server = subprocess.Popen(inet.argv([sys.executable, str(Path(__file__).with_name("peer_http.py")), internet]))
        yield host, inet
    finally:
        if server is not None:
            server.kill()
        host.delete()
        inet.delete()


def delete_vms_and_stop(run: Callable[..., subprocess.CompletedProcess]) -> None:
    """A module's daemon at the end: every VM deleted, then the daemon stopped
    (``run(*banger_args, timeout=...)``)."""
    for vm in json.loads(run("vm", "list", "--json").stdout or "[]"):
        run("vm", "delete", vm["name"], "--force", timeout=120)
    run("daemon", "stop", timeout=60)
