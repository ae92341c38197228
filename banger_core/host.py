"""Facts about the host that defaults and limits derive from."""

from __future__ import annotations

import os


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def memory_mib() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1024  # pragma: no cover


def default_vcpus() -> int:
    """cpus/4, at least 1, at most 4."""
    return max(1, min(4, cpu_count() // 4))


def default_memory_mib() -> int:
    """RAM/8, at least 256 MiB, at most 8 GiB."""
    return max(256, min(8192, memory_mib() // 8))
