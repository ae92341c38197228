"""Running handler work off the event loop: blocking calls in worker threads, with
progress streamed to the client and cancellation when it leaves; and the one
fan-out of a verb over several VM refs."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

from banger_core.errors import BangerError

if TYPE_CHECKING:  # pragma: no cover
    from banger_core.daemon.rpc import Call
    from banger_core.models import VM

# Blocking VM work runs here, not on the event loop; sized for many slow operations.
EXECUTOR = ThreadPoolExecutor(max_workers=32, thread_name_prefix="banger-op")

Progress = Callable[[str, dict[str, Any]], None]
T = TypeVar("T")


async def run_blocking(call: "Call", fn: Callable[..., T], *args: Any) -> T:
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


async def run_simple(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a worker thread (keeping the op id on its log records)."""
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    return await loop.run_in_executor(EXECUTOR, functools.partial(ctx.run, fn, *args))


async def fan_out(call: "Call", refs: list[str], op: Callable[["VM"], Awaitable[Any]]) -> dict[str, Any]:
    """Run ``op(vm)`` once per VM the refs name, concurrently; report per ref, in
    input order. A ref given twice, or two refs naming one VM (its name and an ID
    prefix), run the operation once and share its result."""
    vms = call.state.vms

    def failed(ref: str, exc: BangerError) -> dict[str, Any]:
        exc.op_id = call.op_id
        return {"ref": ref, "ok": False, "error": exc.to_dict()}

    unique = list(dict.fromkeys(refs))
    resolved: dict[str, VM | BangerError] = {}
    for ref in unique:
        try:
            resolved[ref] = await run_simple(vms.resolve, ref)
        except BangerError as exc:
            resolved[ref] = exc
    by_vm = {vm.id: vm for vm in resolved.values() if not isinstance(vm, BangerError)}

    async def once(vm: "VM") -> Any:
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
