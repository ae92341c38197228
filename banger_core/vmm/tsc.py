"""The host's TSC rate, for guests that cannot measure it themselves.

Under TCG a guest's ``rdtsc`` reads the host's TSC (QEMU's ``cpu_get_host_ticks``).
On QEMU's ``microvm`` machine the guest kernel has no HPET and no ACPI PM timer, so
its only way to learn the TSC rate is timing the PIT; when the host is busy and a
vCPU thread is descheduled inside that window, calibration fails, the kernel marks
the TSC unusable and falls back to a delay loop calibrated just as badly, and the
boot crawls or stalls. Measuring the rate here and handing it to the guest as
``tsc_early_khz=`` (a documented kernel parameter made for unreliable early
calibration) takes luck out of it.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import statistics
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

# rdtsc; shl rdx, 32; or rax, rdx; ret
_RDTSC_X86_64 = bytes([0x0F, 0x31, 0x48, 0xC1, 0xE2, 0x20, 0x48, 0x09, 0xD0, 0xC3])


def _rdtsc() -> Callable[[], int]:
    buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(_RDTSC_X86_64)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    fn = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)
    # the code page lives as long as the function (ctypes function objects take attributes; typeshed does not say so)
    fn._keepalive = buf  # type: ignore[attr-defined]
    return fn


@cache
def host_tsc_khz(samples: int = 3, window: float = 0.03) -> int | None:
    """The host TSC rate in kHz (median of ``samples`` windows against
    CLOCK_MONOTONIC_RAW), or None where it cannot be read (not x86-64, or a kernel
    that refuses executable anonymous memory)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        rdtsc = _rdtsc()
    except (OSError, ValueError, AttributeError):
        return None
    rdtsc()  # the first call through ctypes is slow

    def stamp() -> tuple[float, int]:  # (TSC, ns) read together: the clock bracketed by two TSC reads
        a = rdtsc()
        t = time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW)
        return (a + rdtsc()) / 2, t

    rates = []
    for _ in range(samples):
        c0, t0 = stamp()
        time.sleep(window)
        c1, t1 = stamp()
        if t1 > t0 and c1 > c0:
            rates.append((c1 - c0) * 1e6 / (t1 - t0))
    if not rates:
        return None
    khz = int(statistics.median(rates))
    return khz if 100_000 <= khz <= 20_000_000 else None  # 100 MHz .. 20 GHz, else nonsense


def host_tsc_trusted() -> bool:
    """Whether the host kernel keeps time with its TSC (so the TSC is invariant and
    synchronized across host CPUs, and therefore across a TCG guest's vCPUs, which
    all read it)."""
    try:
        return Path("/sys/devices/system/clocksource/clocksource0/current_clocksource").read_text().strip() == "tsc"
    except OSError:
        return False
