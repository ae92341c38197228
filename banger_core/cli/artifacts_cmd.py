"""``banger kernel ...`` and ``banger image ...``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from banger_core.cli import style
from banger_core.cli.common import echo_json, state

kernel_app = typer.Typer(help="Kernels VMs boot.", no_args_is_help=True)
image_app = typer.Typer(help="Root filesystem images VMs boot from.", no_args_is_help=True)


def _call(method: str, params: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = state.client().call(method, params)
    return result


@kernel_app.command("import")
def kernel_import(
    name: str,
    source: Path = typer.Option(
        ...,
        "--from",
        help="an unpacked kernel package (boot/vmlinuz-VER, boot/initrd.img-VER, "
        "lib/modules/VER/), or a dir with vmlinuz|bzImage and/or vmlinux, optional initrd.img, modules/",
    ),
    version: str = typer.Option(None, "--version", help="package tree: the kernel version to take, when there are several"),
    force: bool = typer.Option(False, "--force", help="replace an existing kernel of that name"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Copy a kernel (and its initrd and modules) into banger's store; says which files it took."""
    params = {"name": name, "source": str(source.resolve()), "force": force, "version": version}
    k = _call("kernel.import", {key: v for key, v in params.items() if v is not None})
    if as_json:
        echo_json(k)
        return
    style.echo(f"kernel {k['name']}: {k['kernel']}" + (f" + {Path(k['initrd']).name}" if k.get("initrd") else ""))
    taken = k.get("taken") or {}
    if taken.get("version"):
        style.echo(f"  version {taken['version']}")
    for what in ("kernel", "vmlinux", "initrd", "modules"):
        if taken.get(what):
            style.echo(f"  {what + ':':8} {taken[what]}")


@kernel_app.command("pull")
def kernel_pull(
    name: str,
    force: bool = typer.Option(False, "--force", help="rebuild even if present and current"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Get a kernel by name from the source that has it (`kernel list --available`).

    A kernel already pulled is reused unless its source now makes another revision (it
    is then rebuilt) or --force is given."""
    k = state.client().call("kernel.pull", {"name": _local(name), "force": force}, on_event=_progress(as_json))
    if as_json:
        echo_json(k)
        return
    style.echo(f"kernel {k['name']}: {k['kernel']}")


@kernel_app.command("list")
def kernel_list(
    available: bool = typer.Option(False, "--available", help="show what the sources offer by name, pulled or not"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List kernels (or what the sources offer, with --available)."""
    res = _call("kernel.list", {})
    if available:
        _available(res["available"], as_json)
        return
    ks = res["kernels"]
    if as_json:
        echo_json(ks)
        return
    rows = [
        [
            k["name"],
            Path(k["kernel"]).name,
            "yes" if k.get("vmlinux") else "-",
            Path(k["initrd"]).name if k.get("initrd") else "-",
            "yes" if k.get("modules") else "-",
            "stale" if k.get("stale") else "ok",
        ]
        for k in ks
    ]
    style.echo(style.table(rows, ["NAME", "KERNEL", "VMLINUX", "INITRD", "MODULES", "STATUS"]) if rows else "no kernels")
    _stale_notes(ks)


def _available(offered: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        echo_json(offered)
        return
    rows = [[a["name"], "pulled" if a["pulled"] else "available", a["source"], a.get("description", "")] for a in offered]
    style.echo(style.table(rows, ["NAME", "STATUS", "SOURCE", "DESCRIPTION"]) if rows else "no source offers any by name")


def _stale_notes(items: list[dict[str, Any]]) -> None:
    for i in items:
        if i.get("stale"):
            style.echo(f"{i['name']}: stale, {i['stale']}")


@kernel_app.command("rm")
def kernel_rm(name: str) -> None:
    """Remove a kernel no image uses."""
    _call("kernel.rm", {"name": name})
    style.echo(f"kernel {name}: removed")


def _local(ref: str) -> str:
    """A ref naming a file here goes to the daemon as its absolute path (the daemon's
    working directory is not ours)."""
    return str(Path(ref).resolve()) if "://" not in ref and Path(ref).is_file() else ref


def _progress(quiet: bool) -> Callable[[dict[str, Any]], None]:
    from banger_core.cli.vm_cmd import Progress

    return Progress(quiet=quiet)


@image_app.command("pull")
def image_pull(
    ref: str = typer.Argument(
        ..., help="what a source claims: a name (image list --available), a bundle file, REGISTRY/REPO[:TAG]..."
    ),
    name: str = typer.Option(None, "--name", help="image name (default: the source's, e.g. from the ref)"),
    kernel_ref: str = typer.Option(None, "--kernel-ref", help="kernel to boot it with (default: the default image's)"),
    size: str = typer.Option(None, "--size", help="rootfs size, e.g. 2G (default: the source's)"),
    kernel: Path = typer.Option(None, "--kernel", help="or its own kernel file (imported as a kernel named after the image)"),
    initrd: Path = typer.Option(None, "--initrd", help="with --kernel: its initrd"),
    modules: Path = typer.Option(None, "--modules", help="with --kernel: its /lib/modules/<version> dir"),
    force: bool = typer.Option(False, "--force", help="rebuild even if present and current"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Get an image from the source that claims REF: a name a source builds or fetches
    (`image list --available`), or a reference such as REGISTRY/REPO[:TAG|@DIGEST].
    --name, --kernel-ref, --size and --kernel go to sources that take them.

    An image already pulled is reused unless its source now makes another revision,
    then it is rebuilt; never while a VM uses it."""
    from banger_core.cli.vm_cmd import parse_mib
    from banger_core.errors import BangerError, ErrorCode

    if kernel is not None and kernel_ref is not None:
        raise BangerError(ErrorCode.BAD_REQUEST, "give either --kernel-ref or --kernel [--initrd] [--modules], not both")
    if kernel is None and (initrd or modules):
        raise BangerError(ErrorCode.BAD_REQUEST, "--initrd and --modules go with --kernel")
    res = lambda p: str(p.resolve()) if p else None  # noqa: E731
    params = {
        "ref": _local(ref),
        "name": name,
        "kernel_ref": kernel_ref,
        "size_mib": parse_mib(size, "--size"),
        "force": force or None,
        "kernel": res(kernel),
        "initrd": res(initrd),
        "modules": res(modules),
    }
    i = state.client().call("image.pull", {k: v for k, v in params.items() if v is not None}, on_event=_progress(as_json))
    if as_json:
        echo_json(i)
        return
    style.echo(f"image {i['name']}: {i['rootfs']} (kernel {i['kernel_ref']})")


def _bundle(kind: str, name: str, output: Path, as_json: bool) -> None:
    res = _call(f"{kind}.bundle", {"name": name, "output": str(output.resolve())})
    if as_json:
        echo_json(res)
        return
    style.echo(f"{res['path']}\nsha256 {res['sha256']}\nsize   {res['size']}")


@image_app.command("bundle")
def image_bundle(
    name: str,
    output: Path = typer.Option(..., "--output", "-o", help="the .tar.zst to write"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Pack an image into a .tar.zst bundle; prints the sha256 and size a catalog entry needs."""
    _bundle("image", name, output, as_json)


@kernel_app.command("bundle")
def kernel_bundle(
    name: str,
    output: Path = typer.Option(..., "--output", "-o", help="the .tar.zst to write"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Pack a kernel (with its initrd and modules) into a .tar.zst bundle."""
    _bundle("kernel", name, output, as_json)


@image_app.command("register")
def image_register(
    name: str,
    rootfs: Path = typer.Option(..., "--rootfs", help="an ext4 root filesystem image (used in place, never written)"),
    kernel_ref: str = typer.Option(None, "--kernel-ref", help="name of an imported or pulled kernel"),
    kernel: Path = typer.Option(None, "--kernel", help="or: a kernel file (vmlinux/bzImage) for this image"),
    initrd: Path = typer.Option(None, "--initrd", help="with --kernel: its initrd"),
    modules: Path = typer.Option(None, "--modules", help="with --kernel: its /lib/modules/<version> dir"),
    init: str = typer.Option(None, "--init", help="the image's init when not /sbin/init (a path in the image)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Register a root filesystem image, with --kernel-ref or its own kernel (not both)."""
    from banger_core.errors import BangerError, ErrorCode

    if (kernel_ref is None) == (kernel is None):
        raise BangerError(ErrorCode.BAD_REQUEST, "give either --kernel-ref or --kernel [--initrd] [--modules], not both")
    if kernel is None and (initrd or modules):
        raise BangerError(ErrorCode.BAD_REQUEST, "--initrd and --modules go with --kernel")
    params = {
        "name": name,
        "rootfs": str(rootfs.resolve()),
        "kernel_ref": kernel_ref,
        "kernel": str(kernel.resolve()) if kernel else None,
        "initrd": str(initrd.resolve()) if initrd else None,
        "modules": str(modules.resolve()) if modules else None,
        "init": init,
    }
    i = _call("image.register", {k: v for k, v in params.items() if v is not None})
    if as_json:
        echo_json(i)
        return
    style.echo(f"image {i['name']}: {i['rootfs']} (kernel {i['kernel_ref']})")


@image_app.command("list")
def image_list(
    available: bool = typer.Option(False, "--available", help="show what the sources offer by name, pulled or not"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List images (or what the sources offer, with --available)."""
    res = _call("image.list", {})
    if available:
        _available(res["available"], as_json)
        return
    imgs = res["images"]
    if as_json:
        echo_json(imgs)
        return
    rows = [
        [
            i["name"],
            i.get("kernel_ref") or "-",
            "managed" if i.get("managed") else "registered",
            "stale" if i.get("stale") else "ok",
            i["rootfs"],
        ]
        for i in imgs
    ]
    style.echo(style.table(rows, ["NAME", "KERNEL", "KIND", "STATUS", "ROOTFS"]) if rows else "no images")
    _stale_notes(imgs)


@image_app.command("promote")
def image_promote(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Copy a registered image's rootfs into banger's storage (then the original may go)."""
    i = _call("image.promote", {"name": name})
    if as_json:
        echo_json(i)
        return
    style.echo(f"image {i['name']}: managed, {i['rootfs']}")


def _show(kind: str, name: str, as_json: bool) -> None:
    data = _call(f"{kind}.show", {"name": name})
    if as_json:
        echo_json(data)
        return
    for key, value in data.items():
        if isinstance(value, list):
            value = ", ".join(value) or "-"
        style.echo(f"{key + ':':11} {value if value is not None else '-'}")


@image_app.command("show")
def image_show(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show one image and the VMs using it."""
    _show("image", name, as_json)


@kernel_app.command("show")
def kernel_show(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show one kernel and the images using it."""
    _show("kernel", name, as_json)


@image_app.command("delete")
def image_delete(name: str) -> None:
    """Delete an image no VM uses (a registered rootfs file is left in place; a managed one goes)."""
    _call("image.delete", {"name": name})
    style.echo(f"image {name}: deleted")
