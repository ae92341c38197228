"""``banger daemon status|start|stop|socket``."""

from __future__ import annotations

import typer

from banger_core.cli import style
from banger_core.cli.common import echo_json, state

app = typer.Typer(help="Manage bangerd, the per-user daemon (started on demand).", no_args_is_help=True)


def version(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Show the CLI's and the running daemon's versions."""
    from banger_core import __version__
    from banger_core.build import build_info

    info = state.client().hello()
    build = build_info()
    data = {"cli": __version__, "daemon": info.get("version") if info else None, "build": build}
    if as_json:
        echo_json(data)
        return
    made = f" (commit {build['commit']}, {build['build_time']})" if build["commit"] else ""
    style.echo(f"banger  {__version__}{made}")
    style.echo(f"bangerd {data['daemon'] or 'not running'}")


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Show whether bangerd runs, its pid, uptime, plugins and RPC methods."""
    client = state.client()
    info = client.hello()
    if info is None:
        if as_json:
            echo_json({"running": False, "socket": str(state.paths.socket)})
        else:
            style.echo(f"bangerd: not running (socket {state.paths.socket})")
        return
    st = client.call("daemon.status", autostart=False)
    st["running"] = True
    if as_json:
        echo_json(st)
        return
    build = st.get("build") or {}
    made = f" (commit {build['commit']}, {build['build_time']})" if build.get("commit") else ""
    style.echo(f"bangerd {st['version']}{made}: running, pid {st['pid']}, up {st['uptime_s']:.1f}s")
    style.echo(f"socket:  {st['socket']}")
    style.echo(f"log:     {st['log']}")
    style.echo(f"plugins: {' -> '.join(st['plugins']) or '(none)'}")
    if st.get("plugin_error"):
        style.echo(f"plugin problem: {st['plugin_error']}")
    style.echo(f"VMs:     {st['vms']}")
    for plugin, facts in (st.get("services") or {}).items():
        shown = ", ".join(f"{k} {v}" for k, v in facts.items() if k != "error")
        if facts.get("error"):
            shown = f"NOT STARTED: {facts['error']}" + (f" ({shown})" if shown else "")
        style.echo(f"service {plugin}: {shown}")


@app.command()
def start() -> None:
    """Start bangerd if it is not running (or replace a stale one)."""
    info = state.client().ensure_daemon()
    style.echo(f"bangerd {info['version']}: running, pid {info['pid']}")


@app.command()
def stop() -> None:
    """Stop bangerd. Running VMs keep running and are re-adopted on next start."""
    pid = state.client().stop_daemon()
    style.echo("bangerd: not running" if pid is None else f"bangerd: stopped (pid {pid})")


@app.command()
def socket() -> None:
    """Print the daemon's socket path."""
    style.echo(str(state.paths.socket))
