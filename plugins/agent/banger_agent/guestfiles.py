"""What the agent needs in the guest, in two parts that change at different speeds.

- The launcher, in every image banger builds (``register_guest_payload``): a small sh
  script that finds the agent disk by its ext4 label, mounts it read-only and runs what
  it carries, restarting it if it dies; a systemd unit ordered before the network and
  sshd, or ``GUEST_BOOT_DIR`` for banger's minimal inits. It does not change when the
  agent does, so images need no rebuild for a new agent.
- The agent disk (``agent_disk``): an ext4 labelled ``banger-agent`` holding the agent
  (banger_guest) and its ``run`` script, built once per agent version under the cache
  and attached read-only to every VM.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from importlib import resources
from pathlib import Path

from banger_core import fsutil
from banger_core.images import ext4_from_tree
from banger_core.sources import GUEST_BOOT_DIR, GuestFile

LABEL = "banger-agent"
LAUNCHER = "/usr/local/libexec/banger/agent-launch"
UNIT = "/etc/systemd/system/banger-agent.service"

LAUNCHER_SH = f"""#!/bin/sh
# banger's agent launcher (banger puts it into images; it does not change with the agent):
# find the agent disk (the ext4 labelled {LABEL}), mount it read-only, run its agent.
M=/run/banger-agent
mkdir -p "$M"
tries=0
until grep -q " $M " /proc/mounts; do
  for b in /sys/block/vd*; do
    d=/dev/${{b##*/}}
    [ -b "$d" ] || continue
    if [ "$(dd if="$d" bs=1 skip=1144 count={len(LABEL)} 2>/dev/null)" = "{LABEL}" ]; then
      mount -t ext4 -o ro "$d" "$M" && break
    fi
  done
  grep -q " $M " /proc/mounts && break
  tries=$((tries + 1))
  [ "$tries" -gt 300 ] && {{ echo "banger-agent: no agent disk (an ext4 labelled {LABEL})" >&2; exit 1; }}
  sleep 0.1
done
while :; do
  "$M/run"
  echo "banger-agent: the agent exited ($?); restarting" >&2
  sleep 1
done
"""

UNIT_TEXT = f"""[Unit]
Description=banger guest agent
DefaultDependencies=no
After=systemd-udevd.service systemd-modules-load.service
Before=network-pre.target ssh.service sysinit.target
Wants=network-pre.target

[Service]
ExecStart={LAUNCHER}
Restart=always
RestartSec=1

[Install]
WantedBy=sysinit.target
"""

RUN_SH = """#!/bin/sh
# What the launcher runs: the agent on this disk, with the image's python3.
HERE=$(dirname "$0")
export PYTHONPATH="$HERE/agent" PYTHONDONTWRITEBYTECODE=1
for py in python3 /usr/bin/python3 /usr/local/bin/python3; do
  command -v "$py" >/dev/null 2>&1 && exec "$py" -s -B -m banger_guest.agent
done
echo "banger-agent: no python3 in this image: the agent cannot run" >&2
exit 127
"""


def payload() -> list[GuestFile]:
    return [
        GuestFile(LAUNCHER, LAUNCHER_SH.encode(), 0o755),
        GuestFile(UNIT, UNIT_TEXT.encode(), 0o644),
        GuestFile("/etc/systemd/system/sysinit.target.wants/banger-agent.service", link="../banger-agent.service"),
        GuestFile(f"{GUEST_BOOT_DIR}/agent", link="../agent-launch"),
    ]


def _guest_sources() -> dict[str, bytes]:
    pkg = resources.files("banger_guest")
    return {f.name: f.read_bytes() for f in pkg.iterdir() if f.name.endswith(".py")}


def disk_id(build: dict[str, str | None]) -> str:
    """What identifies the agent disk: the agent's code, the run script, and the banger
    build recorded on it (so its health names the build that made it)."""
    h = hashlib.sha256(RUN_SH.encode() + json.dumps(build, sort_keys=True).encode())
    for name, data in sorted(_guest_sources().items()):
        h.update(name.encode() + b"\0" + data)
    return h.hexdigest()[:12]


_lock = threading.Lock()


def agent_disk(cache_dir: Path, build: dict[str, str | None]) -> Path:
    """The agent disk for this agent (built once, then reused); older ones are removed."""
    ident = disk_id(build)
    where = cache_dir / "agent"
    disk = where / f"agent-{ident}.ext4"
    with _lock:
        if disk.exists():
            return disk
        where.mkdir(parents=True, exist_ok=True)
        with fsutil.staged_dir(where / f"tree-{ident}") as tree:
            pkg = tree / "agent" / "banger_guest"
            pkg.mkdir(parents=True)
            for name, data in _guest_sources().items():
                (pkg / name).write_bytes(data)
            (tree / "run").write_text(RUN_SH)
            (tree / "run").chmod(0o755)
            (tree / "build.json").write_text(json.dumps({**build, "disk": ident}) + "\n")
            ext4_from_tree(tree, disk, size_mib=32, label=LABEL, what="the agent disk")
        shutil.rmtree(where / f"tree-{ident}", ignore_errors=True)
        for old in where.glob("agent-*.ext4"):
            if old != disk:
                old.unlink(missing_ok=True)  # a running VM keeps its open file
        return disk
