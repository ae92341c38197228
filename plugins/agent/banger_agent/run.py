"""``agent.run``: a command in a fresh VM, in one streaming call the daemon owns.

Create (auto-pulling) and boot, wait for the agent, run the command with the client's
streams, return its exit status. With ``rm`` the VM is ephemeral: the daemon deletes it
however the run ends (exit, error, the client interrupted, killed or gone), and a VM
left ephemeral by a daemon that died is deleted when the next daemon reconciles.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from pydantic import Field

from banger_agent.rpc import Terminal
from banger_core.vm.params import CreateParams

log = logging.getLogger("banger.plugin.agent")


class RunParams(CreateParams):
    argv: list[str] = Field(default_factory=list, description="the command; none: leave the VM running (-d)")
    rm: bool = False
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    tty: Terminal | None = Field(default=None, description="run the command on a terminal (the interactive shell)")
    dry_run: bool = Field(default=False, description="say what the run would make and do; make nothing")


async def agent_run(p: RunParams, call: Any) -> dict[str, Any]:
    from banger_agent import socket_of
    from banger_agent.rpc import before_exec, exec_session
    from banger_core.context import ExecRequest
    from banger_core.daemon.work import run_blocking
    from banger_core.errors import BangerError, ErrorCode

    if p.rm and not p.argv:
        raise BangerError(ErrorCode.BAD_REQUEST, "--rm needs a command: a VM deleted as soon as it is made is no use")
    vms = call.state.vms
    from banger_core.vm.params import random_name

    fields = {k: getattr(p, k) for k in CreateParams.model_fields}
    # named now, so a run cut off while its VM is being made can still find and delete it
    create = CreateParams(**{**fields, "name": p.name or random_name(), "ephemeral": p.rm})
    stages: dict[str, float] = {}
    t0 = time.monotonic()
    # plugins check the run before its VM exists (and say what they would do)
    req = ExecRequest(argv=p.argv, cwd=p.cwd, env=p.env)

    def plan(progress: Any, _cancel: Any) -> Any:
        if not p.dry_run:  # what a plan would do is said when it is done
            said = progress
            progress = lambda stage, data: None if stage == "note" else said(stage, data)  # noqa: E731
        return vms.plan_run(create, ExecRequest(**vars(req)), call.op_id, progress)

    draft = await run_blocking(call, plan)
    if p.dry_run:
        spec = {"vm": draft.name, "image": draft.image, "driver": draft.driver, **draft.spec.model_dump()}
        return {"dry_run": True, "spec": spec, "argv": p.argv, "stages": stages}
    ours = True  # False when the name was another VM's: that one is not this run's to delete
    try:
        try:
            vm = await run_blocking(call, lambda prog, cancel: vms.create(create, call.op_id, prog, cancel))
        except BangerError as exc:
            ours = exc.code is not ErrorCode.ALREADY_EXISTS
            raise
        stages["create"] = time.monotonic() - t0
        t1 = time.monotonic()
        await before_exec(call, vm, req, {}, run=True)  # e.g. the workspace goes in
        if (spent := time.monotonic() - t1) >= 0.05:
            stages["prepare"] = spent
        if not p.argv:
            return {"vm": vms.show(vm), "stages": stages}
        t1 = time.monotonic()
        request: dict[str, Any] = {"op": "exec", "argv": req.argv, "env": req.env, "cwd": req.cwd}
        if p.tty is not None:
            request["tty"] = p.tty.model_dump()
        result = await exec_session(call, vm, socket_of(call.state.paths, vm.id), request)
        stages["exec"] = time.monotonic() - t1
        return {**result, "vm": vm.name, "stages": stages}
    finally:
        if p.rm and ours:
            t2 = time.monotonic()
            await _delete(call, vms, create.name)
            stages["delete"] = time.monotonic() - t2
            log.info(
                "run %s: %s", create.name, ", ".join(f"{k} {v:.2f}s" for k, v in stages.items()), extra={"op_id": call.op_id}
            )


async def _delete(call: Any, vms: Any, name: str | None) -> None:
    """Delete the run's VM, whatever state the run left it in; the client may be gone
    (the task cancelled): the delete goes on in a worker thread regardless."""
    from banger_core.daemon.work import EXECUTOR

    def delete() -> None:
        for vm in vms.store.find_vms(name=name):
            if vm.ephemeral:
                vms.delete(vm, call.op_id, force=True)

    gone = asyncio.get_running_loop().run_in_executor(EXECUTOR, delete)
    with contextlib.suppress(BaseException):
        await asyncio.shield(gone)
