"""What the core hands to plugin hooks. Plain dataclasses: cheap, typed, documented."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from pydantic import BaseModel

    from banger_core.models import VM
    from banger_core.errors import BangerError
    from banger_core.paths import Paths
    from banger_core.runtime import Runtime
    from banger_core.store import Store


class CleanupReason(str, Enum):
    """Why ``cleanup`` runs (``StageContext.reason``). Added in 0.2.

    Only ``DELETE`` means the VM is gone for good: release what outlives a boot (an
    address lease, a work disk) then, and only what belongs to the running VMM (TAP,
    NAT rules, DNS record) for the others.
    """

    #: ``vm stop`` (graceful or ``--force``), ``vm kill``, the stop half of ``vm restart``
    STOP = "stop"
    #: ``vm start``/``vm restart`` failed (in a plugin, the VMM, or before either ran);
    #: the VM stays, in state ``error``, and may be started again
    FAILED_START = "failed_start"
    #: ``vm delete`` (``--force`` on a running VM included), ``vm prune``, and a
    #: ``vm create`` that failed (the VM is removed with it); runs once per VM
    DELETE = "delete"
    #: the daemon found the VMM gone without a banger operation stopping it (guest
    #: powered off, VMM crashed or killed: noticed by the monitor, by the next
    #: operation on the VM, or at daemon start), or leftovers of a VM cut off by a
    #: daemon crash; the VM stays, stopped (or ``error``)
    RECONCILE = "reconcile"


@dataclass
class StageContext:
    """Passed to ``prepare_host``, ``configure_machine``, ``post_boot`` and ``cleanup``.

    ``settings`` is this plugin's validated config model (user config.toml merged with
    the VM's project banger.toml), or ``None`` when the plugin declares no model.
    ``teardown`` is this plugin's slice of the VM's durable teardown record: put there
    whatever ``cleanup`` needs to undo ``prepare_host`` even after a daemon crash and a
    lost handles file. ``handles`` is this plugin's slice of the transient handles.
    ``reason`` says why ``cleanup`` runs (``None`` in the setup stages). ``warn`` tells
    the user something that did not stop the VM.
    """

    plugin: str
    stage: str
    vm: "VM"
    paths: "Paths"
    settings: "BaseModel | None"
    op_id: str
    log: "logging.Logger | logging.LoggerAdapter[logging.Logger]"
    teardown: dict[str, Any] = field(default_factory=dict)
    handles: dict[str, Any] = field(default_factory=dict)
    #: Persist ``teardown`` now (call it after recording and before creating).
    persist: Callable[[], None] = lambda: None
    #: Why ``cleanup`` runs; ``None`` for every other stage. Added in 0.2.
    reason: CleanupReason | None = None
    #: This plugin's per-VM options (its ``vm_options`` model, validated), or None
    #: when it declares none. Added in 0.2.
    options: "BaseModel | None" = None
    #: ``service(capability)``: the daemon-side service another plugin registered for
    #: a capability this plugin ``requires`` (see ``register_services``). Added in 0.2.
    service: Callable[[str], Any] = field(default=lambda capability: _no_services(capability))
    #: ``warn(message)``: something the user should know that did not stop the VM (a
    #: file it could not copy): a warning in the daemon log (with the op id and the VM's
    #: name) and, while a start runs (``vm create``/``start``/``restore``, warm ``vm
    #: run``), a line of that command's progress. Added in 0.7.
    warn: Callable[[str], None] = field(default=lambda message: None)


@dataclass
class ExecRequest:
    """The command a ``before_exec`` hook may adjust (``ExecContext.request``). Added in 0.8."""

    #: the command and its arguments (empty: ``vm run -d``, nothing runs yet)
    argv: list[str]
    #: the directory it runs in; None: the guest's default (the user's home). A plugin
    #: may set it when None (the first to set it wins; a user's ``--workdir`` is kept)
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None


@dataclass
class ExecContext:
    """Passed to ``before_exec``: a command is about to run in ``vm``. Added in 0.8.

    ``run`` is True for the command of ``vm run`` (its VM was made for it);
    ``plan`` is True when that VM does not exist yet (``vm run`` checks before it makes
    one, and ``vm run --dry-run`` stops there): describe with ``note``, refuse by
    raising, change nothing. ``exec_options`` is this plugin's ``exec_options`` model
    (validated) or None. ``egress()`` says whether the VM reaches networks beyond this
    host (any plugin's ``vm_egress``).
    """

    plugin: str
    vm: "VM"
    paths: "Paths"
    settings: "BaseModel | None"
    options: "BaseModel | None"
    exec_options: "BaseModel | None"
    request: ExecRequest
    op_id: str
    log: "logging.Logger | logging.LoggerAdapter[logging.Logger]"
    run: bool = False
    plan: bool = False
    service: Callable[[str], Any] = field(default=lambda capability: _no_services(capability))
    #: as ``StageContext.warn``: the daemon log and a warning line of the command's output
    warn: Callable[[str], None] = field(default=lambda message: None)
    #: something the user asked to see (what a plan would do): a line of the command's output
    note: Callable[[str], None] = field(default=lambda message: None)
    egress: Callable[[], bool] = field(default=lambda: False)


@dataclass
class ReconcileContext:
    """Passed to ``reconcile`` once at daemon start, before the socket accepts requests."""

    plugin: str
    paths: "Paths"
    store: "Store"
    settings: "BaseModel | None"
    log: "logging.Logger | logging.LoggerAdapter[logging.Logger]"
    #: as ``StageContext.service``. Added in 0.2.
    service: Callable[[str], Any] = field(default=lambda capability: _no_services(capability))


@dataclass
class FieldsContext:
    """Passed to ``vm_fields`` and ``vm_port_endpoint``: the VM and this plugin's view
    of it (read-only)."""

    plugin: str
    vm: "VM"
    settings: "BaseModel | None"
    options: "BaseModel | None"
    teardown: dict[str, Any]
    handles: dict[str, Any]
    #: as ``StageContext.service`` (e.g. a DNS plugin asks its own service for a VM's
    #: record). Keep calls cheap: these hooks run for every VM of every ``vm list``.
    #: Added in 0.5.
    service: Callable[[str], Any] = field(default=lambda capability: _no_services(capability))
    #: every path banger uses (e.g. ``paths.vm_dir(vm.id)`` for a file the plugin keeps
    #: there). Added in 0.8.
    paths: "Paths | None" = None


def _no_services(capability: str) -> Any:
    from banger_core.errors import BangerError, ErrorCode

    raise BangerError(ErrorCode.PLUGIN, f"no service for {capability!r}: services exist in the daemon only")


@dataclass
class DoctorContext:
    """Passed to ``register_doctor_checks`` as ``doctor``: what ``banger doctor`` knows.

    ``runtime`` is None when the config could not be loaded (``load_error`` says why);
    only the built-in plugins' checks run then.
    """

    paths: "Paths"
    runtime: "Runtime | None"
    load_error: "BangerError | None" = None


@dataclass
class CheckResult:
    """One line of ``banger doctor``."""

    name: str
    status: str  # "PASS" | "WARN" | "FAIL"
    detail: str = ""

    @classmethod
    def ok(cls, name: str, detail: str = "") -> "CheckResult":
        return cls(name, "PASS", detail)

    @classmethod
    def warn(cls, name: str, detail: str) -> "CheckResult":
        return cls(name, "WARN", detail)

    @classmethod
    def fail(cls, name: str, detail: str) -> "CheckResult":
        return cls(name, "FAIL", detail)


CheckFn = Callable[[Any], "CheckResult | list[CheckResult]"]


def check_binaries(name: str, *binaries: str, package: str = "") -> CheckResult:
    """PASS when every binary is on PATH, else FAIL naming the missing ones."""
    import shutil

    missing = [b for b in binaries if shutil.which(b) is None]
    if not missing:
        return CheckResult.ok(name, ", ".join(binaries))
    hint = f" (apt install {package})" if package else ""
    return CheckResult.fail(name, f"not found on PATH: {', '.join(missing)}{hint}")
