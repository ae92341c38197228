"""Per-VM outbound NAT: a MASQUERADE rule scoped to the guest /32 plus FORWARD rules.

Opt-in per VM (``--nat``) or by ``[nat] default = true``; a project's banger.toml may
turn it on only when the user's own config.toml says ``[nat] allow_projects = true``.
See README.md for the rules, the ip_forward policy and why iptables.
"""

from __future__ import annotations

import ipaddress
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from banger_core import hookimpl

if TYPE_CHECKING:
    from banger_network.api import NetService, VMNet

    from banger_nat.service import NatService

requires = ["net"]

PROJECT_FILE = "banger.toml"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uplink: str | None = Field(
        default=None, description="outbound interface NAT masquerades out of; default: the IPv4 default route's device"
    )
    comment: str = Field(
        default="banger",
        pattern=r"^[A-Za-z0-9_.-]{1,32}$",
        description="iptables comment tag: every rule made for a VM says <comment>:nat:<vm id>",
    )
    default: bool = Field(default=False, description="NAT for VMs that say neither --nat nor --no-nat")
    allow_projects: bool = Field(
        default=False,
        description="let a project's banger.toml turn NAT on ([nat] default = true); read from config.toml only",
    )

    @field_validator("uplink")
    @classmethod
    def _uplink(cls, v: str | None) -> str | None:
        if v is not None:
            from banger_core.hostnet import IFNAME_RE

            if not IFNAME_RE.fullmatch(v):
                raise ValueError(f"not an interface name: {v!r} (1-15 letters, digits, '_', '.', '-')")
        return v


class VMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nat: bool = Field(
        default=False,
        description="outbound network access through NAT on the host's uplink (when not given: nat.default in config.toml)",
    )


@hookimpl
def config_model() -> type[BaseModel]:
    return Settings


@hookimpl
def vm_options() -> type[BaseModel]:
    return VMOptions


# --------------------------------------------------------------------------- the decision
@dataclass(frozen=True)
class Decision:
    """Whether a VM gets NAT, why, and (when a project asked and may not) the refusal."""

    on: bool
    why: str
    refusal: str | None = None


def _settings(s: Any) -> Settings:
    return s if isinstance(s, Settings) else Settings()


def _asks(vm: Any, settings: Settings) -> bool:
    """NAT may be on for this VM (cheap: no trust check): the flag, else the merged default."""
    given = vm.options.get("nat") or {}
    return given["nat"] is True if "nat" in given else settings.default


def decide(vm: Any, merged: Settings, user: Settings | None, user_config: Path | None) -> Decision:
    """The effective NAT of a VM: ``--nat``/``--no-nat`` when given; else ``[nat] default``
    of the merged settings when it is the user's own or the user allows projects; a
    project's ``default = true`` the user does not allow is refused. ``user`` is None only
    outside the daemon (no service), where the merged settings are taken as they are."""
    given = vm.options.get("nat") or {}
    if "nat" in given:
        on = given["nat"] is True
        return Decision(on, "--nat" if on else "--no-nat")
    config = str(user_config) if user_config else "config.toml"
    if not merged.default:
        return Decision(False, "[nat] default = false")
    if user is None or user.default:
        return Decision(True, f"[nat] default = true in {config}")
    project = str(Path(vm.project_dir) / PROJECT_FILE) if vm.project_dir else PROJECT_FILE
    if user.allow_projects:
        return Decision(True, f"[nat] default = true in {project} (allowed by [nat] allow_projects in {config})")
    return Decision(
        False,
        f"{project} asks for NAT; not allowed by {config}",
        refusal=(
            f"{project}: [nat] default = true asks for outbound NAT, and a project may not give its VMs network "
            f"egress by itself: set [nat] allow_projects = true in {config} to let projects do that, "
            "or give this VM --nat (or --no-nat)"
        ),
    )


# --------------------------------------------------------------------------- services
def _own_service(ctx: Any) -> "NatService":
    svc: NatService = ctx.service("nat")
    return svc


def _own_service_or_none(ctx: Any) -> "NatService | None":
    from banger_core.errors import BangerError

    try:
        return _own_service(ctx)
    except BangerError:
        return None


@hookimpl
def register_migrations(register: Callable[..., None]) -> None:
    from banger_nat.service import migration_1

    register(1, "nat_vms (who has NAT rules) and nat_forwarding (ip_forward as banger found it)", migration_1)


@hookimpl
def register_services(register: Callable[[str, object], None], daemon: Any) -> None:
    from banger_nat.service import NatService

    register("nat", NatService(daemon.runtime, daemon.store))


# --------------------------------------------------------------------------- lifecycle
def _refuse_mode(vm: Any, net: "VMNet | None") -> str:
    mode = net.mode if net is not None else "none"
    hint = {"none": "a VM with --network none has no network to give egress to"}.get(
        mode, "only the bridge network's guests are masqueraded"
    )
    return f"--nat needs the bridge network: VM {vm.name} has network mode {mode} ({hint})"


@hookimpl
def prepare_host(ctx: Any) -> None:
    from banger_core import hostnet
    from banger_core.errors import BangerError, ErrorCode
    from banger_nat.service import comment_for, insert_rules, rule_to_json, vm_rules

    settings = _settings(ctx.settings)
    if not ctx.teardown and not _asks(ctx.vm, settings):
        return
    svc = _own_service(ctx)
    if ctx.teardown:  # a previous boot's rules a failed cleanup left: gone before anything new
        problems = _undo(ctx, svc, settings)
        if problems:
            raise BangerError(ErrorCode.OPERATION_FAILED, "cannot remove the previous boot's NAT rules: " + "; ".join(problems))
    user = svc.user_settings()
    decision = decide(ctx.vm, settings, user, svc.user_config)
    if decision.refusal:
        raise BangerError(ErrorCode.CONFIG, decision.refusal)
    if not decision.on:
        return
    net_service: NetService = ctx.service("net")
    net = net_service.vm_network(ctx.vm)
    if net is not None and net.mode == "user":  # QEMU's own NAT gives it egress already: nothing to add
        ctx.log.info("VM %s: --nat in user mode: egress through QEMU's user-mode network, no rules needed", ctx.vm.name)
        return
    if net is None or net.mode != "bridge":
        raise BangerError(ErrorCode.BAD_REQUEST, _refuse_mode(ctx.vm, net))
    if not net.bridge or not net.address:
        raise BangerError(
            ErrorCode.OPERATION_FAILED, f"the network plugin gave VM {ctx.vm.name} no bridge or no address: nothing to NAT"
        )
    address = str(ipaddress.IPv4Address(net.address.split("/")[0]))
    trusted = settings if user.allow_projects else user  # a project's [nat] keys apply only when allowed
    uplink = trusted.uplink or hostnet.default_route_device()
    if uplink is None:
        raise BangerError(
            ErrorCode.OPERATION_FAILED,
            f"--nat: this host has no IPv4 default route to masquerade out of; set [nat] uplink in {svc.user_config}",
        )
    if uplink == net.bridge:
        raise BangerError(ErrorCode.CONFIG, f"[nat] uplink is the VMs' own bridge {uplink!r}: name the host's outbound interface")
    if hostnet.link(uplink) is None:
        raise BangerError(
            ErrorCode.NOT_FOUND,
            f"--nat: uplink {uplink!r} does not exist on this host ([nat] uplink in {svc.user_config}, or the default route's)",
        )
    comment = comment_for(user.comment, ctx.vm.id)
    rules = vm_rules(comment, address, net.bridge, uplink)
    record = {
        "comment": comment,
        "uplink": uplink,
        "address": address,
        "bridge": net.bridge,
        "tap": net.tap,
        "why": decision.why,
        "rules": [rule_to_json(r) for r in rules],
    }
    with svc.lock:
        ctx.teardown.clear()
        ctx.teardown.update(record)
        ctx.persist()  # recorded before any rule exists
        svc.remember_vm(ctx.vm.id, record)
        insert_rules(rules)
        svc.ensure_forwarding(ctx.log)
    ctx.log.info("NAT for %s (%s) out of %s: %s", ctx.vm.name, address, uplink, decision.why)


def _user_tag(svc: "NatService | None", settings: Settings) -> str:
    """The comment tag of the user's own config (a project's never counts)."""
    if svc is not None:
        try:
            return svc.user_settings().comment
        except Exception:  # an invalid config.toml: the VM's settings were valid when it started
            pass
    return settings.comment


def _undo(ctx: Any, svc: "NatService | None", settings: Settings) -> list[str]:
    """Remove this VM's rules by the record and by comment, then the ip_forward check.
    Returns every problem met (it goes on past each)."""
    from banger_nat.service import comment_for, parse_comment, remove_rules, rule_from_json

    problems: list[str] = []
    vm_id = ctx.vm.id
    comments = {comment_for(_user_tag(svc, settings), vm_id)}
    if isinstance(ctx.teardown.get("comment"), str):
        comments.add(ctx.teardown["comment"])
    if svc is not None and (row := svc.known_vms().get(vm_id)):
        comments.add(row)  # the plugin's own record, when the VM's teardown lost its
    recorded = []
    for raw in ctx.teardown.get("rules") or []:
        try:
            recorded.append(rule_from_json(raw))
        except Exception as exc:
            problems.append(f"unreadable rule record {raw!r}: {exc}")
    with svc.lock if svc is not None else nullcontext():
        problems += remove_rules(recorded, comments)
        if not problems:
            ctx.teardown.clear()
            if svc is not None:
                svc.forget_vm(vm_id)
        if svc is not None:
            try:
                svc.release_forwarding({parsed[0] for parsed in map(parse_comment, comments) if parsed}, ctx.log)
            except Exception as exc:
                problems.append(f"cannot restore net.ipv4.ip_forward: {exc}")
    return problems


@hookimpl
def cleanup(ctx: Any) -> None:
    from banger_core.errors import BangerError, ErrorCode

    settings = _settings(ctx.settings)
    svc = _own_service_or_none(ctx)
    if not ctx.teardown and not _asks(ctx.vm, settings) and not (svc is not None and ctx.vm.id in svc.known_vms()):
        return  # never had NAT: the firewall is not even read
    problems = _undo(ctx, svc, settings)
    if problems:
        raise BangerError(
            ErrorCode.OPERATION_FAILED, f"NAT cleanup of VM {ctx.vm.name}: {len(problems)} problem(s): " + "; ".join(problems)
        )


@hookimpl
def reconcile(ctx: Any) -> None:
    """Rules of VMs that are not running (a crashed daemon's leftovers) go; rules naming a
    VM this banger never knew are left (another banger in the same namespace) and logged."""
    from banger_core import hostnet
    from banger_core.errors import BangerError, ErrorCode
    from banger_nat.service import describe, parse_comment, tagged_rules

    settings = _settings(ctx.settings)
    svc = _own_service_or_none(ctx)
    vms = ctx.store.list_vms()
    recorded = svc.known_vms() if svc is not None else {}
    tags = {settings.comment} | {parsed[0] for parsed in map(parse_comment, recorded.values()) if parsed}
    if not (svc is not None and svc.has_records()) and not any(vm.teardown.get("nat") or _asks(vm, settings) for vm in vms):
        return  # banger never made a NAT rule here: the firewall is not even read
    if hostnet.iptables_binary() is None:
        ctx.log.warning("iptables is not installed: cannot look for NAT rules left by a crashed daemon")
        return
    live = {vm.id for vm in vms if vm.state.live}
    known = {vm.id for vm in vms} | set(recorded)
    problems: list[str] = []
    foreign: set[str] = set()
    failed: set[str] = set()
    with svc.lock if svc is not None else nullcontext():
        for rule, vm_id in tagged_rules(tags):
            if vm_id in live:
                continue
            if vm_id not in known:
                foreign.add(vm_id)
                continue
            try:
                hostnet.delete_rule(rule)
                ctx.log.info("removed NAT rule of VM %s (not running): %s", vm_id, describe(rule))
            except Exception as exc:
                failed.add(vm_id)
                problems.append(f"cannot delete {describe(rule)}: {exc}")
        if svc is not None:
            for vm_id in set(recorded) - live - failed:
                svc.forget_vm(vm_id)
            try:
                svc.release_forwarding(tags, ctx.log)
            except Exception as exc:
                problems.append(f"cannot restore net.ipv4.ip_forward: {exc}")
    if foreign:
        ctx.log.warning(
            "NAT rules commented <tag>:nat:<id> (tags %s) for VM(s) this banger does not know (%s): left alone "
            "(another banger's?)",
            ", ".join(sorted(tags)),
            ", ".join(sorted(foreign)),
        )
    if problems:
        raise BangerError(ErrorCode.OPERATION_FAILED, f"NAT reconcile: {len(problems)} problem(s): " + "; ".join(problems))


def _decision(ctx: Any) -> Decision:
    settings = _settings(ctx.settings)
    svc = _own_service_or_none(ctx)  # FieldsContext.service (core 0.5)
    return decide(ctx.vm, settings, svc.user_settings() if svc else None, svc.user_config if svc else None)


@hookimpl
def vm_egress(ctx: Any) -> bool | None:
    """NAT on a bridge VM is its way out (in user mode QEMU's own NAT is: the network plugin says so)."""
    return True if _asks(ctx.vm, _settings(ctx.settings)) and _decision(ctx).on else None


@hookimpl
def vm_fields(ctx: Any, detail: bool) -> dict[str, object]:
    decision = _decision(ctx)
    out: dict[str, object] = {"nat": decision.on}
    if detail:
        out["why"] = decision.why
        for key in ("uplink", "address"):
            if ctx.teardown.get(key):
                out[key] = ctx.teardown[key]
    return out


# --------------------------------------------------------------------------- doctor
@hookimpl
def register_doctor_checks(register: Callable[..., None]) -> None:
    from banger_core.context import CheckResult

    def tools(_s: Settings) -> CheckResult:
        import subprocess

        from banger_core import hostnet

        exe = hostnet.iptables_binary()
        if exe is None:
            return CheckResult.fail("tools", "not found on PATH: iptables (apt install iptables)")
        try:
            version = subprocess.run([exe, "-V"], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            return CheckResult.fail("tools", f"{exe} -V: {exc}")
        if "nf_tables" in version:
            return CheckResult.ok("tools", f"{version}: rules go into the kernel's nftables (ip filter / ip nat tables)")
        if "legacy" in version:
            return CheckResult.ok("tools", f"{version}: the legacy x_tables backend")
        return CheckResult.warn("tools", f"{version or exe}: backend unknown (neither nf_tables nor legacy)")

    def forwarding(_s: Settings) -> CheckResult:
        from banger_core import hostnet
        from banger_core.errors import BangerError

        try:
            value = hostnet.sysctl_get("net.ipv4.ip_forward")
        except BangerError as exc:
            return CheckResult.warn("forwarding", exc.message)
        if value == "1":
            return CheckResult.ok("forwarding", "net.ipv4.ip_forward = 1: already on; banger leaves it alone")
        return CheckResult.ok(
            "forwarding",
            f"net.ipv4.ip_forward = {value}: banger sets it to 1 when the first NAT VM starts "
            f"and back to {value} when the last one stops",
        )

    def uplink(s: Settings) -> CheckResult:
        from banger_core import hostnet
        from banger_core.errors import BangerError

        try:
            dev = s.uplink or hostnet.default_route_device()
            exists = dev is not None and hostnet.link(dev) is not None
        except BangerError as exc:
            return CheckResult.warn("uplink", exc.message)
        if dev is None:
            return CheckResult.warn("uplink", "no IPv4 default route: --nat is refused until there is one or [nat] uplink is set")
        if not exists:
            return CheckResult.fail("uplink", f"[nat] uplink {dev!r} does not exist")
        return CheckResult.ok("uplink", f"{dev} ({'[nat] uplink' if s.uplink else 'the default route'})")

    register("tools", tools)
    register("forwarding", forwarding)
    register("uplink", uplink)
