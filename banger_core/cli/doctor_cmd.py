"""``banger doctor``."""

from __future__ import annotations

import typer

from banger_core.cli import style
from banger_core.cli.common import echo_json, state


def doctor(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Check the host, config, plugins and daemon; exit non-zero if anything FAILs."""
    from banger_core.context import DoctorContext
    from banger_core.doctor import run_checks

    rt = state.try_runtime()
    results = run_checks(DoctorContext(state.paths, rt, state.load_error))
    failed = sum(r.status == "FAIL" for r in results)
    if as_json:
        echo_json({"checks": [r.__dict__ for r in results], "ok": failed == 0})
    else:
        width = max(len(r.name) for r in results)
        for r in results:
            style.echo(f"{style.status(r.status, 4)}  {r.name.ljust(width)}  {r.detail}")
        warned = sum(r.status == "WARN" for r in results)
        style.echo(f"\n{len(results)} checks: {len(results) - failed - warned} pass, {warned} warn, {failed} fail")
    if failed:
        raise typer.Exit(1)
