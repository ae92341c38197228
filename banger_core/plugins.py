"""Plugin loading, enablement, dependency ordering and the per-plugin hook runner.

pluggy provides the markers, hookspec validation and the registry. Ordering does not
come from pluggy (it only knows LIFO + tryfirst/trylast): every plugin declares
``requires`` (names of plugins or capabilities it needs) and optionally ``provides``
(capabilities it offers besides its own name) as module attributes; banger resolves
the order with ``graphlib`` and runs each stage as an explicit loop over plugins, one
try/except per plugin. ``config_keys`` (optional, also a module attribute) names the
top-level config keys besides its own ``[name]`` table whose values are the plugin's
settings (``[[file_sync]]``).
"""

from __future__ import annotations

import graphlib
import logging
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Iterable

import pluggy

from banger_core import hookspecs
from banger_core.builtin import BUILTIN, ESSENTIAL
from banger_core.errors import BangerError, ErrorCode, MultiError

if TYPE_CHECKING:  # pragma: no cover
    import typer
    from pydantic import BaseModel

    from banger_core.context import CheckFn, DoctorContext, ExecContext, FieldsContext, ReconcileContext, StageContext
    from banger_core.daemon.rpc import Registry
    from banger_core.daemon.state import DaemonState
    from banger_core.models import Listener, Machine, Resumed
    from banger_core.runtime import Runtime
    from banger_core.sources import GuestPayload, Source
    from banger_core.store import Store

ENTRY_POINT_GROUP = "banger.plugins"
BUILTIN_RANK = {name: i for i, (name, _module) in enumerate(BUILTIN)}
ENV_DISABLE = "BANGER_DISABLE_PLUGINS"  # comma-separated names, on top of config
ENV_STRICT = "BANGER_STRICT_PLUGINS"  # "1": a broken plugin is a hard error
ENV_TRACE = "BANGER_TRACE_PLUGINS"  # "1": log every hook call with its duration
#: what a plugin may claim as a top-level config key (``config_keys``): a bare TOML key
CONFIG_KEY_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")

log = logging.getLogger("banger.plugins")


@dataclass(frozen=True)
class EntryPoint:
    """One ``banger.plugins`` entry point: ``name = module[:attr]`` of a distribution."""

    name: str
    value: str
    distribution: str | None = None
    version: str | None = None

    def load(self) -> Any:
        import importlib

        module_name, _, attrs = self.value.partition(":")
        obj: Any = importlib.import_module(module_name.strip())
        for attr in attrs.strip().split(".") if attrs.strip() else ():
            obj = getattr(obj, attr)
        return obj


@dataclass
class PluginRecord:
    name: str
    distribution: str | None = None
    version: str | None = None
    module: Any = None
    status: str = "enabled"  # enabled | disabled | broken
    reason: str = ""
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    description: str = ""
    hooks: list[str] = field(default_factory=list)
    builtin: bool = False  # part of banger itself (banger_core.builtin)
    essential: bool = False  # a built-in that cannot be disabled
    opt_in: bool = False  # acts on a VM only when a project (or the user's allow-list) names it
    config_keys: tuple[str, ...] = ()  # top-level config keys whose values are this plugin's settings
    entry_point: str | None = None  # module[:attr] it was loaded from (None: built-in or added)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "distribution": self.distribution,
            "status": self.status,
            "reason": self.reason,
            "requires": list(self.requires),
            "provides": list(self.provides),
            "description": self.description,
            "hooks": list(self.hooks),
            "builtin": self.builtin,
            "essential": self.essential,
            "opt_in": self.opt_in,
            "config_keys": list(self.config_keys),
        }


def _str_tuple(module: Any, attr: str) -> tuple[str, ...]:
    value = getattr(module, attr, ())
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"module attribute {attr!r} must be a list of plugin names, got {value!r}")
    return tuple(value)


class PluginHost:
    """Owns the plugin manager and every fact about the installed plugins."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        #: capability -> (providing plugin, service): filled by register_services (daemon)
        self.services: dict[str, tuple[str, Any]] = {}
        #: services whose start() ran (in start order), and why others did not start
        self.started_services: list[tuple[str, Any]] = []
        self.service_errors: dict[str, str] = {}
        #: plugin -> its registered migrations (register_migrations)
        self.migrations: dict[str, list[tuple[int, str, Callable[..., None]]]] = {}
        # each plugin's config_model and vm_options, asked once per process
        self._models: dict[str, type[BaseModel] | None] = {}
        #: hook ("vm_options", "exec_options") -> plugin -> its model
        self._option_models: dict[str, dict[str, type[BaseModel] | None]] = {"vm_options": {}, "exec_options": {}}
        self.trace = os.environ.get(ENV_TRACE) == "1"

    # --- loading ------------------------------------------------------------------
    def load_builtins(self, disabled: Iterable[str] = (), only: Iterable[str] | None = None) -> None:
        """Register banger's built-in plugins (before any entry point), except the
        non-essential ones in ``disabled``; disabling an essential one is refused.
        ``only``: just these (the CLI's fast path builds one command's group)."""
        import importlib

        from banger_core import __version__

        by_env = env_disabled()
        disabled = set(disabled) | by_env
        refused = sorted(disabled & ESSENTIAL)
        if refused:
            raise BangerError(ErrorCode.CONFIG, essential_refusal(refused))
        for name, module_name in BUILTIN:
            if only is not None and name not in only:
                continue
            rec = PluginRecord(name=name, distribution="banger", version=__version__, builtin=True, essential=name in ESSENTIAL)
            if name in disabled:
                rec.status = "disabled"
                rec.reason = f"disabled by {ENV_DISABLE}" if name in by_env else "disabled in config"
                self.records[name] = rec
                continue
            self.add(importlib.import_module(module_name), rec, strict=True)

    def load_entry_points(
        self,
        disabled: Iterable[str] = (),
        strict: bool | None = None,
        only: Iterable[EntryPoint] | None = None,
    ) -> None:
        """Load the installed plugins, found through importlib.metadata; or ``only``
        these (the CLI's fast path, which knows them from its index: no metadata scan)."""
        if only is None:
            from importlib.metadata import entry_points

            found = []
            for meta in entry_points(group=ENTRY_POINT_GROUP):
                dist = getattr(meta, "dist", None)
                found.append(
                    EntryPoint(meta.name, meta.value, dist.metadata["Name"] if dist else None, dist.version if dist else None)
                )
        else:
            found = list(only)
        disabled = set(disabled)
        by_env = env_disabled()
        strict = os.environ.get(ENV_STRICT) == "1" if strict is None else strict
        seen: set[str] = set()
        for ep in sorted(found, key=lambda e: e.name):
            if ep.name in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(ep.name)
            if ep.name in self.records and self.records[ep.name].builtin:
                log.warning("plugin %s (%s) ignored: a built-in plugin has that name", ep.name, ep.value)
                continue
            rec = PluginRecord(name=ep.name, distribution=ep.distribution, version=ep.version, entry_point=ep.value)
            if ep.name in disabled or ep.name in by_env:
                rec.status = "disabled"
                rec.reason = f"disabled by {ENV_DISABLE}" if ep.name in by_env else "disabled in config"
                self.pm.set_blocked(ep.name)
                self.records[ep.name] = rec
                continue
            try:
                module = ep.load()
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # a plugin may raise anything, even SystemExit
                self._broken(rec, f"import failed: {type(exc).__name__}: {exc}", strict)
                continue
            self.add(module, rec, strict=strict)

    def add(self, module: ModuleType | object, rec: PluginRecord | str, strict: bool = False) -> PluginRecord:
        """Register one plugin object (a module or an instance) under a name."""
        if isinstance(rec, str):
            rec = PluginRecord(name=rec)
        if rec.name in self.records and self.records[rec.name].status != "disabled":
            raise BangerError(ErrorCode.PLUGIN, f"plugin {rec.name!r} is registered twice")
        rec.module = module
        rec.description = (getattr(module, "__doc__", None) or "").strip().split("\n")[0]
        try:
            rec.requires = _str_tuple(module, "requires")
            rec.provides = _str_tuple(module, "provides")
            rec.opt_in = getattr(module, "opt_in", False)
            if not isinstance(rec.opt_in, bool):
                raise TypeError(f"module attribute 'opt_in' must be True or False, got {rec.opt_in!r}")
            rec.config_keys = self._config_keys(rec.name, _str_tuple(module, "config_keys"))
            self.pm.register(module, name=rec.name)
        except Exception as exc:
            self._broken(rec, f"invalid plugin: {exc}", strict)
            return rec
        unknown = [name for name in self._impl_names(module) if name not in hookspecs.ALL_HOOKS]
        if unknown:
            self.pm.unregister(module)
            self._broken(rec, f"implements unknown hook(s): {', '.join(sorted(unknown))}", strict)
            return rec
        problems = self._unsupported_impls(module)
        if problems:
            self.pm.unregister(module)
            self._broken(rec, "; ".join(problems), strict)
            return rec
        rec.hooks = [h for h in hookspecs.ALL_HOOKS if h in self._impl_names(module)]
        self.records[rec.name] = rec
        return rec

    def _config_keys(self, name: str, keys: tuple[str, ...]) -> tuple[str, ...]:
        """``keys`` when this plugin may claim them: bare keys, none a core table, a
        plugin's name or another plugin's claim (the first plugin loaded keeps a key);
        and the plugin's own name must not be a key another plugin claims."""
        if claimant := self.claimant(name):
            raise TypeError(f"its name is the config key {claimant} claims")
        if not keys:
            return keys
        from banger_core.config import CORE_TABLES  # only for a plugin that claims keys: pydantic

        for key in keys:
            if not CONFIG_KEY_RE.fullmatch(key):
                raise TypeError(f"config_keys: {key!r} is not a config key ({CONFIG_KEY_RE.pattern})")
            if key in CORE_TABLES:
                raise TypeError(f"config_keys: {key!r} is banger's own [{key}] table")
            if key == name or key in self.records:
                raise TypeError(f"config_keys: {key!r} is a plugin's name: its table is that plugin's")
            if claimant := self.claimant(key):
                raise TypeError(f"config_keys: {key!r} is claimed by {claimant}")
        if len(set(keys)) != len(keys):
            raise TypeError(f"config_keys: a key is named twice: {list(keys)}")
        return keys

    def claimant(self, key: str) -> str | None:
        """The plugin (enabled) whose ``config_keys`` claim the top-level ``key``."""
        for rec in self.records.values():
            if key in rec.config_keys and rec.status == "enabled":
                return rec.name
        return None

    def why_unclaimed(self, key: str) -> str:
        """Why no enabled plugin claims ``key``: one that would is not enabled, or the
        plugins never imported (disabled) might; for an error message."""
        for rec in self.records.values():
            if key in rec.config_keys and rec.status != "enabled":
                return f"{rec.name} claims it, but is {rec.status}" + (f" ({rec.reason})" if rec.reason else "")
        unknown = sorted(n for n, r in self.records.items() if r.module is None and r.status != "enabled")
        if unknown:
            return f"no loaded plugin claims it (not loaded, so not inspected: {', '.join(unknown)})"
        return "no installed plugin claims it"

    def _impl_names(self, module: object) -> list[str]:
        names = []
        for attr in dir(module):
            try:
                obj = getattr(module, attr)
            except Exception:
                continue
            opts = self.pm.parse_hookimpl_opts(module, attr) if callable(obj) else None
            if opts is not None:
                names.append(opts.get("specname") or attr)
        return names

    def _unsupported_impls(self, module: object) -> list[str]:
        """banger calls each plugin's hooks itself, in dependency order: pluggy's
        wrappers and tryfirst/trylast would be silently ignored, so refuse them."""
        import inspect

        out = []
        for attr in dir(module):
            obj = getattr(module, attr, None)
            opts = self.pm.parse_hookimpl_opts(module, attr) if callable(obj) else None
            if not opts:
                continue
            if opts.get("hookwrapper") or opts.get("wrapper"):
                out.append(f"{attr}: hook wrappers are not supported")
            if opts.get("tryfirst") or opts.get("trylast"):
                out.append(f"{attr}: tryfirst/trylast are not supported; declare `requires` instead")
            if inspect.iscoroutinefunction(obj) or inspect.isasyncgenfunction(obj):
                out.append(f"{attr}: hooks must be plain functions, not async")
        return out

    def mark_broken(self, name: str, reason: str) -> None:
        """A plugin failed after loading (e.g. in a register_* hook): take it out."""
        rec = self.records[name]
        if rec.module is not None and self.pm.is_registered(rec.module):
            self.pm.unregister(rec.module)
        rec.status, rec.reason, rec.module = "broken", reason, None
        log.warning("plugin %s is broken: %s", name, reason)

    def _broken(self, rec: PluginRecord, reason: str, strict: bool) -> None:
        rec.status, rec.reason, rec.module = "broken", reason, None
        self.records[rec.name] = rec
        log.warning("plugin %s is broken: %s", rec.name, reason)
        if strict:
            raise BangerError(ErrorCode.PLUGIN, f"plugin {rec.name!r} is broken: {reason}")

    def finish_loading(self) -> None:
        # Every registered hookimpl must match a hookspec; per-plugin checks above make
        # this pass, so a failure here is a bug in banger, not in a plugin.
        self.pm.check_pending()

    # --- ordering -----------------------------------------------------------------
    @property
    def enabled(self) -> list[str]:
        return sorted(n for n, r in self.records.items() if r.status == "enabled")

    def order(self, names: Iterable[str] | None = None, excluded_by: str = "") -> list[str]:
        """Dependency order of ``names`` (default: every enabled plugin).

        Raises one ``BangerError`` naming the plugins for a missing requirement or a
        cycle. ``excluded_by`` says why enabled plugins outside ``names`` were left out
        (e.g. a project's banger.toml).
        """
        selected = list(self.enabled if names is None else names)
        providers: dict[str, list[str]] = {}
        for n in selected:
            rec = self.records[n]
            for cap in (n, *rec.provides):
                providers.setdefault(cap, []).append(n)
        graph: dict[str, set[str]] = {}
        missing: list[str] = []
        for n in selected:
            deps: set[str] = set()
            for req in self.records[n].requires:
                if req in providers:
                    deps.update(p for p in providers[req] if p != n)
                else:
                    missing.append(f"{n} requires {req}, which {self._why_absent(req, excluded_by)}")
            graph[n] = deps
        if missing:
            raise BangerError(ErrorCode.PLUGIN, "; ".join(missing), details={"missing": missing})
        sorter = graphlib.TopologicalSorter(graph)
        try:
            sorter.prepare()
        except graphlib.CycleError as exc:
            cycle = list(exc.args[1])
            raise BangerError(
                ErrorCode.PLUGIN,
                "plugin dependency cycle: " + " -> ".join(cycle),
                details={"cycle": cycle},
            ) from None
        # Deterministic: among ready plugins, the built-ins first, then alphabetical.
        out: list[str] = []
        while sorter.is_active():
            ready = sorted(sorter.get_ready(), key=lambda n: (BUILTIN_RANK.get(n, len(BUILTIN_RANK)), n))
            out.extend(ready)
            sorter.done(*ready)
        return out

    def providers_of(self, capability: str, among: Iterable[str] | None = None) -> list[str]:
        """Enabled plugins (or those of ``among``) that are or provide ``capability``:
        the one named so first, then alphabetical."""
        names = self.enabled if among is None else among
        found = [n for n in names if n == capability or capability in self.records[n].provides]
        return sorted(found, key=lambda n: (n != capability, n))

    def _why_absent(self, req: str, excluded_by: str = "") -> str:
        def state(rec: PluginRecord) -> str:
            if rec.status == "enabled":
                return f"disabled by {excluded_by}" if excluded_by else "disabled"
            return rec.status + (f" ({rec.reason})" if rec.reason else "")

        rec = self.records.get(req)
        if rec is not None:
            return f"is {state(rec)}"
        for other in self.records.values():
            if req in other.provides:
                return f"is provided by {other.name}, which is {state(other)}"
        unknown = sorted(n for n, r in self.records.items() if r.status == "disabled" and r.module is None)
        if unknown:  # never imported: what they provide is unknown
            return f"no loaded plugin provides (disabled, so not inspected: {', '.join(unknown)})"
        return "is not installed"

    # --- calling ------------------------------------------------------------------
    # Core code calls hooks through the typed methods below, never by spelling a hook
    # name: the hook names live in this section only (as tox's plugin manager does).

    def config_model(self, plugin: str) -> "type[BaseModel] | None":
        """The plugin's settings model (asked once, then cached)."""
        if plugin not in self._models:
            self._models[plugin] = self._call("config_model", plugin)
        return self._models[plugin]

    def options_model(self, hook: str, plugin: str) -> "type[BaseModel] | None":
        """The plugin's model of ``hook``: ``vm_options`` (its per-VM options) or
        ``exec_options`` (its ``vm exec`` options); asked once, then cached."""
        cache = self._option_models[hook]
        if plugin not in cache:
            try:
                model = self._call(hook, plugin)
            except Exception as exc:
                raise BangerError(ErrorCode.PLUGIN, f"plugin {plugin!r}: {hook} failed: {type(exc).__name__}: {exc}") from exc
            required = [n for n, f in (model.model_fields.items() if model is not None else ()) if f.is_required()]
            if required:  # a VM made (a command given) without the flag could never be validated
                raise BangerError(
                    ErrorCode.PLUGIN, f"plugin {plugin!r}: {hook} field(s) without a default: {', '.join(required)}"
                )
            cache[plugin] = model
        return cache[plugin]

    def vm_options(self, plugin: str) -> "type[BaseModel] | None":
        """The plugin's per-VM options model (asked once, then cached)."""
        return self.options_model("vm_options", plugin)

    def option_models(self, hook: str = "vm_options") -> "dict[str, type[BaseModel]]":
        """Every enabled plugin's model of ``hook`` (see ``options_model``), built-ins
        first; a plugin whose hook raises is marked broken."""
        out: dict[str, type[BaseModel]] = {}
        for name in self.builtins_first():
            try:
                model = self.options_model(hook, name)
            except BangerError as exc:
                self.mark_broken(name, exc.message.removeprefix(f"plugin {name!r}: "))
                continue
            if model is not None:
                out[name] = model
        return out

    def implements(self, hook: str, plugin: str) -> bool:
        return self._impl(hook, plugin) is not None

    def _impl(self, hook: str, plugin: str) -> Any:
        caller = getattr(self.pm.hook, hook)
        for impl in caller.get_hookimpls():
            if impl.plugin_name == plugin:
                return impl
        return None

    def _call(self, hook: str, plugin: str, /, **kwargs: Any) -> Any:
        """Call one plugin's implementation of ``hook`` (keyword arguments only)."""
        impl = self._impl(hook, plugin)
        if impl is None:
            return None
        args = {k: kwargs[k] for k in impl.argnames if k in kwargs}
        if not self.trace:
            return impl.function(**args)
        t0 = time.perf_counter()
        try:
            return impl.function(**args)
        finally:
            log.info("hook %s.%s took %.1f ms", plugin, hook, (time.perf_counter() - t0) * 1000)

    def _call_each(
        self, hook: str, plugins: Iterable[str], kwargs_for: Callable[[str], dict[str, Any]]
    ) -> list[tuple[str, BaseException]]:
        """Call ``hook`` on each plugin in turn; keep going past failures, return them."""
        failures: list[tuple[str, BaseException]] = []
        for name in plugins:
            if self._impl(hook, name) is None:
                continue
            try:
                self._call(hook, name, **kwargs_for(name))
            except Exception as exc:
                log.error("plugin %s: %s failed: %s\n%s", name, hook, exc, traceback.format_exc())
                failures.append((name, exc))
        return failures

    def _register_each(
        self,
        hook: str,
        kwargs_for: Callable[[str], dict[str, Any]],
        undo: Callable[[str], None] = lambda _n: None,
        after: Callable[[str], None] = lambda _n: None,
        names: list[str] | None = None,
    ) -> list[str]:
        """The one fan-out of a registry hook: every enabled plugin (built-ins first),
        each with its own ``register``. A plugin whose hook raises is marked broken and
        what it registered is undone (``undo``); a built-in that raises is a bug in
        banger and is raised. Returns the plugins that broke."""
        broke: list[str] = []
        for name in self.builtins_first() if names is None else names:
            try:
                self._call(hook, name, **kwargs_for(name))
            except Exception as exc:
                if self.records[name].builtin:
                    raise
                undo(name)
                self.mark_broken(name, f"{hook} failed: {type(exc).__name__}: {exc}")
                broke.append(name)
            after(name)
        return broke

    def _providers_first(self) -> list[str]:
        """Enabled plugins in dependency order (providers before their consumers); when
        the set has no order (a cycle, a missing requirement), built-ins first."""
        try:
            return self.order()
        except BangerError:
            return self.builtins_first()

    def implemented_by_any(self, hook: str) -> bool:
        """Whether any enabled plugin implements ``hook`` (skip per-VM work otherwise)."""
        return bool(getattr(self.pm.hook, hook).get_hookimpls())

    def builtins_first(self) -> list[str]:
        """Enabled plugins: the built-ins in their fixed order, then the rest by name."""
        builtin = [n for n in self.records if self.records[n].builtin and self.records[n].status == "enabled"]
        return builtin + [n for n in self.enabled if n not in builtin]

    # registry hooks --------------------------------------------------------------
    def register_commands(
        self, app: "typer.Typer", vm: "typer.Typer", observe: Callable[[str], None] = lambda _n: None
    ) -> list[str]:
        """Every plugin adds its CLI commands to ``app`` (and ``banger vm`` subcommands to
        ``vm``); ``observe(plugin)`` after each. Returns the plugins that broke."""
        return self._register_each("register_commands", lambda _n: {"app": app, "vm": vm}, after=observe)

    def register_rpc_methods(self, registry: "Registry") -> list[str]:
        """Every plugin adds its RPC methods (``<plugin>.*``) to ``registry``."""
        return self._register_each(
            "register_rpc_methods", lambda n: {"register": registry.for_plugin(n)}, undo=registry.drop_owner
        )

    def register_services(self, daemon: "DaemonState") -> list[str]:
        """Every plugin offers its services (in dependency order, providers first)."""
        self.services.clear()

        def kwargs_for(name: str) -> dict[str, Any]:
            own = {name, *self.records[name].provides}

            def register(capability: str, service: object) -> None:
                if capability not in own:
                    raise BangerError(
                        ErrorCode.PLUGIN,
                        f"plugin {name!r} may only offer services for {', '.join(sorted(own))}, not {capability!r}",
                    )
                if capability in self.services:
                    other = self.services[capability][0]
                    raise BangerError(ErrorCode.PLUGIN, f"a {capability!r} service is offered by both {other} and {name}")
                self.services[capability] = (name, service)

            return {"register": register, "daemon": daemon}

        def undo(name: str) -> None:
            for cap in [c for c, (owner, _s) in self.services.items() if owner == name]:
                del self.services[cap]

        return self._register_each("register_services", kwargs_for, undo=undo, names=self._providers_first())

    # daemon-lifetime services ------------------------------------------------------------
    def _distinct_services(self) -> list[tuple[str, Any]]:
        """(owner, service) once per service object, providers first."""
        rank = {n: i for i, n in enumerate(self._providers_first())}
        seen: set[int] = set()
        out: list[tuple[str, Any]] = []
        for owner, svc in sorted(self.services.values(), key=lambda os_: rank.get(os_[0], len(rank))):
            if id(svc) not in seen:
                seen.add(id(svc))
                out.append((owner, svc))
        return out

    def start_services(self) -> list[tuple[str, BaseException]]:
        """``start()`` of each service that has one, providers first; failures are
        returned (and kept for ``services_status``), not raised."""
        failures: list[tuple[str, BaseException]] = []
        self.started_services = []
        self.service_errors = {}
        for owner, svc in self._distinct_services():
            start = getattr(svc, "start", None)
            if not callable(start):
                continue
            try:
                start()
            except Exception as exc:
                log.error("plugin %s: its service did not start: %s\n%s", owner, exc, traceback.format_exc())
                self.service_errors[owner] = f"{type(exc).__name__}: {exc}"
                failures.append((owner, exc))
                continue
            self.started_services.append((owner, svc))
        return failures

    def stop_services(self) -> list[tuple[str, BaseException]]:
        """``stop()`` of each started service, consumers first; every one runs."""
        failures: list[tuple[str, BaseException]] = []
        started, self.started_services = self.started_services, []
        for owner, svc in reversed(started):
            stop = getattr(svc, "stop", None)
            if not callable(stop):
                continue
            try:
                stop()
            except Exception as exc:
                log.error("plugin %s: its service did not stop cleanly: %s", owner, exc)
                failures.append((owner, exc))
        return failures

    def services_status(self) -> dict[str, dict[str, Any]]:
        """What ``daemon status`` shows per plugin offering a service with ``status()``
        (or one whose ``start()`` failed: its ``error``)."""
        out: dict[str, dict[str, Any]] = {}
        for owner, svc in self._distinct_services():
            entry: dict[str, Any] = {}
            status = getattr(svc, "status", None)
            if callable(status):
                try:
                    entry.update(status() or {})
                except Exception as exc:
                    entry["status_error"] = f"{type(exc).__name__}: {exc}"
            if owner in self.service_errors:
                entry["error"] = self.service_errors[owner]
            if entry:
                out.setdefault(owner, {}).update(entry)
        return out

    def collect_migrations(self) -> list[str]:
        """Ask every plugin for its migrations (into ``self.migrations``), apply none;
        the plugins whose registration broke."""

        def kwargs_for(name: str) -> dict[str, Any]:
            def register(number: int, description: str, fn: Callable[..., None]) -> None:
                if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                    raise BangerError(ErrorCode.PLUGIN, f"a migration number must be an integer >= 1, not {number!r}")
                mine = self.migrations.setdefault(name, [])
                if any(n == number for n, _d, _f in mine):
                    raise BangerError(ErrorCode.PLUGIN, f"migration {number} is registered twice")
                if not callable(fn):
                    raise BangerError(ErrorCode.PLUGIN, f"migration {number}: fn is not callable")
                mine.append((number, str(description), fn))

            return {"register": register}

        def undo(name: str) -> None:
            self.migrations.pop(name, None)

        self.migrations = {}
        return self._register_each("register_migrations", kwargs_for, undo=undo)

    def register_migrations(self, store: "Store") -> list[str]:
        """Every plugin's own migrations, applied now (plugin order); the plugins that
        broke (a bad registration or a failing migration)."""
        broke = self.collect_migrations()
        for name, migrations in list(self.migrations.items()):
            if name in broke:
                continue
            try:
                applied = store.migrate_plugin(name, migrations)
            except Exception as exc:
                self.mark_broken(name, f"migration failed: {type(exc).__name__}: {exc}")
                broke.append(name)
                continue
            if applied:
                log.info("plugin %s: applied migrations %s", name, applied)
        return broke

    def register_sources(self, runtime: "Runtime") -> tuple[list[tuple[str, "Source"]], list[str]]:
        """Every plugin's sources of images and kernels, in the order they are asked
        (plugin order; ``fallback`` sources last): ([(plugin, source)], broke)."""
        from banger_core.sources import SOURCE_NAME_RE

        found: list[tuple[str, Source]] = []

        def kwargs_for(name: str) -> dict[str, Any]:
            def register(source: "Source") -> None:
                src_name = getattr(source, "name", None)
                if not isinstance(src_name, str) or not SOURCE_NAME_RE.fullmatch(src_name):
                    raise BangerError(ErrorCode.PLUGIN, f"a source's name must match {SOURCE_NAME_RE.pattern}: {src_name!r}")
                kinds = getattr(source, "kinds", None)
                if not isinstance(kinds, tuple) or not kinds or not set(kinds) <= {"image", "kernel"}:
                    raise BangerError(ErrorCode.PLUGIN, f"source {src_name!r}: kinds must be a tuple of 'image'/'kernel'")
                for attr in ("claims", "artifact_name", "revision", "fetch"):
                    if not callable(getattr(source, attr, None)):
                        raise BangerError(ErrorCode.PLUGIN, f"source {src_name!r} has no {attr}()")
                if any(s.name == src_name for _p, s in found):
                    raise BangerError(ErrorCode.PLUGIN, f"two sources are named {src_name!r}")
                found.append((name, source))

            return {"register": register, "runtime": runtime}

        def undo(name: str) -> None:
            found[:] = [(p, s) for p, s in found if p != name]

        broke = self._register_each("register_sources", kwargs_for, undo=undo, names=self._providers_first())
        found.sort(key=lambda ps: bool(getattr(ps[1], "fallback", False)))  # stable: plugin order otherwise
        return found, broke

    def register_guest_payload(self) -> tuple["GuestPayload", list[str]]:
        """Every plugin's guest files, in plugin order: (payload, broke)."""
        from banger_core.sources import GuestFile, GuestPayload

        owner: dict[str, str] = {}
        files: list[tuple[str, GuestFile]] = []

        def kwargs_for(name: str) -> dict[str, Any]:
            def register(f: GuestFile) -> None:
                if not isinstance(f, GuestFile):
                    raise BangerError(ErrorCode.PLUGIN, f"register_guest_payload takes a GuestFile, not {f!r}")
                parts = f.path.split("/")
                if not f.path.startswith("/") or ".." in parts or f.path.endswith("/") or "\0" in f.path:
                    raise BangerError(ErrorCode.PLUGIN, f"guest file {f.path!r}: an absolute path without '..'")
                if f.path in owner:
                    raise BangerError(ErrorCode.PLUGIN, f"guest file {f.path} is registered by both {owner[f.path]} and {name}")
                owner[f.path] = name
                files.append((name, f))

            return {"register": register}

        def undo(name: str) -> None:
            files[:] = [(p, f) for p, f in files if p != name]
            for path in [p for p, o in owner.items() if o == name]:
                del owner[path]

        broke = self._register_each("register_guest_payload", kwargs_for, undo=undo)
        return GuestPayload([f for _p, f in files]), broke

    def service_for(self, consumer: str, capability: str) -> Any:
        """The service offered for ``capability``, for a plugin that requires it."""
        rec = self.records[consumer]
        if capability not in rec.requires and capability != consumer and capability not in rec.provides:
            raise BangerError(
                ErrorCode.PLUGIN,
                f"plugin {consumer!r} uses the {capability!r} service without declaring requires = [{capability!r}]",
            )
        return self.service(capability)

    def service(self, capability: str) -> Any:
        """The service offered for ``capability`` (any caller: RPC handlers)."""
        try:
            return self.services[capability][1]
        except KeyError:
            providers = self.providers_of(capability)
            why = f"{', '.join(providers)} offers none" if providers else "no enabled plugin provides it"
            raise BangerError(ErrorCode.PLUGIN, f"no {capability!r} service: {why}") from None

    def register_doctor_checks(self, doctor: "DoctorContext") -> list[tuple[str, str, "CheckFn"]]:
        """Every plugin's doctor checks, as (plugin, check name, fn), plugins in order."""
        checks: list[tuple[str, str, CheckFn]] = []

        def kwargs_for(name: str) -> dict[str, Any]:
            def register(check_name: str, fn: "CheckFn") -> None:
                checks.append((name, check_name, fn))

            return {"register": register, "doctor": doctor}

        broke = self._register_each("register_doctor_checks", kwargs_for)
        return [c for c in checks if c[0] not in broke]

    # daemon start ------------------------------------------------------------------
    def reconcile(self, order: list[str], ctx_for: Callable[[str], "ReconcileContext"]) -> list[tuple[str, BaseException]]:
        """Each plugin's ``reconcile`` in order; failures returned, not raised."""
        return self._call_each("reconcile", order, lambda n: {"ctx": ctx_for(n)})

    # VM lifecycle ------------------------------------------------------------------
    def prepare_host(self, order: list[str], ctx_for: Callable[[str], "StageContext"]) -> list[str]:
        return self._run_setup("prepare_host", order, ctx_for)

    def configure_machine(self, order: list[str], ctx_for: Callable[[str], "StageContext"], machine: "Machine") -> list[str]:
        return self._run_setup("configure_machine", order, ctx_for, machine=machine)

    def post_boot(self, order: list[str], ctx_for: Callable[[str], "StageContext"]) -> list[str]:
        return self._run_setup("post_boot", order, ctx_for)

    def vm_resumed(self, order: list[str], ctx_for: Callable[[str], "StageContext"], resumed: "Resumed") -> list[str]:
        return self._run_setup("vm_resumed", order, ctx_for, resumed=resumed)

    def vm_fields(self, order: list[str], ctx_for: Callable[[str], "FieldsContext"], detail: bool) -> dict[str, dict[str, Any]]:
        """Each plugin's fields for one VM; a plugin that raises shows ``error``."""
        out: dict[str, dict[str, Any]] = {}
        for name in order:
            if self._impl("vm_fields", name) is None:
                continue
            try:
                fields = self._call("vm_fields", name, ctx=ctx_for(name), detail=detail)
            except Exception as exc:
                log.warning("plugin %s: vm_fields failed: %s", name, exc)
                fields = {"error": f"{type(exc).__name__}: {exc}"}
            if fields:
                out[name] = dict(fields)
        return out

    def vm_port_endpoint(
        self, order: list[str], ctx_for: Callable[[str], "FieldsContext"], listener: "Listener"
    ) -> tuple[str, str] | None:
        """(endpoint, plugin) from the first plugin, in order, that can reach the port."""
        found = self._first_answer("vm_port_endpoint", order, lambda n: {"ctx": ctx_for(n), "listener": listener})
        return (str(found[1]), found[0]) if found else None

    def before_exec(self, order: list[str], ctx_for: Callable[[str], "ExecContext"]) -> list[str]:
        return self._run_setup("before_exec", order, ctx_for)

    def vm_egress(self, order: list[str], ctx_for: Callable[[str], "FieldsContext"]) -> str | None:
        """The first plugin, in order, through which the VM reaches beyond this host."""
        found = self._first_answer("vm_egress", order, lambda n: {"ctx": ctx_for(n)})
        return found[0] if found else None

    def request_guest_shutdown(self, order: list[str], ctx_for: Callable[[str], "StageContext"]) -> str | None:
        """Ask plugins, in order, to shut the guest down; the name of the first that did."""
        found = self._first_answer("request_guest_shutdown", order, lambda n: {"ctx": ctx_for(n)})
        return found[0] if found else None

    def _first_answer(self, hook: str, order: list[str], kwargs_for: Callable[[str], dict[str, Any]]) -> tuple[str, Any] | None:
        """(plugin, answer) of the first plugin in ``order`` whose ``hook`` answers
        (anything truthy); one that raises is logged and the next is asked."""
        for name in order:
            if self._impl(hook, name) is None:
                continue
            try:
                answer = self._call(hook, name, **kwargs_for(name))
            except Exception as exc:  # fall through to the next plugin
                log.warning("plugin %s: %s failed: %s", name, hook, exc)
                continue
            if answer:
                return name, answer
        return None

    def _run_setup(self, stage: str, order: list[str], ctx_for: Callable[[str], Any], **kwargs: Any) -> list[str]:
        """Run a setup stage in dependency order; stop at the first failure.

        Returns the plugins whose hook ran. On failure raises ``BangerError`` naming
        the plugin and the stage (the caller then runs ``cleanup``).
        """
        ran: list[str] = []
        for name in order:
            if self._impl(stage, name) is None:
                continue
            ctx = ctx_for(name)
            try:
                self._call(stage, name, ctx=ctx, **kwargs)
            except BangerError as exc:
                raise BangerError(
                    exc.code,
                    f"{name}: {stage}: {exc.message}",
                    details={**exc.details, "plugin": name, "stage": stage},
                ) from exc
            except Exception as exc:
                raise BangerError(
                    ErrorCode.OPERATION_FAILED,
                    f"{name}: {stage} failed: {type(exc).__name__}: {exc}",
                    details={"plugin": name, "stage": stage},
                ) from exc
            ran.append(name)
        return ran

    def cleanup(self, order: list[str], ctx_for: Callable[[str], "StageContext"], what: str = "cleanup") -> None:
        """Every plugin's ``cleanup`` in reverse order; raise all failures together."""
        failures = self._call_each("cleanup", list(reversed(order)), lambda n: {"ctx": ctx_for(n)})
        if failures:
            raise MultiError(what, failures)


def env_disabled() -> set[str]:
    return {n.strip() for n in os.environ.get(ENV_DISABLE, "").split(",") if n.strip()}


def essential_refusal(names: Iterable[str]) -> str:
    return (
        f"plugin(s) {', '.join(repr(n) for n in names)} are built into banger and cannot be disabled "
        f"(the essential built-ins: {', '.join(sorted(ESSENTIAL))})"
    )


def load_plugins(disabled: Iterable[str] = (), strict: bool | None = None) -> PluginHost:
    host = PluginHost()
    host.load_builtins(disabled)
    host.load_entry_points(disabled=disabled, strict=strict)
    host.finish_loading()
    return host
