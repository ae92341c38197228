"""``banger doctor``: the core's checks (registered by the built-in ``doctor`` plugin)
and the runner of every plugin's registered checks."""

from __future__ import annotations

import os
import shutil
import sys
from typing import TYPE_CHECKING, Callable

from banger_core.context import CheckResult
from banger_core.errors import BangerError
from banger_core.fsutil import not_owner_only

if TYPE_CHECKING:  # pragma: no cover
    from banger_core.context import CheckFn, DoctorContext
    from banger_core.paths import Paths
    from banger_core.runtime import Runtime


def register_core_checks(register: Callable[[str, "CheckFn"], None], doctor: "DoctorContext") -> None:
    """The core's checks, registered by the built-in ``doctor`` plugin."""
    paths, rt = doctor.paths, doctor.runtime
    register("python", lambda _s: _python_check())
    register("config", lambda _s: _config_checks(doctor))
    if rt is not None:
        register("vm defaults", lambda _s: _vm_defaults_check(rt))
        register("default image", lambda _s: _default_image_check(rt))
    register("state", lambda _s: _state_check(paths))
    register("runtime dir", lambda _s: _runtime_dir_check(paths))
    register("memory dir", lambda _s: _memory_dir_check(paths))
    register("daemon", lambda _s: _daemon_check(paths))
    register("qemu", lambda _s: _qemu_check())
    register("kvm", lambda _s: _kvm_check(paths))


def _python_check() -> CheckResult:
    v = sys.version_info
    if v >= (3, 11):
        return CheckResult.ok("python", f"{v.major}.{v.minor}.{v.micro}")
    return CheckResult.fail("python", f"{v.major}.{v.minor}: banger needs Python 3.11+")


def _qemu_check() -> CheckResult:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        return CheckResult.ok("qemu", qemu)
    return CheckResult.warn("qemu", "qemu-system-x86_64 not found: VMs cannot boot under QEMU (apt install qemu-system-x86)")


def _config_checks(doctor: "DoctorContext") -> list[CheckResult]:
    """The config file, the plugin set it gives (broken plugins, order) and settings."""
    paths, rt = doctor.paths, doctor.runtime
    if rt is None:
        return [CheckResult.fail("config", doctor.load_error.message if doctor.load_error else "not loaded")]
    detail = str(paths.config_file) if paths.config_file.exists() else f"{paths.config_file} (absent: defaults)"
    out = [CheckResult.ok("config", detail)]
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
    return out


def _vm_defaults_check(rt: "Runtime") -> CheckResult:
    """Each VM default with where it comes from: config / auto (this host) / builtin."""
    from banger_core.config import shown_vm_defaults

    shown = shown_vm_defaults(rt.config.core.vm_defaults).items()
    parts = [f"{key.removesuffix('_mib')}={value} ({src})" for key, (value, src) in shown]
    return CheckResult.ok("vm defaults", f"{', '.join(parts)}; config {rt.config.path}")


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


def _default_image_check(rt: "Runtime") -> CheckResult:
    """The image `vm create` uses without --image is here, or a source provides it."""
    from banger_core.config import resolve_vm_defaults
    from banger_core.store import Store

    name = resolve_vm_defaults(rt.config.core.vm_defaults)["image"][0]
    if rt.paths.db_file.exists():
        try:
            store = Store(rt.paths.db_file)
            try:
                if store.find_image(name) is not None:
                    return CheckResult.ok("default image", f"{name}: pulled")
            finally:
                store.close()
        except Exception as exc:
            return CheckResult.fail("default image", f"{name}: the state store cannot say: {exc}")
    sources, _broke = rt.host.register_sources(rt)
    for plugin, src in sources:
        try:
            if "image" in src.kinds and src.claims("image", name):
                return CheckResult.ok("default image", f"{name}: the source {src.name} ({plugin}) provides it on first use")
        except Exception:
            continue
    return CheckResult.fail("default image", f"{name}: not pulled, and no enabled source provides it: `vm create` needs --image")


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
    if why := not_owner_only(d):
        return CheckResult.fail("runtime dir", f"{d} {why}")
    return CheckResult.ok("runtime dir", f"{d} (0700)")


def _memory_dir_check(paths: "Paths") -> CheckResult:
    """Where running QEMU guests keep their RAM (``QemuDriver``): ours alone, on a
    tmpfs with room (a VM is refused at start when its memory does not fit)."""
    d = paths.memory_dir
    probe = d if d.exists() else d.parent
    try:
        fs = os.statvfs(probe)
    except OSError as exc:
        return CheckResult.fail("memory dir", f"{d}: {exc.strerror} (set BANGER_MEMORY_DIR)")
    free = f"{fs.f_bavail * fs.f_frsize / 2**30:.1f} GiB free"
    if (d.exists() or d.is_symlink()) and (why := not_owner_only(d)):
        return CheckResult.fail("memory dir", f"{d} {why}: QEMU VMs will not start")
    with open("/proc/mounts") as fh:
        mounts = [ln.split() for ln in fh]
    best = max(
        (m for m in mounts if str(probe).startswith(m[1].rstrip("/") + "/") or str(probe) == m[1]), key=lambda m: len(m[1])
    )
    if best[2] != "tmpfs":
        return CheckResult.warn("memory dir", f"{d} is on {best[2]}, not a tmpfs: guest RAM is written back to disk ({free})")
    return CheckResult.ok("memory dir", f"{d} (tmpfs, {free}{'' if d.exists() else '; created on first use'})")


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


def run_checks(doctor: "DoctorContext") -> list[CheckResult]:
    """Every check every plugin registered (built-ins first), run in turn.

    Without a runtime (the config did not load) only the built-ins' checks run. A
    built-in's results keep their own names; a plugin's are prefixed with its name.
    """
    from banger_core.plugins import PluginHost

    rt = doctor.runtime
    if rt is not None:
        host = rt.host
        checks = host.register_doctor_checks(doctor)
        rt.resolve()  # a plugin whose registration broke is out of the order now
    else:
        host = PluginHost()
        host.load_builtins()
        checks = host.register_doctor_checks(doctor)
    out: list[CheckResult] = []
    for plugin, check_name, fn in checks:
        builtin = host.records[plugin].builtin
        label = check_name if builtin else f"{plugin}: {check_name}"
        settings = None
        if rt is not None and not builtin:
            try:
                settings = rt.config.settings_for(rt.host, plugin)
            except BangerError:
                continue  # reported once, as "settings <plugin>", by the config check
        try:
            res = fn(settings)
        except Exception as exc:
            out.append(CheckResult.fail(label, f"check raised {type(exc).__name__}: {exc}"))
            continue
        for r in res if isinstance(res, list) else [res]:
            if not isinstance(r, CheckResult):
                out.append(CheckResult.fail(label, f"check returned {r!r}, not a CheckResult"))
            elif builtin:
                out.append(r)
            else:
                out.append(CheckResult(f"{plugin}: {r.name}" if r.name != check_name else label, r.status, r.detail))
    return out
