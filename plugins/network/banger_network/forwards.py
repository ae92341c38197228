"""User mode's automatic port forwards: the guest agent pushes its listeners
(``watch_ports``) whenever they change; each TCP and UDP listener the host can reach
through slirp (bound to a wildcard or to the guest's own address) gets a QEMU forward
from 127.0.0.1, and each TCP listener on the guest's loopback (a dev server on
localhost) a port the daemon listens on and relays through the agent (``tcp_connect``):
on the same port when that is free, else on an ephemeral one, or on the port
``[network.forward] pin`` names; ``exclude`` ones never do. A listener that goes takes
its forward with it.

One ``Forwarder`` per running user-mode VM; one worker thread applies every VM's
changes (the agent's callback only records the newest list and wakes it). Forwards are
kept in the plugin's ``network_forwards`` table while the VMM holds them, so a daemon
restarted under running VMs knows what they have.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from datetime import datetime, timezone
from typing import Any

from banger_core.errors import BangerError, ErrorCode
from banger_core.models import HostForward
from banger_network.settings import ForwardSettings

log = logging.getLogger("banger.plugin.network")

HOST = "127.0.0.1"
NIC_ID = "net0"
EPHEMERAL_TRIES = 5

Key = tuple[str, int]  # (proto, guest port)


def free_port(proto: str) -> int:
    """A port the kernel would give an ephemeral bind of ``proto`` on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


SLIRP, AGENT = "slirp", "agent"


def route(listener: dict[str, Any], guest: str) -> tuple[str | None, str]:
    """How the host reaches ``listener``: (SLIRP, "") through a QEMU forward (it
    delivers to the guest's own address: a wildcard or that address), (AGENT, "")
    through the guest agent (a TCP listener on the guest's loopback), or (None, why
    not)."""
    try:
        bound = ipaddress.ip_address(str(listener.get("address", "")).split("%")[0])
    except ValueError:
        return None, "an address banger cannot read"
    if bound.is_unspecified or str(bound) == guest:
        return SLIRP, ""
    if bound.is_loopback:
        if listener.get("proto") == "tcp" and bound.version == 4:
            return AGENT, ""
        return None, f"{listener.get('proto')} bound to {bound} in the guest: only the guest reaches it"
    return None, f"bound to {bound}, not to the guest's {guest}"


class Forwarder:
    """One running user-mode VM's forwards."""

    def __init__(
        self,
        manager: "ForwardManager",
        vm_id: str,
        vm_name: str,
        guest: str,
        existing: dict[Key, HostForward],
        proxy: Any = None,
    ) -> None:
        self.manager = manager
        self.vm_id, self.vm_name, self.guest = vm_id, vm_name, guest
        self.proxy = proxy  # (guest_port, host_port) -> a ProxyHandle (the agent's listen_tcp); None: no agent proxies
        self.lock = threading.Lock()
        self.alive = True
        self.forwards: dict[Key, HostForward] = dict(existing)  # through QEMU
        self.proxies: dict[Key, Any] = {}  # through the agent: key -> ProxyHandle (daemon-lifetime: not in the table)
        self.skipped: dict[Key, str] = {}
        self.listeners: list[dict[str, Any]] | None = None  # the newest list the agent pushed
        self.watch: Any = None

    def on_listeners(self, listeners: Any) -> None:
        """The agent's callback (on its loop thread): keep the newest list, wake the worker."""
        if isinstance(listeners, list):
            self.listeners = [d for d in listeners if isinstance(d, dict)]
            self.manager.wake(self.vm_id)

    def wanted(self, rules: ForwardSettings) -> tuple[dict[Key, str], dict[Key, str]]:
        """(key -> SLIRP or AGENT, key -> why it is not forwarded)."""
        want: dict[Key, str] = {}
        skipped: dict[Key, str] = {}
        for d in self.listeners or []:
            proto, port = d.get("proto"), d.get("port")
            if proto not in ("tcp", "udp") or not isinstance(port, int):
                continue
            key = (proto, port)
            how, why = route(d, self.guest)
            if how == AGENT and self.proxy is None:
                how, why = None, f"bound to {d.get('address')} in the guest, and no agent to relay it"
            if how is not None and rules.excluded(proto, port):
                how, why = None, "excluded by [network.forward] exclude"
            if how is not None and want.get(key) != SLIRP:  # one process on a wildcard beats another on loopback
                want[key] = how
            elif how is None:
                skipped[key] = why
        return want, {k: v for k, v in skipped.items() if k not in want}

    def apply(self, rules: ForwardSettings) -> None:
        """Make the VM's forwards match its newest listener list (from the worker)."""
        with self.lock:
            if not self.alive or self.listeners is None:
                return
            want, skipped = self.wanted(rules) if rules.auto else ({}, {})
            for key in sorted(k for k in self.forwards if want.get(k) != SLIRP):
                fwd = self.forwards.pop(key)
                try:
                    self.manager.remove(self.vm_id, fwd)
                except BangerError as exc:
                    log.warning("VM %s: removing forward %s -> %s: %s", self.vm_name, fwd.spec(), key, exc.message)
                self.manager.forget_row(self.vm_id, key)
                log.info("VM %s: %s/%d no longer forwarded (from %s)", self.vm_name, *key, fwd.spec())
            for key in sorted(k for k in self.proxies if want.get(k) != AGENT):
                self.proxies.pop(key).close()
                log.info("VM %s: %s/%d no longer relayed", self.vm_name, *key)
            for key, how in sorted(want.items()):
                if key in (self.forwards if how == SLIRP else self.proxies):
                    continue
                try:
                    if how == SLIRP:
                        fwd = self._add(key, rules)
                        self.forwards[key] = fwd
                        self.manager.record_row(self.vm_id, key, fwd)
                        port = fwd.host_port
                    else:
                        self.proxies[key] = self._relay(key, rules)
                        port = self.proxies[key].port
                except BangerError as exc:
                    skipped[key] = exc.message
                    continue
                log.info("VM %s: %s/%d forwarded from %s:%d (%s)", self.vm_name, key[0], key[1], HOST, port, how)
            self.skipped = skipped

    def _relay(self, key: Key, rules: ForwardSettings) -> Any:
        """A listener on the guest's loopback: the daemon listens on 127.0.0.1 and
        relays each connection through the agent."""
        _proto, port = key
        pinned = rules.pinned("tcp", port)
        for host_port in [pinned] if pinned is not None else [port, 0]:
            try:
                return self.proxy(port, host_port)
            except OSError:
                continue
        if pinned is not None:
            raise BangerError(ErrorCode.BUSY, f"pinned to {HOST}:{pinned} by [network.forward] pin, which is taken")
        raise BangerError(ErrorCode.BUSY, "no free host port for it")  # pragma: no cover (port 0 is always free)

    def _add(self, key: Key, rules: ForwardSettings) -> HostForward:
        proto, port = key
        pinned = rules.pinned(proto, port)
        if pinned is not None:
            fwd = HostForward(proto=proto, host_port=pinned, guest_port=port)  # type: ignore[arg-type]
            try:
                self.manager.add(self.vm_id, fwd)
            except BangerError as exc:
                raise BangerError(exc.code, f"pinned to {HOST}:{pinned} by [network.forward] pin, which is taken") from None
            return fwd
        candidates = [port] + [free_port(proto) for _ in range(EPHEMERAL_TRIES)]
        last: BangerError | None = None
        for host_port in candidates:
            fwd = HostForward(proto=proto, host_port=host_port, guest_port=port)  # type: ignore[arg-type]
            try:
                self.manager.add(self.vm_id, fwd)
                return fwd
            except BangerError as exc:
                if exc.code != ErrorCode.BUSY:
                    raise
                last = exc
        raise BangerError(ErrorCode.BUSY, f"no free host port for it ({last.message if last else 'all taken'})")

    def stop_watching(self) -> None:
        """No more changes: the watch ends, the agent relays close (they are the
        daemon's); QEMU's forwards stay with it."""
        self.alive = False
        if self.watch is not None:
            self.watch.cancel()
        for relay in self.proxies.values():
            relay.close()
        self.proxies.clear()

    def close(self) -> None:
        with self.lock:
            self.stop_watching()
            self.forwards.clear()
            self.manager.forget_rows(self.vm_id)

    def endpoint(self, key: Key, listener: dict[str, Any]) -> str | None:
        """Where the host reaches ``listener`` (as ``vm ports`` shows it), if it does."""
        how, _why = route(listener, self.guest)
        if how == SLIRP and key in self.forwards:
            return f"{self.forwards[key].host_address}:{self.forwards[key].host_port}"
        if how == AGENT and key in self.proxies:
            return f"{HOST}:{self.proxies[key].port}"
        return None

    def describe(self) -> list[dict[str, Any]]:
        """For ``vm show``: each listener the host reaches, and each it does not (why)."""
        rows: list[dict[str, Any]] = [
            {"guest": f"{p}/{g}", "host": f"{f.host_address}:{f.host_port}"} for (p, g), f in sorted(self.forwards.items())
        ]
        rows += [{"guest": f"{p}/{g}", "host": f"{HOST}:{r.port}", "via": "agent"} for (p, g), r in sorted(self.proxies.items())]
        rows += [{"guest": f"{p}/{g}", "host": None, "why": why} for (p, g), why in sorted(self.skipped.items())]
        return sorted(rows, key=lambda r: (r["guest"].split("/")[0], int(r["guest"].split("/")[1])))


class ForwardManager:
    """Every running user-mode VM's ``Forwarder``, and the one worker thread."""

    def __init__(self, daemon: Any, settings: Any) -> None:
        self.daemon = daemon
        self.settings = settings  # () -> Settings: read at each change (a config reload applies)
        self.lock = threading.Lock()
        self.forwarders: dict[str, Forwarder] = {}
        self.dirty: set[str] = set()
        self.event = threading.Event()
        self.stopping = False
        self.thread: threading.Thread | None = None

    # --- the table -------------------------------------------------------------------
    def rows(self, vm_id: str | None = None) -> list[dict[str, Any]]:
        with self.daemon.store.transaction() as db:
            t = db["network_forwards"]
            return [dict(r) for r in (t.rows_where("vm_id = ?", [vm_id]) if vm_id else t.rows)]

    def record_row(self, vm_id: str, key: Key, fwd: HostForward) -> None:
        with self.daemon.store.transaction() as db:
            db["network_forwards"].upsert(
                {
                    "vm_id": vm_id,
                    "proto": key[0],
                    "guest_port": key[1],
                    "host_address": fwd.host_address,
                    "host_port": fwd.host_port,
                    "created_at": datetime.now(timezone.utc).isoformat(),
                },
                pk=("vm_id", "proto", "guest_port"),
            )

    def forget_row(self, vm_id: str, key: Key) -> None:
        with self.daemon.store.transaction() as db:
            db["network_forwards"].delete_where("vm_id = ? AND proto = ? AND guest_port = ?", [vm_id, key[0], key[1]])

    def forget_rows(self, vm_id: str) -> None:
        with self.daemon.store.transaction() as db:
            db["network_forwards"].delete_where("vm_id = ?", [vm_id])

    # --- the driver, through the core ----------------------------------------------------
    def add(self, vm_id: str, fwd: HostForward) -> None:
        self.daemon.vms.host_forward(self.daemon.store.get_vm(vm_id), NIC_ID, fwd)

    def remove(self, vm_id: str, fwd: HostForward) -> None:
        self.daemon.vms.host_forward(self.daemon.store.get_vm(vm_id), NIC_ID, fwd, remove=True)

    # --- VMs ---------------------------------------------------------------------------
    def watch(self, agent: Any, paths: Any, vm_id: str, vm_name: str, guest: str, adopt: bool = False) -> Forwarder:
        """Start forwarding a running VM's listeners. ``adopt``: its VMM already has the
        forwards the table lists (a daemon restarted under it); else it has none."""
        existing: dict[Key, HostForward] = {}
        if adopt:
            for r in self.rows(vm_id):
                existing[(r["proto"], r["guest_port"])] = HostForward(
                    proto=r["proto"], host_address=r["host_address"], host_port=r["host_port"], guest_port=r["guest_port"]
                )
        else:
            self.forget_rows(vm_id)
        f = Forwarder(self, vm_id, vm_name, guest, existing, lambda g, h: agent.listen_tcp(paths, vm_id, g, h, HOST))
        with self.lock:
            old = self.forwarders.pop(vm_id, None)
            self.forwarders[vm_id] = f
        if old is not None:
            with old.lock:
                old.stop_watching()
        f.watch = agent.watch(paths, vm_id, {"op": "watch_ports"}, f.on_listeners)
        self._ensure_thread()
        return f

    def get(self, vm_id: str) -> Forwarder | None:
        with self.lock:
            return self.forwarders.get(vm_id)

    def stop_vm(self, vm_id: str) -> None:
        """The VM stopped (or is being cleaned up): stop watching, forget its rows."""
        with self.lock:
            f = self.forwarders.pop(vm_id, None)
            self.dirty.discard(vm_id)
        if f is not None:
            f.close()
        else:
            self.forget_rows(vm_id)

    def wake(self, vm_id: str) -> None:
        with self.lock:
            self.dirty.add(vm_id)
        self.event.set()

    def _ensure_thread(self) -> None:
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                self.stopping = False
                self.thread = threading.Thread(target=self._run, name="network-forwards", daemon=True)
                self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            self.event.wait(timeout=5)
            self.event.clear()
            with self.lock:
                todo = [self.forwarders[i] for i in sorted(self.dirty) if i in self.forwarders]
                self.dirty.clear()
            if not todo:
                continue
            rules = self.settings().forward
            for f in todo:
                try:
                    f.apply(rules)
                except Exception:  # one VM's trouble must not stop the others' forwards
                    log.exception("VM %s: applying forwards failed", f.vm_name)

    def stop(self) -> None:
        """At daemon stop: stop watching (the VMs keep their forwards; the next daemon
        adopts them from the table)."""
        self.stopping = True
        self.event.set()
        with self.lock:
            forwarders = list(self.forwarders.values())
            self.forwarders.clear()
        for f in forwarders:
            with f.lock:
                f.stop_watching()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def status(self) -> dict[str, Any]:
        with self.lock:
            fs = list(self.forwarders.values())
        return {"user_vms": len(fs), "forwards": sum(len(f.forwards) + len(f.proxies) for f in fs)}
