"""What the benchmarks share: an isolated banger's environment, the test suite's cache,
printing a results table. Stdlib only; imported by the
benchmark scripts run as ``python benchmarks/NAME.py`` (this directory is on sys.path)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


#: where the test suite keeps what it builds (the default image, kernels): benchmarks
#: that boot the default image share it instead of building their own
TEST_CACHE = Path(os.environ.get("BANGER_TEST_CACHE", "/var/cache/banger-test")) / "banger-cache"


def banger_env(root: Path, cache: Path | None = None, netns: str = "none") -> dict[str, str]:
    """The environment of a banger whose config, state, cache (unless ``cache`` is
    given) and runtime dirs are under ``root``: nothing of the user's banger is touched.
    ``netns``: the network namespace its daemon may change (BANGER_NETNS); by default
    none (the network safety rule: a benchmark's bridge lives in a namespace it made).
    The CLI runs as a user's install does, with Python's bytecode cache on:
    PYTHONDONTWRITEBYTECODE (set on some build machines) would make every call compile
    banger's modules again."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BANGER_") and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(
        BANGER_CONFIG_DIR=str(root / "cfg"),
        BANGER_STATE_DIR=str(root / "state"),
        BANGER_CACHE_DIR=str(cache or root / "cache"),
        BANGER_RUNTIME_DIR=str(root / "run"),
        NO_COLOR="1",
        BANGER_NETNS=netns,
    )
    return env


def print_table(header: list[str], rows: list[list[str]], left: Iterable[int] = (0,)) -> None:
    """Columns padded to their widest cell: the ``left`` ones left-aligned, the rest
    (numbers) right-aligned; trailing spaces dropped."""
    left = set(left)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
