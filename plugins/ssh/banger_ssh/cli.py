"""``banger ssh-key``, ``banger ssh-config``, ``banger vm ssh`` and ``banger vm ssh-proxy``."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import typer


def _call(method: str, params: dict[str, Any]) -> dict[str, Any]:
    from banger_core.client import Client

    result: dict[str, Any] = Client().call(method, params)
    return result


def _banger() -> str:
    """This banger's executable, for the ProxyCommand (the one the user runs)."""
    return str(Path(sys.argv[0]).absolute()) if Path(sys.argv[0]).name == "banger" else shutil.which("banger") or "banger"


def ssh_argv(target: dict[str, Any], command: list[str], tty: bool) -> list[str]:
    """The system ssh client's argv for ``vm ssh``: banger's key and known_hosts, the
    VM's name as the host-key alias, banger's ProxyCommand; the command's words quoted
    so the guest's shell sees them as given."""
    from banger_ssh.sshconfig import client_options

    proxy = f"{shlex.quote(_banger())} vm ssh-proxy {shlex.quote(target['name'])}"
    argv = ["ssh"]
    for k, v in [*client_options(target["key"], target["known_hosts"], proxy), ("HostKeyAlias", target["alias"])]:
        argv += ["-o", f"{k}={v}"]
    if tty:
        argv.append("-t")
    argv.append(target["alias"])
    if command:
        argv += ["--", " ".join(shlex.quote(w) for w in command)]
    return argv


def add_commands(app: typer.Typer, vm: typer.Typer) -> None:
    @vm.command("ssh", context_settings={"allow_interspersed_args": False})
    def vm_ssh(
        ref: str = typer.Argument(..., help="the VM (name or id prefix)"),
        command: list[str] = typer.Argument(None, help="a command and its arguments, after -- (none: a login shell)"),
        wait: float = typer.Option(
            None, "--wait", help="seconds to wait for the guest's sshd (default: wait_s in config.toml's ssh table, 60)"
        ),
    ) -> None:
        """SSH into a running VM with the system's OpenSSH client (banger's key, the VM's
        pinned host key). With a command, its exit status is banger's and each argument
        arrives as given. Bridge VMs are reached at their address, others through the
        agent channel."""
        from banger_core.errors import BangerError, ErrorCode

        if shutil.which("ssh") is None:
            raise BangerError(ErrorCode.OPERATION_FAILED, "ssh is missing (apt install openssh-client)")
        words = list(command or [])
        if words and words[0] == "--":
            words = words[1:]
        params: dict[str, Any] = {"ref": ref} if wait is None else {"ref": ref, "wait_s": wait}
        target = _call("ssh.target", params)
        interactive = not words
        rc = subprocess.run(ssh_argv(target, words, tty=interactive and sys.stdin.isatty())).returncode
        if interactive:
            state = _call("vm.show", {"ref": target["name"]}).get("state")
            if state in ("running", "paused"):
                print(f"VM {target['name']} is still running (banger vm stop {target['name']} to stop it)", file=sys.stderr)
        raise typer.Exit(rc)

    @vm.command("ssh-proxy", hidden=True)
    def vm_ssh_proxy(host: str = typer.Argument(..., help="NAME or NAME.vm")) -> None:
        """An SSH ProxyCommand: stdin/stdout joined to the VM's port 22 (its address for a
        bridge VM, else through the agent)."""
        name = host[: -len(".vm")] if host.endswith(".vm") else host
        target = _call("ssh.target", {"ref": name, "wait_s": 0})
        if target.get("address"):
            raise typer.Exit(_pipe_tcp(target["address"], 22))
        from banger_core.client import Client

        with Client().open_stream("agent.connect", {"ref": name, "port": 22}) as stream:
            result = stream.pump(0, 1, 2)
        raise typer.Exit(int(result.get("exit_status", 0)))

    @app.command("ssh-key")
    def ssh_key(
        rotate: bool = typer.Option(False, "--rotate", help="make a new key (pushed to running VMs; new VMs get only it)"),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """banger's SSH key: its path and public key (made on first use)."""
        r = _call("ssh.key", {"rotate": rotate})
        if as_json:
            print(json.dumps(r, indent=2))
            return
        print(f"key:         {r['key']}\nfingerprint: {r['fingerprint']}\npublic:      {r['public']}")
        if rotate:
            print(f"pushed to:   {', '.join(r['pushed']) or '-'}")
            for name, why in r["failed"].items():
                print(f"not pushed:  {name}: {why}", file=sys.stderr)

    @app.command("ssh-config")
    def ssh_config(
        install: bool = typer.Option(False, "--install", help="include banger's settings for *.vm in ~/.ssh/config"),
        uninstall: bool = typer.Option(False, "--uninstall", help="take that Include out again (the file as it was)"),
    ) -> None:
        """`ssh NAME.vm` for every VM: one Include in ~/.ssh/config (made 0600 if
        absent), before its first Host/Match line; --uninstall restores the file."""
        from banger_core.errors import BangerError, ErrorCode
        from banger_core.fsutil import atomic_write
        from banger_ssh import sshconfig

        if install == uninstall:
            raise BangerError(ErrorCode.BAD_REQUEST, "give --install or --uninstall")
        f = {k: Path(v) for k, v in _call("ssh.key", {}).items() if k in ("key", "known_hosts", "config", "record")}
        user_config = Path.home() / ".ssh" / "config"
        if install:
            atomic_write(f["config"], sshconfig.render(f["key"], f["known_hosts"], _banger()), mode=0o600)
            what = sshconfig.install(user_config, f["config"], f["record"])
        else:
            what = sshconfig.uninstall(user_config, f["config"], f["record"])
        print(f"{user_config}: {what}")


def _pipe_tcp(address: str, port: int) -> int:
    """stdin -> a TCP connection -> stdout, until the peer closes."""
    try:
        s = socket.create_connection((address, port), timeout=10)
    except OSError as exc:
        print(f"banger: cannot reach {address}:{port}: {exc}", file=sys.stderr)
        return 255
    s.settimeout(None)

    def up() -> None:
        try:
            while data := os.read(0, 65536):
                s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    threading.Thread(target=up, daemon=True).start()
    out = sys.stdout.buffer
    while data := s.recv(65536):
        out.write(data)
        out.flush()
    return 0
