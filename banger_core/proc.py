"""The one runner for external commands: spawns, logs each command and its exit
status, and stops what it started (the whole process group) on a timeout, a cancel
or an error of its own.

``run`` runs a command to completion and captures its output; ``run_long`` streams a
long command's output lines (a kernel compile, a root filesystem build) and can be cancelled.
Both raise ``CommandFailed`` (a BangerError, ``operation_failed``) when the command
fails, is not installed or times out; ``run_long`` raises ``errors.Cancelled`` when
cancelled.
"""

from __future__ import annotations

import collections
import logging
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, overload

from banger_core.errors import BangerError, ErrorCode, raise_if_cancelled

log = logging.getLogger("banger.proc")

Echo = Callable[[str], Any]  # a build's log: hears "$ command" and an unchecked failure
GRACE = 5.0  # seconds between SIGTERM to a process group and SIGKILL


class CommandFailed(BangerError):
    """A command exited non-zero, is not installed, or timed out."""

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(ErrorCode.OPERATION_FAILED, message, details=details)


@overload
def run(
    argv: Sequence[str | Path],
    *,
    check: bool = ...,
    timeout: float | None = ...,
    input: bytes | None = ...,
    cwd: Path | str | None = ...,
    env: Mapping[str, str] | None = ...,
    what: str | None = ...,
    echo: Echo | None = ...,
    text: Literal[False] = ...,
    pass_fds: Sequence[int] = ...,
) -> subprocess.CompletedProcess[bytes]: ...


@overload
def run(
    argv: Sequence[str | Path],
    *,
    check: bool = ...,
    timeout: float | None = ...,
    input: str | None = ...,
    cwd: Path | str | None = ...,
    env: Mapping[str, str] | None = ...,
    what: str | None = ...,
    echo: Echo | None = ...,
    text: Literal[True],
    pass_fds: Sequence[int] = ...,
) -> subprocess.CompletedProcess[str]: ...


def run(
    argv: Sequence[str | Path],
    *,
    check: bool = True,
    timeout: float | None = 300,
    input: bytes | str | None = None,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    what: str | None = None,
    echo: Echo | None = None,
    text: bool = False,
    pass_fds: Sequence[int] = (),
) -> subprocess.CompletedProcess[Any]:
    """Run a command to completion, capturing its output (bytes, or str with ``text``).

    ``input`` is fed to its stdin (else stdin is /dev/null); ``env`` adds to the
    environment; ``timeout`` (None: none) stops the command and all it started. With
    ``check`` a failure raises ``CommandFailed``: "WHAT failed: <last stderr line>",
    or without ``what`` "PROGRAM exited N: <last 5 stderr lines>". ``echo`` hears the
    command line (and an unchecked failure). ``pass_fds`` stay open in the command.
    """
    args = _argv(argv, echo)
    t0 = time.perf_counter()
    p = _spawn(args, what, cwd, env, text, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL, pass_fds=pass_fds)
    try:
        out, err = p.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(p)
        log.warning("command timed out after %ss: %s", timeout, shlex.join(args))
        raise CommandFailed(
            f"{what or 'command'}: {shlex.join(args)} timed out after {timeout}s", details={"argv": args}
        ) from None
    except BaseException:
        _stop(p)
        raise
    _log_status(args, p.returncode, t0)
    if p.returncode != 0:
        lines = (err if text else err.decode(errors="replace")).strip().splitlines()
        if check:
            raise CommandFailed(
                _failure(args, p.returncode, lines[-5:], what),
                details={"argv": args, "exit_status": p.returncode, "stderr": "\n".join(lines[-20:])},
            )
        if echo is not None:
            echo(f"  exit {p.returncode}: " + "\n".join(lines[-5:]))
    return subprocess.CompletedProcess(args, p.returncode, out, err)


def run_long(
    argv: Sequence[str | Path],
    *,
    on_line: Callable[[str], Any] | None = None,
    cancel: threading.Event | None = None,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    what: str | None = None,
    echo: Echo | None = None,
) -> None:
    """Run a long command, streaming its output lines (stderr merged) to ``on_line``.

    It runs in its own process group: when ``cancel`` is set the whole group (make
    and every compiler it started) is terminated, then killed, and
    ``Cancelled(what or PROGRAM)`` is raised (the group is stopped too when
    ``on_line`` raises, and its error goes on). A failure raises ``CommandFailed`` with the last lines of its output (those that
    mention an error, if any).
    """
    args = _argv(argv, echo)
    t0 = time.perf_counter()
    p = _spawn(args, what, cwd, env, True, stdin=subprocess.DEVNULL, merge=True)
    tail: collections.deque[str] = collections.deque(maxlen=15)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.2):
            if cancel is not None and cancel.is_set():
                _kill_group(p)
                return

    watcher = threading.Thread(target=watch, name=f"cancel-watch {args[0]}", daemon=True)
    watcher.start()
    try:
        assert p.stdout is not None
        for line in p.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if on_line is not None:
                on_line(line)
        p.wait()
    except BaseException:
        _stop(p)
        raise
    finally:
        stop.set()
        watcher.join()
        if p.stdout is not None:
            p.stdout.close()
    _log_status(args, p.returncode, t0)
    raise_if_cancelled(cancel, what or args[0])
    if p.returncode != 0:
        errors = [line for line in tail if "error" in line.lower()] or list(tail)
        raise CommandFailed(
            _failure(args, p.returncode, errors[-8:], what),
            details={"argv": args, "exit_status": p.returncode, "output": "\n".join(tail)},
        )


# --------------------------------------------------------------------------- internals


def _argv(argv: Sequence[str | Path], echo: Echo | None) -> list[str]:
    args = [str(a) for a in argv]
    if echo is not None:
        echo(f"$ {shlex.join(args)}")
    return args


def _spawn(
    args: list[str],
    what: str | None,
    cwd: Path | str | None,
    env: Mapping[str, str] | None,
    text: bool,
    *,
    stdin: int,
    merge: bool = False,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[Any]:
    """Start ``args`` in a process group of its own (so all it starts can be stopped)."""
    try:
        return subprocess.Popen(
            args,
            cwd=cwd,
            env={**os.environ, **env} if env else None,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge else subprocess.PIPE,
            text=text,
            errors="replace" if text else None,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
        )
    except FileNotFoundError:
        if cwd is not None and not Path(cwd).is_dir():
            raise
        prefix = f"{what}: " if what else ""
        raise CommandFailed(f"{prefix}{args[0]} is not installed", details={"argv": args}) from None


def _failure(args: list[str], status: int, lines: list[str], what: str | None) -> str:
    if what:
        return f"{what} failed: {lines[-1] if lines else f'exit status {status}'}"
    return f"{args[0]} exited {status}: " + "\n".join(lines)


def _log_status(args: list[str], status: int, t0: float) -> None:
    log.info(
        "ran %s -> %s in %.0f ms",
        shlex.join(args),
        status,
        (time.perf_counter() - t0) * 1000,
        extra={"exit_status": status},
    )


def _stop(p: subprocess.Popen[Any]) -> None:
    """Kill the command's group, then collect it (without waiting on a pipe that
    something outside the group may still hold)."""
    _kill_group(p)
    try:
        p.communicate(timeout=GRACE)
    except (subprocess.TimeoutExpired, ValueError, OSError):
        for f in (p.stdout, p.stderr, p.stdin):
            if f is not None:
                f.close()
        p.wait()


def _kill_group(p: subprocess.Popen[Any]) -> None:
    """SIGTERM the process group; SIGKILL what is left of it after GRACE seconds."""
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + GRACE
    while time.monotonic() < deadline:
        if p.poll() is not None:
            try:
                os.killpg(p.pid, 0)  # the leader is gone: are the others?
            except ProcessLookupError:
                return
        time.sleep(0.05)
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
