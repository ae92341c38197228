"""What a running daemon must match to be reused: banger's version, the user's
config.toml and the installed distributions (plugins among them). Stdlib only (the CLI runs it on
every daemon call); when it differs the CLI replaces the daemon."""

from __future__ import annotations

import hashlib
import os

from banger_core import __version__
from banger_core.paths import Paths


def installed_distributions() -> list[str]:
    """The installed distributions' metadata directories (their names carry name and
    version) in the site directories and on PYTHONPATH: an install, upgrade or removal
    of any plugin changes this. Not the rest of sys.path: the CLI, the daemon and a
    test runner each put other things first (a script's dir, the cwd, a rootdir).
    A directory listing, not importlib.metadata's entry-point scan (~1 ms, not ~25)."""
    import site

    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    dirs += [d for d in os.environ.get("PYTHONPATH", "").split(os.pathsep) if d]
    out: set[str] = set()
    for entry in dirs:
        try:
            with os.scandir(entry) as it:
                out.update(e.name for e in it if e.name.endswith((".dist-info", ".egg-info")))
        except OSError:
            continue
    return sorted(out)


def _code_stamp() -> str:
    """Newest modification time of banger_core's own sources: an editable install
    edited in place (same version) must not keep talking to a daemon running old code."""
    newest = 0
    stack = [os.path.dirname(os.path.abspath(__file__))]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False) and e.name != "__pycache__":
                    stack.append(e.path)
                elif e.name.endswith(".py"):
                    newest = max(newest, e.stat().st_mtime_ns)
    return str(newest)


_memo: dict[tuple[str, str], str] = {}


def fingerprint(paths: Paths) -> str:
    """Computed once per process and config file (the CLI asks twice: its command index
    and the daemon check)."""
    key = (str(paths.config_file), os.environ.get("BANGER_DISABLE_PLUGINS", ""))
    if key not in _memo:
        _memo[key] = _compute(paths)
    return _memo[key]


def _compute(paths: Paths) -> str:
    h = hashlib.sha256(__version__.encode())
    h.update(_code_stamp().encode())
    try:
        h.update(paths.config_file.read_bytes())
    except OSError:
        h.update(b"<no config>")
    for dist in installed_distributions():
        h.update(f"\0{dist}".encode())
    # Environment that changes what the daemon loads or logs.
    for var in ("BANGER_DISABLE_PLUGINS", "BANGER_STRICT_PLUGINS", "BANGER_TRACE_PLUGINS"):
        h.update(f"\0{var}={os.environ.get(var, '')}".encode())
    return h.hexdigest()[:16]
