"""Terminal styling that honours NO_COLOR, TERM=dumb and non-TTY output."""

from __future__ import annotations

import os
import sys
from typing import TextIO

_CODES = {"red": "31", "green": "32", "yellow": "33", "blue": "34", "dim": "2", "bold": "1"}


def color_enabled(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stdout
    if "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return hasattr(stream, "isatty") and stream.isatty()


def paint(text: str, color: str, stream: TextIO | None = None) -> str:
    if not color_enabled(stream):
        return text
    return f"\x1b[{_CODES[color]}m{text}\x1b[0m"


STATUS_COLORS = {"PASS": "green", "WARN": "yellow", "FAIL": "red", "enabled": "green", "disabled": "dim", "broken": "red"}


def status(text: str, width: int = 0, stream: TextIO | None = None) -> str:
    return paint(text.ljust(width), STATUS_COLORS.get(text, "bold"), stream)


def table(rows: list[list[str]], header: list[str], color_col: int | None = None) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out = ["  ".join(paint(h.ljust(w), "bold") for h, w in zip(header, widths, strict=False)).rstrip()]
    for r in rows:
        cells = []
        for i, (c, w) in enumerate(zip(r, widths, strict=False)):
            cells.append(status(str(c), w) if i == color_col else str(c).ljust(w))
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def echo(text: str = "", err: bool = False) -> None:
    """Print a line (flushed); colour codes are kept where colour is on for that stream
    (FORCE_COLOR included) and stripped elsewhere. Not click.echo: importing click on
    top of typer's own copy costs every command ~7 ms."""
    stream = sys.stderr if err else sys.stdout
    if "\x1b[" in text and not color_enabled(stream):
        import re

        text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    stream.write(text + "\n")
    stream.flush()
