"""What the core hands to plugin hooks. Plain dataclasses: cheap, typed, documented."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from pydantic import BaseModel

    from banger_core.models import VM
    from banger_core.errors import BangerError
    from banger_core.paths import Paths
    from banger_core.runtime import Runtime
    from banger_core.store import Store


@dataclass
class StageContext:
    """Passed to ``prepare_host``, ``configure_machine``, ``post_boot`` and ``cleanup``.

    ``settings`` is this plugin's validated config model (user config.toml merged with
    the VM's project banger.toml), or ``None`` when the plugin declares no model.
    ``teardown`` is this plugin's slice of the VM's durable teardown record: put there
    whatever ``cleanup`` needs to undo ``prepare_host`` even after a daemon crash and a
    lost handles file. ``handles`` is this plugin's slice of the transient handles.
    """

    plugin: str
    stage: str
    vm: "VM"
    paths: "Paths"
    settings: "BaseModel | None"
    op_id: str
    log: logging.Logger | logging.LoggerAdapter
    teardown: dict[str, Any] = field(default_factory=dict)
    handles: dict[str, Any] = field(default_factory=dict)
    #: Persist ``teardown`` now (call it after recording and before creating).
    persist: Callable[[], None] = lambda: None


@dataclass
class ReconcileContext:
    """Passed to ``reconcile`` once at daemon start, before the socket accepts requests."""

    plugin: str
    paths: "Paths"
    store: "Store"
    settings: "BaseModel | None"
    log: logging.Logger | logging.LoggerAdapter


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
