"""Runs the plugin lifecycle for one VM: setup stages in dependency order around the
boot, cleanup in reverse. The VM state machine (issue: lifecycle) drives this."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from banger_core.context import CleanupReason, ExecContext, ExecRequest, FieldsContext, StageContext
from banger_core.errors import BangerError, ErrorCode, MultiError
from banger_core.models import VM, Listener, Machine, Resumed
from banger_core.runtime import Runtime

log = logging.getLogger("banger.lifecycle")


class Lifecycle:
    """The plugins acting on one VM, their settings, and the stage runner.

    Construction resolves the plugin set (the user's config plus the VM's project
    banger.toml) and validates every plugin's settings, so bad config fails before
    any host state exists.
    """

    def __init__(
        self,
        rt: Runtime,
        vm: VM,
        *,
        op_id: str,
        persist: Callable[[VM], None] | None = None,
        handles: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.rt = rt
        self.vm = vm
        self.op_id = op_id
        self._persist = persist or (lambda _vm: None)
        #: True once ``start`` began running the stages (its failure then ran cleanup)
        self.started = False
        #: the running start's progress (``StageContext.warn`` adds a line to it)
        self.progress: Callable[[str, dict[str, Any]], None] | None = None
        self.handles = handles if handles is not None else {}
        project_dir = Path(vm.project_dir) if vm.project_dir else None
        self.plugins, self.project = rt.plugins_for(project_dir)
        self.settings: dict[str, BaseModel | None] = {
            name: rt.config.settings_for(rt.host, name, self.project) for name in self.plugins
        }
        # Stored options of a plugin that no longer acts on this VM are kept, unused.
        self.options = self.validate_options(
            {k: v for k, v in vm.options.items() if k in self.plugins and rt.host.vm_options(k) is not None}
        )

    def validate_options(self, given: dict[str, dict[str, Any]], hook: str = "vm_options") -> dict[str, BaseModel | None]:
        """Each acting plugin's per-VM options model (``exec_options``: its ``vm exec``
        options model), from ``given`` (plugin -> values); options for a plugin that
        declares none, or that does not act on this VM, are refused."""
        from pydantic import ValidationError

        from banger_core.models import validate_input

        host = self.rt.host

        def model_of(name: str) -> "type[BaseModel] | None":
            return host.options_model(hook, name)

        kind = "per-VM" if hook == "vm_options" else "vm exec"
        for name in given:
            if name not in self.plugins:
                where = f"VMs made from {self.project.path.parent}" if self.project else "VMs (see banger plugins resolve)"
                raise BangerError(ErrorCode.BAD_REQUEST, f"options for {name!r}: that plugin does not act on {where}")
            if model_of(name) is None:
                raise BangerError(ErrorCode.BAD_REQUEST, f"options for {name!r}: that plugin takes no {kind} options")
        out: dict[str, BaseModel | None] = {}
        for name in self.plugins:
            model = model_of(name)
            if model is None:
                out[name] = None
                continue
            try:
                out[name] = validate_input(model, given.get(name, {}))
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg']}"
                    for e in exc.errors(include_url=False, include_input=False)[:5]
                )
                raise BangerError(ErrorCode.BAD_REQUEST, f"options for {name}: {problems}") from None
        return out

    def ctx(self, plugin: str, stage: str, reason: CleanupReason | None = None) -> StageContext:
        return StageContext(
            plugin=plugin,
            stage=stage,
            vm=self.vm,
            paths=self.rt.paths,
            settings=self.settings[plugin],
            op_id=self.op_id,
            log=logging.LoggerAdapter(logging.getLogger(f"banger.plugin.{plugin}"), {"op_id": self.op_id}),
            teardown=self.vm.teardown.setdefault(plugin, {}),
            handles=self.handles.setdefault(plugin, {}),
            persist=lambda: self._persist(self.vm),
            reason=reason,
            options=self.options.get(plugin),
            service=lambda capability: self.rt.host.service_for(plugin, capability),
            warn=lambda message: self.warn(plugin, message),
        )

    def warn(self, plugin: str, message: str) -> None:
        """A plugin's warning: the daemon log, and the running start's progress."""
        logging.getLogger(f"banger.plugin.{plugin}").warning("VM %s: %s", self.vm.name, message, extra={"op_id": self.op_id})
        if self.progress is not None:
            self.progress("warning", {"plugin": plugin, "msg": message})

    def fields_ctx(self, plugin: str) -> FieldsContext:
        """A plugin's read-only view of this VM (``vm_fields``, ``vm_port_endpoint``)."""
        return FieldsContext(
            plugin=plugin,
            vm=self.vm,
            settings=self.settings[plugin],
            options=self.options.get(plugin),
            teardown=dict(self.vm.teardown.get(plugin, {})),
            handles=dict(self.handles.get(plugin, {})),
            service=lambda capability: self.rt.host.service_for(plugin, capability),
            paths=self.rt.paths,
        )

    def egress(self) -> bool:
        """Whether the VM reaches networks beyond this host (any plugin's ``vm_egress``)."""
        return self.rt.host.vm_egress(self.plugins, self.fields_ctx) is not None

    def before_exec(
        self,
        request: ExecRequest,
        exec_options: dict[str, dict[str, Any]],
        *,
        run: bool = False,
        plan: bool = False,
        progress: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        """Every acting plugin's ``before_exec`` in order, with its validated ``vm exec``
        options; the first that raises stops the command (its error names the plugin).
        Warnings and notes go to ``progress``."""
        checked = self.validate_options(exec_options, hook="exec_options")
        self.progress = progress

        def note(plugin: str, message: str) -> None:
            if progress is not None:
                progress("note", {"plugin": plugin, "msg": message})

        def ctx(plugin: str) -> ExecContext:
            return ExecContext(
                plugin=plugin,
                vm=self.vm,
                paths=self.rt.paths,
                settings=self.settings[plugin],
                options=self.options.get(plugin),
                exec_options=checked.get(plugin),
                request=request,
                op_id=self.op_id,
                log=logging.LoggerAdapter(logging.getLogger(f"banger.plugin.{plugin}"), {"op_id": self.op_id}),
                run=run,
                plan=plan,
                service=lambda capability: self.rt.host.service_for(plugin, capability),
                warn=lambda message: self.warn(plugin, message),
                note=lambda message: note(plugin, message),
                egress=self.egress,
            )

        try:
            self.rt.host.before_exec(self.plugins, ctx)
        except BangerError as exc:
            exc.op_id = self.op_id
            raise

    def fields(self, detail: bool) -> dict[str, dict[str, Any]]:
        """Every acting plugin's ``vm_fields`` for this VM."""
        return self.rt.host.vm_fields(self.plugins, self.fields_ctx, detail)

    def port_endpoint(self, listener: Listener) -> tuple[str, str]:
        """(endpoint, plugin) for a guest listener: the first acting plugin that can reach
        it, else ``("guest:PORT", "")``."""
        found = self.rt.host.vm_port_endpoint(self.plugins, self.fields_ctx, listener)
        return found if found is not None else (f"guest:{listener.port}", "")

    def _stage(self, run: Callable[..., Any], stage: str, *args: Any) -> None:
        try:
            run(self.plugins, lambda n: self.ctx(n, stage), *args)
        except BangerError as exc:
            exc.op_id = self.op_id
            raise
        finally:
            self._persist(self.vm)

    def start(
        self,
        machine: Machine,
        boot: Callable[[Machine], Resumed | None],
        failure_reason: CleanupReason = CleanupReason.FAILED_START,
        progress: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        """prepare_host -> configure_machine -> boot -> [vm_resumed] -> post_boot;
        ``vm_resumed`` when ``boot`` says the VM continued from a snapshot instead of
        booting. On any failure run cleanup for every plugin (with ``failure_reason``:
        DELETE when the VM goes with the failure, as in a failed create) and raise the
        first error (cleanup errors attached). Plugins' warnings go to ``progress``."""
        self.started = True
        self.progress = progress
        try:
            host = self.rt.host
            self._stage(host.prepare_host, "prepare_host")
            self._stage(host.configure_machine, "configure_machine", machine)
            resumed = boot(machine)
            if isinstance(resumed, Resumed):
                self._stage(host.vm_resumed, "vm_resumed", resumed)
            self._stage(host.post_boot, "post_boot")
        except BaseException as exc:
            try:
                self.cleanup(failure_reason)
            except MultiError as cleanup_exc:
                if isinstance(exc, BangerError):
                    exc.details["cleanup_failures"] = cleanup_exc.details["failures"]
                log.error("cleanup after failed start also failed: %s", cleanup_exc, extra={"op_id": self.op_id})
            raise

    def request_guest_shutdown(self) -> str | None:
        """Ask plugins, in order, to shut the guest down; the first that did wins."""
        return self.rt.host.request_guest_shutdown(self.plugins, lambda n: self.ctx(n, "request_guest_shutdown"))

    def cleanup(self, reason: CleanupReason = CleanupReason.DELETE) -> None:
        """Every plugin's cleanup, reverse order, told ``reason``; all errors raised
        together. The core always says why; the default (a full teardown) is for
        callers that run the lifecycle once, like ``banger_core.testing``."""
        try:
            self.rt.host.cleanup(self.plugins, lambda n: self.ctx(n, "cleanup", reason))
        finally:
            self._persist(self.vm)
