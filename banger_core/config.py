"""The one config loader: user ``config.toml`` and per-project ``banger.toml``.

``config.toml`` (in the config dir)::

    [plugins]
    enable = ["dns", "nat"]   # optional allow-list: only these plugins load
    disable = ["filesync"]    # never load these

    [daemon]
    log_level = "info"

    [<plugin>]                # one table per plugin, validated by its own model
    key = "value"

    [[file_sync]]             # a top-level key a plugin claims (its ``config_keys``):
    host = "~/.aws"           # an array or a table, part of that plugin's settings

A project's ``banger.toml`` (in the directory a VM is made from) has the same
``[plugins]`` table, applied on top for that project's VMs only, plugin tables whose
keys override the user's, and claimed keys: a claimed array's items come after the
user's, a claimed table's keys override the user's. It may also have a
``[vm_defaults]`` table, the same keys and checks as the user's, so a repository says
what its VMs get::

    [vm_defaults]             # only the keys given here override the user's
    image = "debian-bookworm"
    kernel = "microvm-6.1"
    vcpus = 2
    memory_mib = "2G"
    root_size_mib = "8G"

For each VM spec value, a flag (an RPC param) wins, then the project's
``[vm_defaults]``, then the user's, then what is derived from the host or built in
(``resolve_vm_defaults``).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, ValidationError, ValidationInfo, model_validator

from banger_core.builtin import ESSENTIAL
from banger_core.errors import BangerError, ErrorCode
from banger_core.models import Input, SizeMiB, validate_input
from banger_core.paths import PROJECT_FILE

if TYPE_CHECKING:  # pragma: no cover
    from banger_core.plugins import PluginHost


class _Table(Input):
    """A config table: strict (no "30" for 30, no true for 1), unknown keys refused."""


class PluginsTable(_Table):
    enable: list[str] | None = Field(default=None, description="allow-list of plugins")
    disable: list[str] = Field(default_factory=list, description="block-list of plugins")

    @model_validator(mode="after")
    def _no_overlap(self) -> "PluginsTable":
        both = sorted(set(self.enable or ()) & set(self.disable))
        if both:
            raise ValueError(f"plugin(s) both enabled and disabled: {', '.join(both)}")
        essential = sorted(set(self.disable) & ESSENTIAL)
        if essential:
            from banger_core.plugins import essential_refusal

            raise ValueError(essential_refusal(essential))
        return self


class DaemonTable(_Table):
    log_level: Literal["debug", "info", "warning", "error"] = "info"


DEFAULT_IMAGE = "debian-bookworm"  # what `vm create` boots when nothing says otherwise


class VMDefaultsTable(_Table):
    """Unset values are derived from the host (see ``host_defaults``)."""

    vcpus: int | None = Field(default=None, gt=0)
    memory_mib: SizeMiB | None = Field(default=None, description='MiB, or a size like "2G"')
    root_size_mib: SizeMiB = Field(default=4096, description='MiB, or a size like "8G"')
    image: str | None = None
    kernel: str | None = None  # instead of each image's own kernel, e.g. microvm-6.1


class VMMTable(_Table):
    driver: Literal["auto", "qemu", "firecracker"] = "auto"
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    qemu_binary: str = "qemu-system-x86_64"
    qemu_machine: Literal["auto", "pc", "microvm", "q35"] = "auto"
    firecracker_binary: str = "firecracker"
    kvm_probe_timeout_s: float = Field(default=10.0, gt=0)
    tcg_tb_size_mib: int = Field(
        default=0,
        ge=0,
        description="QEMU under TCG: the translation cache each VM may grow to, in MiB (0: QEMU's default, up to 1 GiB)",
    )
    stop_timeout_s: float = Field(default=30.0, gt=0, description="graceful stop, per phase")
    disk_strategy: Literal["auto", "reflink", "qcow2", "sparse"] = "auto"
    boot_args: list[str] = Field(default_factory=list, description="extra kernel arguments for every VM")


class CatalogTable(_Table):
    path: str | None = Field(
        default=None, description="a catalog.json naming image and kernel bundles (asked before any plugin's source)"
    )


DEFAULT_MAX_ROOTFS_MIB = 64 * 1024  # 64 GiB


class ImagesTable(_Table):
    max_rootfs_size: SizeMiB = Field(
        default=DEFAULT_MAX_ROOTFS_MIB, description='largest root filesystem banger accepts from any source (MiB, or "64G")'
    )


class SnapshotsTable(_Table):
    templates_max: int = Field(
        default=4, ge=0, description="warm-start templates kept (least recently used go first; 0: no warm starts)"
    )


class CoreConfig(_Table):
    plugins: PluginsTable = Field(default_factory=PluginsTable)
    daemon: DaemonTable = Field(default_factory=DaemonTable)
    vm_defaults: VMDefaultsTable = Field(default_factory=VMDefaultsTable)
    vmm: VMMTable = Field(default_factory=VMMTable)
    catalog: CatalogTable = Field(default_factory=CatalogTable)
    images: ImagesTable = Field(default_factory=ImagesTable)
    snapshots: SnapshotsTable = Field(default_factory=SnapshotsTable)


CORE_TABLES = frozenset(CoreConfig.model_fields)

Provenance = Literal["project", "config", "auto", "builtin"]


def resolve_vm_defaults(d: VMDefaultsTable, project: VMDefaultsTable | None = None) -> dict[str, tuple[Any, Provenance]]:
    """What `vm create` uses for each spec value nobody gave, and where it comes from:
    the project's banger.toml (``project``: its ``[vm_defaults]``, when the VM is made
    from one), the user's config, derived from this host ("auto"), or banger's built-in
    default. Only the keys a table sets count (``model_fields_set``): a project that
    sets memory_mib alone keeps the user's image. The one resolution of VM defaults:
    create, `vm create --help` and doctor use it."""
    from banger_core import host

    def pick(key: str, auto: Any | None = None, builtin: Any | None = None) -> tuple[Any, Provenance]:
        layers: tuple[tuple[VMDefaultsTable | None, Provenance], ...] = ((project, "project"), (d, "config"))
        for table, src in layers:
            if table is not None and key in table.model_fields_set and getattr(table, key) is not None:
                return getattr(table, key), src
        if auto is not None:
            return auto, "auto"
        return (builtin if builtin is not None else VMDefaultsTable.model_fields[key].default), "builtin"

    return {
        "vcpus": pick("vcpus", host.default_vcpus()),
        "memory_mib": pick("memory_mib", host.default_memory_mib()),
        "root_size_mib": pick("root_size_mib"),
        "image": pick("image", builtin=DEFAULT_IMAGE),
        "kernel": pick("kernel"),  # None: each image's own kernel
    }


def shown_vm_defaults(d: VMDefaultsTable, project: VMDefaultsTable | None = None) -> dict[str, tuple[str, Provenance]]:
    """``resolve_vm_defaults`` as users read it ("3013 MiB", "the image's own"): what
    `vm create --help` and `doctor` print."""
    out: dict[str, tuple[str, Provenance]] = {}
    for key, (value, src) in resolve_vm_defaults(d, project).items():
        if value is None:
            out[key] = ("the image's own", src)
        else:
            out[key] = (f"{value} MiB" if key.endswith("_mib") else str(value), src)
    return out


# Keys of the original (Go) banger's flat config.toml, and what became of each.
_RENAMED = "renamed to"
LEGACY_KEYS: dict[str, str] = {
    "vcpu": f"{_RENAMED} [vm_defaults] vcpus",
    "memory_mib": f"{_RENAMED} [vm_defaults] memory_mib",
    "disk_size": f'{_RENAMED} [workdisk] size_mib (the work disk that holds /root; MiB, or a size like "8G")',
    "default_image_name": f"{_RENAMED} [vm_defaults] image",
    "firecracker_bin": f"{_RENAMED} [vmm] firecracker_binary",
    "system_overlay_size": f'{_RENAMED} [vm_defaults] root_size_mib (the root filesystem; MiB, or a size like "8G")',
    # banger's own before 0.7: it sized the root disk, and `--disk-size` now sizes the work disk
    "disk_size_mib": (
        f"{_RENAMED} root_size_mib for the root filesystem (0.7); the work disk that holds /root is"
        " sized by [workdisk] size_mib (or --disk-size)"
    ),
    "stats_poll_interval": ("not supported: banger polls no VM stats; the daemon notices a VMM exiting by itself"),
}


#: tables of plugins that were renamed: their settings now live under the new name
RENAMED_TABLES: dict[str, str] = {"vsock": "agent"}


def _legacy_key_errors(path: Path, raw: dict[str, Any]) -> list[str]:
    """Keys of the original tool's config, at the top level or inside a core table, and
    tables of renamed plugins."""
    found = [
        f"{path}: [{old}] is now [{new}] (the {old} plugin was renamed {new})"
        for old, new in RENAMED_TABLES.items()
        if isinstance(raw.get(old), dict)
    ]
    for key, value in raw.items():
        if key in LEGACY_KEYS and not isinstance(value, dict):
            found.append(f"{path}: {key}: {LEGACY_KEYS[key]}")
    for table in CORE_TABLES:
        sub = raw.get(table)
        if isinstance(sub, dict):
            for key in sub:
                if key in LEGACY_KEYS and key not in CoreConfig.model_fields[table].annotation.model_fields:  # type: ignore[union-attr]
                    found.append(f"{path}: [{table}] {key}: {LEGACY_KEYS[key]}")
    return found


def format_validation_error(path: Path, table: str | None, exc: ValidationError) -> str:
    """``FILE: [table] key: what was expected (got …)`` — one line per problem."""
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        tbl: str | None = table
        if table is None and loc:
            tbl, loc = loc[0], loc[1:]
        key = ".".join(loc) if loc else "(table)"
        msg = err.get("msg", "invalid")
        where = f"[{tbl}] {key}" if tbl else key
        got = ""
        if err.get("type") not in ("missing",) and "input" in err and not isinstance(err["input"], dict):
            got = f" (got {err['input']!r})"
        lines.append(f"{path}: {where}: {msg}{got}")
    return "; ".join(lines)


def _clip(text: str, keep: int = 200) -> str:
    return text if len(text) <= keep else f"{text[:keep]}… ({len(text)} characters)"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise BangerError(ErrorCode.CONFIG, f"{path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise BangerError(ErrorCode.CONFIG, f"{path}: cannot read: {exc.strerror}") from None


def _with_requirements(host: "PluginHost", active: list[str], blocked: set[str]) -> list[str]:
    """``active`` plus, transitively, a provider of each requirement none of them
    provides (an opt-in plugin a project turned on brings what it needs); what cannot be
    brought in is left for ``PluginHost.order`` to name."""
    out = list(active)
    todo = list(active)
    while todo:
        for req in host.records[todo.pop()].requires:
            if host.providers_of(req, out):
                continue
            candidates = [n for n in host.providers_of(req) if n not in blocked]
            if candidates:
                out.append(candidates[0])
                todo.append(candidates[0])
    return out


def _plugin_values(
    path: Path, raw: dict[str, Any], core_tables: frozenset[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, list[Any]]]:
    """The top-level keys that are not the core's: (tables, arrays). A table is a
    plugin's ``[name]`` or a table some plugin claims; an array must be claimed
    (``check_claims``, once the plugins are known); anything else is refused here."""
    tables: dict[str, dict[str, Any]] = {}
    arrays: dict[str, list[Any]] = {}
    for key, value in raw.items():
        if key in core_tables:
            continue
        if isinstance(value, dict):
            tables[key] = value
        elif isinstance(value, list):
            arrays[key] = value
        else:
            raise BangerError(ErrorCode.CONFIG, f"{path}: {key}: expected a table [{key}], got {type(value).__name__}")
    return tables, arrays


@dataclass(frozen=True)
class SettingsSource:
    """Where the values of a plugin's settings come from, for the plugin's validators
    (added in 0.7). The core validates a plugin's settings twice: the user's
    config.toml alone (``project_file`` None), then merged with the project's
    banger.toml; each time pydantic's validation context holds this under
    ``"banger"``: read it with ``SettingsSource.of(info)`` in a validator that takes
    ``info: ValidationInfo``. A project's items are the ones a plugin may want to trust
    less than the user's own (a cloned repository wrote them)."""

    user_file: Path
    project_file: Path | None = None
    #: top-level keys of the plugin's settings the project's banger.toml set
    project_keys: frozenset[str] = frozenset()
    #: for each claimed array: how many of its items are the user's (the project's follow)
    user_items: Mapping[str, int] = field(default_factory=dict)

    @property
    def project_dir(self) -> Path | None:
        """The project's directory (where its banger.toml is), when one is merged in."""
        return self.project_file.parent if self.project_file is not None else None

    def from_project(self, key: str, index: int | None = None) -> bool:
        """Whether the value of ``key`` came from the project's banger.toml; for a
        claimed array, whether its item ``index`` did."""
        if self.project_file is None or key not in self.project_keys:
            return False
        return index is None or index >= self.user_items.get(key, 0)

    @staticmethod
    def of(info: ValidationInfo) -> "SettingsSource | None":
        """The source of the values being validated; None when the core is not the one
        validating (a plugin's own unit test): treat the values as the user's."""
        ctx = info.context
        source = ctx.get("banger") if isinstance(ctx, dict) else None
        return source if isinstance(source, SettingsSource) else None


def _loc_text(loc: list[Any]) -> str:
    """``file_sync[2].mode`` for the location ("file_sync", 2, "mode")."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def format_settings_error(
    plugin: str, exc: ValidationError, claimed: tuple[str, ...], user_file: Path, project: "SettingsSource | None" = None
) -> str:
    """A plugin's settings errors, one per line as ``format_validation_error`` writes
    them, but each naming the file the bad value is in: ``FILE: [plugin] key: ...`` for
    its own table, ``FILE: file_sync[2].mode: ...`` for a claimed key, the index counted
    in that file's own array (from 0)."""
    lines = []
    for err in exc.errors():
        loc = list(err.get("loc", ()))
        where_file = user_file
        if project is not None and project.project_file is not None:
            # merged: the user's values alone were valid, so the project's are at fault,
            # unless the error is in one of the user's items of a claimed array
            where_file = project.project_file
            if len(loc) > 1 and loc[0] in claimed and isinstance(loc[1], int):
                if project.from_project(str(loc[0]), loc[1]):
                    loc[1] -= project.user_items.get(str(loc[0]), 0)
                else:
                    where_file = user_file
        if loc and loc[0] in claimed:
            where = _loc_text(loc)
        else:
            where = f"[{plugin}] " + (".".join(str(p) for p in loc) if loc else "(table)")
        got = ""
        if err.get("type") not in ("missing",) and "input" in err and not isinstance(err["input"], dict):
            got = f" (got {err['input']!r})"
        lines.append(f"{where_file}: {where}: {err.get('msg', 'invalid')}{got}")
    return "; ".join(lines)


def _claimed_values(
    path: Path, plugin: str, tables: dict[str, dict[str, Any]], arrays: dict[str, list[Any]], claimed: tuple[str, ...]
) -> dict[str, Any]:
    """A plugin's values in one file: its ``[plugin]`` table and the claimed keys."""
    own = dict(tables.get(plugin, {}))
    for key in claimed:
        if key in own:
            raise BangerError(
                ErrorCode.CONFIG, f"{path}: [{plugin}] {key}: {key} is a top-level key of its own, not a key of [{plugin}]"
            )
        if key in arrays:
            own[key] = arrays[key]
        elif key in tables:
            own[key] = tables[key]
    return own


def _merge(user: dict[str, Any], proj: dict[str, Any], claimed: tuple[str, ...]) -> dict[str, Any]:
    """The project's values over the user's: a key replaces the user's, except a
    claimed array (the project's items follow the user's) and a claimed table (merged
    key by key, as the plugin's own table is)."""
    out = dict(user)
    for key, value in proj.items():
        mine = user.get(key)
        if key in claimed and isinstance(mine, list) and isinstance(value, list):
            out[key] = mine + value
        elif key in claimed and isinstance(mine, dict) and isinstance(value, dict):
            out[key] = {**mine, **value}
        else:
            out[key] = value
    return out


def _check_claims(host: "PluginHost", path: Path, arrays: dict[str, list[Any]]) -> None:
    """Every top-level array is claimed by an enabled plugin, else one error naming
    each such key and why nobody claims it."""
    unclaimed = [k for k in arrays if host.claimant(k) is None]
    if unclaimed:
        raise BangerError(
            ErrorCode.CONFIG,
            "; ".join(
                f"{path}: {key}: not a banger setting: {host.why_unclaimed(key)} "
                f"(a plugin's settings go in its table [name], or in a top-level key it claims)"
                for key in unclaimed
            ),
        )


#: the core's tables a project's banger.toml may have (the rest are plugins')
PROJECT_TABLES = frozenset({"plugins", "vm_defaults"})


@dataclass
class ProjectConfig:
    """A project's ``banger.toml``."""

    path: Path
    plugins: PluginsTable
    tables: dict[str, dict[str, Any]]
    arrays: dict[str, list[Any]] = field(default_factory=dict)
    #: its ``[vm_defaults]``: only the keys it sets (``model_fields_set``) override the user's
    vm_defaults: VMDefaultsTable = field(default_factory=VMDefaultsTable)

    @classmethod
    def load(cls, directory: Path) -> "ProjectConfig | None":
        path = directory / PROJECT_FILE
        try:
            if not path.is_file():
                return None
        except OSError as exc:  # a name too long, a directory we may not search
            raise BangerError(ErrorCode.CONFIG, f"{_clip(str(path))}: cannot read: {exc.strerror}") from None
        raw = _read_toml(path)
        try:
            plugins = PluginsTable.model_validate(raw.get("plugins", {}))
        except ValidationError as exc:
            raise BangerError(ErrorCode.CONFIG, format_validation_error(path, "plugins", exc)) from None
        try:  # the keys it leaves out stay unset (model_fields_set): the user's apply
            vm_defaults = VMDefaultsTable.model_validate(raw.get("vm_defaults", {}))
        except ValidationError as exc:
            raise BangerError(ErrorCode.CONFIG, format_validation_error(path, "vm_defaults", exc)) from None
        tables, arrays = _plugin_values(path, raw, PROJECT_TABLES)
        return cls(path=path, plugins=plugins, tables=tables, arrays=arrays, vm_defaults=vm_defaults)


@dataclass
class Config:
    path: Path
    core: CoreConfig = field(default_factory=CoreConfig)
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: top-level arrays: each must be claimed by a plugin (``check_claims``)
    arrays: dict[str, list[Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "Config":
        raw = _read_toml(path)
        if legacy := _legacy_key_errors(path, raw):
            raise BangerError(ErrorCode.CONFIG, "; ".join(legacy))
        core_raw = {k: v for k, v in raw.items() if k in CORE_TABLES}
        try:
            core = CoreConfig.model_validate(core_raw)
        except ValidationError as exc:
            raise BangerError(ErrorCode.CONFIG, format_validation_error(path, None, exc)) from None
        tables, arrays = _plugin_values(path, raw, CORE_TABLES)
        return cls(path=path, core=core, tables=tables, arrays=arrays)

    def check_claims(self, host: "PluginHost") -> None:
        """Refuse a top-level array no enabled plugin claims (once plugins are loaded)."""
        _check_claims(host, self.path, self.arrays)

    # --- plugin enablement --------------------------------------------------------
    def globally_disabled(self, installed: list[str]) -> set[str]:
        """Plugins that must not even be loaded, per this config."""
        out = set(self.core.plugins.disable)
        if self.core.plugins.enable is not None:
            out |= {n for n in installed if n not in self.core.plugins.enable}
        return out

    def enabled_for(self, host: "PluginHost", project: ProjectConfig | None) -> list[str]:
        """The dependency-ordered plugins that act on VMs made from ``project``.

        Every enabled plugin, except opt-in ones (``opt_in = True``) the user's
        ``[plugins] enable`` does not name; then a project's ``disable`` takes plugins
        out and its ``enable`` turns plugins on (opt-in ones included) for its VMs; then
        whatever those require is brought in, unless the project disabled it (an error
        names it) or it is unavailable (disabled, broken, not installed: named too).
        """
        allow = self.core.plugins.enable
        active = [n for n in host.enabled if not host.records[n].opt_in or (allow is not None and n in allow)]
        blocked: set[str] = set()
        excluded_by = ""
        if project is not None:
            for key in ("enable", "disable"):
                for n in getattr(project.plugins, key) or ():
                    if n not in host.records:
                        raise BangerError(
                            ErrorCode.CONFIG,
                            f"{project.path}: [plugins] {key}: plugin {n!r} is not installed",
                        )
                    if key == "enable" and host.records[n].status != "enabled":
                        raise BangerError(
                            ErrorCode.CONFIG,
                            f"{project.path}: [plugins] enable: plugin {n!r} is "
                            f"{host.records[n].status} for this user ({host.records[n].reason})",
                        )
            _check_claims(host, project.path, project.arrays)
            blocked = set(project.plugins.disable)
            active = [n for n in active if n not in blocked]
            active += [n for n in project.plugins.enable or () if n not in active]
            excluded_by = str(project.path)
        return host.order(_with_requirements(host, active, blocked), excluded_by=excluded_by)

    # --- plugin settings ----------------------------------------------------------
    def settings_for(self, host: "PluginHost", plugin: str, project: ProjectConfig | None = None) -> BaseModel | None:
        """The plugin's settings: its ``[plugin]`` table and the top-level keys it
        claims (``config_keys``), from the user's config.toml, then merged with the
        project's banger.toml. Each is validated strictly, with a ``SettingsSource`` as
        the validation context; an error names the file the bad value is in."""
        model = host.config_model(plugin)
        rec = host.records.get(plugin)
        claimed = rec.config_keys if rec is not None else ()
        user = _claimed_values(self.path, plugin, self.tables, self.arrays, claimed)
        proj = _claimed_values(project.path, plugin, project.tables, project.arrays, claimed) if project else {}
        if model is None:
            if user or proj:
                src = project.path if project is not None and proj else self.path
                raise BangerError(ErrorCode.CONFIG, f"{src}: [{plugin}]: plugin {plugin!r} takes no settings")
            return None
        absent = [k for k in claimed if k not in model.model_fields]
        if absent:
            raise BangerError(
                ErrorCode.PLUGIN,
                f"plugin {plugin!r} claims the config key(s) {', '.join(absent)} but its settings have no such field",
            )
        # strict=True here makes every plugin's model strict, third parties' included.
        mine = SettingsSource(user_file=self.path)
        try:
            settings: BaseModel = validate_input(model, user, context={"banger": mine})
        except ValidationError as exc:
            raise BangerError(ErrorCode.CONFIG, format_settings_error(plugin, exc, claimed, self.path)) from None
        if not proj:
            return settings
        assert project is not None
        both = SettingsSource(
            user_file=self.path,
            project_file=project.path,
            project_keys=frozenset(proj),
            user_items={k: len(user[k]) for k in claimed if isinstance(user.get(k), list)},
        )
        try:
            settings = validate_input(model, _merge(user, proj, claimed), context={"banger": both})
        except ValidationError as exc:  # the project's values are at fault (the user's alone were valid)
            raise BangerError(ErrorCode.CONFIG, format_settings_error(plugin, exc, claimed, project.path, both)) from None
        return settings

    def unknown_tables(self, host: "PluginHost") -> list[str]:
        return sorted(t for t in self.tables if t not in host.records and host.claimant(t) is None)
