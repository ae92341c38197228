"""``banger plugins list``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from banger_core.cli import style
from banger_core.cli.common import echo_json, state

app = typer.Typer(help="Inspect installed plugins.", no_args_is_help=True)


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List installed plugins: version, distribution, status (and why), hooks, order."""
    rt = state.runtime()
    order = rt.order or []
    records = sorted(rt.host.records.values(), key=lambda r: (order.index(r.name) if r.name in order else len(order), r.name))
    if as_json:
        echo_json(
            {
                "plugins": [r.to_dict() for r in records],
                "order": order,
                "error": rt.order_error.message if rt.order_error else None,
            }
        )
        return
    if not records:
        style.echo("no plugins installed")
        return
    rows = [
        [
            r.name,
            r.version or "-",
            f"{r.distribution} (built-in)" if r.builtin else r.distribution or "-",
            f"{r.status} (opt-in)" if r.opt_in and r.status == "enabled" else r.status,
            ",".join(r.requires) or "-",
            ",".join(r.hooks) or "-",
        ]
        for r in records
    ]
    style.echo(style.table(rows, ["NAME", "VERSION", "DISTRIBUTION", "STATUS", "REQUIRES", "HOOKS"], color_col=3))
    for r in records:
        if r.reason and r.status != "enabled":
            style.echo(f"  {r.name}: {r.reason}")
    if rt.order_error:
        style.echo(style.paint(f"error: {rt.order_error.message}", "red"))
    else:
        style.echo(f"order: {' -> '.join(order)}")


@app.command()
def resolve(
    project: Path = typer.Option(None, "--project", "-p", help="a project directory (its banger.toml applies); default: none"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show which plugins act on VMs made from PROJECT, in order, with their settings."""
    from banger_core.config import ProjectConfig

    rt = state.runtime()
    proj = ProjectConfig.load(project.resolve()) if project else None
    order = rt.config.enabled_for(rt.host, proj)
    settings = {}
    for name in order:
        s = rt.config.settings_for(rt.host, name, proj)
        settings[name] = s.model_dump(mode="json") if s is not None else None
    if as_json:
        echo_json({"project_file": str(proj.path) if proj else None, "order": order, "settings": settings})
        return
    if proj:
        style.echo(f"project: {proj.path}")
    style.echo(f"order: {' -> '.join(order) or '(none)'}")
    for name in order:
        style.echo(f"[{name}]")
        for key, value in (settings[name] or {}).items():
            style.echo(f"  {key} = {json.dumps(value)}")
