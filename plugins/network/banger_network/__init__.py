"""Network modes for VMs: a host bridge with a warm pool of TAP devices and leased guest
addresses (bridge), or no NIC at all (none). Offers the ``net`` service (api.py) that
NAT and DNS use.

- ``--network bridge|user|none|auto`` per VM (``vm create``, ``vm run``, ``vm set``),
  ``[network] mode`` in config.toml or a project's banger.toml (flag > project > user).
  ``auto``: bridge when the daemon may create TAP devices here, else none (user mode is
  the next banger's).
- bridge: the bridge (``banger0``, the subnet's first host address) is made on demand;
  a daemon service keeps ``tap_pool`` TAPs (``tap-pool-N``) on it, refilled in the
  background, adopted or removed at the next start after a crash, drained at daemon stop.
  A VM's boot takes one (renamed ``bt-<id>``). Addresses and MACs are leased from the
  plugin's own table (``network_leases``): never two VMs', kept across stop/start,
  released on delete. The guest gets them on its kernel command line (``ip=`` for
  kernels with IP autoconfiguration, ``banger.net=`` that the agent applies otherwise);
  a VM restored from a snapshot gets its own MAC and address through the agent.
- Safety: every change goes through ``banger_core.hostnet``, and only in the network
  namespace banger is told to use (``[network] netns`` / ``BANGER_NETNS``), or else the
  one it first acted in (recorded).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any, Callable

from banger_core import hookimpl

if TYPE_CHECKING:
    from pydantic import BaseModel

    from banger_core.context import CheckResult

requires = ["agent"]  # a restored VM's own MAC and address are applied by the agent
provides = ["net"]

_service: Any = None


@hookimpl
def config_model() -> "type[BaseModel]":
    from banger_network.settings import Settings

    return Settings


@hookimpl
def vm_options() -> "type[BaseModel]":
    from banger_network.settings import VMOptions

    return VMOptions


def _m1_leases(db: Any) -> None:
    db["network_leases"].create(
        {"vm_id": str, "vm_name": str, "address": str, "mac": str, "created_at": str}, pk="vm_id", not_null={"address", "mac"}
    )
    db["network_leases"].create_index(["address"], unique=True)
    db["network_leases"].create_index(["mac"], unique=True)
    db["network_meta"].create({"key": str, "value": str}, pk="key")


@hookimpl
def register_migrations(register: Callable[..., None]) -> None:
    register(1, "network_leases (guest addresses and MACs), network_meta (the namespace banger acts in)", _m1_leases)


@hookimpl
def register_services(register: Callable[[str, object], None], daemon: Any) -> None:
    global _service
    from banger_network.service import NetworkService

    _service = NetworkService(daemon)
    register("net", _service)


def _svc(ctx: Any) -> Any:
    """The service, or None outside a daemon (banger_core.testing.run_lifecycle): then
    VMs get no network and nothing on the host changes."""
    from banger_core.errors import BangerError

    try:
        return ctx.service("net")
    except BangerError:
        return None


@hookimpl
def reconcile(ctx: Any) -> None:
    svc = _svc(ctx)
    if svc is None:
        return
    report = svc.reconcile(ctx.store)
    ctx.log.info("network reconciled: %s", report)


@hookimpl
def prepare_host(ctx: Any) -> None:
    from banger_core.errors import BangerError, ErrorCode
    from banger_network.service import host_resolver, tap_name

    svc = _svc(ctx)
    mode = svc.resolved_mode(ctx.vm, ctx.settings, ctx.options) if svc is not None else "none"
    ctx.teardown.clear()
    ctx.teardown["mode"] = mode
    if mode == "none":
        ctx.persist()
        return
    if mode == "user":
        raise BangerError(
            ErrorCode.BAD_REQUEST,
            "network mode 'user' (QEMU user-mode networking) is not in this banger yet: use --network bridge or none",
        )
    svc.guard()
    address, mac = svc.lease(ctx.vm.id, ctx.vm.name)
    s = svc.settings()
    resolver = s.resolver or host_resolver()  # the user's own setting: a project cannot pick its guests' resolver
    ctx.teardown.update(bridge=s.bridge, tap=tap_name(ctx.vm.id), address=address, mac=mac, resolver=resolver)
    ctx.persist()  # before anything exists: cleanup finds the TAP even after a crash
    svc.ensure_bridge()
    how = svc.attach_tap(ctx.teardown["tap"])
    ctx.log.info("VM %s: %s on %s (%s TAP %s)", ctx.vm.name, address, s.bridge, how, ctx.teardown["tap"])
    svc.prepared(svc.vmnet(ctx.vm.id, ctx.vm.name, ctx.teardown))


@hookimpl
def configure_machine(ctx: Any, machine: Any) -> None:
    from banger_core.models import NIC

    td = ctx.teardown
    if td.get("mode") != "bridge":
        return
    net = _svc(ctx).vm_network(ctx.vm)
    machine.nics.append(NIC(id="net0", tap=td["tap"], mac=td["mac"]))
    mask = str(ipaddress.IPv4Network(f"0.0.0.0/{net.prefixlen}").netmask)
    dns = td.get("resolver") or ""
    # the kernel's own autoconfiguration (banger's microVM kernel has it; Debian's cloud
    # kernel has not, and the agent applies banger.net= there)
    machine.boot_args.append(f"ip={td['address']}::{net.gateway}:{mask}:{ctx.vm.name}:eth0:off:{dns}")
    machine.boot_args.append(f"banger.net={td['address']}/{net.prefixlen},{net.gateway},{dns},{td['mac']}")


@hookimpl
def vm_resumed(ctx: Any, resumed: Any) -> None:
    """A VM restored from a snapshot runs with its source's MAC and address: the agent
    gives the guest its own (link down, new MAC, address, route, resolver, link up)."""
    td = ctx.teardown
    if td.get("mode") != "bridge" or not resumed.new_identity:
        return
    net = _svc(ctx).vm_network(ctx.vm)
    request = {
        "op": "net",
        "address": f"{td['address']}/{net.prefixlen}",
        "gateway": net.gateway,
        "resolver": td.get("resolver"),
        "mac": td["mac"],
    }
    try:
        result = ctx.service("agent").request(ctx.paths, ctx.vm.id, request, timeout=20)
    except Exception as exc:
        raise RuntimeError(
            f"the guest could not take its own address {td['address']} (it has {resumed.source_vm}'s): {exc}"
        ) from None
    ctx.log.info(
        "VM %s: its own MAC %s and address %s on %s (%s ms)",
        ctx.vm.name,
        td["mac"],
        td["address"],
        result.get("interface"),
        result.get("ms"),
    )


@hookimpl
def post_boot(ctx: Any) -> None:
    svc = _svc(ctx)
    if svc is not None:
        svc.activate(ctx.vm.id)


@hookimpl
def cleanup(ctx: Any) -> None:
    from banger_core import hostnet
    from banger_core.context import CleanupReason
    from banger_network.service import tap_name

    svc = _svc(ctx)
    if svc is None:
        return
    svc.forget(ctx.vm.id)
    errors = []
    if ctx.teardown.get("mode") == "bridge" or hostnet.link(tap_name(ctx.vm.id)) is not None:
        try:
            svc.guard()
            for name in {ctx.teardown.get("tap") or tap_name(ctx.vm.id), tap_name(ctx.vm.id)}:
                hostnet.delete_link(name)
        except Exception as exc:
            errors.append(f"TAP: {exc}")
    if getattr(ctx, "reason", None) in (CleanupReason.DELETE, None):
        svc.release(ctx.vm.id)
    if errors:
        raise RuntimeError("; ".join(errors))


@hookimpl
def vm_fields(ctx: Any, detail: bool) -> dict[str, object] | None:
    td = ctx.teardown
    if not td:
        return None
    if not detail:
        return {"ip": td.get("address") or "-"}
    out: dict[str, object] = {"mode": td.get("mode")}
    for k in ("address", "mac", "bridge", "tap", "resolver"):
        if td.get(k):
            out[k] = td[k]
    return out


@hookimpl
def register_doctor_checks(register: Callable[..., None], doctor: Any) -> None:
    import os

    from banger_core.context import CheckResult

    def tun(_s: Any) -> "CheckResult":
        if os.path.exists("/dev/net/tun"):
            return CheckResult.ok("tun", "/dev/net/tun")
        return CheckResult.fail("tun", "/dev/net/tun missing: load the tun module (modprobe tun)")

    def mode(s: Any) -> "CheckResult":
        from banger_core import hostnet
        from banger_network.service import netns_refusal
        from banger_network.settings import Settings

        s = s if isinstance(s, Settings) else Settings()
        ok, why = hostnet.may_create_taps()
        expected = s.expected_netns()
        refused = netns_refusal(expected) if expected else None  # '': the daemon's recorded namespace rules
        auto = f"none ({refused})" if refused else (f"bridge ({why})" if ok else f"none ({why})")
        where = f"daemon namespace {hostnet.current_namespace().describe()}"
        return CheckResult.ok("mode", f"mode {s.mode}; auto = {auto}; {where}")

    def bridge(s: Any) -> "CheckResult":
        from banger_core import hostnet
        from banger_network.settings import Settings

        s = s if isinstance(s, Settings) else Settings()
        lk = hostnet.link(s.bridge)
        if lk is None:
            return CheckResult.ok("bridge", f"{s.bridge} ({s.subnet}) is made when the first bridge VM starts")
        addrs = hostnet.addresses(s.bridge)
        gw = f"{next(ipaddress.IPv4Network(s.subnet).hosts())}/{ipaddress.IPv4Network(s.subnet).prefixlen}"
        if gw not in addrs:
            return CheckResult.warn("bridge", f"{s.bridge} exists without {gw} (has {', '.join(addrs) or 'no address'})")
        pool = len(hostnet.links("tap-pool-"))
        return CheckResult.ok("bridge", f"{s.bridge} {gw}, {'up' if lk.up else 'DOWN'}; {pool} pool TAP(s)")

    register("tun", tun)
    register("mode", mode)
    register("bridge", bridge)
