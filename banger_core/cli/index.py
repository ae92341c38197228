"""Which plugin provides which CLI command, remembered between CLI runs.

Building the whole app means loading the config (pydantic) and importing every plugin;
the common path (``banger vm list``, ``banger vm exec``) needs neither. After a full
load the CLI writes this index; later runs whose fingerprint (banger's code, the
config file, the installed distributions, the plugin environment variables: the one
the daemon uses) matches build only the built-ins plus the plugins that provide the
command asked for. Any other fingerprint, a missing or unreadable index: a full load.
Stdlib only.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import typer

    from banger_core.paths import Paths

VERSION = 1


def command_names(app: "typer.Typer") -> set[str]:
    """``"x"`` for every top-level command or group of ``app``, ``"x y"`` for every
    command of a group (one level: banger's groups are not nested deeper)."""
    out: set[str] = set()
    for cmd in app.registered_commands:
        out.add(cmd.name or _derived(cmd.callback))
    for group in app.registered_groups:
        name = group.name or ""
        out.add(name)
        if group.typer_instance is not None:
            out.update(f"{name} {sub}" for sub in command_names(group.typer_instance) if " " not in sub)
    return out


def _derived(callback: Any) -> str:
    return str(getattr(callback, "__name__", "")).replace("_", "-")


def command_key(argv: list[str]) -> tuple[str, ...]:
    """The command words of ``argv``: up to two leading words that are not options."""
    words: list[str] = []
    for arg in argv[:2]:
        if arg.startswith("-"):
            break
        words.append(arg)
    return tuple(words)


def load(paths: "Paths", fingerprint: str) -> dict[str, list[str]] | None:
    """command -> plugins that contribute to it; None when absent or stale."""
    try:
        data = json.loads(paths.cli_index.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("v") != VERSION or data.get("fingerprint") != fingerprint:
        return None
    commands = data.get("commands")
    return commands if isinstance(commands, dict) else None


def save(paths: "Paths", fingerprint: str, commands: dict[str, list[str]]) -> None:
    from banger_core.fsutil import atomic_write

    data = {"v": VERSION, "fingerprint": fingerprint, "commands": commands}
    try:
        paths.cli_index.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(paths.cli_index, json.dumps(data, sort_keys=True))
    except OSError:
        pass  # a read-only cache dir: every run is a full load, nothing worse
