"""The interface of the "net" service this plugin reads its records from (typing only).

The network plugin offers it (``provides = ["net"]``); this plugin reaches it through
the core (``host.service_for("dns", "net")``) and never imports the provider. When the
service also has ``bridge_possible() -> (bool, why)`` and it says no bridge VM can
exist here, the server does not listen at all (nothing could ever be answered).
"""

from __future__ import annotations

from typing import Protocol


class NetService(Protocol):
    def records(self) -> dict[str, str]:
        """VM name -> IPv4 address, for running VMs in bridge mode only."""
        ...

    @property
    def generation(self) -> int:
        """Increments whenever ``records()`` would return something else."""
        ...
