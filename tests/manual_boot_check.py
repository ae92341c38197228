"""Boot the test guest assets under QEMU (TCG) and check them end to end.

    .venv/bin/python tests/manual_boot_check.py [--smp 2 1] [--microvm]

Builds (or reuses) the kernel, initrd and module tree in $BANGER_TEST_CACHE
(default /var/cache/banger-test), writes a fresh busybox root disk there, then
for each -smp value boots a copy of that disk on QEMU's ``pc`` machine, waits
for the guest's BANGER-TEST-BOOT line, checks nproc, presses the ACPI power
button over QMP and checks that QEMU exits by itself.  Prints the timings and
exits non-zero when a check fails.  Serial logs are kept in
<cache>/manual-boot-check/.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from guest_assets import (
    BOOT_MARKER,
    POWEROFF_MARKER,
    busybox_rootfs,
    default_cache_dir,
    test_kernel,
)

BOOT_TIMEOUT_S = 180.0
POWEROFF_TIMEOUT_S = 60.0
MEMORY_MIB = 512
CMDLINE = "console=ttyS0 root=/dev/vda rw panic=-1 net.ifnames=0"


@dataclass
class BootResult:
    name: str
    ok: bool = False
    boot_s: float | None = None
    poweroff_s: float | None = None
    nproc: int | None = None
    mem_kb: int | None = None
    exit_code: int | None = None
    problems: list[str] = field(default_factory=list)
    log: Path | None = None


def qemu_args(
    machine: str,
    smp: int,
    kernel: dict[str, Any],
    disk: Path,
    qmp: Path,
    serial: Path,
    append: str = CMDLINE,
) -> list[str]:
    args = [
        "qemu-system-x86_64",
        "-M",
        machine,
        "-accel",
        "tcg",
        "-smp",
        str(smp),
        "-m",
        str(MEMORY_MIB),
        "-display",
        "none",
        "-no-reboot",
        "-nic",
        "none",
        "-kernel",
        kernel["kernel"],
        "-initrd",
        kernel["initrd"],
        "-append",
        append,
        "-qmp",
        f"unix:{qmp},server=on,wait=off",
        "-serial",
        f"file:{serial}",
    ]
    if machine.split(",")[0] == "microvm":
        # microvm has no PCI: the disk is a virtio-mmio device, found through ACPI.
        args += ["-drive", f"id=root,file={disk},if=none,format=raw", "-device", "virtio-blk-device,drive=root"]
    else:
        args += ["-drive", f"file={disk},if=virtio,format=raw"]
    return args


def qmp_powerdown(path: Path, timeout: float = 10.0) -> None:
    """qmp_capabilities, then system_powerdown (an ACPI power-button press)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        reader = sock.makefile("rb")

        def reply() -> dict[str, Any]:
            while True:
                line = reader.readline()
                if not line:
                    raise RuntimeError("QMP connection closed")
                msg: dict[str, Any] = json.loads(line)
                if "event" not in msg:
                    return msg

        greeting = reply()
        if "QMP" not in greeting:
            raise RuntimeError(f"unexpected QMP greeting {greeting}")
        for command in ("qmp_capabilities", "system_powerdown"):
            sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
            answer = reply()
            if "error" in answer:
                raise RuntimeError(f"QMP {command}: {answer['error']}")


def boot_once(
    name: str,
    machine: str,
    smp: int,
    kernel: dict[str, Any],
    rootfs: Path,
    logs: Path,
    boot_timeout: float = BOOT_TIMEOUT_S,
    append: str = CMDLINE,
) -> BootResult:
    result = BootResult(name=name, log=logs / f"{name}.log")
    with tempfile.TemporaryDirectory(prefix="banger-boot-") as tmp:
        disk = Path(tmp) / "root.ext4"
        shutil.copyfile(rootfs, disk)
        qmp = Path(tmp) / "qmp.sock"
        serial = Path(tmp) / "serial.log"
        stderr_path = Path(tmp) / "qemu.stderr"
        args = qemu_args(machine, smp, kernel, disk, qmp, serial, append)
        with open(stderr_path, "wb") as stderr:
            start = time.monotonic()
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
        try:
            boot_line = _wait_for_line(serial, BOOT_MARKER, proc, boot_timeout)
            if boot_line is None:
                result.problems.append(f"no {BOOT_MARKER} line within {boot_timeout:.0f}s (qemu exit {proc.poll()})")
                return result
            result.boot_s = time.monotonic() - start
            match = re.search(r"nproc=(\d+) mem_kb=(\d+)", boot_line)
            if match:
                result.nproc, result.mem_kb = int(match[1]), int(match[2])
            if result.nproc != smp:
                result.problems.append(f"nproc={result.nproc}, expected {smp}")

            pressed = time.monotonic()
            qmp_powerdown(qmp)
            try:
                result.exit_code = proc.wait(timeout=POWEROFF_TIMEOUT_S)
                result.poweroff_s = time.monotonic() - pressed
            except subprocess.TimeoutExpired:
                result.problems.append(f"qemu still running {POWEROFF_TIMEOUT_S:.0f}s after system_powerdown")
            text = serial.read_text(errors="replace")
            if POWEROFF_MARKER not in text:
                result.problems.append(f"guest never printed {POWEROFF_MARKER}")
            if result.exit_code not in (None, 0):
                result.problems.append(f"qemu exited {result.exit_code}")
            result.ok = not result.problems
            return result
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            logs.mkdir(parents=True, exist_ok=True)
            log_text = serial.read_text(errors="replace") if serial.exists() else ""
            qemu_err = stderr_path.read_text(errors="replace") if stderr_path.exists() else ""
            assert result.log is not None
            result.log.write_text(f"$ {' '.join(args)}\n{log_text}\n--- qemu stdout/stderr ---\n{qemu_err}")


def _wait_for_line(path: Path, marker: str, proc: subprocess.Popen[bytes], timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith(marker):
                    return line
        if proc.poll() is not None:
            return None
        time.sleep(0.05)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smp", type=int, nargs="*", default=[2, 1], help="boot once per -smp value on -M pc (default: 2 1)")
    parser.add_argument(
        "--microvm",
        nargs="?",
        const="microvm",
        metavar="MACHINE",
        help="also try -M microvm[,OPTIONS] (informational: pc is the target)",
    )
    parser.add_argument(
        "--boot-timeout",
        type=float,
        default=BOOT_TIMEOUT_S,
        help=f"seconds to wait for {BOOT_MARKER} (default {BOOT_TIMEOUT_S:.0f})",
    )
    parser.add_argument(
        "--microvm-append",
        default="",
        metavar="PARAMS",
        help="extra kernel parameters for the microvm run, e.g. "
        "tsc_early_khz=2400000 (TCG: PIT-based TSC calibration is flaky there)",
    )
    opts = parser.parse_args(argv)

    cache = default_cache_dir()
    started = time.monotonic()
    kernel = test_kernel(cache)
    print(
        f"kernel: {kernel['package']} {kernel['package_version']} ({kernel['version']}), "
        f"ready in {time.monotonic() - started:.1f}s"
    )
    print(f"initrd modules: {' '.join(kernel['initrd_modules'])}")

    started = time.monotonic()
    rootfs = busybox_rootfs(cache / "rootfs-busybox.ext4", modules_dir=Path(kernel["modules"]), cache=cache)
    print(f"rootfs: {rootfs} built in {time.monotonic() - started:.1f}s")

    runs = [(f"pc-smp{n}", "pc", n) for n in opts.smp]
    if opts.microvm:
        runs.append(("microvm-smp2", opts.microvm, 2))
    logs = cache / "manual-boot-check"
    failed = 0
    for name, machine, smp in runs:
        append = CMDLINE
        if machine.split(",")[0] == "microvm" and opts.microvm_append:
            append = f"{CMDLINE} {opts.microvm_append}"
        result = boot_once(name, machine, smp, kernel, rootfs, logs, opts.boot_timeout, append)
        boot = f"{result.boot_s:.1f}s" if result.boot_s is not None else "-"
        off = f"{result.poweroff_s:.1f}s" if result.poweroff_s is not None else "-"
        status = "OK" if result.ok else "FAIL: " + "; ".join(result.problems)
        print(
            f"{name}: boot-line {boot}, nproc={result.nproc}, mem_kb={result.mem_kb}, "
            f"powerdown->exit {off}, qemu exit {result.exit_code}: {status} (log {result.log})"
        )
        if not result.ok and machine.split(",")[0] != "microvm":
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
