"""The checks a name or a size passes, with no pydantic: the CLI's common path uses
them before any model exists (`vm run`, `vm create`: 90 ms of pydantic imports
saved), and the models validate with the same functions."""

from __future__ import annotations

import re

# Every validation pattern is used with ``fullmatch`` (``$`` also matches before a
# final newline, so ``match`` with ``...$`` lets "box\n" through).
VM_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_SIZE_RE = re.compile(r"([0-9]+)([KMGT]?)(?:i?B)?", re.IGNORECASE)
_UNIT_MIB = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}


def validate_vm_name(name: str, what: str = "VM") -> str:
    """VM names (and snapshot names: ``what``) are DNS labels: 1–63 of [a-z0-9-], no
    leading or trailing '-'."""
    if not isinstance(name, str) or not VM_NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid {what} name {name!r}: use 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'"
        )
    return name


def parse_size_mib(value: object) -> int:
    """A size in MiB: an integer (MiB) or a string like "512", "512M", "2G", "1GiB".

    The one size syntax of banger (CLI flags, config, RPC). Booleans, floats and
    anything else are refused; so is a size below 1 MiB.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f'expected a size: an integer (MiB) or a string like "512M" or "8G", got {type(value).__name__}')
    if isinstance(value, int):
        mib = float(value)
    else:
        m = _SIZE_RE.fullmatch(value)
        if not m:
            raise ValueError(f'cannot parse size {value!r}: use an integer (MiB) or a string like "512M", "8G"')
        mib = int(m.group(1)) * _UNIT_MIB[(m.group(2) or "m").lower()]
    if mib < 1:
        raise ValueError(f"size must be at least 1 MiB, got {value!r}")
    return int(mib)
