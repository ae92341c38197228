"""The agent plugin's published interface: what a plugin that ``requires = ["agent"]``
gets from ``ctx.service("agent")``. Import it for typing only (``if TYPE_CHECKING:``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, BinaryIO, Protocol


class AgentAPI(Protocol):
    def health(self, vm_id: str) -> dict[str, Any] | None:
        """No guest round trip: the health the VM's agent answered when the VM last
        booted or resumed (``agent``, ``version``, ``uptime``, ``workdisk``, ...), None
        when it has no agent (an image without banger's agent). For ``post_boot`` and
        ``vm_resumed`` hooks of plugins ordered after the agent."""
        ...

    def request(self, paths: Any, vm_id: str, request: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        """From a lifecycle hook (a worker thread): send one op (``{"op": ...}``, see
        banger_guest.agent) to the VM's agent and return its result; raises when the
        agent answers an error or does not answer within ``timeout`` seconds."""
        ...

    def send(
        self,
        paths: Any,
        vm_id: str,
        request: dict[str, Any],
        write: Callable[[BinaryIO], None] | None,
        timeout: float = 60,
        stdout: Callable[[bytes], None] | None = None,
    ) -> tuple[int, str]:
        """From a thread (a lifecycle hook): open a session of ``request``, an op that
        reads its STDIN (``{"op": "cp_in", "dest", "parents"}``: a tar stream as
        banger_guest.transfer writes it), call ``write(out)`` with a binary file whose
        bytes go to that STDIN (flow-controlled: a write waits while the agent is
        behind), end the STDIN and wait for the op's end: (exit status, why: its STDERR,
        or the agent's reason for refusing the request). The op ending early stops the
        writes (its outcome is returned). An exception from ``write`` kills the op (a
        cp_in then extracts nothing) and propagates; so does a channel that closes. No
        agent channel (the VM has none): OSError; ``timeout`` bounds each wait (added in
        banger-agent 0.4).

        ``write=None`` sends no input; ``stdout(chunk)`` receives the op's STDOUT as it
        comes, on the agent's event-loop thread (keep it quick: append to a buffer or
        file), e.g. ``{"op": "exec", "argv": [...]}`` whose output a plugin reads (both
        added in banger-agent 0.5)."""
        ...

    def watch(
        self, paths: Any, vm_id: str, request: dict[str, Any], on_line: Callable[[Any], None], retry_max: float = 5.0
    ) -> "WatchHandle":
        """From any thread: keep a session of ``request`` (an op that writes JSON lines
        on its STDOUT until closed, e.g. ``{"op": "watch_ports"}``) open to the VM's
        agent, calling ``on_line(obj)`` for each line on the agent plugin's event-loop
        thread (be quick); reopened with a back-off when the channel drops, until
        ``cancel()``. It does not fail: ``last_error`` says what went wrong last."""
        ...

    def listen_tcp(self, paths: Any, vm_id: str, guest_port: int, host_port: int = 0, host: str = "127.0.0.1") -> "ProxyHandle":
        """From a thread: listen on ``host:host_port`` (0: ephemeral; OSError when the
        port is taken) and relay each connection to the guest's 127.0.0.1:``guest_port``
        through the agent channel."""
        ...

    def probe_tcp(self, paths: Any, vm_id: str, port: int, timeout: float = 5) -> bytes:
        """From a thread: the first bytes the guest's 127.0.0.1:``port`` sends after a
        connection (b"" when none come in ``timeout``); RuntimeError when nothing
        listens there (e.g. waiting for sshd's banner)."""
        ...


class ProxyHandle(Protocol):
    port: int  # the host port it listens on
    connections: int

    def close(self) -> None:
        """Stop accepting; from any thread, idempotent."""
        ...


class WatchHandle(Protocol):
    lines: int
    sessions: int
    last_error: str | None

    def cancel(self) -> None:
        """Stop watching; from any thread, idempotent."""
        ...
