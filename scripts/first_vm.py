"""The install's main job: a command in a real VM on the default image.

`banger vm run --rm -- uname -a` creates a VM from the default image (debian-bookworm,
with its kernel, built on this host from Debian's packages by the debian plugin the
first time, then cached), waits for its guest agent, runs `uname -a` in it, prints the
guest's kernel line, and deletes the VM, however the run ends.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BANGER = str(Path(sys.executable).parent / "banger")


def banger(*args: str) -> int:
    print(f"$ banger {' '.join(args)}", flush=True)
    return subprocess.run([BANGER, *args]).returncode


def main() -> int:
    # an install brings the default image up to date: a no-op when it is current, a
    # rebuild when this banger's recipe or guest payload moved on (refused while VMs use it)
    banger("image", "pull", "debian-bookworm")
    return banger("vm", "run", "--rm", "--vcpu", "1", "--memory", "1G", "--", "uname", "-a")


if __name__ == "__main__":
    os.environ.setdefault("NO_COLOR", "1")
    sys.exit(main())
