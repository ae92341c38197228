"""Copy host files into the guest at every start and at resume: ``[[file_sync]]``.

Entries come from the user's config.toml and a project's banger.toml (a top-level
array this plugin claims), are checked at config load (entries.py), and are copied
through the guest agent's ``cp_in`` op (copy.py), owned by root. A project's entries
may only name paths inside that project. See README.md.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from pydantic import BaseModel

from banger_core import hookimpl
from banger_core.context import CheckResult
from banger_filesync.entries import Entry, Settings

# After the agent (it copies through it) and the work disk (/root, where the files go).
requires = ["agent", "workdisk"]
# [[file_sync]] in config.toml and banger.toml: this plugin's settings.
config_keys = ["file_sync"]

__all__ = ["Entry", "Settings"]


@hookimpl
def config_model() -> type[BaseModel]:
    return Settings


def _entries(ctx: Any) -> list[Entry]:
    settings = ctx.settings if isinstance(ctx.settings, Settings) else Settings()
    return settings.file_sync


def _sync(ctx: Any, when: str) -> None:
    from banger_filesync.copy import sync

    entries = _entries(ctx)
    if not entries and not ctx.teardown.get("last"):
        return
    outcome = sync(ctx, entries, when)
    ctx.teardown["last"] = outcome.record()  # what vm show says; there is nothing to undo
    ctx.persist()
    ctx.handles["synced_in"] = ctx.op_id


@hookimpl
def vm_resumed(ctx: Any, resumed: Any) -> None:
    """A restored (or warm-started, or resumed) VM holds the files of the moment its
    snapshot was taken: it gets the host's current ones, before any post_boot runs."""
    _sync(ctx, "resume")


@hookimpl
def post_boot(ctx: Any) -> None:
    """Every start: the entries, copied again (unless vm_resumed just did, in this start)."""
    if ctx.handles.get("synced_in") == ctx.op_id:
        return
    _sync(ctx, "start")


@hookimpl
def vm_fields(ctx: Any, detail: bool) -> dict[str, object] | None:
    """vm show: what the last sync copied, skipped and could not copy, and when."""
    last = ctx.teardown.get("last")
    if not detail or not last:
        return None
    out: dict[str, object] = {"last": f"at {last.get('when')} ({last.get('at')})", "synced": last.get("synced", [])}
    for key in ("skipped", "failed"):
        if last.get(key):
            out[key] = last[key]
    return out


@hookimpl
def register_doctor_checks(register: Callable[[str, Callable[[Any], Any]], None]) -> None:
    def entries(s: Settings | None) -> CheckResult:
        found = (s or Settings()).file_sync
        if not found:
            return CheckResult.ok("entries", "none ([[file_sync]] in config.toml)")
        listed = "; ".join(f"{e.describe()}{f' ({e.mode})' if e.mode else ''}" for e in found)
        missing = [e.host for e in found if not os.path.exists(e.host)]
        if missing:
            return CheckResult.warn("entries", f"host paths missing (skipped at start): {', '.join(missing)}; entries: {listed}")
        return CheckResult.ok("entries", listed)

    register("entries", entries)
