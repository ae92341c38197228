"""The network plugin's published interface: what a plugin that ``requires = ["net"]``
gets from ``ctx.service("net")`` (or ``daemon.runtime.host.service_for(me, "net")``).

Import it for typing only (``if TYPE_CHECKING:``): the service object comes from the
core, and any plugin that provides ``net`` with this interface can take this one's place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

Mode = Literal["bridge", "user", "none"]


@dataclass(frozen=True)
class VMNet:
    """One VM's network as the network plugin set it up for its current boot."""

    vm_id: str
    vm_name: str
    mode: Mode  # what "auto" resolved to
    bridge: str | None = None  # bridge mode: the host bridge
    tap: str | None = None  # bridge mode: this boot's TAP device
    mac: str | None = None
    # bridge mode: the guest's IPv4 address (leased, kept across stop/start); user mode:
    # its address on its own slirp network (10.0.2.15 by default: every user-mode VM's)
    address: str | None = None
    prefixlen: int | None = None
    gateway: str | None = None  # the bridge's address; user mode: slirp's, which leads to the host's loopback
    resolver: str | None = None  # the nameserver the guest is told to use (user mode: slirp's DNS forwarder)


class NetService(Protocol):
    def vm_network(self, vm: Any) -> VMNet | None:
        """The VM's network for the boot being prepared or running (after the network
        plugin's ``prepare_host``); None before that or when it has none (mode none)."""
        ...

    def records(self) -> dict[str, str]:
        """VM name -> IPv4 address, for running VMs in bridge mode (what DNS serves;
        a user-mode address is not reachable from the host, and every one is the same)."""
        ...

    @property
    def generation(self) -> int:
        """Increments whenever ``records()`` would answer differently."""
        ...

    def bridge_possible(self) -> tuple[bool, str]:
        """Whether this daemon may put VMs on the bridge here (TAPs allowed, the
        namespace rule met), and why (not): no records can exist otherwise."""
        ...

    def resolved_mode(self, vm: Any, settings: Any, options: Any) -> Mode:
        """What the VM's mode ("auto" included) resolves to here, without acting."""
        ...
