"""The core's RPC methods for VMs, kernels and images."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import signal as signals
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import Field, field_validator

from banger_core import images
from banger_core.daemon.rpc import Call, NoParams, Registry
from banger_core.errors import BangerError, ErrorCode
from banger_core.models import HostPath, Input, SizeMiB
from banger_core.vms import CreateParams, SetParams, VMService

if TYPE_CHECKING:  # pragma: no cover
    from banger_core.paths import Paths
    from banger_core.store import Store

# Blocking VM work runs here, not on the event loop; sized for many slow operations.
EXECUTOR = ThreadPoolExecutor(max_workers=32, thread_name_prefix="banger-op")


class _P(Input):
    """RPC params: strict, unknown keys refused, defaults validated (see Input)."""


class RefsParams(_P):
    refs: list[str] = Field(min_length=1)
    force: bool = False


class KillParams(_P):
    refs: list[str] = Field(min_length=1)
    signal: str = "KILL"

    @field_validator("signal")
    @classmethod
    def _sig(cls, v: str) -> str:
        name = v.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        if name not in signals.Signals.__members__:
            raise ValueError(f"unknown signal {v!r}")
        return name


class RefParams(_P):
    ref: str


class LogsParams(_P):
    ref: str
    lines: int = Field(default=200, ge=0)


class KernelImportParams(_P):
    name: str
    source: HostPath
    force: bool = False
    version: str | None = Field(default=None, description="package tree: the kernel version to take")


class NameParams(_P):
    name: str


class PullParams(_P):
    name: str
    force: bool = False


class ImagePullParams(_P):
    ref: str = Field(description="a catalog name or an OCI reference REGISTRY/REPO[:TAG|@DIGEST]")
    force: bool = Field(default=False, description="catalog images: rebuild even if present and current")
    name: str | None = None
    kernel_ref: str | None = None
    size_mib: SizeMiB | None = None
    kernel: HostPath | None = Field(default=None, description="OCI: a kernel file, imported as a kernel named after the image")
    initrd: HostPath | None = None
    modules: HostPath | None = None


class BundleParams(_P):
    name: str
    output: HostPath


class ImageRegisterParams(_P):
    name: str
    rootfs: HostPath
    kernel_ref: str | None = None
    kernel: HostPath | None = None
    initrd: HostPath | None = None
    modules: HostPath | None = None


async def run_blocking(call: Call, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args, progress, cancel)`` in a worker thread.

    Progress events stream to the client; if the client goes away the request task is
    cancelled, ``cancel`` is set and we wait for ``fn`` to roll back before returning.
    """
    loop = asyncio.get_running_loop()
    cancel = threading.Event()

    def progress(stage: str, data: dict[str, Any]) -> None:
        asyncio.run_coroutine_threadsafe(call.emit({"stage": stage, **data}), loop)

    ctx = contextvars.copy_context()  # keeps the op id on log records from the thread
    fut = loop.run_in_executor(EXECUTOR, functools.partial(ctx.run, fn, *args, progress, cancel))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        cancel.set()
        try:
            await fut
        except Exception:  # the client is gone; rollback is logged
            pass
        raise


async def run_simple(fn: Callable[..., Any], *args: Any) -> Any:
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    return await loop.run_in_executor(EXECUTOR, functools.partial(ctx.run, fn, *args))


def register(reg: Registry, vms: VMService, store: "Store", paths: "Paths") -> None:
    async def fan_out(call: Call, refs: list[str], op: Callable[..., Any]) -> dict[str, Any]:
        """Run ``op(vm)`` once per VM the refs name, concurrently; report per ref, in
        input order. A ref given twice, or two refs naming one VM (its name and an ID
        prefix), run the operation once and share its result."""

        def failed(ref: str, exc: BangerError) -> dict[str, Any]:
            exc.op_id = call.op_id
            return {"ref": ref, "ok": False, "error": exc.to_dict()}

        unique = list(dict.fromkeys(refs))
        resolved: dict[str, Any] = {}
        for ref in unique:
            try:
                resolved[ref] = await run_simple(vms.resolve, ref)
            except BangerError as exc:
                resolved[ref] = exc
        by_vm = {vm.id: vm for vm in resolved.values() if not isinstance(vm, BangerError)}

        async def once(vm: Any) -> Any:
            try:
                return await op(vm)
            except BangerError as exc:
                return exc

        done = dict(zip(by_vm, await asyncio.gather(*(once(vm) for vm in by_vm.values())), strict=True))
        results = []
        for ref in unique:
            got = resolved[ref]
            if isinstance(got, BangerError):
                results.append(failed(ref, got))
                continue
            out = done[got.id]
            results.append(failed(ref, out) if isinstance(out, BangerError) else {"ref": ref, "ok": True, "vm": out})
        return {"results": results}

    async def create(p: CreateParams, call: Call) -> dict[str, Any]:
        vm = await run_blocking(call, lambda prog, cancel: vms.create(p, call.op_id, prog, cancel))
        return vms.show(vm)

    async def start(p: RefsParams, call: Call) -> dict[str, Any]:
        async def op(vm):
            done = await run_blocking(call, lambda prog, cancel: vms.start(vm, call.op_id, prog, cancel))
            return vms.show(done)

        return await fan_out(call, p.refs, op)

    async def restart(p: RefsParams, call: Call) -> dict[str, Any]:
        async def op(vm):
            done = await run_blocking(call, lambda prog, cancel: vms.restart(vm, call.op_id, prog, cancel))
            return vms.show(done)

        return await fan_out(call, p.refs, op)

    async def stop(p: RefsParams, call: Call) -> dict[str, Any]:
        async def op(vm):
            return vms.show(await run_simple(vms.stop, vm, call.op_id, p.force))

        return await fan_out(call, p.refs, op)

    async def kill(p: KillParams, call: Call) -> dict[str, Any]:
        sig = int(signals.Signals[p.signal])

        async def op(vm):
            return vms.show(await run_simple(vms.kill, vm, call.op_id, sig))

        return await fan_out(call, p.refs, op)

    async def delete(p: RefsParams, call: Call) -> dict[str, Any]:
        async def op(vm):
            gone = await run_simple(vms.delete, vm, call.op_id, p.force)
            return {"id": gone.id, "name": gone.name, "state": "deleted"}

        return await fan_out(call, p.refs, op)

    async def prune(_p: Any, call: Call) -> dict[str, Any]:
        gone = await run_simple(vms.prune, call.op_id)
        return {"deleted": [{"id": v.id, "name": v.name} for v in gone]}

    async def set_(p: SetParams, call: Call) -> dict[str, Any]:
        if all(v is None for k, v in p.model_dump().items() if k != "refs"):
            raise BangerError(ErrorCode.BAD_REQUEST, "nothing to set: give vcpus, memory_mib or disk_size_mib")

        async def op(vm):
            return vms.show(await run_simple(vms.set, vm, p, call.op_id))

        return await fan_out(call, p.refs, op)

    async def list_(_p: Any, call: Call) -> dict[str, Any]:
        return {"vms": await run_simple(vms.list)}

    async def show(p: RefParams, call: Call) -> dict[str, Any]:
        return await run_simple(lambda: vms.show(vms.resolve(p.ref)))

    async def logs(p: LogsParams, call: Call) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            vm = vms.resolve(p.ref)
            path = vms.console_log(vm)
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:
                text = ""
            lines = text.splitlines()[-p.lines :] if p.lines else text.splitlines()
            return {"vm": vm.name, "path": str(path), "text": "\n".join(lines)}

        return await run_simple(read)

    def under_lock(locks: list[tuple[str, str]], fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[..., Any]:
        """``fn(*args)`` under the artifacts' per-name pull locks (taken in the order
        pulls take them: image before kernel), for run_blocking: a client that leaves
        while waiting for a lock cancels the wait."""

        def work(_progress: Any, cancel: threading.Event) -> Any:
            with contextlib.ExitStack() as held:
                for kind, name in locks:
                    held.enter_context(vms.puller.locked(kind, name, cancel))
                return fn(*args, **kwargs)

        return work

    async def kernel_import(p: KernelImportParams, call: Call) -> dict[str, Any]:
        k, files = await run_blocking(
            call,
            under_lock(
                [("kernel", p.name)], images.import_kernel_tree, store, paths, p.name, Path(p.source), p.force, version=p.version
            ),
        )
        return {**k.model_dump(mode="json"), "taken": files.taken()}

    async def kernel_list(_p: Any, call: Call) -> dict[str, Any]:
        pulled = {k.name: {**k.model_dump(mode="json"), "stale": vms.puller.stale("kernel", k)} for k in store.list_kernels()}
        available = [{"name": n, "pulled": n in pulled, **entry} for n, entry in sorted(vms.puller.catalog()["kernels"].items())]
        return {"kernels": list(pulled.values()), "available": available}

    async def kernel_pull(p: PullParams, call: Call) -> dict[str, Any]:
        k = await run_blocking(call, lambda prog, cancel: vms.puller.kernel(p.name, force=p.force, progress=prog, cancel=cancel))
        return k.model_dump(mode="json")

    async def image_pull(p: ImagePullParams, call: Call) -> dict[str, Any]:
        def pull(prog, cancel):
            if p.kernel and p.kernel_ref:
                raise BangerError(ErrorCode.BAD_REQUEST, "give either --kernel-ref or --kernel [--initrd] [--modules], not both")
            if not p.kernel and (p.initrd or p.modules):
                raise BangerError(ErrorCode.BAD_REQUEST, "--initrd and --modules go with --kernel")
            if p.ref in vms.puller.catalog()["images"] or not any(c in p.ref for c in "/:@"):
                if p.name or p.kernel_ref or p.size_mib or p.kernel:
                    raise BangerError(ErrorCode.BAD_REQUEST, "--name, --kernel-ref, --kernel and --size apply to OCI pulls only")
                return vms.puller.image(p.ref, force=p.force, progress=prog, cancel=cancel)
            if p.force:
                raise BangerError(
                    ErrorCode.BAD_REQUEST, "--force applies to catalog images; an OCI pull takes --name for another copy"
                )
            own = (
                (Path(p.kernel), Path(p.initrd) if p.initrd else None, Path(p.modules) if p.modules else None)
                if p.kernel
                else None
            )
            return vms.puller.oci(
                p.ref, name=p.name, kernel_ref=p.kernel_ref, size_mib=p.size_mib, progress=prog, cancel=cancel, kernel_files=own
            )

        return (await run_blocking(call, pull)).model_dump(mode="json")

    async def kernel_rm(p: NameParams, call: Call) -> dict[str, Any]:
        await run_blocking(call, under_lock([("kernel", p.name)], images.remove_kernel, store, paths, p.name))
        return {"name": p.name, "state": "removed"}

    async def image_register(p: ImageRegisterParams, call: Call) -> dict[str, Any]:
        opt = lambda v: Path(v) if v else None  # noqa: E731
        # with its own kernel triple, a kernel of the image's name is imported too
        locks = [("image", p.name)] + ([("kernel", p.name)] if p.kernel else [])
        i = await run_blocking(
            call,
            under_lock(
                locks,
                images.register_image,
                store,
                paths,
                p.name,
                Path(p.rootfs),
                p.kernel_ref,
                opt(p.kernel),
                opt(p.initrd),
                opt(p.modules),
                max_rootfs_mib=vms.puller.max_rootfs_mib,
            ),
        )
        return i.model_dump(mode="json")

    async def image_promote(p: NameParams, call: Call) -> dict[str, Any]:
        promoted = await run_blocking(
            call, under_lock([("image", p.name)], images.promote_image, store, paths, p.name, vms.puller.max_rootfs_mib)
        )
        return promoted.model_dump(mode="json")

    async def image_show(p: NameParams, call: Call) -> dict[str, Any]:
        img = store.get_image(p.name)
        return {
            **img.model_dump(mode="json"),
            "stale": vms.puller.stale("image", img),
            "used_by": [v.name for v in store.list_vms() if v.image == p.name],
        }

    async def kernel_show(p: NameParams, call: Call) -> dict[str, Any]:
        k = store.get_kernel(p.name)
        return {
            **k.model_dump(mode="json"),
            "stale": vms.puller.stale("kernel", k),
            "used_by": [i.name for i in store.list_images() if i.kernel_ref == p.name],
        }

    async def image_bundle(p: BundleParams, call: Call) -> dict[str, Any]:
        from banger_core import bundles

        img = store.get_image(p.name)
        return await run_simple(
            bundles.create, Path(p.output), "image", img.name, {"rootfs": Path(img.rootfs)}, {"kernel_ref": img.kernel_ref}
        )

    async def kernel_bundle(p: BundleParams, call: Call) -> dict[str, Any]:
        from banger_core import bundles

        k = store.get_kernel(p.name)
        files = {
            "kernel": Path(k.kernel),
            "initrd": Path(k.initrd) if k.initrd else None,
            "modules": Path(k.modules) if k.modules else None,
            "vmlinux": Path(k.vmlinux) if k.vmlinux and k.vmlinux != k.kernel else None,
        }
        return await run_simple(bundles.create, Path(p.output), "kernel", k.name, files)

    async def image_list(_p: Any, call: Call) -> dict[str, Any]:
        return {"images": [{**i.model_dump(mode="json"), "stale": vms.puller.stale("image", i)} for i in store.list_images()]}

    async def image_delete(p: NameParams, call: Call) -> dict[str, Any]:
        await run_blocking(call, under_lock([("image", p.name)], images.delete_image, store, paths, p.name))
        pruned = await run_simple(vms.puller.prune_blobs)  # its OCI layers, unless another image has them
        return {"name": p.name, "state": "deleted", "pruned_layers": len(pruned)}

    r = reg.register
    r("vm.create", create, CreateParams)
    r("vm.start", start, RefsParams)
    r("vm.restart", restart, RefsParams)
    r("vm.stop", stop, RefsParams)
    r("vm.kill", kill, KillParams)
    r("vm.delete", delete, RefsParams)
    r("vm.prune", prune, NoParams)
    r("vm.set", set_, SetParams)
    r("vm.list", list_, NoParams)
    r("vm.show", show, RefParams)
    r("vm.logs", logs, LogsParams)
    r("kernel.import", kernel_import, KernelImportParams)
    r("kernel.list", kernel_list, NoParams)
    r("kernel.rm", kernel_rm, NameParams)
    r("kernel.pull", kernel_pull, PullParams)
    r("image.pull", image_pull, ImagePullParams)
    r("image.bundle", image_bundle, BundleParams)
    r("kernel.bundle", kernel_bundle, BundleParams)
    r("image.register", image_register, ImageRegisterParams)
    r("image.list", image_list, NoParams)
    r("image.promote", image_promote, NameParams)
    r("image.show", image_show, NameParams)
    r("kernel.show", kernel_show, NameParams)
    r("image.delete", image_delete, NameParams)
