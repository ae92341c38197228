"""``banger vm workspace prepare`` and ``banger vm workspace export``."""

from __future__ import annotations

import os
import sys
from typing import Any

import typer


def add_commands(vm: typer.Typer) -> None:
    ws = typer.Typer(help="A git repository in a VM (/root/repo), and its changes back as a patch.", no_args_is_help=True)
    vm.add_typer(ws, name="workspace")

    @ws.command("prepare")
    def prepare(
        ref: str = typer.Argument(..., help="the VM (name or id prefix)"),
        path: str = typer.Argument(..., help="a directory in a git work tree on this host"),
        include_untracked: bool = typer.Option(False, "--include-untracked", help="send untracked files too (not ignored ones)"),
        dry_run: bool = typer.Option(False, "--dry-run", help="list what would be sent (no VM needed)"),
        mode: str = typer.Option(None, "--mode", help="copy (HEAD's commit alone) | full_copy (all history, submodules)"),
        force: bool = typer.Option(False, "--force", help="replace a workspace holding changes not exported yet"),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Copy the repository PATH is in to /root/repo in a running VM: its HEAD commit,
        with the working-tree content of its tracked files (uncommitted host edits arrive
        as uncommitted edits), untracked files with --include-untracked. What was there
        is replaced once the copy is complete; `vm exec` then runs there."""
        from banger_core.cli import style
        from banger_core.errors import BangerError, ErrorCode
        from banger_workspace import repo, summary

        if mode is not None and mode not in repo.MODES:
            raise BangerError(ErrorCode.BAD_REQUEST, f"--mode {mode!r}: use copy or full_copy")
        if dry_run:
            try:
                plan = repo.inspect(path, mode or "copy", include_untracked)
            except repo.RepoError as exc:
                raise BangerError(ErrorCode.BAD_REQUEST, str(exc)) from None
            for f in plan.files:
                typer.echo(f)
            for line in summary(plan, "/root/repo"):
                style.echo(f"would copy {line}" if line.startswith(plan.top) else line, err=True)
            style.echo("(dry run: nothing sent)", err=True)
            return
        from banger_core.client import Client

        params: dict[str, Any] = {"ref": ref, "path": os.path.abspath(path), "force": force}
        if mode:
            params["mode"] = mode
        if include_untracked:
            params["include_untracked"] = True
        r = Client().call("workspace.prepare", params)
        if as_json:
            import json

            typer.echo(json.dumps(r, indent=2))
            return
        for line in r["summary"]:
            style.echo(line, err=True)
        typer.echo(f"{r['vm']}: {r['guest_path']} at {r['head'][:12]} ({r['files']} files)")

    @ws.command("export")
    def export(
        ref: str = typer.Argument(..., help="the VM (name or id prefix)"),
        base_commit: str = typer.Option(None, "--base-commit", help="diff against this commit: guest commits since are included"),
        output: str = typer.Option(None, "--output", "-o", help="write the patch here (default: stdout)"),
        as_json: bool = typer.Option(False, "--json", help="the changed files as JSON on stderr"),
    ) -> None:
        """Everything the guest changed in its workspace, committed or not, as a binary-safe
        patch (`git apply` it on the host): by default against the guest's HEAD, with
        --base-commit against that commit (the prepared head: `vm show` says it). The
        changed files are listed on stderr. The guest's index is not touched."""
        import re

        from banger_core.cli import style
        from banger_core.errors import BangerError, ErrorCode
        from banger_workspace.rpc import SHA_PATTERN

        if base_commit is not None and not re.fullmatch(SHA_PATTERN, base_commit):
            raise BangerError(ErrorCode.BAD_REQUEST, f"--base-commit {base_commit!r}: a commit id (4 to 64 hex digits)")
        params: dict[str, Any] = {"ref": ref}
        if base_commit:
            params["base_commit"] = base_commit
        if output is None:
            result = _export(params, 1)
        else:
            from pathlib import Path

            from banger_core.fsutil import atomic_file

            with atomic_file(Path(output)) as tmp:  # a patch cut short leaves nothing at FILE
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    result = _export(params, fd)
                finally:
                    os.close(fd)
        if as_json:
            import json

            print(json.dumps(result["files"], indent=2), file=sys.stderr)
        else:
            for f in result["files"]:
                style.echo(f"{f['status']}\t{f['path']}", err=True)
            where = f" to {output}" if output else ""
            style.echo(
                f"{result['vm']}: {len(result['files'])} file(s) changed against {result['base']}, "
                f"{result['bytes']} bytes of patch{where}",
                err=True,
            )


def _export(params: dict[str, Any], fd: int) -> dict[str, Any]:
    from banger_core.client import Client

    with Client().open_stream("workspace.export", params) as stream:
        result: dict[str, Any] = stream.pump(None, fd, 2)
    return result
