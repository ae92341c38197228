"""The network service: the bridge, the TAP pool, address leases and the running VMs'
addresses (what DNS serves). One per daemon; thread-safe (lifecycle hooks of several VMs
call it from worker threads at once). Every privileged operation goes through
``banger_core.hostnet``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import secrets
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from banger_core import hostnet
from banger_core.errors import BangerError, ErrorCode
from banger_network.api import Mode, VMNet
from banger_network.forwards import ForwardManager
from banger_network.settings import NO_NETNS, Settings

log = logging.getLogger("banger.plugin.network")

POOL_PREFIX = "tap-pool-"
VM_TAP_PREFIX = "bt-"
ISOLATION_COMMENT = "banger:bridge-isolation"


def tap_name(vm_id: str) -> str:
    """The TAP of a VM's boot: ``bt-`` + the first 12 characters of its id (15 bytes)."""
    return VM_TAP_PREFIX + vm_id[:12]


def bridge_mac(bridge: str) -> str:
    """A fixed, locally administered MAC for the bridge (else it takes its lowest port's,
    which changes as TAPs come and go and breaks guests' ARP entries for the gateway)."""
    h = hashlib.sha256(f"banger-bridge:{bridge}".encode()).digest()
    return "02:" + ":".join(f"{b:02x}" for b in h[:5])


def user_mac(vm_id: str) -> str:
    """A user-mode VM's MAC (its own slirp network: unique only for neatness)."""
    h = hashlib.sha256(f"banger-user:{vm_id}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])


RESOLV_CONFS = ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf")


def host_resolver(files: tuple[str, ...] = RESOLV_CONFS) -> str | None:
    """The first non-loopback nameserver the host uses: /etc/resolv.conf, or
    systemd-resolved's upstream list when /etc/resolv.conf names only its stub."""
    for path in files:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            words = line.split()
            if len(words) >= 2 and words[0] == "nameserver":
                try:
                    addr = ipaddress.ip_address(words[1].split("%")[0])
                except ValueError:
                    continue
                if addr.version == 4 and not addr.is_loopback:
                    return str(addr)
    return None


def driver_nic_kinds(driver: str) -> frozenset[str]:
    """The NIC kinds the VMM ``driver`` can give a guest (the core's drivers say)."""
    from banger_core.vmm.drivers import DRIVER_CLASSES

    cls = DRIVER_CLASSES.get(driver)
    return cls.nic_kinds if cls is not None else frozenset()


def netns_refusal(expected: str) -> str | None:
    """Why the namespace banger is told to act in (``[network] netns`` / BANGER_NETNS:
    'none' or a name) forbids acting here; None when this is it."""
    if expected == NO_NETNS:
        return "banger is told to change no network namespace ([network] netns / BANGER_NETNS = 'none')"
    try:
        hostnet.require_namespace(expected)
    except BangerError as exc:
        return exc.message
    return None


class TapPool:
    """TAP devices made ahead of time on the bridge, so a create only renames one."""

    def __init__(self, service: "NetworkService") -> None:
        self.svc = service
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.made = 0
        self.taken = 0
        self.errors = 0
        self.last_error: str | None = None

    def names(self) -> list[str]:
        return sorted(lk.name for lk in hostnet.links(POOL_PREFIX))

    def adopt(self, bridge: str, target: int) -> tuple[list[str], list[str]]:
        """At daemon start: pool TAPs a killed daemon left. Those on the bridge stay (up
        to ``target``); the others go. (adopted, removed)"""
        br = hostnet.link(bridge)
        adopted: list[str] = []
        removed: list[str] = []
        with self.lock:
            for lk in hostnet.links(POOL_PREFIX):
                if br is not None and lk.master == br.index and lk.kind == "tun" and len(adopted) < target:
                    adopted.append(lk.name)
                else:
                    hostnet.delete_link(lk.name)
                    removed.append(lk.name)
        return adopted, removed

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="network-tap-pool", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def drain(self) -> list[str]:
        with self.lock:
            names = self.names()
            for n in names:
                hostnet.delete_link(n)
        return names

    def take(self, new_name: str) -> bool:
        """Rename a pool TAP to ``new_name`` (up, on the bridge); False when none is left."""
        with self.lock:
            for name in self.names():
                try:
                    hostnet.rename_link(name, new_name)
                except BangerError as exc:
                    log.warning("pool TAP %s unusable (%s): removed", name, exc.message)
                    hostnet.delete_link(name)
                    continue
                self.taken += 1
                self.wake.set()
                return True
        self.wake.set()
        return False

    def fill_once(self) -> int:
        s = self.svc.settings()
        if s.tap_pool <= 0 or self.svc.guard_error() is not None or hostnet.link(s.bridge) is None:
            return 0
        made = 0
        with self.lock:
            have = set(self.names())
            n = 0
            while len(have) < s.tap_pool:
                name = f"{POOL_PREFIX}{n}"
                n += 1
                if name in have:
                    continue
                hostnet.create_tap(name, master=s.bridge)
                have.add(name)
                made += 1
        self.made += made
        return made

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.fill_once()
            except Exception as exc:  # keep refilling later; say why
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("TAP pool refill failed: %s", self.last_error)
            self.wake.wait(timeout=10)
            self.wake.clear()


class NetworkService:
    """Implements ``banger_network.api.NetService`` (the ``net`` capability)."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.store = daemon.store
        self.runtime = daemon.runtime
        self.lock = threading.RLock()
        self._prepared: dict[str, VMNet] = {}  # vm id -> this boot's network (after prepare_host)
        self._active: dict[str, VMNet] = {}  # vm id -> running VMs' (what DNS serves)
        self._records: dict[str, str] = {}
        self._generation = 0
        self.pool = TapPool(self)
        self._isolated: str | None = None  # the bridge whose isolation rule this daemon checked
        self.forwards = ForwardManager(daemon, self.settings)
        self._adopt: list[tuple[str, str]] = []  # running user-mode VMs found at reconcile: (id, name)

    # --- settings, namespace ------------------------------------------------------------
    def settings(self) -> Settings:
        """The user's own [network] settings: the host side (bridge, subnet, pool,
        namespace) is the user's to choose, never a project's."""
        s = self.runtime.config.settings_for(self.runtime.host, "network")
        return s if isinstance(s, Settings) else Settings()

    def _meta(self, key: str) -> str | None:
        with self.store.transaction() as db:
            rows = list(db["network_meta"].rows_where("key = ?", [key]))
        return rows[0]["value"] if rows else None

    def guard_error(self) -> str | None:
        """Why banger may not change the network here (None: it may). Does not record."""
        expected = self.settings().expected_netns()
        if expected:
            return netns_refusal(expected)
        here = hostnet.current_namespace()
        recorded = self._meta("netns")
        if recorded is not None and recorded != here.key:
            where = self._meta("netns_name") or recorded
            return (
                f"refusing to change the network: this daemon runs in {here.describe()}, but banger's bridge was made in "
                f"namespace {where} (recorded in its state); set [network] netns to the namespace it should use"
            )
        return None

    def guard(self) -> None:
        """Raise unless banger may change the network here; record the namespace it acts
        in the first time (so a daemon started elsewhere later refuses)."""
        why = self.guard_error()
        if why is not None:
            raise BangerError(ErrorCode.OPERATION_FAILED, f"network: {why}")
        if not self.settings().expected_netns() and self._meta("netns") is None:
            here = hostnet.current_namespace()
            with self.store.transaction() as db:
                db["network_meta"].upsert({"key": "netns", "value": here.key}, pk="key")
                db["network_meta"].upsert({"key": "netns_name", "value": here.describe()}, pk="key")

    def can_bridge(self) -> tuple[bool, str]:
        ok, why = hostnet.may_create_taps()
        if not ok:
            return False, why
        refused = self.guard_error()
        if refused is not None:
            return False, refused
        return True, why

    def bridge_possible(self) -> tuple[bool, str]:
        return self.can_bridge()

    def user_refusal(self, driver: str | None) -> str | None:
        """Why user mode is not possible for a VM of VMM ``driver`` (None: it is): the
        VMM must have it, and banger must be allowed this namespace's network (user
        mode changes nothing on the host, but its guests use the daemon's network)."""
        if driver is not None and "user" not in driver_nic_kinds(driver):
            return f"the {driver} VMM has no user-mode networking (QEMU has)"
        expected = self.settings().expected_netns()
        if expected:
            return netns_refusal(expected)
        return None

    def resolved_mode(self, vm: Any, settings: Any, options: Any) -> Mode:
        s = settings if isinstance(settings, Settings) else self.settings()
        asked = (getattr(options, "network", None) if options is not None else None) or s.mode
        if asked != "auto":
            return asked
        if self.can_bridge()[0]:
            return "bridge"
        return "user" if self.user_refusal(getattr(vm, "driver", None)) is None else "none"

    def auto_explained(self, driver: str | None = "qemu") -> str:
        ok, why = self.can_bridge()
        if ok:
            return f"bridge ({why})"
        refused = self.user_refusal(driver)
        return f"user ({why})" if refused is None else f"none ({why}; {refused})"

    # --- bridge, TAPs ---------------------------------------------------------------------
    def network(self) -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Interface]:
        net = ipaddress.IPv4Network(self.settings().subnet)
        return net, ipaddress.IPv4Interface(f"{next(net.hosts())}/{net.prefixlen}")

    def ensure_bridge(self) -> None:
        s = self.settings()
        _net, gw = self.network()
        created = hostnet.ensure_bridge(s.bridge, gw.with_prefixlen, bridge_mac(s.bridge))
        if created:
            log.info("made bridge %s (%s)", s.bridge, gw)
        if not created and self._isolated == s.bridge:
            return  # checked by this daemon already (an iptables run costs ~5 ms a create)
        # guests leave the bridge only through NAT's rules (inserted ahead of this one)
        hostnet.append_rule(
            hostnet.Rule(
                "filter",
                "FORWARD",
                ("-i", s.bridge, "!", "-o", s.bridge, "-m", "comment", "--comment", ISOLATION_COMMENT, "-j", "DROP"),
            )
        )
        self._isolated = s.bridge

    def attach_tap(self, name: str) -> str:
        """This boot's TAP on the bridge: a pool TAP renamed, else made now. 'pool' or 'new'."""
        hostnet.delete_link(name)  # a previous boot's, left by a crash
        if self.pool.take(name):
            return "pool"
        hostnet.create_tap(name, master=self.settings().bridge)
        return "new"

    # --- leases -----------------------------------------------------------------------------
    def lease(self, vm_id: str, vm_name: str) -> tuple[str, str]:
        """The VM's address and MAC: kept across its stop/start, never another VM's."""
        net, gw = self.network()
        with self.store.transaction() as db:
            t = db["network_leases"]
            rows = list(t.rows_where("vm_id = ?", [vm_id]))
            if rows and ipaddress.IPv4Address(rows[0]["address"]) in net:
                if rows[0]["vm_name"] != vm_name:
                    t.update(vm_id, {"vm_name": vm_name})
                return rows[0]["address"], rows[0]["mac"]
            if rows:  # the subnet changed since: lease anew
                t.delete(vm_id)
            taken = {r["address"] for r in t.rows}
            macs = {r["mac"] for r in t.rows}
            address = next((str(h) for h in net.hosts() if h != gw.ip and str(h) not in taken), None)
            if address is None:
                raise BangerError(ErrorCode.OPERATION_FAILED, f"network: no free address left in {net} ({len(taken)} leased)")
            mac = _new_mac(macs)
            t.insert(
                {
                    "vm_id": vm_id,
                    "vm_name": vm_name,
                    "address": address,
                    "mac": mac,
                    "created_at": datetime.now(timezone.utc).isoformat(),
                }
            )
        return address, mac

    def release(self, vm_id: str) -> bool:
        with self.store.transaction() as db:
            had = bool(list(db["network_leases"].rows_where("vm_id = ?", [vm_id])))
            db["network_leases"].delete_where("vm_id = ?", [vm_id])
        return had

    def leases(self) -> list[dict[str, Any]]:
        with self.store.transaction() as db:
            return [dict(r) for r in db["network_leases"].rows]

    # --- this boot's network, and DNS records -------------------------------------------
    def prepared(self, net: VMNet) -> None:
        with self.lock:
            self._prepared[net.vm_id] = net

    def vm_network(self, vm: Any) -> VMNet | None:
        with self.lock:
            return self._prepared.get(vm.id)

    def activate(self, vm_id: str) -> None:
        with self.lock:
            net = self._prepared.get(vm_id)
            if net is not None and net.mode == "bridge" and net.address:
                self._active[vm_id] = net
                self._rebuild()
            elif net is not None:
                self._active[vm_id] = net  # no record: a user-mode address is the VM's own

    def forget(self, vm_id: str) -> None:
        with self.lock:
            self._prepared.pop(vm_id, None)
            if self._active.pop(vm_id, None) is not None:
                self._rebuild()

    def _rebuild(self) -> None:
        self._records = {n.vm_name: n.address for n in self._active.values() if n.address and n.mode == "bridge"}
        self._generation += 1

    def records(self) -> dict[str, str]:
        with self.lock:
            return dict(self._records)

    @property
    def generation(self) -> int:
        return self._generation

    def vmnet(self, vm_id: str, vm_name: str, teardown: dict[str, Any]) -> VMNet:
        if teardown.get("mode") == "user":
            from banger_core.models import user_net

            u = user_net(teardown.get("user_net") or self.settings().user_subnet)
            return VMNet(
                vm_id=vm_id,
                vm_name=vm_name,
                mode="user",
                mac=teardown.get("mac"),
                address=u.guest,
                prefixlen=u.prefixlen,
                gateway=u.gateway,
                resolver=u.dns,
            )
        s = self.settings()
        net, gw = self.network()
        return VMNet(
            vm_id=vm_id,
            vm_name=vm_name,
            mode="bridge",
            bridge=teardown.get("bridge", s.bridge),
            tap=teardown.get("tap"),
            mac=teardown.get("mac"),
            address=teardown.get("address"),
            prefixlen=net.prefixlen,
            gateway=str(gw.ip),
            resolver=teardown.get("resolver"),
        )

    # --- daemon start / stop ------------------------------------------------------------------
    def reconcile(self, store: Any) -> dict[str, Any]:
        """At daemon start: the running bridge VMs' records again; leases of VMs that are
        gone released; VM TAPs of VMs not running removed."""
        from banger_core.models import VMState

        vms = {vm.id: vm for vm in store.list_vms()}
        live = {i for i, vm in vms.items() if vm.state in (VMState.RUNNING, VMState.PAUSED)}
        released = [lease["vm_id"] for lease in self.leases() if lease["vm_id"] not in vms]
        for vm_id in released:
            self.release(vm_id)
        self._adopt = []
        for vm_id in live:
            td = vms[vm_id].teardown.get("network") or {}
            if td.get("mode") in ("bridge", "user") and td.get("address"):
                self.prepared(self.vmnet(vm_id, vms[vm_id].name, td))
                self.activate(vm_id)
            if td.get("mode") == "user":
                self._adopt.append((vm_id, vms[vm_id].name))
        dropped = 0
        for row in self.forwards.rows():
            if row["vm_id"] not in live:
                self.forwards.forget_rows(row["vm_id"])
                dropped += 1
        removed: list[str] = []
        if self.guard_error() is None:
            keep = {tap_name(i) for i in live}
            bridge = hostnet.link(self.settings().bridge)
            for lk in hostnet.links(VM_TAP_PREFIX):
                # only on this daemon's bridge: another banger (its own bridge) keeps its own
                if lk.name not in keep and lk.kind == "tun" and bridge is not None and lk.master == bridge.index:
                    hostnet.delete_link(lk.name)
                    removed.append(lk.name)
        return {
            "records": len(self._records),
            "released": released,
            "removed_taps": removed,
            "user_vms": len(self._adopt),
            "stale_forwards": dropped,
        }

    def watch_ports(self, vm_id: str, vm_name: str, adopt: bool = False) -> None:
        """Forward a running user-mode VM's listeners (post_boot, vm_resumed, start)."""
        from banger_core.models import user_net

        agent = self.runtime.host.service_for("network", "agent")
        guest = user_net(self.settings().user_subnet).guest
        net = self._prepared.get(vm_id)
        self.forwards.watch(agent, self.daemon.paths, vm_id, vm_name, net.address if net and net.address else guest, adopt)

    def start(self) -> None:
        for vm_id, name in self._adopt:  # the VMs kept their forwards: the table says which
            try:
                self.watch_ports(vm_id, name, adopt=True)
            except Exception as exc:
                log.warning("VM %s: cannot watch its ports again: %s", name, exc)
        self._adopt = []
        if self.guard_error() is None and hostnet.may_create_taps()[0]:
            s = self.settings()
            adopted, removed = self.pool.adopt(s.bridge, s.tap_pool)
            if adopted or removed:
                log.info("TAP pool at start: adopted %s, removed %s", adopted, removed)
            self.pool.start()

    def stop(self) -> None:
        self.forwards.stop()
        self.pool.stop()
        if self.guard_error() is None and hostnet.may_create_taps()[0]:
            drained = self.pool.drain()
            if drained:
                log.info("TAP pool drained: %s", ", ".join(drained))

    def status(self) -> dict[str, Any]:
        s = self.settings()
        out: dict[str, Any] = {"bridge": s.bridge, "subnet": s.subnet, "auto": self.auto_explained()}
        try:
            out["pool"] = f"{len(self.pool.names())}/{s.tap_pool}"
        except BangerError as exc:
            out["pool"] = exc.message
        out["leases"] = len(self.leases())
        out["running"] = len(self._records)
        out.update(self.forwards.status())
        if self.pool.last_error:
            out["pool_error"] = self.pool.last_error
        return out


def _new_mac(taken: set[str]) -> str:
    while True:
        mac = "02:42:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(4))
        if mac not in taken:
            return mac
