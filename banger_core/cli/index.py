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
    from banger_core.plugins import EntryPoint

VERSION = 1


def command_names(app: "typer.Typer") -> set[str]:
    """``"x"`` for every top-level command or group of ``app``, ``"x y"`` for every
    command of a group (one level: banger's groups are not nested deeper)."""
    out: set[str] = set()
    for cmd in app.registered_commands:
        out.add(name_of(cmd))
    for group in app.registered_groups:
        name = group.name or ""
        out.add(name)
        if group.typer_instance is not None:
            out.update(f"{name} {sub}" for sub in command_names(group.typer_instance) if " " not in sub)
    return out


def name_of(command: Any) -> str:
    """A registered typer command's name: given, or derived from its function as typer does."""
    return str(command.name or getattr(command.callback, "__name__", "").replace("_", "-"))


def command_key(argv: list[str]) -> tuple[str, ...]:
    """The command words of ``argv``: up to two leading words that are not options."""
    words: list[str] = []
    for arg in argv[:2]:
        if arg.startswith("-"):
            break
        words.append(arg)
    return tuple(words)


class Index:
    """command -> the plugins contributing to it, and each such plugin's entry point."""

    def __init__(self, commands: dict[str, list[str]], plugins: dict[str, "EntryPoint"]) -> None:
        self.commands = commands
        self.plugins = plugins

    def providers(self, key: tuple[str, ...]) -> list["EntryPoint"] | None:
        """The entry points of the plugins the command ``key`` needs; None if the index
        cannot say (then everything is loaded)."""
        if len(key) == 1:  # a group's help lists every subcommand, the plugins' too
            names = [p for c, ps in self.commands.items() if c == key[0] or c.startswith(key[0] + " ") for p in ps]
        else:
            names = self.commands.get(key[0], []) + self.commands.get(" ".join(key), [])
        if any(n not in self.plugins for n in names):
            return None
        return [self.plugins[n] for n in dict.fromkeys(names)]


def load(paths: "Paths", fingerprint: str) -> Index | None:
    """The index, or None when absent, unreadable or made for another fingerprint."""
    from banger_core.plugins import EntryPoint

    try:
        data = json.loads(paths.cli_index.read_text())
        if data.get("v") != VERSION or data.get("fingerprint") != fingerprint:
            return None
        commands = {str(c): [str(p) for p in ps] for c, ps in data["commands"].items()}
        plugins = {str(n): EntryPoint(str(n), *map(_opt_str, e)) for n, e in data["plugins"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return Index(commands, plugins)


def _opt_str(value: Any) -> Any:
    return None if value is None else str(value)


def save(paths: "Paths", fingerprint: str, commands: dict[str, list[str]], plugins: dict[str, "EntryPoint"]) -> None:
    from banger_core.fsutil import atomic_write

    data = {
        "v": VERSION,
        "fingerprint": fingerprint,
        "commands": commands,
        "plugins": {n: [e.value, e.distribution, e.version] for n, e in plugins.items()},
    }
    text = json.dumps(data, sort_keys=True)
    try:
        if paths.cli_index.read_text() == text:
            return  # every full load gets here: no write (and fsync) when nothing changed
    except OSError:
        pass
    try:
        paths.cli_index.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(paths.cli_index, text)
    except OSError:
        pass  # a read-only cache dir: every run is a full load, nothing worse
