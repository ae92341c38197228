"""The daemon's ``kernel.*`` and ``image.*`` methods, registered by the built-in
``artifacts`` plugin."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

from pydantic import Field

from banger_core import images
from banger_core.daemon.rpc import Call, NoParams
from banger_core.daemon.work import Progress, run_blocking, run_simple
from banger_core.errors import BangerError, ErrorCode
from banger_core.models import HostPath, Input, SizeMiB
from banger_core.sources import PullOptions


class KernelImportParams(Input):
    name: str
    source: HostPath
    force: bool = False
    version: str | None = Field(default=None, description="package tree: the kernel version to take")


class NameParams(Input):
    name: str


class PullParams(Input):
    name: str
    force: bool = False


class ImagePullParams(Input):
    ref: str = Field(description="what a source claims: a name (debian-bookworm), an OCI reference...")
    force: bool = Field(default=False, description="rebuild even if present and current")
    name: str | None = None
    kernel_ref: str | None = None
    size_mib: SizeMiB | None = None
    kernel: HostPath | None = Field(default=None, description="a kernel file, imported as a kernel named after the image")
    initrd: HostPath | None = None
    modules: HostPath | None = None


class BundleParams(Input):
    name: str
    output: HostPath


class ImageRegisterParams(Input):
    name: str
    rootfs: HostPath
    kernel_ref: str | None = None
    kernel: HostPath | None = None
    initrd: HostPath | None = None
    modules: HostPath | None = None
    init: str | None = None


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


T = TypeVar("T")


def under_lock(
    call: Call, locks: list[tuple[str, str]], fn: Callable[..., T], *args: Any, **kwargs: Any
) -> Callable[[Progress, threading.Event], T]:
    """``fn(*args)`` under the artifacts' per-name pull locks (taken in the order
    pulls take them: image before kernel), for run_blocking: a client that leaves
    while waiting for a lock cancels the wait."""
    puller = call.state.puller

    def work(_progress: Progress, cancel: threading.Event) -> T:
        with contextlib.ExitStack() as held:
            for kind, name in locks:
                held.enter_context(puller.locked(kind, name, cancel))
            return fn(*args, **kwargs)

    return work


async def kernel_import(p: KernelImportParams, call: Call) -> dict[str, Any]:
    s = call.state
    k, files = await run_blocking(
        call,
        under_lock(
            call,
            [("kernel", p.name)],
            images.import_kernel_tree,
            s.store,
            s.paths,
            p.name,
            Path(p.source),
            p.force,
            version=p.version,
        ),
    )
    return {**k.model_dump(mode="json"), "taken": files.taken()}


async def kernel_list(_p: NoParams, call: Call) -> dict[str, Any]:
    puller = call.state.puller
    pulled = {k.name: {**k.model_dump(mode="json"), "stale": puller.stale("kernel", k)} for k in call.state.store.list_kernels()}
    available = [{**entry, "pulled": entry["name"] in pulled} for entry in puller.available("kernel")]
    return {"kernels": list(pulled.values()), "available": available}


async def kernel_pull(p: PullParams, call: Call) -> dict[str, Any]:
    puller = call.state.puller
    k = await run_blocking(call, lambda prog, cancel: puller.pull("kernel", p.name, force=p.force, progress=prog, cancel=cancel))
    return k.model_dump(mode="json")


async def image_pull(p: ImagePullParams, call: Call) -> dict[str, Any]:
    puller = call.state.puller
    options = PullOptions(
        name=p.name,
        kernel_ref=p.kernel_ref,
        size_mib=p.size_mib,
        kernel=_path(p.kernel),
        initrd=_path(p.initrd),
        modules=_path(p.modules),
    )
    if options.kernel is None and (options.initrd or options.modules):
        raise BangerError(ErrorCode.BAD_REQUEST, "--initrd and --modules go with --kernel")
    image = await run_blocking(
        call, lambda prog, cancel: puller.pull("image", p.ref, force=p.force, options=options, progress=prog, cancel=cancel)
    )
    return image.model_dump(mode="json")


async def kernel_rm(p: NameParams, call: Call) -> dict[str, Any]:
    s = call.state
    await run_blocking(call, under_lock(call, [("kernel", p.name)], images.remove_kernel, s.store, s.paths, p.name))
    return {"name": p.name, "state": "removed"}


async def image_register(p: ImageRegisterParams, call: Call) -> dict[str, Any]:
    s = call.state
    # with its own kernel triple, a kernel of the image's name is imported too
    locks = [("image", p.name)] + ([("kernel", p.name)] if p.kernel else [])
    i = await run_blocking(
        call,
        under_lock(
            call,
            locks,
            images.register_image,
            s.store,
            s.paths,
            p.name,
            Path(p.rootfs),
            p.kernel_ref,
            _path(p.kernel),
            _path(p.initrd),
            _path(p.modules),
            init=p.init,
            max_rootfs_mib=s.puller.max_rootfs_mib,
        ),
    )
    return i.model_dump(mode="json")


async def image_promote(p: NameParams, call: Call) -> dict[str, Any]:
    s = call.state
    promoted = await run_blocking(
        call, under_lock(call, [("image", p.name)], images.promote_image, s.store, s.paths, p.name, s.puller.max_rootfs_mib)
    )
    return promoted.model_dump(mode="json")


async def image_show(p: NameParams, call: Call) -> dict[str, Any]:
    store = call.state.store
    img = store.get_image(p.name)
    return {
        **img.model_dump(mode="json"),
        "stale": call.state.puller.stale("image", img),
        "used_by": [v.name for v in store.list_vms() if v.image == p.name],
    }


async def kernel_show(p: NameParams, call: Call) -> dict[str, Any]:
    store = call.state.store
    k = store.get_kernel(p.name)
    return {
        **k.model_dump(mode="json"),
        "stale": call.state.puller.stale("kernel", k),
        "used_by": [i.name for i in store.list_images() if i.kernel_ref == p.name],
    }


async def image_bundle(p: BundleParams, call: Call) -> dict[str, Any]:
    from banger_core import bundles

    img = call.state.store.get_image(p.name)
    made: dict[str, Any] = await run_simple(
        bundles.create, Path(p.output), "image", img.name, {"rootfs": Path(img.rootfs)}, {"kernel_ref": img.kernel_ref}
    )
    return made


async def kernel_bundle(p: BundleParams, call: Call) -> dict[str, Any]:
    from banger_core import bundles

    k = call.state.store.get_kernel(p.name)
    files = {
        "kernel": Path(k.kernel),
        "initrd": _path(k.initrd),
        "modules": _path(k.modules),
        "vmlinux": Path(k.vmlinux) if k.vmlinux and k.vmlinux != k.kernel else None,
    }
    made: dict[str, Any] = await run_simple(bundles.create, Path(p.output), "kernel", k.name, files)
    return made


async def image_list(_p: NoParams, call: Call) -> dict[str, Any]:
    puller = call.state.puller
    pulled = {i.name: {**i.model_dump(mode="json"), "stale": puller.stale("image", i)} for i in call.state.store.list_images()}
    available = [{**entry, "pulled": entry["name"] in pulled} for entry in puller.available("image")]
    return {"images": list(pulled.values()), "available": available}


async def image_delete(p: NameParams, call: Call) -> dict[str, Any]:
    s = call.state
    await run_blocking(call, under_lock(call, [("image", p.name)], images.delete_image, s.store, s.paths, p.name))
    pruned = await run_simple(s.puller.tidy)  # sources drop caches only it needed (an OCI image's layers)
    return {"name": p.name, "state": "deleted", "pruned": len(pruned)}


def register_kernel(register: Callable[..., None]) -> None:
    register("kernel.import", kernel_import, KernelImportParams)
    register("kernel.list", kernel_list, NoParams)
    register("kernel.rm", kernel_rm, NameParams)
    register("kernel.pull", kernel_pull, PullParams)
    register("kernel.show", kernel_show, NameParams)
    register("kernel.bundle", kernel_bundle, BundleParams)


def register_image(register: Callable[..., None]) -> None:
    register("image.pull", image_pull, ImagePullParams)
    register("image.register", image_register, ImageRegisterParams)
    register("image.list", image_list, NoParams)
    register("image.show", image_show, NameParams)
    register("image.promote", image_promote, NameParams)
    register("image.bundle", image_bundle, BundleParams)
    register("image.delete", image_delete, NameParams)
