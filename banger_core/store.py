"""SQLite state (durable intent) through sqlite-utils, with numbered migrations.

Each migration runs once, in a transaction, and is recorded in ``migrations``;
running them again is a no-op. Add a migration by appending to ``MIGRATIONS`` —
never edit one that has shipped.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import sqlite_utils

from banger_core.errors import BangerError, ErrorCode
from banger_core.models import VM, Image, Kernel, Snapshot, utcnow


Artifact = TypeVar("Artifact", Image, Kernel)


def _m001_initial(db: sqlite_utils.Database) -> None:
    db.table("vms").create(
        {
            "id": str,
            "name": str,
            "state": str,
            "image": str,
            "spec": str,
            "driver": str,
            "guest_ip": str,
            "project_dir": str,
            "teardown": str,
            "created_at": str,
            "updated_at": str,
        },
        pk="id",
        not_null={"name", "state", "spec"},
    )
    db.table("vms").create_index(["name"], unique=True)
    db.table("images").create(
        {"name": str, "rootfs": str, "kernel_ref": str, "managed": int, "sha256": str, "created_at": str},
        pk="name",
        not_null={"rootfs"},
    )
    db.table("kernels").create(
        {"name": str, "kernel": str, "initrd": str, "modules": str, "created_at": str},
        pk="name",
        not_null={"kernel"},
    )


def _m002_vm_disk_and_error(db: sqlite_utils.Database) -> None:
    db.table("vms").add_column("disk_strategy", str)
    db.table("vms").add_column("last_error", str)


def _m003_image_init_source(db: sqlite_utils.Database) -> None:
    db.table("images").add_column("init", str)
    db.table("images").add_column("source", str)


def _m004_kernel_vmlinux_source(db: sqlite_utils.Database) -> None:
    db.table("kernels").add_column("vmlinux", str)
    db.table("kernels").add_column("source", str)


def _m005_vm_options(db: sqlite_utils.Database) -> None:
    db.table("vms").add_column("options", str)


def _m006_pull_records(db: sqlite_utils.Database) -> None:
    """What a pull made is recorded as ``REF#REVISION`` since sources became plugins
    (0.3). Before, the catalog recorded ``recipe:...``/``bundle:...`` (the ref being the
    artifact's name; NULL before recipes were recorded) and OCI pulls ``REF@DIGEST``;
    the revision strings are unchanged, so staleness is too. Imported and registered
    artifacts keep what they record (no ``#``: never judged)."""
    for table, pulled in (("images", "managed = 1"), ("kernels", "1")):
        db.execute(
            f"UPDATE {table} SET source = name || '#' || source "
            f"WHERE {pulled} AND (source LIKE 'recipe:%' OR source LIKE 'bundle:%')"
        )
        db.execute(f"UPDATE {table} SET source = name || '#' WHERE {pulled} AND source IS NULL")
    for row in list(db.query("SELECT name, source FROM images WHERE managed = 1 AND source LIKE '%@sha256:%'")):
        ref, _at, digest = row["source"].rpartition("@")
        db.execute("UPDATE images SET source = ? WHERE name = ?", [f"{ref}#{digest}", row["name"]])


def _m007_vm_ephemeral(db: sqlite_utils.Database) -> None:
    db.table("vms").add_column("ephemeral", int, not_null_default=0)


def _m008_snapshots(db: sqlite_utils.Database) -> None:
    db.table("vms").add_column("base_snapshot", str)
    db.table("snapshots").create(
        {"id": str, "name": str, "kind": str, "vm_id": str, "key": str, "data": str, "created_at": str},
        pk="id",
        not_null={"name", "kind", "data"},
    )
    db.table("snapshots").create_index(["name"], unique=True)
    db.table("snapshots").create_index(["key"])


def _m009_root_size(db: sqlite_utils.Database) -> None:
    """A VM's spec says ``root_size_mib`` (0.7): ``disk_size_mib`` sized the root disk,
    and ``--disk-size`` now sizes the work disk. In VMs and in snapshots' VM specs."""
    db.execute(
        "UPDATE vms SET spec = json_remove(json_set(spec, '$.root_size_mib', json_extract(spec, '$.disk_size_mib')),"
        " '$.disk_size_mib') WHERE json_extract(spec, '$.disk_size_mib') IS NOT NULL"
    )
    db.execute(
        "UPDATE snapshots SET data = json_remove(json_set(data, '$.spec.root_size_mib',"
        " json_extract(data, '$.spec.disk_size_mib')), '$.spec.disk_size_mib')"
        " WHERE json_extract(data, '$.spec.disk_size_mib') IS NOT NULL"
    )


MIGRATIONS: list[tuple[int, str, Callable[[sqlite_utils.Database], None]]] = [
    (1, "initial: vms, images, kernels", _m001_initial),
    (2, "vms: disk_strategy, last_error", _m002_vm_disk_and_error),
    (3, "images: init, source", _m003_image_init_source),
    (4, "kernels: vmlinux, source", _m004_kernel_vmlinux_source),
    (5, "vms: options (per-VM plugin options)", _m005_vm_options),
    (6, "images, kernels: what a pull made as REF#REVISION", _m006_pull_records),
    (7, "vms: ephemeral (deleted when the run that made it ends)", _m007_vm_ephemeral),
    (8, "snapshots; vms: base_snapshot", _m008_snapshots),
    (9, "vms, snapshots: spec.disk_size_mib is root_size_mib", _m009_root_size),
]


#: One plugin's migration: (number, description, fn). ``fn(db)`` runs once, in a
#: transaction; numbers start at 1 and only grow (``register_migrations``).
PluginMigration = tuple[int, str, Callable[[sqlite_utils.Database], None]]


def plugin_table_prefix(plugin: str) -> str:
    """The prefix every table a plugin's migrations create must have: ``<plugin>_``."""
    return plugin.replace("-", "_") + "_"


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class Store:
    """The state store. Thread-safe; one connection guarded by a lock."""

    def __init__(self, path: Path, migrate: bool = True) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        conn = sqlite3.connect(str(path), check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA foreign_keys=ON")
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.RLock()
        if migrate:
            self.migrate()

    def close(self) -> None:
        self.db.conn.close()

    # --- migrations ---------------------------------------------------------------
    def migrate(self) -> list[int]:
        """Apply pending migrations; return the numbers applied now."""
        applied_now = []
        with self._lock:
            self.db.table("migrations").create({"number": int, "name": str, "applied_at": str}, pk="number", if_not_exists=True)
            done = {row["number"] for row in self.db.table("migrations").rows}
            for number, name, fn in MIGRATIONS:
                if number in done:
                    continue
                with self.db.atomic():  # one transaction per migration
                    fn(self.db)
                    self.db.table("migrations").insert(
                        {"number": number, "name": name, "applied_at": datetime.now(timezone.utc).isoformat()}
                    )
                applied_now.append(number)
        return applied_now

    def applied_migrations(self) -> list[int]:
        if not self.db.table("migrations").exists():
            return []
        return sorted(row["number"] for row in self.db.table("migrations").rows)

    def pending_migrations(self) -> list[tuple[int, str]]:
        """The core's migrations not applied yet (``bangerd --check-migrations``)."""
        done = set(self.applied_migrations())
        return [(n, name) for n, name, _fn in MIGRATIONS if n not in done]

    # --- plugins' own tables --------------------------------------------------------
    def _plugin_done(self, plugin: str) -> set[int]:
        t = self.db.table("plugin_migrations")
        if not t.exists():
            return set()
        return {r["number"] for r in t.rows_where("plugin = ?", [plugin])}

    def pending_plugin_migrations(self, plugin: str, migrations: list[PluginMigration]) -> list[tuple[int, str]]:
        done = self._plugin_done(plugin)
        return [(n, name) for n, name, _fn in migrations if n not in done]

    def migrate_plugin(self, plugin: str, migrations: list[PluginMigration]) -> list[int]:
        """Apply a plugin's pending migrations (``register_migrations``), each in its own
        transaction, recorded in ``plugin_migrations``; the numbers applied now. A
        migration that creates a table not named ``<plugin>_...`` is rolled back and
        refused: plugins share one database, so each keeps to its own names."""
        prefix = plugin_table_prefix(plugin)
        applied: list[int] = []
        with self._lock:
            self.db.table("plugin_migrations").create(
                {"plugin": str, "number": int, "name": str, "applied_at": str}, pk=("plugin", "number"), if_not_exists=True
            )
            done = self._plugin_done(plugin)
            for number, name, fn in sorted(migrations, key=lambda m: m[0]):
                if number in done:
                    continue
                before = set(self.db.table_names())
                with self.db.atomic():
                    fn(self.db)
                    foreign = sorted(t for t in set(self.db.table_names()) - before if not t.startswith(prefix))
                    if foreign:
                        raise BangerError(
                            ErrorCode.PLUGIN,
                            f"plugin {plugin!r}: migration {number} creates {', '.join(foreign)}: "
                            f"a plugin's tables must be named {prefix}*",
                        )
                    self.db.table("plugin_migrations").insert(
                        {"plugin": plugin, "number": number, "name": name, "applied_at": datetime.now(timezone.utc).isoformat()}
                    )
                applied.append(number)
        return applied

    @contextmanager
    def transaction(self) -> Iterator[sqlite_utils.Database]:
        """The database, for a plugin's own tables: the store's lock held and one
        transaction (committed on success, rolled back on an exception)."""
        with self._lock, self.db.atomic():
            yield self.db

    # --- VMs ----------------------------------------------------------------------
    @staticmethod
    def _vm_row(vm: VM) -> dict[str, Any]:
        data = vm.model_dump(mode="json")
        data["spec"] = json.dumps(data["spec"])
        data["teardown"] = json.dumps(data["teardown"])
        data["options"] = json.dumps(data["options"])
        return data

    @staticmethod
    def _vm_from_row(row: dict[str, Any]) -> VM:
        row = dict(row)
        row["spec"] = json.loads(row["spec"])
        row["teardown"] = json.loads(row["teardown"] or "{}")
        row["options"] = json.loads(row.get("options") or "{}")
        row["ephemeral"] = bool(row.get("ephemeral"))
        return VM.model_validate({k: v for k, v in row.items() if v is not None})

    def insert_vm(self, vm: VM) -> VM:
        with self._lock:
            try:
                self.db.table("vms").insert(self._vm_row(vm))
            except sqlite3.IntegrityError:
                raise BangerError(ErrorCode.ALREADY_EXISTS, f"a VM named {vm.name!r} already exists") from None
        return vm

    def update_vm(self, vm: VM) -> VM:
        vm.updated_at = utcnow()
        with self._lock:
            self.db.table("vms").update(vm.id, self._vm_row(vm))
        return vm

    def get_vm(self, vm_id: str) -> VM:
        with self._lock:
            try:
                return self._vm_from_row(self.db.table("vms").get(vm_id))
            except sqlite_utils.db.NotFoundError:
                raise BangerError(ErrorCode.NOT_FOUND, f"no VM with id {vm_id!r}") from None

    def list_vms(self) -> list[VM]:
        with self._lock:
            return [self._vm_from_row(r) for r in self.db.table("vms").rows_where(order_by="created_at")]

    def find_vms(self, name: str | None = None, id_prefix: str | None = None) -> list[VM]:
        with self._lock:
            if name is not None:
                rows = self.db.table("vms").rows_where("name = ?", [name])
            else:
                rows = self.db.table("vms").rows_where("id LIKE ? ESCAPE '\\'", [_like_prefix(id_prefix or "")])
            return [self._vm_from_row(r) for r in rows]

    def _get(self, table: str, model: type[Artifact], name: str) -> Artifact:
        with self._lock:
            try:
                row = self.db.table(table).get(name)
            except sqlite_utils.db.NotFoundError:
                kind = table.rstrip("s")
                raise BangerError(ErrorCode.NOT_FOUND, f"no {kind} named {name!r} (see `banger {kind} list`)") from None
            return model.model_validate({k: v for k, v in row.items() if v is not None})

    def _all(self, table: str, model: type[Artifact]) -> list[Artifact]:
        with self._lock:
            return [model.model_validate({k: v for k, v in r.items() if v is not None}) for r in self.db.table(table).rows]

    def get_image(self, name: str) -> Image:
        return self._get("images", Image, name)

    def find_image(self, name: str) -> Image | None:
        """The image, or None when there is none by that name."""
        with self._lock:
            return self.get_image(name) if self.db.table("images").count_where("name = ?", [name]) else None

    def find_kernel(self, name: str) -> Kernel | None:
        with self._lock:
            return self.get_kernel(name) if self.db.table("kernels").count_where("name = ?", [name]) else None

    def get_kernel(self, name: str) -> Kernel:
        return self._get("kernels", Kernel, name)

    def delete_image(self, name: str) -> None:
        with self._lock:
            self.db.table("images").delete_where("name = ?", [name])

    def delete_kernel(self, name: str) -> None:
        with self._lock:
            self.db.table("kernels").delete_where("name = ?", [name])

    def delete_vm(self, vm_id: str) -> None:
        with self._lock:
            self.db.table("vms").delete_where("id = ?", [vm_id])

    # --- images & kernels ---------------------------------------------------------
    def upsert_image(self, image: Image) -> None:
        with self._lock:
            self.db.table("images").upsert(image.model_dump(mode="json"), pk="name")

    def list_images(self) -> list[Image]:
        return self._all("images", Image)

    def upsert_kernel(self, kernel: Kernel) -> None:
        with self._lock:
            self.db.table("kernels").upsert(kernel.model_dump(mode="json"), pk="name")

    def list_kernels(self) -> list[Kernel]:
        return self._all("kernels", Kernel)

    # --- snapshots ----------------------------------------------------------------
    def insert_snapshot(self, snap: Snapshot) -> Snapshot:
        row = {
            "id": snap.id,
            "name": snap.name,
            "kind": snap.kind.value,
            "vm_id": snap.vm_id,
            "key": snap.key,
            "data": snap.model_dump_json(),
            "created_at": snap.created_at.isoformat(),
        }
        with self._lock:
            try:
                self.db.table("snapshots").insert(row)
            except sqlite3.IntegrityError:
                raise BangerError(ErrorCode.ALREADY_EXISTS, f"a snapshot named {snap.name!r} already exists") from None
        return snap

    def update_snapshot(self, snap: Snapshot) -> None:
        with self._lock:
            self.db.table("snapshots").update(snap.id, {"data": snap.model_dump_json()})

    def list_snapshots(self, kind: str | None = None, key: str | None = None) -> list[Snapshot]:
        where, args = [], []
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if key is not None:
            where.append("key = ?")
            args.append(key)
        with self._lock:
            rows = self.db.table("snapshots").rows_where(" AND ".join(where) or None, args, order_by="created_at")
            return [Snapshot.model_validate_json(r["data"]) for r in rows]

    def find_snapshot(self, name: str) -> Snapshot | None:
        with self._lock:
            rows = list(self.db.table("snapshots").rows_where("name = ?", [name]))
            return Snapshot.model_validate_json(rows[0]["data"]) if rows else None

    def find_snapshots(self, id_prefix: str) -> list[Snapshot]:
        with self._lock:
            rows = self.db.table("snapshots").rows_where("id LIKE ? ESCAPE '\\'", [_like_prefix(id_prefix)])
            return [Snapshot.model_validate_json(r["data"]) for r in rows]

    def delete_snapshot(self, snap_id: str) -> None:
        with self._lock:
            self.db.table("snapshots").delete_where("id = ?", [snap_id])

    def vms_on_snapshot(self, snap_id: str) -> list[VM]:
        with self._lock:
            return [self._vm_from_row(r) for r in self.db.table("vms").rows_where("base_snapshot = ?", [snap_id])]

    def tables(self) -> Iterator[str]:
        return iter(self.db.table_names())
