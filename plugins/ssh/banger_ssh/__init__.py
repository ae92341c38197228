"""SSH that just works: banger's own ed25519 key, a host key pair of its own for every
VM (made on the host at create, never in a TCG guest) pinned as ``NAME.vm`` in the
known_hosts banger keeps, banger's public key in root's authorized_keys, ``banger vm
ssh NAME [-- CMD...]``, and ``banger ssh-config --install`` for plain ``ssh NAME.vm``:
straight to the address for bridge VMs, through the agent channel otherwise.

Why a plugin of its own, not part of ``agent``: it is what a user may leave out (or
replace with their own key management) without losing exec, and it requires only the
agent's published operations (``ssh_setup``, ``tcp_connect``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ConfigDict, Field

from banger_core import hookimpl

if TYPE_CHECKING:
    from banger_core.context import CheckResult

requires = ["agent"]
provides = ["ssh"]

HOST_KEY = "ssh_host_ed25519_key"  # in the VM's directory


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(
        default="", description="banger's SSH private key (made on first use); '' = $BANGER_STATE_DIR/ssh/id_ed25519"
    )
    wait_s: int = Field(default=60, ge=1, le=3600, description="how long `vm ssh` waits for the guest's sshd")


def files(paths: Any, settings: Any) -> dict[str, Path]:
    """banger's SSH files: key, known_hosts, config (the Include's target), record."""
    d = Path(paths.state_dir) / "ssh"
    key = getattr(settings, "key", "") or ""
    return {
        "dir": d,
        "key": Path(key).expanduser().absolute() if key else d / "id_ed25519",
        "known_hosts": d / "known_hosts",
        "config": d / "config",
        "record": d / "installed.json",
    }


@hookimpl
def config_model() -> type[BaseModel]:
    return Settings


# --- lifecycle -------------------------------------------------------------------------


@hookimpl
def prepare_host(ctx: Any) -> None:
    """The VM's own host key pair, made once per VM (a restored VM is a new VM: its own)."""
    from banger_ssh import keys

    vm_dir = Path(ctx.paths.vm_files(ctx.vm.id).dir)
    vm_dir.mkdir(parents=True, exist_ok=True)
    host_key = vm_dir / HOST_KEY
    if not host_key.exists():
        keys.keygen(host_key, f"root@{ctx.vm.name}")
    ctx.teardown["alias"] = keys.alias(ctx.vm.name)
    ctx.persist()


def _place(ctx: Any) -> None:
    """Through the agent: the VM's host keys (sshd reloads them), banger's public key in
    root's authorized_keys and the keys it rotated out taken out; then ``NAME.vm`` is
    pinned to the VM's host key."""
    from banger_ssh import keys

    f = files(ctx.paths, ctx.settings)
    host_key = Path(ctx.paths.vm_files(ctx.vm.id).dir) / HOST_KEY
    if not host_key.exists():
        return
    try:
        agent = ctx.service("agent")
    except Exception as exc:  # no agent service (no daemon: banger_core.testing.run_lifecycle)
        ctx.log.warning("VM %s: SSH keys not placed: %s", ctx.vm.name, exc)
        return
    if agent.health(ctx.vm.id) is None:  # no agent answered this start (an image without it): nothing to ask
        return
    request = {
        "op": "ssh_setup",
        "host_keys": {"ed25519": {"private": host_key.read_text(), "public": keys.public_line(host_key)}},
        "authorized_keys": [keys.ensure_key(f["key"])],
        "revoke": keys.retired(f["key"]),
    }
    try:
        result = agent.request(ctx.paths, ctx.vm.id, request, timeout=20)
    except Exception as exc:  # an old agent, or one that went away: the VM runs; vm ssh says why it cannot
        ctx.log.warning("VM %s: SSH keys not placed: %s", ctx.vm.name, exc)
        return
    ctx.handles["placed_in"] = ctx.op_id
    keys.pin(f["known_hosts"], ctx.vm.name, keys.public_line(host_key))
    ctx.log.info(
        "VM %s: SSH host key pinned as %s (sshd %s%s)",
        ctx.vm.name,
        keys.alias(ctx.vm.name),
        result.get("sshd") or "not running yet",
        f"; {result['revoked']} rotated-out key(s) revoked" if result.get("revoked") else "",
    )


@hookimpl
def vm_resumed(ctx: Any, resumed: Any) -> None:
    """A VM restored from a snapshot (or warm-started) still serves the source's host
    key: it gets its own (made by prepare_host for this VM) in its resume hook."""
    if resumed.new_identity:
        _place(ctx)


@hookimpl
def post_boot(ctx: Any) -> None:
    """Every start (unless vm_resumed just placed them in this start)."""
    if ctx.handles.get("placed_in") != ctx.op_id:
        _place(ctx)


@hookimpl
def cleanup(ctx: Any) -> None:
    from banger_core.context import CleanupReason
    from banger_ssh import keys

    if getattr(ctx, "reason", None) in (CleanupReason.DELETE, None):
        keys.unpin(files(ctx.paths, ctx.settings)["known_hosts"], ctx.vm.name)


@hookimpl
def vm_fields(ctx: Any, detail: bool) -> dict[str, object] | None:
    if not detail or not ctx.teardown.get("alias"):
        return None
    return {"host": ctx.teardown["alias"], "command": f"banger vm ssh {ctx.vm.name}"}


# --- RPC -------------------------------------------------------------------------------


class TargetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ref: str
    wait_s: float | None = Field(
        default=None, ge=0, le=3600, description="wait for the guest's sshd (0: do not; default [ssh] wait_s)"
    )


class KeyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rotate: bool = False


def _settings(state: Any) -> Any:
    return state.runtime.config.settings_for(state.runtime.host, "ssh")


def ssh_target(p: TargetParams, call: Any) -> dict[str, Any]:
    """Where and how the CLI reaches a running VM's sshd; with ``wait_s``, once it
    answers (its banner, through the agent)."""
    import time

    from banger_core.errors import BangerError, ErrorCode
    from banger_ssh import keys

    state = call.state
    wait_s = p.wait_s if p.wait_s is not None else float(getattr(_settings(state), "wait_s", 60))
    vm = state.vms.resolve(p.ref)
    if not vm.state.live:
        raise BangerError(ErrorCode.BAD_REQUEST, f"VM {vm.name} is {vm.state.value}: start it first (banger vm start {vm.name})")
    f = files(state.paths, _settings(state))
    keys.ensure_key(f["key"])
    net = vm.teardown.get("network") or {}
    out = {
        "name": vm.name,
        "alias": keys.alias(vm.name),
        "mode": net.get("mode") or "none",
        "address": net.get("address") if net.get("mode") == "bridge" else None,
        "key": str(f["key"]),
        "known_hosts": str(f["known_hosts"]),
    }
    if wait_s:
        agent = state.service("agent")
        deadline = time.monotonic() + wait_s
        last = "no answer"
        while True:
            try:
                first = agent.probe_tcp(state.paths, vm.id, 22, timeout=min(5.0, max(0.5, deadline - time.monotonic())))
                if first.startswith(b"SSH-"):
                    break
                last = f"port 22 answered {first[:40]!r}" if first else "port 22 said nothing"
            except Exception as exc:
                last = str(exc) or type(exc).__name__
            if time.monotonic() >= deadline:
                raise BangerError(
                    ErrorCode.OPERATION_FAILED,
                    f"no SSH server answered in VM {vm.name} within {wait_s:.0f}s ({last}); does its image run sshd?",
                )
            time.sleep(0.5)
    return out


def ssh_key(p: KeyParams, call: Any) -> dict[str, Any]:
    """banger's key (made if missing); ``rotate``: a new one, pushed to the running VMs'
    authorized_keys, the old one revoked there (and in stopped VMs at their next start)."""
    from banger_ssh import keys

    state = call.state
    f = files(state.paths, _settings(state))
    public = keys.rotate_key(f["key"]) if p.rotate else keys.ensure_key(f["key"])
    pushed, failed = [], {}
    if p.rotate:
        agent = state.service("agent")
        for vm in state.store.list_vms():
            if vm.state.live:
                try:
                    request = {
                        "op": "ssh_setup",
                        "host_keys": None,
                        "authorized_keys": [public],
                        "revoke": keys.retired(f["key"]),
                    }
                    agent.request(state.paths, vm.id, request, timeout=20)
                    pushed.append(vm.name)
                except Exception as exc:
                    failed[vm.name] = str(exc)
    return {
        "key": str(f["key"]),
        "public": public,
        "fingerprint": keys.fingerprint(f["key"]),
        "known_hosts": str(f["known_hosts"]),
        "config": str(f["config"]),
        "record": str(f["record"]),
        "pushed": pushed,
        "failed": failed,
    }


@hookimpl
def register_rpc_methods(register: Callable[..., None]) -> None:
    register("ssh.target", ssh_target, params=TargetParams)
    register("ssh.key", ssh_key, params=KeyParams)


@hookimpl
def register_commands(app: Any, vm: Any) -> None:
    from banger_ssh import cli

    cli.add_commands(app, vm)


@hookimpl
def register_doctor_checks(register: Callable[..., None]) -> None:
    from banger_core.context import check_binaries

    def tools(_s: Any) -> "CheckResult":
        return check_binaries("tools", "ssh", "ssh-keygen", package="openssh-client")

    register("tools", tools)
