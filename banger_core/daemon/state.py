"""What an RPC handler may use of the running daemon: ``call.state``.

One instance per daemon, built before any plugin registers methods. Handlers read it;
they do not replace its members. Documented in docs/plugins.md ("Daemon state").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from banger_core.daemon.rpc import Registry
    from banger_core.vm.handles import HandleStore
    from banger_core.paths import Paths
    from banger_core.pulls import Puller
    from banger_core.runtime import Runtime
    from banger_core.store import Store
    from banger_core.vm.service import VMService


@dataclass
class DaemonState:
    """The daemon's state, typed, for RPC handlers (built-in and plugin alike)."""

    #: every path banger uses (state, cache, runtime dirs, the socket, logs)
    paths: "Paths"
    #: the loaded config and plugin host (``runtime.config``, ``runtime.host``)
    runtime: "Runtime"
    #: the SQLite state store (VMs, images, kernels)
    store: "Store"
    #: live per-VM handles (pids, sockets) of running VMs
    handles: "HandleStore"
    #: the VM state machine: resolve refs, create/start/stop/delete, show
    vms: "VMService"
    #: the RPC method registry (read-only for handlers)
    registry: "Registry"
    #: when the daemon started (time.time()) and its config/code fingerprint
    started: float = 0.0
    fingerprint: str = ""
    #: how many requests are in flight right now (this one included), and the limit
    inflight: Callable[[], int] = field(default=lambda: 0)
    max_connections: int = 0
    #: ask the daemon to drain and exit after this request replies
    request_shutdown: Callable[[], None] = field(default=lambda: None)

    def service(self, capability: str) -> Any:
        """The daemon-side service a plugin registered for ``capability``
        (``register_services``); a typed ``BangerError`` when there is none."""
        return self.runtime.host.service(capability)

    @property
    def puller(self) -> "Puller":
        """The image/kernel pull engine (per-name locks, catalog, staleness)."""
        return self.vms.puller
