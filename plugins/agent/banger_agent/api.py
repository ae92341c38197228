"""The agent plugin's published interface: what a plugin that ``requires = ["agent"]``
gets from ``ctx.service("agent")``. Import it for typing only (``if TYPE_CHECKING:``)."""

from __future__ import annotations

from typing import Any, Protocol


class AgentAPI(Protocol):
    def request(self, paths: Any, vm_id: str, request: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        """From a lifecycle hook (a worker thread): send one op (``{"op": ...}``, see
        banger_guest.agent) to the VM's agent and return its result; raises when the
        agent answers an error or does not answer within ``timeout`` seconds."""
        ...
