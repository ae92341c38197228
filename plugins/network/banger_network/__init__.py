"""Network modes for VMs: a host bridge with a warm pool of TAP devices and leased guest
addresses (bridge), or no NIC at all (none). Offers the ``net`` service (api.py) that
NAT and DNS use.

- ``--network bridge|user|none|auto`` per VM (``vm create``, ``vm run``, ``vm set``),
  ``[network] mode`` in config.toml or a project's banger.toml (flag > project > user).
  ``auto``: bridge when the daemon may create TAP devices here, else user when the VM's
  VMM has it (QEMU), else none.
- bridge: the bridge (``banger0``, the subnet's first host address) is made on demand;
  a daemon service keeps ``tap_pool`` TAPs (``tap-pool-N``) on it, refilled in the
  background, adopted or removed at the next start after a crash, drained at daemon stop.
  A VM's boot takes one (renamed ``bt-<id>``). Addresses and MACs are leased from the
  plugin's own table (``network_leases``): never two VMs', kept across stop/start,
  released on delete. The guest gets them on its kernel command line (``ip=`` for
  kernels with IP autoconfiguration, ``banger.net=`` that the agent applies otherwise);
  a VM restored from a snapshot gets its own MAC and address through the agent.
- user: QEMU's user-mode network (slirp), nothing made on the host and no privilege
  needed: the guest is 10.0.2.15, reaches the host's loopback at 10.0.2.2 and the
  internet through the daemon's own network. The guest agent pushes its listeners when
  they change (``watch_ports``) and each TCP/UDP one is forwarded from 127.0.0.1 on the
  same port when free, else an ephemeral one (``[network.forward]`` excludes or pins
  ports); ``vm ports`` and ``vm show`` say where (forwards.py).
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


def _m2_forwards(db: Any) -> None:
    db["network_forwards"].create(
        {"vm_id": str, "proto": str, "guest_port": int, "host_address": str, "host_port": int, "created_at": str},
        pk=("vm_id", "proto", "guest_port"),
    )


@hookimpl
def register_migrations(register: Callable[..., None]) -> None:
    register(1, "network_leases (guest addresses and MACs), network_meta (the namespace banger acts in)", _m1_leases)
    register(2, "network_forwards (user mode's host forwards, while their VMM holds them)", _m2_forwards)


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
    from banger_core.models import user_net
    from banger_network.service import host_resolver, tap_name, user_mac

    svc = _svc(ctx)
    mode = svc.resolved_mode(ctx.vm, ctx.settings, ctx.options) if svc is not None else "none"
    ctx.teardown.clear()
    ctx.teardown["mode"] = mode
    if mode == "none":
        ctx.persist()
        return
    if mode == "user":
        refused = svc.user_refusal(ctx.vm.driver)
        if refused is not None:
            raise BangerError(ErrorCode.BAD_REQUEST, f"network mode user: {refused}")
        svc.forwards.stop_vm(ctx.vm.id)  # a previous boot's rows: its VMM is gone
        u = user_net(svc.settings().user_subnet)
        ctx.teardown.update(user_net=u.network, address=u.guest, mac=user_mac(ctx.vm.id))
        ctx.persist()
        svc.prepared(svc.vmnet(ctx.vm.id, ctx.vm.name, ctx.teardown))
        ctx.log.info("VM %s: user-mode network %s (nothing made on the host)", ctx.vm.name, u.network)
        return
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
    if td.get("mode") not in ("bridge", "user"):
        return
    net = _svc(ctx).vm_network(ctx.vm)
    if td["mode"] == "user":
        machine.nics.append(NIC(id="net0", kind="user", net=td["user_net"], mac=td["mac"]))
    else:
        machine.nics.append(NIC(id="net0", tap=td["tap"], mac=td["mac"]))
    mask = str(ipaddress.IPv4Network(f"0.0.0.0/{net.prefixlen}").netmask)
    dns = net.resolver or ""
    # the kernel's own autoconfiguration (banger's microVM kernel has it; Debian's cloud
    # kernel has not, and the agent applies banger.net= there)
    machine.boot_args.append(f"ip={net.address}::{net.gateway}:{mask}:{ctx.vm.name}:eth0:off:{dns}")
    machine.boot_args.append(f"banger.net={net.address}/{net.prefixlen},{net.gateway},{dns},{td['mac']}")


@hookimpl
def vm_resumed(ctx: Any, resumed: Any) -> None:
    """A VM restored from a snapshot runs with its source's MAC and address: the agent
    gives the guest its own (link down, new MAC, address, route, resolver, link up)."""
    td = ctx.teardown
    if td.get("mode") == "user":  # a new VMM: no forwards yet, whatever the guest listens on
        _svc(ctx).watch_ports(ctx.vm.id, ctx.vm.name)
        return
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
    if svc is None:
        return
    svc.activate(ctx.vm.id)
    if ctx.teardown.get("mode") == "user" and svc.forwards.get(ctx.vm.id) is None:  # (vm_resumed started it)
        svc.watch_ports(ctx.vm.id, ctx.vm.name)


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
    try:
        svc.forwards.stop_vm(ctx.vm.id)
    except Exception as exc:
        errors.append(f"forwards: {exc}")
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
def vm_egress(ctx: Any) -> bool | None:
    """A user-mode VM reaches out through QEMU's own NAT (a bridge VM needs the nat plugin)."""
    mode = ctx.teardown.get("mode")
    if mode is None and (svc := _svc(ctx)) is not None:  # not started yet (vm run's plan)
        mode = svc.resolved_mode(ctx.vm, ctx.settings, ctx.options)
    return True if mode == "user" else None


@hookimpl
def vm_fields(ctx: Any, detail: bool) -> dict[str, object] | None:
    td = ctx.teardown
    if not td:
        return None
    if not detail:
        return {"ip": "user" if td.get("mode") == "user" else td.get("address") or "-"}
    out: dict[str, object] = {"mode": td.get("mode")}
    for k in ("address", "mac", "bridge", "tap", "resolver", "user_net"):
        if td.get(k):
            out[k] = td[k]
    if td.get("mode") == "user":
        f = _forwarder(ctx)
        out["forwards"] = f.describe() if f is not None else []
    return out


def _forwarder(ctx: Any) -> Any:
    try:
        svc = ctx.service("net")
    except Exception:
        return None
    return svc.forwards.get(ctx.vm.id) if ctx.vm.state.live else None


@hookimpl
def vm_port_endpoint(ctx: Any, listener: Any) -> str | None:
    """A user-mode VM's forwarded listener: 127.0.0.1:<its host port>."""
    if ctx.teardown.get("mode") != "user":
        return None
    f = _forwarder(ctx)
    return f.endpoint((listener.proto, listener.port), listener.model_dump()) if f is not None else None


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
        if refused:
            auto = f"none ({refused})"
        elif ok:
            auto = f"bridge ({why})"
        else:
            auto = f"user on QEMU, none on Firecracker ({why})"
        where = f"daemon namespace {hostnet.current_namespace().describe()}"
        return CheckResult.ok("mode", f"mode {s.mode}; auto = {auto}; {where}")

    def user(s: Any) -> "CheckResult":
        import shutil

        from banger_core.models import user_net
        from banger_network.settings import Settings

        s = s if isinstance(s, Settings) else Settings()
        u = user_net(s.user_subnet)
        rt = getattr(doctor, "runtime", None)
        if shutil.which(rt.config.core.vmm.qemu_binary if rt is not None else "qemu-system-x86_64") is None:
            return CheckResult.warn("user mode", "no QEMU binary: user mode needs QEMU (Firecracker has none)")
        f = s.forward
        fwd = "off" if not f.auto else f"on ({len(f.exclude)} excluded, {len(f.pin)} pinned)"
        return CheckResult.ok(
            "user mode",
            f"QEMU slirp on {u.network}: the guest is {u.guest}; it reaches this host's 127.0.0.1 services at {u.gateway} "
            f"and DNS at {u.dns}, and goes out through the daemon's network; its listeners are forwarded to 127.0.0.1: {fwd}",
        )

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
    register("user mode", user)
    register("bridge", bridge)
