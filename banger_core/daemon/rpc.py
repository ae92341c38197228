"""RPC method registry and the per-request call object handed to handlers."""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from pydantic import BaseModel, ValidationError

from banger_core import protocol
from banger_core.errors import BangerError, ErrorCode
from banger_core.logs import clip
from banger_core.models import Input, validate_input

if TYPE_CHECKING:  # pragma: no cover
    from banger_core.daemon.state import DaemonState

log = logging.getLogger("banger.rpc")

Handler = Callable[[Any, "Call"], Awaitable[Any] | Any]

#: validation problems named in one bad_request (a request may have thousands)
MAX_PROBLEMS = 10


class NoParams(Input):
    """The params of a method that takes none: ``{}`` only."""


@dataclass
class Method:
    name: str
    handler: Handler
    params: type[BaseModel] | None
    owner: str  # "core" or a plugin name


@dataclass
class Call:
    """One request in flight: its op id, a logger that stamps it, and ``emit``."""

    op_id: str
    method: str
    peer_uid: int
    _send: Callable[[bytes], Awaitable[None]]
    #: the daemon's Runtime (paths, config, plugin host) and Store (also on ``state``)
    runtime: Any = None
    store: Any = None
    #: the daemon's state, typed: paths, runtime, store, vms, puller, registry (set by
    #: the daemon for every request; see banger_core.daemon.state)
    state: "DaemonState" = None  # type: ignore[assignment]
    log: logging.LoggerAdapter = field(init=False)

    def __post_init__(self) -> None:
        self.log = logging.LoggerAdapter(logging.getLogger("banger.rpc"), {"op_id": self.op_id})

    async def emit(self, payload: dict[str, Any]) -> None:
        """Stream a progress event to the client."""
        await self._send(protocol.encode(protocol.event(self.op_id, payload)))


class Registry:
    def __init__(self) -> None:
        self.methods: dict[str, Method] = {}

    def register(self, name: str, handler: Handler, params: type[BaseModel] | None = None, *, owner: str = "core") -> None:
        if owner != "core" and not name.startswith(f"{owner}."):
            raise BangerError(ErrorCode.PLUGIN, f"plugin {owner!r} may only register methods named '{owner}.*', not {name!r}")
        if name in self.methods:
            raise BangerError(ErrorCode.PLUGIN, f"RPC method {name!r} registered by both {self.methods[name].owner} and {owner}")
        self.methods[name] = Method(name, handler, params, owner)

    def drop_owner(self, owner: str) -> None:
        for name in [n for n, m in self.methods.items() if m.owner == owner]:
            del self.methods[name]

    def for_plugin(self, plugin: str) -> Callable[..., None]:
        def register(name: str, handler: Handler, params: type[BaseModel] | None = None) -> None:
            self.register(name, handler, params, owner=plugin)

        return register

    async def dispatch(self, method_name: str, raw_params: Any, call: Call) -> Any:
        method = self.methods.get(method_name)
        if method is None:
            raise BangerError(
                ErrorCode.UNKNOWN_METHOD,
                f"unknown method {clip(method_name, 200)!r}",
                details={"known": sorted(self.methods)},
            )
        if not isinstance(raw_params, dict):
            raise BangerError(ErrorCode.BAD_REQUEST, "params must be a JSON object")
        params: Any = raw_params
        if method.params is not None:
            errors = None
            try:
                params = validate_input(method.params, raw_params)
            except ValidationError as exc:
                errors = exc.errors(include_url=False, include_input=False)
            if errors is not None:  # raised here, not chained to what holds the input
                problems = "; ".join(
                    f"{clip('.'.join(str(p) for p in e['loc']), 100) or 'params'}: {clip(e['msg'], 300)}"
                    for e in errors[:MAX_PROBLEMS]
                )
                if len(errors) > MAX_PROBLEMS:
                    problems += f"; and {len(errors) - MAX_PROBLEMS} more"
                raise BangerError(ErrorCode.BAD_REQUEST, f"{method_name}: invalid params: {problems}")
        if inspect.iscoroutinefunction(method.handler):
            value = await method.handler(params, call)
        else:
            value = await asyncio.to_thread(method.handler, params, call)
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        return value
