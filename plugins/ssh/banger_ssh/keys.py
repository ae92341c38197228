"""banger's SSH key pair and the known_hosts it keeps, on the host.

Files (``$BANGER_STATE_DIR/ssh/`` unless ``[ssh] key`` names another key path):
``id_ed25519`` / ``.pub`` (banger's client key, made on first use), ``known_hosts``
(one line per VM: ``NAME.vm ssh-ed25519 …``, its own host key), ``config`` (what
``ssh-config --install`` includes). Every change holds ``.lock`` and lands by rename.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from pathlib import Path

from banger_core.errors import BangerError, ErrorCode
from banger_core import fsutil
from banger_core.fsutil import atomic_write

SUFFIX = ".vm"


def locked(directory: Path) -> contextlib.AbstractContextManager[None]:
    return fsutil.locked(directory / ".lock")


def keygen(path: Path, comment: str) -> None:
    """A new ed25519 pair at ``path`` and ``path.pub`` (ssh-keygen; replaced by rename)."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".keygen-") as tmp:
        new = Path(tmp) / "key"
        try:
            r = subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(new)],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except FileNotFoundError:
            raise BangerError(ErrorCode.OPERATION_FAILED, "ssh-keygen is missing (apt install openssh-client)") from None
        if r.returncode != 0:
            raise BangerError(ErrorCode.OPERATION_FAILED, f"ssh-keygen failed: {r.stderr.strip()}")
        os.replace(new.with_suffix(".pub"), path.with_name(path.name + ".pub"))
        os.replace(new, path)


def ensure_key(key: Path) -> str:
    """banger's public key line, the pair made first if it does not exist."""
    with locked(key.parent):
        if not key.exists() or not key.with_name(key.name + ".pub").exists():
            keygen(key, "banger")
        return public_line(key)


def rotate_key(key: Path) -> str:
    """A new pair; the old public key joins ``KEY.retired`` (every VM is told to revoke
    what is listed there: running ones now, stopped ones at their next start)."""
    with locked(key.parent):
        old = public_line(key) if key.with_name(key.name + ".pub").exists() else None
        keygen(key, "banger")
        if old:
            atomic_write(retired_file(key), "".join(f"{ln}\n" for ln in dict.fromkeys([*retired(key), old])), mode=0o600)
        return public_line(key)


def retired_file(key: Path) -> Path:
    return key.with_name(key.name + ".retired")


def retired(key: Path) -> list[str]:
    """banger's public keys rotated out, oldest first."""
    return _read(retired_file(key))


def public_line(key: Path) -> str:
    return key.with_name(key.name + ".pub").read_text().strip()


def fingerprint(key: Path) -> str:
    r = subprocess.run(["ssh-keygen", "-l", "-f", str(key.with_name(key.name + ".pub"))], capture_output=True, text=True)
    return r.stdout.split()[1] if r.returncode == 0 and len(r.stdout.split()) > 1 else "?"


def alias(vm_name: str) -> str:
    return vm_name + SUFFIX


def pin(known_hosts: Path, vm_name: str, host_public: str) -> None:
    """``NAME.vm`` is known by ``host_public`` (its ``TYPE BASE64``), replacing any old
    line for it: a name reused by a new VM never trips host-key checking."""
    words = host_public.split()
    line = f"{alias(vm_name)} {words[0]} {words[1]}"
    with locked(known_hosts.parent):
        lines = [ln for ln in _read(known_hosts) if ln.split(" ", 1)[0] != alias(vm_name)]
        atomic_write(known_hosts, "".join(f"{ln}\n" for ln in [*lines, line]), mode=0o600)


def unpin(known_hosts: Path, vm_name: str) -> bool:
    with locked(known_hosts.parent):
        lines = _read(known_hosts)
        kept = [ln for ln in lines if ln.split(" ", 1)[0] != alias(vm_name)]
        if kept == lines:
            return False
        atomic_write(known_hosts, "".join(f"{ln}\n" for ln in kept), mode=0o600)
        return True


def _read(path: Path) -> list[str]:
    try:
        return [ln for ln in path.read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        return []
