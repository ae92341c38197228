"""``banger vm snapshot``, ``vm restore``, ``banger snapshot ...`` and ``image warm``."""

from __future__ import annotations

import sys
import time
from typing import Any, List, Optional

import typer

from banger_core.cli import style
from banger_core.cli.common import echo_json, state
from banger_core.cli.vm_cmd import Progress, _age, _fan_out, check_name, create_params

app = typer.Typer(help="Snapshots of VMs: restore them as new VMs (banger vm snapshot / vm restore).", no_args_is_help=True)


def _call(method: str, params: dict[str, Any], on_event: Any = None) -> Any:
    return state.client().call(method, params, on_event=on_event)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def add_vm_commands(vm: typer.Typer) -> None:
    vm.command("snapshot")(vm_snapshot)
    vm.command("restore")(vm_restore)
    vm.command("fork")(vm_fork)


def vm_snapshot(
    ref: str = typer.Argument(..., help="VM name or ID prefix"),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="the snapshot's name (default VM-YYYYmmdd-HHMMSS)"),
    stop: bool = typer.Option(False, "--stop", help="leave the VM stopped afterwards"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Snapshot a running VM: its memory, devices and disk, taken while it is paused
    (a fraction of a second); it then runs on (or stays stopped with --stop)."""
    t0 = time.monotonic()
    res = _call("vm.snapshot", {"ref": ref, "name": check_name(name, "snapshot"), "stop": stop})
    if as_json:
        echo_json(res)
        return
    s = res["snapshot"]
    style.echo(f"{s['name']}: snapshot of {s['vm_name']} ({_mib(s['size_bytes'])}); {res['vm']['name']} is {res['vm']['state']}")
    style.echo(style.paint(f"done in {time.monotonic() - t0:.1f}s", "dim", sys.stderr), err=True)


def vm_restore(
    snapshot: str = typer.Argument(..., help="snapshot name or ID prefix"),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="the new VM's name (default: generated)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """A new VM continuing from a snapshot, on its own copy-on-write disk, with its own
    identity (hostname, machine-id, RNG, clock, SSH host keys)."""
    t0 = time.monotonic()
    vm = _call("vm.restore", {"snapshot": snapshot, "name": check_name(name)}, on_event=Progress(quiet=as_json))
    if as_json:
        echo_json(vm)
        return
    style.echo(f"{vm['name']} {style.paint(vm['state'], 'green')} (id {vm['id'][:8]}), restored from {snapshot}")
    style.echo(style.paint(f"ready in {time.monotonic() - t0:.1f}s", "dim", sys.stderr), err=True)


def vm_fork(
    ref: str = typer.Argument(..., help="the running VM to fork (name or ID prefix)"),
    count: int = typer.Option(1, "--count", "-c", min=1, max=64, help="how many forks"),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="fork names are NAME-1..NAME-N (default: the VM's name)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """N new VMs that go on from a running VM's state now: its processes, memory and
    disk, each on its own copy-on-write layer and with its own identity (address, DNS
    name, NAT rules, forwards, hostname, SSH host keys, machine-id, RNG, clock,
    workspace). The VM runs on; the forks share the memory it had (copy-on-write)."""
    t0 = time.monotonic()
    res = _call(
        "vm.fork", {"ref": ref, "count": count, "name": check_name(name, "fork prefix")}, on_event=Progress(quiet=as_json)
    )
    if as_json:
        echo_json(res)
        return
    for vm in res["vms"]:
        style.echo(f"{vm['name']} {style.paint(vm['state'], 'green')} (id {vm['id'][:8]}), forked from {ref}")
    style.echo(style.paint(f"{len(res['vms'])} fork(s) ready in {time.monotonic() - t0:.1f}s", "dim", sys.stderr), err=True)


@app.command("list")
def snapshot_list(
    kind: Optional[str] = typer.Option(None, "--kind", help="user | template | fork"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List snapshots and warm-start templates."""
    snaps = _call("snapshot.list", {"kind": kind} if kind else {})["snapshots"]
    if as_json:
        echo_json(snaps)
        return
    rows = [
        [
            s["name"],
            s["kind"],
            s["vm_name"],
            s.get("image") or "-",
            _mib(s["size_bytes"]),
            _age(s["created_at"]),
            ",".join(s["vms"]) or "-",
        ]
        for s in snaps
    ]
    style.echo(style.table(rows, ["NAME", "KIND", "FROM VM", "IMAGE", "SIZE", "AGE", "VMS ON IT"]) if rows else "no snapshots")


@app.command("show")
def snapshot_show(ref: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """One snapshot: where it came from, its files, the VMs standing on it."""
    s = _call("snapshot.show", {"ref": ref})
    if as_json:
        echo_json(s)
        return
    spec = s["spec"]
    for k, v in (
        ("name", s["name"]),
        ("id", s["id"]),
        ("kind", s["kind"]),
        ("from VM", f"{s['vm_name']} ({s['vm_id'][:8]})"),
        ("image", s.get("image") or "-"),
        ("spec", f"{spec['vcpus']} vcpu | {spec['memory_mib']} MiB | {spec['root_size_mib']} MiB root | {s['driver']}"),
        ("size", _mib(s["size_bytes"])),
        ("created", s["created_at"]),
        ("dir", s["dir"]),
        ("VMs on it", ", ".join(s["vms"]) or "-"),
        ("snapshots on it", ", ".join(s.get("snapshots", [])) or "-"),
    ):
        style.echo(f"{k + ':':<16} {v}")


@app.command("delete")
def snapshot_delete(refs: List[str] = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """Delete snapshots (refused for one a VM stands on)."""
    _fan_out("snapshot.delete", refs, as_json, "deleted")


def image_warm(
    image: Optional[str] = typer.Argument(None, help="the image (default: the default image)"),
    rm: bool = typer.Option(False, "--rm", help="remove the image's templates (every image's when none is named)"),
    kernel: Optional[str] = typer.Option(None, "--kernel", "-k"),
    vcpu: Optional[int] = typer.Option(None, "--vcpu"),
    memory: Optional[str] = typer.Option(None, "--memory", "-m"),
    root_size: Optional[str] = typer.Option(None, "--root-size"),
    driver: Optional[str] = typer.Option(None, "--driver"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Make the warm-start template `vm run` restores instead of booting (a VM boots
    once for it); --rm removes templates. A template matches one image, kernel, spec,
    plugin set and banger build, and is remade when any of them changes."""
    params: dict[str, Any] = {"image": image, "rm": rm}
    if not rm:
        params["create"] = create_params(None, image, kernel, vcpu, memory, root_size, driver=driver)
    res = _call("snapshot.warm", params, on_event=None if rm else Progress(quiet=as_json))
    if as_json:
        echo_json(res)
        return
    if rm:
        for n in res["removed"]:
            style.echo(f"{n}: removed")
        for n in res["kept"]:
            style.echo(style.paint(f"{n}: kept (VMs stand on it)", "yellow", sys.stderr), err=True)  # or snapshots of them
        if not res["removed"] and not res["kept"]:
            style.echo("no templates")
        return
    t = res["template"]
    style.echo(f"{t['name']}: {'already there' if res['how'] == 'existing' else 'made'} for image {t.get('image')}")
