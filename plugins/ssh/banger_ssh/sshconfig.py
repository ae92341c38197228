"""``banger ssh-config --install|--uninstall``: one ``Include`` of banger's own SSH
settings for ``*.vm`` in ``~/.ssh/config``, so ``ssh NAME.vm`` works.

The Include goes before the file's first ``Host``/``Match`` line (an Include after a
Host block applies only inside that block), or at the end when it has none. The file is
made (0600) when there is none. Installing twice changes nothing. Uninstalling takes
out exactly what was put in (and the file, when banger made it): the user's file comes
back byte for byte.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from banger_core.fsutil import atomic_write

MARK = "# banger: NAME.vm hosts (`banger ssh-config --uninstall` removes this and the next line)"
HOST_OR_MATCH = re.compile(r"[ \t]*(host|match)([ \t=]|$)", re.IGNORECASE)


def client_options(key: Path | str, known_hosts: Path | str, proxy: str) -> list[tuple[str, str]]:
    """How banger's ssh client reaches a VM: the one list both the Include's file
    (``render``) and ``vm ssh``'s ``-o`` options are made from."""
    return [
        ("User", "root"),
        ("IdentityFile", f'"{key}"'),
        ("IdentitiesOnly", "yes"),
        ("UserKnownHostsFile", f'"{known_hosts}"'),
        ("StrictHostKeyChecking", "yes"),
        ("CheckHostIP", "no"),
        ("LogLevel", "ERROR"),
        ("ProxyCommand", proxy),
    ]


def render(key: Path, known_hosts: Path, banger: str) -> str:
    """banger's own settings for ``*.vm`` (the file the Include names)."""
    lines = "".join(f"    {k} {v}\n" for k, v in client_options(key, known_hosts, f'"{banger}" vm ssh-proxy %h'))
    return "# banger's SSH settings for NAME.vm: written by banger, included from ~/.ssh/config\nHost *.vm\n" + lines


def block(include: Path) -> str:
    return f'{MARK}\nInclude "{include}"\n'


def install(user_config: Path, include: Path, record: Path) -> str:
    """Put the Include in; what was done ("installed", "already installed")."""
    try:
        text = user_config.read_bytes().decode()
        existed = True
    except FileNotFoundError:
        text, existed = "", False
    ours = block(include)
    if ours in text:
        return "already installed"
    lines = text.splitlines(keepends=True)
    at = next((i for i, ln in enumerate(lines) if HOST_OR_MATCH.match(ln)), None)
    added_newline = False
    if at is None:
        if text and not text.endswith("\n"):
            text += "\n"
            added_newline = True
        new = text + ours
    else:
        new = "".join(lines[:at]) + ours + "".join(lines[at:])
    user_config.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = user_config.stat().st_mode & 0o777 if existed else 0o600
    atomic_write(record, json.dumps({"created": not existed, "added_newline": added_newline}), mode=0o600)
    atomic_write(user_config, new, mode=mode)
    return "installed"


def uninstall(user_config: Path, include: Path, record: Path) -> str:
    """Take it out again; what was done."""
    try:
        text = user_config.read_bytes().decode()
    except FileNotFoundError:
        record.unlink(missing_ok=True)
        return "not installed (no ~/.ssh/config)"
    ours = block(include)
    try:
        how = json.loads(record.read_text())
    except (OSError, ValueError):
        how = {}
    if ours not in text:
        record.unlink(missing_ok=True)
        return "not installed"
    if how.get("added_newline") and text.endswith("\n" + ours):
        new = text[: -len(ours) - 1]
    else:
        new = text.replace(ours, "", 1)
    if how.get("created") and new == "":
        user_config.unlink()
    else:
        atomic_write(user_config, new, mode=user_config.stat().st_mode & 0o777)
    record.unlink(missing_ok=True)
    return "uninstalled"
