"""``banger doctor``: core checks plus every plugin's registered checks."""

from __future__ import annotations

import os
import shutil
import stat
import sys
from typing import TYPE_CHECKING, Callable

from banger_core.context import CheckResult
from banger_core.errors import BangerError

if TYPE_CHECKING:  # pragma: no cover
    from banger_core.paths import Paths
    from banger_core.runtime import Runtime


def core_checks(paths: "Paths", rt: "Runtime | None", load_error: BangerError | None) -> list[CheckResult]:
    out: list[CheckResult] = []
    v = sys.version_info
    out.append(
        CheckResult.ok("python", f"{v.major}.{v.minor}.{v.micro}")
        if v >= (3, 11)
        else CheckResult.fail("python", f"{v.major}.{v.minor}: banger needs Python 3.11+")
    )
    if load_error is not None:
        out.append(CheckResult.fail("config", load_error.message))
    else:
        assert rt is not None
        detail = str(paths.config_file) if paths.config_file.exists() else f"{paths.config_file} (absent: defaults)"
        out.append(CheckResult.ok("config", detail))
        allow = rt.config.core.plugins.enable or []
        absent = [n for n in allow if n not in rt.host.records]
        if absent:
            out.append(
                CheckResult.warn("config plugins", f"{paths.config_file}: [plugins] enable names uninstalled {', '.join(absent)}")
            )
        unknown = rt.config.unknown_tables(rt.host)
        if unknown:
            out.append(
                CheckResult.warn("config tables", f"{paths.config_file}: no installed plugin named {', '.join(unknown)}; ignored")
            )
        for rec in rt.host.records.values():
            if rec.status == "broken":
                out.append(CheckResult.fail(f"plugin {rec.name}", rec.reason))
        if rt.order_error is not None:
            out.append(CheckResult.fail("plugin order", rt.order_error.message))
        else:
            out.append(CheckResult.ok("plugin order", " -> ".join(rt.order or []) or "(no plugins)"))
        for name in rt.order or []:
            try:
                rt.config.settings_for(rt.host, name)
            except BangerError as exc:
                out.append(CheckResult.fail(f"settings {name}", exc.message))
        out.append(_vm_defaults_check(rt))
        out.append(_catalog_check(rt))
    out.append(_state_check(paths))
    out.append(_runtime_dir_check(paths))
    out.append(_daemon_check(paths))
    qemu = shutil.which("qemu-system-x86_64")
    out.append(
        CheckResult.ok("qemu", qemu)
        if qemu
        else CheckResult.warn("qemu", "qemu-system-x86_64 not found: VMs cannot boot under QEMU (apt install qemu-system-x86)")
    )
    out.append(_kvm_check(paths))
    out.append(_kernel_build_check())
    return out


def _vm_defaults_check(rt: "Runtime") -> CheckResult:
    """Each VM default with where it comes from: config / auto (this host) / builtin."""
    from banger_core.config import shown_vm_defaults

    shown = shown_vm_defaults(rt.config.core.vm_defaults).items()
    parts = [f"{key.removesuffix('_mib')}={value} ({src})" for key, (value, src) in shown]
    return CheckResult.ok("vm defaults", f"{', '.join(parts)}; config {rt.config.path}")


def _catalog_check(rt: "Runtime") -> CheckResult:
    """A `[catalog] path` must name a readable catalog file."""
    from banger_core.pulls import catalog

    extra = rt.config.core.catalog.path
    try:
        cat = catalog(extra)
    except BangerError as exc:
        return CheckResult.fail("catalog", f"{rt.config.path}: {exc.message}")
    where = f"built-in + {extra}" if extra else "built-in"
    return CheckResult.ok("catalog", f"{where}: {len(cat['images'])} image(s), {len(cat['kernels'])} kernel(s)")


def _kernel_build_check() -> CheckResult:
    """Whether `kernel pull microvm-6.1` can compile here (optional: a warning at most)."""
    from banger_core.artifacts.common import ArtifactBuildError
    from banger_core.artifacts.microvm_kernel import check_build_tools

    try:
        check_build_tools()
    except ArtifactBuildError as exc:
        return CheckResult.warn("kernel build", f"microvm-6.1 cannot be compiled here: {exc}")
    return CheckResult.ok("kernel build", "gcc, make, bc, bison, flex, libelf-dev present: microvm-6.1 can be compiled")


def _kvm_check(paths: "Paths") -> CheckResult:
    """What the last KVM probe boot found (state/kvm-probe.json), else what /dev/kvm allows."""
    import json

    try:
        probe = json.loads(paths.kvm_probe.read_text())
    except (OSError, ValueError):
        probe = None
    if probe and probe.get("accel") == "kvm":
        return CheckResult.ok("kvm", probe.get("why", "KVM works"))
    if probe:
        return CheckResult.warn("kvm", f"{probe.get('why', 'KVM unusable')}: guests run under TCG (slow)")
    if os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK):
        return CheckResult.ok("kvm", "/dev/kvm is accessible (the first boot probes whether it works)")
    return CheckResult.warn("kvm", "/dev/kvm not accessible: guests run under TCG software emulation (slow)")


def _state_check(paths: "Paths") -> CheckResult:
    from banger_core.store import MIGRATIONS, Store

    if not paths.db_file.exists():
        return CheckResult.ok("state", f"{paths.db_file} (created on first use)")
    try:
        store = Store(paths.db_file)
        try:
            applied = store.applied_migrations()
        finally:
            store.close()
    except Exception as exc:
        return CheckResult.fail("state", f"{paths.db_file}: {exc}")
    latest = MIGRATIONS[-1][0]
    if applied and applied[-1] == latest:
        return CheckResult.ok("state", f"{paths.db_file} (schema {latest})")
    return CheckResult.fail("state", f"{paths.db_file}: schema at {applied[-1] if applied else 0}, want {latest}")


def _runtime_dir_check(paths: "Paths") -> CheckResult:
    d = paths.runtime_dir
    if not d.exists():
        return CheckResult.ok("runtime dir", f"{d} (created on first use)")
    st = d.stat()
    if st.st_uid != os.getuid():
        return CheckResult.fail("runtime dir", f"{d} is owned by uid {st.st_uid}, not you ({os.getuid()})")
    if stat.S_IMODE(st.st_mode) & 0o077:
        return CheckResult.fail("runtime dir", f"{d} has mode {oct(stat.S_IMODE(st.st_mode))}; want 0700")
    return CheckResult.ok("runtime dir", f"{d} (0700)")


def _daemon_check(paths: "Paths") -> CheckResult:
    from banger_core import __version__
    from banger_core.client import Client

    try:
        info = Client(paths).hello()
    except BangerError as exc:
        return CheckResult.fail("daemon", exc.message)
    if info is None:
        return CheckResult.ok("daemon", "not running (the CLI starts it on demand)")
    if info.get("version") != __version__:
        return CheckResult.warn("daemon", f"pid {info['pid']} runs {info.get('version')}; replaced on next use")
    return CheckResult.ok("daemon", f"pid {info['pid']}, {paths.socket}")


def plugin_checks(rt: "Runtime") -> list[CheckResult]:
    out: list[CheckResult] = []
    checks: list[tuple[str, str, Callable]] = []
    for name in rt.order or rt.host.enabled:

        def register(check_name: str, fn: Callable, _plugin: str = name) -> None:
            checks.append((_plugin, check_name, fn))

        try:
            rt.host.call("register_doctor_checks", name, register=register)
        except Exception as exc:
            out.append(CheckResult.fail(f"{name}", f"register_doctor_checks failed: {exc}"))
    for plugin, check_name, fn in checks:
        label = f"{plugin}: {check_name}"
        try:
            settings = rt.config.settings_for(rt.host, plugin)
        except BangerError:
            continue  # reported once, as "settings <plugin>", by core_checks
        try:
            res = fn(settings)
        except Exception as exc:
            out.append(CheckResult.fail(label, f"check raised {type(exc).__name__}: {exc}"))
            continue
        for r in res if isinstance(res, list) else [res]:
            if not isinstance(r, CheckResult):
                out.append(CheckResult.fail(label, f"check returned {r!r}, not a CheckResult"))
                continue
            out.append(CheckResult(f"{plugin}: {r.name}" if r.name != check_name else label, r.status, r.detail))
    return out
