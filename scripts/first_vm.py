"""The install's main job: boot a real VM on the default image and show its console.

`banger vm create` with no image pulls the default image (debian-bookworm) and its
kernel from the debian plugin — built on this host from Debian's packages the first time,
then cached — boots it, and this script waits for the guest's login prompt, prints
what the guest said, and stops and deletes the VM again. (Running a command inside
needs the guest agent, which is not built yet.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BANGER = str(Path(sys.executable).parent / "banger")
NAME = "first-vm"


def banger(*args: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    if not quiet:
        print(f"$ banger {' '.join(args)}", flush=True)
    r = subprocess.run([BANGER, *args], text=True, stdout=subprocess.PIPE, stderr=None if not quiet else subprocess.PIPE)
    if not quiet:
        sys.stdout.write(r.stdout)
    if check and r.returncode != 0:
        sys.exit(r.returncode)
    return r


def main() -> int:
    banger("vm", "delete", NAME, "--force", check=False, quiet=True)
    # an install brings the default image up to date: a no-op when it is current, a
    # rebuild when this banger's recipe moved on (refused, and the old one booted,
    # while other VMs use it)
    banger("image", "pull", "debian-bookworm", check=False)
    t0 = time.monotonic()
    try:
        banger("vm", "create", "--name", NAME, "--vcpu", "1", "--memory", "1G")
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            text = banger("vm", "logs", NAME, "-n", "0", check=False, quiet=True).stdout
            if "login:" in text:
                print(f"==> the guest is up {time.monotonic() - t0:.1f}s after create started; its console:")
                for line in text.splitlines():
                    if (
                        line.startswith(("Debian GNU/Linux 12", "Linux "))
                        or "login:" in line
                        or "Reached target multi-user" in line
                    ):
                        print(f"    {line.strip()}")
                banger("vm", "stop", NAME)
                return 0
            time.sleep(1)
        print(f"banger: the guest did not reach a login prompt in 600s; see `banger vm logs {NAME}`", file=sys.stderr)
        return 1
    finally:
        # delete first, report after: a closed stdout (`| head`) or a signal must not
        # leave the VM running
        r = banger("vm", "delete", NAME, "--force", check=False, quiet=True)
        with contextlib.suppress(OSError):
            print(f"$ banger vm delete {NAME} --force\n{r.stdout}", end="", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("NO_COLOR", "1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through main's cleanup
    sys.exit(main())
