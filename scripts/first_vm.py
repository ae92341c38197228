"""The install's main job: boot a real VM with banger and show what the guest printed.

Until the default image and `banger vm run` exist, this is the furthest a new user can
get: it builds (once, cached) Debian's cloud kernel with an initrd banger makes and a
small busybox root disk, registers them with banger, creates a VM, waits for the guest
to report in on its console, and deletes the VM again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import guest_assets as ga  # noqa: E402

BANGER = str(Path(sys.executable).parent / "banger")
NAME = "first-vm"


def banger(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    print(f"$ banger {' '.join(args)}", flush=True)
    r = subprocess.run([BANGER, *args], text=True, capture_output=True)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    if check and r.returncode != 0:
        sys.exit(r.returncode)
    return r


def main() -> int:
    cache = ga.default_cache_dir()
    print(f"==> building (or reusing) a kernel and a busybox root disk in {cache}", flush=True)
    kernel = ga.test_kernel(cache)
    rootfs = cache / "rootfs-busybox.ext4"
    if not rootfs.exists():
        ga.busybox_rootfs(rootfs, modules_dir=Path(kernel["modules"]), cache=cache)
    kernels = {k["name"] for k in json.loads(banger("kernel", "list", "--json").stdout)}
    if "debian-cloud" not in kernels:
        banger("kernel", "import", "debian-cloud", "--from", str(Path(kernel["kernel"]).parent))
    images = {i["name"] for i in json.loads(banger("image", "list", "--json").stdout)}
    if "busybox" not in images:
        banger("image", "register", "busybox", "--rootfs", str(rootfs), "--kernel-ref", "debian-cloud")
    if NAME in {v["name"] for v in json.loads(banger("vm", "list", "--json").stdout)}:
        banger("vm", "delete", NAME, "--force")
    t0 = time.monotonic()
    banger("vm", "create", "--name", NAME, "--image", "busybox", "--vcpu", "1", "--memory", "256M", "--disk-size", "256M")
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            text = subprocess.run([BANGER, "vm", "logs", NAME, "-n", "0"], text=True, capture_output=True).stdout
            if ga.BOOT_MARKER in text:
                print(f"==> the guest booted and reported in {time.monotonic() - t0:.1f}s; its console says:")
                for line in text.splitlines():
                    if line.startswith(("BANGER-TEST", "Linux version")) or "banger" in line:
                        print(f"    {line}")
                banger("vm", "stop", NAME)
                return 0
            time.sleep(0.5)
        print("banger: the guest did not report in within 300s; see `banger vm logs first-vm`", file=sys.stderr)
        return 1
    finally:
        banger("vm", "delete", NAME, "--force", check=False)


if __name__ == "__main__":
    os.environ.setdefault("NO_COLOR", "1")
    sys.exit(main())
