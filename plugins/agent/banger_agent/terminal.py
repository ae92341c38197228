"""The client's terminal during ``vm exec -t`` and ``vm run``'s interactive shell: raw
mode while the command runs (keys, Ctrl-C included, go to the guest's terminal as
typed), restored however the CLI leaves (exit, error, a signal it forwards); the
window size sent at start and on every SIGWINCH."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import termios
import tty
from collections.abc import Callable, Iterator
from typing import Any


def size(default: tuple[int, int] = (24, 80)) -> tuple[int, int]:
    """(rows, cols) of the terminal on stdin, stdout or stderr; ``default`` without one."""
    for fd in (0, 1, 2):
        try:
            s = os.get_terminal_size(fd)
        except OSError:
            continue
        if s.lines > 0 and s.columns > 0:
            return s.lines, s.columns
    return default


#: what a TERM may be (rpc.Terminal checks the same); anything else asks for the default
TERM_RE = re.compile(r"[A-Za-z0-9._+-]{1,64}")


def request(term: str | None = None) -> dict[str, Any]:
    """The ``tty`` an exec asks for: this terminal's size and TERM."""
    rows, cols = size()
    term = term or os.environ.get("TERM") or ""
    return {"rows": rows, "cols": cols, "term": term if TERM_RE.fullmatch(term) else "xterm-256color"}


@contextlib.contextmanager
def raw(on_resize: Callable[[int, int], object]) -> Iterator[None]:
    """Put stdin's terminal (if it is one) in raw mode and forward window changes;
    both undone on the way out, whatever the way out is."""
    saved = None
    if os.isatty(0):
        saved = termios.tcgetattr(0)
        tty.setraw(0)
    previous = signal.signal(signal.SIGWINCH, lambda _n, _f: on_resize(*size()))
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, previous)
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
