"""The guest agent: its channel (virtio-serial on QEMU; vsock on Firecracker, through
Firecracker's hybrid vsock socket and its ``CONNECT <port>`` handshake), its disk,
`vm exec` and `vm health`; VMs are ready when the agent answers.

A VM whose image carries banger's launcher (images banger builds do, through
``register_guest_payload``) gets the agent disk and the channel; ``vm create`` returns
once the agent answers health (or fails naming the console log). The image needs nothing
else: the agent disk carries a Python interpreter assembled from the host's python3
(``interpreter``), used when the image has no python3 or one that cannot import what the
agent uses (the console says which runs). Other images (a registered rootfs, a bundle
made before the launcher) boot with a warning, and ``exec`` refuses them saying why.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from banger_core import hookimpl

if TYPE_CHECKING:
    from pydantic import BaseModel

    from banger_core.context import CheckResult

# Imported lazily, in the hooks that need them: `vm exec` loads this module on every
# call, and pydantic models and the core's contexts cost more to import than the exec.

provides = ["agent"]

SOCKET = "agent.sock"  # in the VM's directory: QEMU's chardev socket
VSOCK = "agent.vsock"  # in the VM's directory: Firecracker's vsock socket (service.opener_for: by its suffix)


@hookimpl
def config_model() -> type[BaseModel]:
    from banger_agent.settings import Settings

    return Settings


@hookimpl
def register_guest_payload(register: Callable[[Any], None]) -> None:
    from banger_agent.guestfiles import payload

    for f in payload():
        register(f)


_service: Any = None


def agents() -> Any:
    """The one AgentService of this daemon (made on first use)."""
    global _service
    if _service is None:
        from banger_agent.service import AgentService

        _service = AgentService()
    return _service


@hookimpl
def register_services(register: Callable[[str, object], None]) -> None:
    register("agent", agents())


def socket_of(paths: Any, vm_id: str) -> Path:
    """The host end of the VM's agent channel, as the VM was last booted (machine.json):
    Firecracker's vsock socket, else QEMU's chardev socket."""
    files = paths.vm_files(vm_id)
    try:
        agent = json.loads(Path(files.machine).read_text()).get("agent") or {}
    except (OSError, ValueError, AttributeError):
        agent = {}
    return Path(files.dir) / (VSOCK if agent.get("kind") == "vsock" else SOCKET)


def agent_support(rootfs: str) -> str | None:
    """Why the image cannot run the agent, or None when it can: it must carry banger's
    launcher (debugfs reads the ext4; nothing is mounted). A python3 it need not have:
    the agent disk brings one."""
    from banger_agent.guestfiles import LAUNCHER

    try:
        r = subprocess.run(["debugfs", "-R", f"stat {LAUNCHER}", rootfs], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot read the image: {exc}"
    if "Inode:" not in r.stdout:
        if "File not found" in r.stderr:
            return "it does not carry banger's agent launcher (pull or rebuild it with this banger)"
        return f"cannot read the image: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'debugfs said nothing'}"
    return None


def _image_of(ctx: Any) -> Any:
    from banger_core.store import Store

    store = Store(ctx.paths.db_file)
    try:
        return store.find_image(ctx.vm.image or "")
    finally:
        store.close()


@hookimpl
def configure_machine(ctx: Any, machine: Any) -> None:
    from banger_agent.channel import VSOCK_PORT
    from banger_agent.guestfiles import agent_disk
    from banger_core.build import build_info
    from banger_core.models import AgentChannel, Drive

    image = _image_of(ctx)
    why = agent_support(image.rootfs) if image is not None else "its image is gone"
    if why:
        why = f"image {ctx.vm.image}: {why}"
        ctx.teardown["no_agent"] = why
        ctx.persist()
        ctx.log.warning("%s: no agent in VM %s", why, ctx.vm.name)
        return
    ctx.teardown.pop("no_agent", None)
    ctx.persist()
    b = build_info()
    disk = agent_disk(ctx.paths.cache_dir, {"banger": b["version"], "commit": b["commit"], "build_time": b["build_time"]})
    machine.drives.append(Drive(id="agent", path=str(disk), read_only=True))
    vm_dir = Path(ctx.paths.vm_files(ctx.vm.id).dir)
    for stale in (SOCKET, VSOCK):  # Firecracker cannot bind its vsock socket over an old one
        (vm_dir / stale).unlink(missing_ok=True)
    if ctx.vm.driver == "firecracker":  # vsock: the agent listens on VSOCK_PORT
        machine.agent = AgentChannel(kind="vsock", host_path=str(vm_dir / VSOCK), guest_cid=3)
        machine.boot_args.append(f"banger.agent=vsock:{VSOCK_PORT}")
    else:
        machine.agent = AgentChannel(kind="serial", host_path=str(vm_dir / SOCKET))


@hookimpl
def post_boot(ctx: Any) -> None:
    """Wait (bounded) until the agent answers: `vm create` returns a VM that runs commands."""
    from banger_agent.service import AgentMismatch, AgentUnavailable

    if ctx.teardown.get("no_agent"):
        return
    from banger_agent.settings import Settings

    settings = ctx.settings or Settings()
    console = ctx.paths.vm_files(ctx.vm.id).console_log
    t = time.monotonic()
    try:
        health = agents().wait_ready(ctx.vm.id, socket_of(ctx.paths, ctx.vm.id), time.monotonic() + settings.wait_timeout_s)
    except AgentMismatch as exc:
        raise RuntimeError(str(exc)) from None
    except AgentUnavailable as exc:
        raise RuntimeError(
            f"the guest agent did not answer within {settings.wait_timeout_s:.0f}s ({exc}); see the console log {console}"
        ) from None
    ctx.log.info("agent %s ready in %.2fs (guest uptime %.1fs)", health.get("agent"), time.monotonic() - t, health.get("uptime"))


@hookimpl
def vm_resumed(ctx: Any, resumed: Any) -> None:
    """The VM continues from a snapshot: the agent steps its clock to the host's and
    reseeds its RNG; a new VM (``resumed.new_identity``) also gets its own hostname and
    machine-id. (SSH host keys are the ssh plugin's: it places the VM's own.)"""
    import secrets
    import uuid

    if ctx.teardown.get("no_agent"):
        return
    from banger_agent.settings import Settings

    settings = ctx.settings or Settings()
    sock = socket_of(ctx.paths, ctx.vm.id)
    t0 = time.monotonic()
    agents().wait_ready(ctx.vm.id, sock, time.monotonic() + settings.wait_timeout_s)
    t1 = time.monotonic()
    request: dict[str, Any] = {"op": "resume", "seed": secrets.token_hex(64)}
    if resumed.new_identity:
        request.update(hostname=ctx.vm.name, machine_id=uuid.uuid4().hex)
    t2 = time.monotonic()
    request["time_ns"] = time.time_ns()  # last: the clock is stepped to it
    result = agents().run(agents().call(ctx.vm.id, sock, request, timeout=30), timeout=35)
    t3 = time.monotonic()
    body = result if isinstance(result, dict) else {}
    if body.get("errors"):
        ctx.log.warning("VM %s: resume: %s", ctx.vm.name, body["errors"])
    ctx.log.info(
        "VM %s resumed from %s: %s (agent answered in %.2fs, request made in %.2fs, applied in %.2fs: %s ms)",
        ctx.vm.name,
        resumed.snapshot or "its suspend image",
        ", ".join(body.get("applied", [])),
        t1 - t0,
        t2 - t1,
        t3 - t2,
        body.get("ms"),
    )


@hookimpl
def request_guest_shutdown(ctx: Any) -> bool | None:
    """Graceful stop: the agent syncs first (data only its sync can save), then powers off."""
    if ctx.teardown.get("no_agent"):
        return None
    sock = socket_of(ctx.paths, ctx.vm.id)
    if not sock.exists():
        return None
    try:
        agents().run(agents().call(ctx.vm.id, sock, {"op": "poweroff"}, timeout=10), timeout=15)
    except Exception as exc:
        ctx.log.warning("the agent could not sync and power off %s: %s", ctx.vm.name, exc)
        return None
    return True


@hookimpl
def cleanup(ctx: Any) -> None:
    if _service is not None:
        _service.drop(ctx.vm.id)
        _service.healths.pop(ctx.vm.id, None)
    for name in (SOCKET, VSOCK):  # Firecracker leaves its vsock socket behind when it exits
        (Path(ctx.paths.vm_files(ctx.vm.id).dir) / name).unlink(missing_ok=True)


@hookimpl
def register_rpc_methods(register: Callable[..., None]) -> None:
    from banger_agent import rpc, run

    register("agent.exec", rpc.agent_exec, params=rpc.ExecParams, stream=True)
    register("agent.health", rpc.agent_health, params=rpc.HealthParams)
    register("agent.cp", rpc.agent_cp, params=rpc.CpParams, stream=True)
    register("agent.ports", rpc.agent_ports, params=rpc.PortsParams)
    register("agent.connect", rpc.agent_connect, params=rpc.ConnectParams, stream=True)
    register("agent.run", run.agent_run, params=run.RunParams, stream=True)


@hookimpl
def register_commands(app: Any, vm: Any) -> None:
    from banger_agent import cli

    cli.add_commands(vm)
    cli.add_run(vm)


@hookimpl
def register_doctor_checks(register: Callable[[str, Callable[[Any], CheckResult]], None]) -> None:
    from banger_core.context import CheckResult

    def transport(_s: Any) -> CheckResult:
        # Firecracker's vsock is its own device model behind a unix socket: no /dev/vhost-vsock needed
        return CheckResult.ok("transport", "virtio-serial on QEMU; vsock on Firecracker (its hybrid vsock socket)")

    def debugfs(_s: Any) -> CheckResult:
        import shutil

        if shutil.which("debugfs"):
            return CheckResult.ok("debugfs", "present: images are checked for the agent launcher")
        return CheckResult.fail("debugfs", "missing (apt install e2fsprogs): no VM gets an agent")

    register("transport", transport)
    register("debugfs", debugfs)
