"""The work disk: the VM's own ext4 holding /root, mounted by the agent as it starts.

The host (the workdisk plugin) attaches the disk and names its ext4 label on the
kernel command line (``banger.workdisk=LABEL``). The agent mounts it on /root before it
serves anything, so nothing the host asks of the guest (SSH keys, synced files, a
workspace) can land on the image's /root underneath. The disk is found by reading each
virtio disk's superblock label, not through udev or a systemd device unit: images
without udev (OCI images with systemd) would otherwise wait 90 s for a device that
never "appears". Stdlib only.
"""

from __future__ import annotations

import os
import subprocess
import time

TARGET = "/root"
#: the ext4 superblock starts 1024 bytes in; its volume name is 120 bytes into it
LABEL_OFFSET = 1024 + 120
LABEL_RE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


def _label(device: str) -> str:
    try:
        with open(device, "rb") as fh:
            fh.seek(1024 + 0x38)
            if fh.read(2) != b"\x53\xef":  # not ext2/3/4
                return ""
            fh.seek(LABEL_OFFSET)
            return fh.read(16).split(b"\0", 1)[0].decode("ascii", "replace")
    except OSError:
        return ""


def find(label: str, sys_block: str = "/sys/block", dev: str = "/dev") -> str | None:
    """The /dev path of the virtio disk whose ext4 label is ``label``."""
    try:
        names = sorted(os.listdir(sys_block))
    except OSError:
        return None
    for name in names:
        if name.startswith("vd") and _label(os.path.join(dev, name)) == label:
            return os.path.join(dev, name)
    return None


def mounted_on(target: str, mounts: str = "/proc/mounts") -> str | None:
    """The device mounted on ``target`` (the last mount wins), or None."""
    found = None
    try:
        with open(mounts) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) > 2 and parts[1] == target:
                    found = parts[0]
    except OSError:
        return None
    return found


def mount(label: str, target: str = TARGET, wait_s: float = 10.0) -> dict[str, str]:
    """Mount the ext4 labelled ``label`` on ``target`` unless it already is (an agent
    restarted, a VM restored from a snapshot); what was done, for ``health``: a dict
    with ``device`` and ``target``, or ``error``."""
    if not label or set(label) - LABEL_RE_CHARS or len(label) > 16:
        return {"error": f"bad work disk label {label!r}"}
    deadline = time.monotonic() + wait_s
    device = find(label)
    while device is None and time.monotonic() < deadline:  # virtio-blk is there at boot; be patient anyway
        time.sleep(0.05)
        device = find(label)
    if device is None:
        return {"error": f"no disk labelled {label} (the work disk)"}
    current = mounted_on(target)
    if current is not None and os.path.realpath(current) == os.path.realpath(device):
        return {"device": device, "target": target, "state": "already mounted"}
    os.makedirs(target, mode=0o700, exist_ok=True)
    r = subprocess.run(["mount", "-t", "ext4", "-o", "noatime", device, target], capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": f"mount {device} {target}: {(r.stderr or r.stdout).strip() or f'status {r.returncode}'}"}
    return {"device": device, "target": target, "state": "mounted"}
