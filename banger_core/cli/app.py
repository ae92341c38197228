"""The typer app: core commands, plus whatever enabled plugins register."""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer

from banger_core import __version__
from banger_core.cli import style
from banger_core.cli.common import echo_json, error_line, state
from banger_core.errors import BangerError


def _version_callback(value: bool) -> None:
    if value:
        style.echo(f"banger {__version__}")
        raise typer.Exit()


def build_app() -> typer.Typer:
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

    @app.command()
    def version(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
        """Show the CLI's and the running daemon's versions."""
        info = state.client().hello()
        data = {"cli": __version__, "daemon": info.get("version") if info else None}
        if as_json:
            echo_json(data)
            return
        style.echo(f"banger  {__version__}")
        style.echo(f"bangerd {data['daemon'] or 'not running'}")

    from banger_core.cli import artifacts_cmd, daemon_cmd, doctor_cmd, plugins_cmd, vm_cmd

    app.add_typer(vm_cmd.app, name="vm")
    app.add_typer(artifacts_cmd.kernel_app, name="kernel")
    app.add_typer(artifacts_cmd.image_app, name="image")
    app.add_typer(daemon_cmd.app, name="daemon")
    app.add_typer(plugins_cmd.app, name="plugins")
    app.command("doctor")(doctor_cmd.doctor)
    _register_plugin_commands(app)
    return app


def _register_plugin_commands(app: typer.Typer) -> None:
    rt = state.try_runtime()
    if rt is None:
        return
    broke = False
    for name in rt.host.enabled:
        try:
            rt.host.call("register_commands", name, app=app)
        except Exception as exc:  # a broken plugin must not break the CLI
            rt.host.mark_broken(name, f"register_commands failed: {type(exc).__name__}: {exc}")
            broke = True
    if broke:
        rt.resolve()


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
        app = build_app()
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
