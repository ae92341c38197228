"""What identifies this banger's build: its version, and the commit and commit time of
the checkout it runs from (an install from a git clone; None otherwise). Shown by
``banger version``, ``daemon status`` and the guest agent's health (its disk records
the build that made it)."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from banger_core import __version__


@functools.lru_cache(maxsize=1)
def build_info() -> dict[str, str | None]:
    repo = Path(__file__).resolve().parent.parent
    commit = time = None
    if (repo / ".git").exists():
        try:
            out = subprocess.run(
                ["git", "-C", str(repo), "log", "-1", "--format=%h %cI"], capture_output=True, text=True, timeout=5
            ).stdout.split()
            if len(out) == 2:
                commit, time = out
        except (OSError, subprocess.TimeoutExpired):
            pass
    return {"version": __version__, "commit": commit, "build_time": time}
