"""Processes a test or benchmark left behind: anything still using its scratch dir."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def kill_processes_using(root: Path) -> list[str]:
    """SIGKILL every process whose command line names a path under ``root`` (a VMM
    whose disks, console and sockets live there); return their command lines."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(str(root).encode() in a for a in argv):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                continue
            found.append(" ".join(a.decode(errors="replace") for a in argv)[:200])
    return found
