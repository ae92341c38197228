"""The one runner for external commands: logs each command and its exit status."""

from __future__ import annotations

import logging
import shlex
import subprocess
import time
from pathlib import Path
from typing import Sequence

from banger_core.errors import BangerError, ErrorCode

log = logging.getLogger("banger.proc")


def run(
    argv: Sequence[str | Path],
    *,
    check: bool = True,
    timeout: float | None = 300,
    input: bytes | None = None,
    what: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command to completion, capturing output.

    On failure (``check``) raises ``BangerError(operation_failed)`` whose message says
    what was being done, the command and the last line of its stderr.
    """
    args = [str(a) for a in argv]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            args, capture_output=True, timeout=timeout, input=input, stdin=None if input else subprocess.DEVNULL
        )
    except FileNotFoundError:
        raise BangerError(ErrorCode.OPERATION_FAILED, f"{what or 'command'}: {args[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        log.warning("command timed out after %ss: %s", timeout, shlex.join(args))
        raise BangerError(
            ErrorCode.OPERATION_FAILED, f"{what or 'command'}: {shlex.join(args)} timed out after {timeout}s"
        ) from None
    log.info(
        "ran %s -> %s in %.0f ms",
        shlex.join(args),
        proc.returncode,
        (time.perf_counter() - t0) * 1000,
        extra={"exit_status": proc.returncode},
    )
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        last = err[-1] if err else f"exit status {proc.returncode}"
        raise BangerError(
            ErrorCode.OPERATION_FAILED,
            f"{what or 'command'} failed: {last}",
            details={"argv": args, "exit_status": proc.returncode, "stderr": "\n".join(err[-20:])},
        )
    return proc
