"""The daemon's own ``daemon.*`` methods, registered by the built-in ``daemon`` plugin."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from banger_core import PROTOCOL_VERSION, __version__
from banger_core.daemon.rpc import Call, NoParams


async def hello(_p: NoParams, call: Call) -> dict[str, Any]:
    return {"version": __version__, "protocol": PROTOCOL_VERSION, "pid": os.getpid(), "fingerprint": call.state.fingerprint}


async def status(_p: NoParams, call: Call) -> dict[str, Any]:
    s = call.state
    rt = s.runtime
    from banger_core.build import build_info

    return {
        "version": __version__,
        "build": build_info(),
        "pid": os.getpid(),
        "uptime_s": round(time.time() - s.started, 3),
        "socket": str(s.paths.socket),
        "log": str(s.paths.daemon_log),
        "state_dir": str(s.paths.state_dir),
        "inflight": s.inflight() - 1,
        "max_connections": s.max_connections,
        "plugins": rt.order or [],
        "broken": {n: r.reason for n, r in rt.host.records.items() if r.status == "broken"},
        "plugin_error": rt.order_error.message if rt.order_error else None,
        "methods": sorted(s.registry.methods),
        "vms": len(s.store.list_vms()),
        "services": rt.host.services_status(),
    }


async def methods(_p: NoParams, call: Call) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, m in sorted(call.state.registry.methods.items()):
        try:
            schema = m.params.model_json_schema() if m.params is not None else None
        except Exception as exc:  # a plugin's model may not have a schema
            schema = {"error": f"{type(exc).__name__}: {exc}"}
        out[name] = {"owner": m.owner, "params": schema, "stream": m.stream}
    return {"methods": out}


async def shutdown(_p: NoParams, call: Call) -> dict[str, Any]:
    call.log.info("shutdown requested by uid %s", call.peer_uid)
    call.state.request_shutdown()
    return {"pid": os.getpid()}


def register(register: Callable[..., None]) -> None:
    register("daemon.hello", hello, NoParams)
    register("daemon.status", status, NoParams)
    register("daemon.methods", methods, NoParams)
    register("daemon.shutdown", shutdown, NoParams)
