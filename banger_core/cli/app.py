"""The typer app: the commands every plugin registers, the built-ins' first."""

from __future__ import annotations

import copy
import os
import sys
from typing import TYPE_CHECKING, Optional

import typer

from banger_core import __version__
from banger_core.cli import index, style
from banger_core.cli.common import error_line, state
from banger_core.errors import BangerError

if TYPE_CHECKING:  # pragma: no cover
    from banger_core.plugins import PluginHost


def _version_callback(value: bool) -> None:
    if value:
        style.echo(f"banger {__version__}")
        raise typer.Exit()


def build_app(argv: list[str] | None = None) -> typer.Typer:
    argv = list(argv or [])
    app = typer.Typer(
        name="banger",
        help="A real, disposable Linux machine in one command.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def _root(
        version: Optional[bool] = typer.Option(
            None, "--version", "-V", callback=_version_callback, is_eager=True, help="Print the version and exit."
        ),
    ) -> None:
        pass

    from banger_core.cli import vm_cmd

    host, full = _plugin_host(argv)
    contributed: dict[str, list[str]] = {}
    seen = index.command_names(app)

    def observe(plugin: str) -> None:
        nonlocal seen
        now = index.command_names(app)
        if not host.records[plugin].builtin:
            for command in now - seen:
                contributed.setdefault(command, []).append(plugin)
        seen = now

    broke = host.register_commands(app, vm=vm_cmd.app, observe=observe)
    # plugins' per-VM options become flags of vm create/set and the agent's vm run; their
    # vm exec options, of the agent's vm exec
    for hook in ("vm_options", "exec_options"):
        if not full and not vm_cmd.gives_plugin_flags(argv, hook):
            continue  # e.g. `vm exec VM -- CMD`: no plugin's model (pydantic) for flags not given
        models = host.option_models(hook)
        taking = vm_cmd.with_plugin_options(models, hook)
        for plugin in models:
            if not host.records[plugin].builtin:
                for command in taking:
                    if plugin not in contributed.setdefault(f"vm {command}", []):
                        contributed[f"vm {command}"].append(plugin)
    if not full:
        _keep_only(app, index.command_key(argv))
    rt = state.try_runtime() if full else None
    if rt is not None and host is rt.host:
        if broke:
            rt.resolve()  # a plugin whose commands broke is out of the order now
        else:
            from banger_core.plugins import EntryPoint

            entry_points = {
                name: EntryPoint(name, rec.entry_point, rec.distribution, rec.version)
                for name, rec in host.records.items()
                if rec.entry_point is not None
            }
            index.save(state.paths, _fingerprint(), contributed, entry_points)
    return app


def _keep_only(app: typer.Typer, key: tuple[str, ...]) -> None:
    """Trim the group ``key[0]`` to its command ``key[1]``: typer converts every
    command of a group into a click command before running one (~10 ms for ``vm``)."""
    if len(key) < 2:
        return
    for i, group in enumerate(app.registered_groups):
        if group.name != key[0] or group.typer_instance is None:
            continue
        trimmed = copy.copy(group.typer_instance)
        trimmed.registered_commands = [c for c in trimmed.registered_commands if index.name_of(c) == key[1]]
        trimmed.registered_groups = [g for g in trimmed.registered_groups if g.name == key[1]]
        app.registered_groups[i] = copy.copy(group)
        app.registered_groups[i].typer_instance = trimmed


def _fingerprint() -> str:
    from banger_core.fingerprint import fingerprint

    return fingerprint(state.paths)


def _plugin_host(argv: list[str]) -> tuple["PluginHost", bool]:
    """The host whose plugins register commands, and whether it is the full one.

    Fast path: when the CLI index is current and names who provides the command in
    ``argv``, only the built-ins and those plugins are loaded (no config, no other
    plugin). Otherwise every plugin, through the runtime; when the config cannot be
    loaded, the built-ins alone (the core's commands work and report the error).
    """
    from banger_core.builtin import COMMANDS
    from banger_core.plugins import PluginHost

    key = index.command_key(argv)
    known = index.load(state.paths, _fingerprint()) if key else None
    providers = known.providers(key) if known is not None and (key[0] in COMMANDS or key[0] in known.commands) else None
    if providers is not None:
        host = PluginHost()
        host.load_builtins(only=[COMMANDS[key[0]]] if key[0] in COMMANDS else [])
        if providers:
            host.load_entry_points(only=providers)
        host.finish_loading()
        return host, False
    rt = state.try_runtime()
    if rt is not None:
        return rt.host, True
    host = PluginHost()
    host.load_builtins()
    return host, True


def fail(err: BangerError) -> None:
    msg = error_line(err)
    print(style.paint(msg, "red", sys.stderr), file=sys.stderr)
    sys.exit(1)


def run(argv: list[str]) -> None:
    import logging

    # Problems the CLI cares about are reported through plugins list / doctor / errors;
    # keep library warnings off the terminal unless tracing is asked for.
    root = logging.getLogger("banger")
    if os.environ.get("BANGER_TRACE_PLUGINS") == "1" or os.environ.get("BANGER_DEBUG") == "1":
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    else:
        root.addHandler(logging.NullHandler())
        root.propagate = False
    try:
        state.argv = argv
        app = build_app(argv)
        app(args=argv, prog_name="banger")
    except SystemExit as exit_:
        if exit_.code == 2 and state.load_error is not None:
            # a usage error while plugins could not load: their commands are missing
            print(f"banger: note: plugin commands are unavailable: {state.load_error.message}", file=sys.stderr)
        raise
    except BangerError as err:
        fail(err)
    except KeyboardInterrupt:
        print("banger: interrupted", file=sys.stderr)
        sys.exit(130)
