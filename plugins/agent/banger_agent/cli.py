"""``banger vm exec``, ``vm run``, ``vm cp``, ``vm ports`` and ``vm health``."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import sys
from typing import Any

import typer

from banger_agent import terminal

#: what ``vm run`` with no command opens on a terminal: bash if the image has it, else sh
LOGIN_SHELL = ["/bin/sh", "-c", "command -v bash >/dev/null 2>&1 && exec bash -l; exec sh -l"]

ENV_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.DOTALL)


def add_commands(vm: typer.Typer) -> None:
    @vm.command(
        "exec",
        context_settings={"allow_interspersed_args": False},
    )
    def vm_exec(
        ref: str = typer.Argument(..., help="the VM (name or id prefix)"),
        command: list[str] = typer.Argument(..., help="the command and its arguments, after --"),
        env: list[str] = typer.Option([], "--env", "-e", help="K=V in the command's environment (repeatable)"),
        workdir: str = typer.Option(None, "--workdir", "-w", help="the directory it runs in"),
        user: str = typer.Option(None, "--user", "-u", help="the user it runs as (default root)"),
        tty: bool = typer.Option(False, "--tty", "-t", help="run it on a terminal in the guest (interactive programs, shells)"),
    ) -> None:
        """Run a command in a running VM: stdin goes to it, its stdout and stderr come
        back, and its exit status is banger's (128+N for signal N). Ctrl-C reaches the
        command; if banger is killed, the command's process group in the guest is too.

        With -t it runs on a pseudo-terminal in the guest sized like yours (and resized
        with it), your terminal in raw mode meanwhile (restored however banger exits);
        its output all comes on stdout."""

        pairs = env_pairs(env)
        if command and command[0] == "--":  # `vm exec VM -- CMD`: the separator is not the command
            command = command[1:]
        if not command:
            raise _bad("no command: banger vm exec VM -- CMD [ARGS...]")
        if "--" in command and all(w.startswith("-") for w in command[: command.index("--")]):
            flags = " ".join(command[: command.index("--")])  # `vm exec VM --flag -- CMD`: options come first
            raise _bad(
                f"options go before the VM: did you mean `banger vm exec {flags} {ref} -- {shlex.join(command[command.index('--') + 1 :])}`?"
            )
        params: dict[str, Any] = {"ref": ref, "argv": command, "env": pairs}
        if workdir:
            params["cwd"] = workdir
        if user:
            params["user"] = user
        if tty:
            params["tty"] = terminal.request()
        from banger_core.cli.vm_cmd import given_exec_options

        if given_exec_options:
            params["options"] = given_exec_options
        result = stream_command("agent.exec", params, "exec", stdin=not sys.stdin.closed, tty=tty, on_event=_said)
        raise typer.Exit(int(result.get("exit_status", 255)))

    vm_exec.__banger_exec_options__ = True  # type: ignore[attr-defined]

    @vm.command("cp")
    def vm_cp(
        src: str = typer.Argument(..., help="what to copy: a local path, or VM:PATH"),
        dst: str = typer.Argument(..., help="where to: VM:PATH, or a local path"),
    ) -> None:
        """Copy a file or a directory tree between this host and a running VM.

        Exactly one side is VM:PATH (write a local path holding a colon as ./a:b). As
        with cp -a: into DST when it is a directory, else as DST (its parent must
        exist); modes, times and symlinks kept, contents byte for byte, streamed (any
        size). Copies into the VM are owned by root; copies out, by you. A copy cut
        short leaves nothing half-written at DST."""
        from banger_agent import cp

        status, what = cp.copy(src, dst)
        if status == 0:
            print(f"copied {what}", file=sys.stderr)
        raise typer.Exit(status)

    @vm.command("ports")
    def vm_ports(
        ref: str = typer.Argument(..., help="the VM (name or id prefix)"),
        as_json: bool = typer.Option(False, "--json"),
        no_probe: bool = typer.Option(False, "--no-probe", help="do not probe TCP listeners for https/http"),
    ) -> None:
        """What listens in a running VM: every TCP and UDP listener, v4 and v6, with the
        process holding it, and where this host reaches it (ENDPOINT: from the plugin
        that can reach it, e.g. NAME.vm:PORT; guest:PORT when none can). TCP listeners
        are probed from inside the guest: PROTO says https or http when they speak it."""
        from banger_core.client import Client

        r = Client().call("agent.ports", {"ref": ref, "probe": not no_probe})
        if as_json:
            typer.echo(json.dumps(r["listeners"], indent=2))
            return
        rows = [
            (d["scheme"] or d["proto"], d["endpoint"], f"{d['process'] or '?'}[{d['pid'] or '?'}]", d["command"])
            for d in r["listeners"]
        ]
        if not rows:
            typer.echo(f"nothing listens in {r['vm']}")
            return
        header = ("PROTO", "ENDPOINT", "PROCESS", "COMMAND")
        widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(3)]
        for row in [header, *rows]:
            typer.echo("  ".join(str(v).ljust(w) for v, w in zip(row[:3], widths, strict=True)) + "  " + row[3][:120])

    @vm.command("health")
    def vm_health(ref: str, as_json: bool = typer.Option(False, "--json")) -> None:
        """Ask a running VM's agent who it is: agent and protocol versions, banger's
        build that made its disk, boot id, uptime."""
        from banger_core.client import Client

        h = Client().call("agent.health", {"ref": ref})
        if as_json:
            typer.echo(json.dumps(h, indent=2))
            return
        build = h.get("build") or {}
        typer.echo(
            f"{h['vm']}: agent {h.get('agent')} (protocol {h.get('version')}, python {h.get('python')}), "
            f"up {h.get('uptime', 0):.1f}s, hostname {h.get('hostname')}, boot {h.get('boot_id')}, "
            f"agent disk {build.get('disk', '?')} from banger {build.get('banger', '?')}"
        )


def stream_command(
    method: str, params: dict[str, Any], what: str, stdin: bool, on_event: Any = None, tty: bool = False
) -> dict[str, Any]:
    """A streaming call for a command in a guest: our stdin (if ``stdin``), stdout and
    stderr pumped through it, SIGINT/TERM/HUP/QUIT forwarded to the command; the final
    result. With ``tty`` our terminal is raw meanwhile and its size follows ours. The
    daemon going away mid-call exits 255, saying so."""
    from banger_core.client import Client
    from banger_core.errors import BangerError, ErrorCode

    try:
        with Client().open_stream(method, params) as stream:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
                signal.signal(sig, lambda n, _f: stream.signal(signal.Signals(n).name[3:]))
            with terminal.raw(stream.resize) if tty else contextlib.nullcontext():
                result: dict[str, Any] = stream.pump(0 if stdin else None, 1, 2, on_event=on_event)
            return result
    except BangerError as exc:
        if exc.code is not ErrorCode.DAEMON_UNAVAILABLE:
            raise
        why = exc.message
    except (ConnectionError, OSError) as exc:
        why = str(exc)
    print(f"banger: the daemon went away during the {what}: {why}", file=sys.stderr)
    raise typer.Exit(255)


def _said(ev: dict[str, Any]) -> None:
    """What plugins say before the command runs (``before_exec``): to stderr."""
    from banger_core.cli import style
    from banger_core.cli.vm_cmd import plugin_said

    if (said := plugin_said(ev)) is not None:
        style.echo(said, err=True)


def run_words(args: list[str], argv: list[str]) -> tuple[str | None, list[str]]:
    """``vm run [PATH] [-- CMD...]``'s positionals: (PATH, CMD). The command is what
    follows ``--`` on the command line (click drops a ``--`` that comes before any
    positional, so the raw ``argv`` says where it was); a word before it that is not a
    directory is refused, saying what was probably meant."""
    command = argv[argv.index("--") + 1 :] if "--" in argv else []
    words = args[: len(args) - len(command)] if command else list(args)
    if words and words[-1] == "--":
        words = words[:-1]
    path = None
    if words and os.path.isdir(words[0]):
        path, words = words[0], words[1:]
    if words:
        shown = " ".join(shlex.quote(w) for w in [*words, *command])
        before = f"{shlex.quote(path)} " if path else ""
        what = f"{words[0]!r} is not a directory" if path is None else f"{words[0]!r} comes before --"
        raise _bad(f"{what}: did you mean `banger vm run {before}-- {shown}`?")
    return path, command


def env_pairs(env: list[str]) -> dict[str, str]:
    """``--env K=V`` flags as a dict; a clear error for one that is not NAME=VALUE."""
    pairs = {}
    for e in env:
        m = ENV_RE.fullmatch(e)
        if m is None:
            raise _bad(f"--env {e!r}: expected NAME=VALUE")
        pairs[m.group(1)] = m.group(2)
    return pairs


def _bad(msg: str) -> Exception:
    from banger_core.errors import BangerError, ErrorCode

    return BangerError(ErrorCode.BAD_REQUEST, msg)


def add_run(vm: typer.Typer) -> None:
    @vm.command("run", context_settings={"allow_interspersed_args": False})
    def vm_run(
        args: list[str] = typer.Argument(
            None, metavar="[PATH] [-- CMD...]", help="a project directory, then the command and its arguments after --"
        ),
        rm: bool = typer.Option(False, "--rm", help="delete the VM when the command ends, however it ends"),
        detach: bool = typer.Option(False, "--detach", "-d", help="leave the VM running and say how to reach it"),
        name: str = typer.Option(None, "--name", "-n", help="DNS-label name (default: generated)"),
        image: str = typer.Option(None, "--image", "-i", help="image name, pulled if missing"),
        kernel: str = typer.Option(None, "--kernel", "-k", help="boot this kernel instead of the image's"),
        vcpu: int = typer.Option(None, "--vcpu", help="vCPUs"),
        memory: str = typer.Option(None, "--memory", "-m", help="memory, e.g. 1024 or 2G"),
        root_size: str = typer.Option(None, "--root-size", help="root filesystem size, e.g. 4G"),
        env: list[str] = typer.Option([], "--env", "-e", help="K=V in the command's environment (repeatable)"),
        workdir: str = typer.Option(None, "--workdir", "-w", help="the directory it runs in"),
        cold: bool = typer.Option(
            False, "--cold", help="boot, even when a warm-start template matches (by default one is restored, or made)"
        ),
        dry_run: bool = typer.Option(
            False, "--dry-run", help="say what the run would make and do (plugins' checks too); make nothing"
        ),
    ) -> None:
        """Create a VM, run a command in it, return its exit status.

        With PATH the VM is made from that project: its banger.toml applies (image and
        resources in [vm_defaults], plugins and their settings), and plugins act on it
        (the workspace plugin copies its git repository to /root/repo, where the command
        runs). Without PATH, neither.

        The `spec:` line and progress go to stderr, then the command's output (stdout is
        the command's alone), then the elapsed time. With --rm the daemon deletes the VM
        however the run ends (exit, error, Ctrl-C, SIGTERM, banger killed). With -d the VM is
        left running; with no command, a shell opens in it when stdin is a terminal (the
        VM is left running after, unless --rm), else it is left running as with -d."""
        import time
        from pathlib import Path

        from banger_core.cli.common import state
        from banger_core.cli.vm_cmd import Progress, create_params

        path, command = run_words(list(args or []), list(state.argv or []))
        if detach and rm:
            raise _bad("-d leaves the VM running and --rm deletes it: give one")
        if detach and command:
            raise _bad("-d leaves the VM running without running anything: give a command or -d, not both")
        interactive = not command and not detach and sys.stdin.isatty()
        if interactive:
            command = list(LOGIN_SHELL)
        params = create_params(name, image, kernel, vcpu, memory, root_size, project=Path(path) if path else None)
        params.update(argv=command, rm=rm, env=env_pairs(env), warm=not cold)
        if interactive and not dry_run:
            params["tty"] = terminal.request()
        if workdir:
            params["cwd"] = workdir
        t0 = time.monotonic()
        if dry_run:
            plan = stream_command("agent.run", {**params, "dry_run": True}, "run", stdin=False, on_event=Progress(quiet=False))
            s = plan["spec"]
            print(
                f"would make {s['vm']}: {s['vcpus']} vcpu | {s['memory_mib']} MiB | {s['root_size_mib']} MiB root"
                f" | image {s['image']} | {s['driver']}"
                + (f"; then run: {shlex.join(command)}" if command else "")
                + " (dry run: nothing made)",
                file=sys.stderr,
            )
            return
        result = stream_command("agent.run", params, "run", stdin=bool(command), on_event=Progress(quiet=False), tty=interactive)
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in (result.get("stages") or {}).items())
        if interactive and not rm:
            vm_name = result.get("vm")
            print(
                f"{vm_name} is still running: banger vm exec -t {vm_name} -- sh; delete: banger vm delete {vm_name} --force",
                file=sys.stderr,
            )
        if not command:
            vm = result["vm"]
            print(
                f"{vm['name']} is running. Run a command: banger vm exec {vm['name']} -- CMD\n"
                f"  health: banger vm health {vm['name']}; stop: banger vm stop {vm['name']}; "
                f"delete: banger vm delete {vm['name']} --force",
                file=sys.stderr,
            )
        print(f"ran in {time.monotonic() - t0:.1f}s ({stages})", file=sys.stderr)
        raise typer.Exit(int(result.get("exit_status", 0)))

    vm_run.__banger_vm_options__ = True  # type: ignore[attr-defined]
