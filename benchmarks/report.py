"""What the benchmarks share: printing a results table. Stdlib only; imported by the
benchmark scripts run as ``python benchmarks/NAME.py`` (this directory is on sys.path)."""

from __future__ import annotations

from collections.abc import Iterable


def print_table(header: list[str], rows: list[list[str]], left: Iterable[int] = (0,)) -> None:
    """Columns padded to their widest cell: the ``left`` ones left-aligned, the rest
    (numbers) right-aligned; trailing spaces dropped."""
    left = set(left)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
