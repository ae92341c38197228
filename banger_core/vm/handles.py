"""Transient VM handles: in memory, mirrored to a per-VM ``handles.json``.

The file is written (fsutil.atomic_write: temp file, fsync, rename) *before* the in-memory
cache changes, so a daemon crash leaves disk ahead of memory — recoverable at
reconcile — never memory ahead of disk (lost handles strand host state).
"""

from __future__ import annotations

import json
import threading

from pydantic import ValidationError

from banger_core.fsutil import atomic_write
from banger_core.models import VMHandles
from banger_core.paths import Paths


class HandleStore:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self._cache: dict[str, VMHandles] = {}
        self._lock = threading.Lock()

    def set(self, handles: VMHandles) -> None:
        data = handles.model_dump_json(indent=2).encode()
        with self._lock:
            atomic_write(self.paths.vm_handles(handles.vm_id), data, mode=0o600)
            self._cache[handles.vm_id] = handles

    def get(self, vm_id: str) -> VMHandles | None:
        with self._lock:
            return self._cache.get(vm_id)

    def drop(self, vm_id: str) -> None:
        with self._lock:
            try:
                self.paths.vm_handles(vm_id).unlink()
            except FileNotFoundError:
                pass
            self._cache.pop(vm_id, None)

    def read_file(self, vm_id: str) -> VMHandles | None:
        """Read a VM's handles.json; ``None`` if missing or corrupt (never raises)."""
        try:
            raw = json.loads(self.paths.vm_handles(vm_id).read_bytes())
            return VMHandles.model_validate(raw)
        except (OSError, ValueError, ValidationError):
            return None

    def load_all(self) -> dict[str, VMHandles]:
        """Re-seed the cache from disk (daemon start)."""
        found: dict[str, VMHandles] = {}
        if self.paths.vms_dir.is_dir():
            for d in self.paths.vms_dir.iterdir():
                h = self.read_file(d.name)
                if h is not None and h.vm_id == d.name:
                    found[d.name] = h
        with self._lock:
            self._cache.update(found)
        return found
