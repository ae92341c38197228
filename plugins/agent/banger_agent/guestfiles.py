"""What the agent needs in the guest, in two parts that change at different speeds.

- The launcher, in every image banger builds (``register_guest_payload``): a small sh
  script that finds the agent disk by its ext4 label, mounts it read-only and runs what
  it carries, restarting it if it dies; a systemd unit ordered before the network and
  sshd, or ``GUEST_BOOT_DIR`` for banger's minimal inits. It does not change when the
  agent does, so images need no rebuild for a new agent.
- The agent disk (``agent_disk``): an ext4 labelled ``banger-agent`` holding the agent
  (banger_guest), a Python interpreter for it (``python/``, assembled from the host's
  python3 by ``interpreter``), the modules the agent uses (``modules``) and the ``run``
  script, built once per agent, interpreter and banger build under the cache and
  attached read-only to every VM. ``run`` runs the agent on the image's own python3 when
  it can import every one of those modules (the agent's own imports too), else on the
  disk's interpreter, so the agent runs on any image, python3 or not; it says which on
  the console.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import threading
import time
from importlib import resources
from pathlib import Path

from banger_core import fsutil
from banger_agent import interpreter
from banger_core.images import INODE_BYTES, ext4_from_tree, tree_needs
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


def _sh(argv: list[str]) -> str:
    """``argv`` as sh words; those starting with a variable ($P, $HERE) are expanded."""
    return " ".join(f'"{a}"' if a.startswith("$") else shlex.quote(a) for a in argv)


RUN_SH = f"""#!/bin/sh
# What the launcher runs: the agent on this disk, on the image's python3 if that can
# import every module the agent uses (./modules), else on the python this disk carries.
HERE=${{0%/*}}
export PYTHONPATH="$HERE/agent" PYTHONDONTWRITEBYTECODE=1
read -r MODULES < "$HERE/modules"
seen=
for py in python3 /usr/bin/python3 /usr/local/bin/python3; do
  py=$(command -v "$py" 2>/dev/null) || continue
  case " $seen " in *" $py "*) continue ;; esac
  seen="$seen $py"
  # one start probes and serves: the agent imports ./modules first and exits 75 when it
  # cannot (an import of the agent itself failing, e.g. an old python, counts too); any
  # other exit (a python that will not start, an agent that ended) also falls through
  BANGER_AGENT_REQUIRE="$HERE/modules" "$py" -s -S -B -c '
import sys
try:
    from banger_guest import agent
except BaseException as exc:
    sys.stderr.write("banger-agent: %s cannot import the agent: %r\\n" % (sys.executable, exc))
    sys.exit(75)
sys.exit(agent.main())'
  rc=$?
  if [ "$rc" = 75 ]; then
    echo "banger-agent: the image's $py cannot import all of: $MODULES" >&2
  else  # it would not start, or the agent died on it: the disk's python serves instead
    echo "banger-agent: the agent on the image's $py exited $rc" >&2
  fi
done
P="$HERE/python"
read -r VERSION < "$P/version"
echo "banger-agent: running on banger's own python $VERSION (from the agent disk)" >&2
exec {_sh(interpreter.run_argv("$P", "$HERE/agent"))}
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


def disk_id(build: dict[str, str | None], python: str, sources: dict[str, bytes] | None = None) -> str:
    """What identifies the agent disk: the agent's code, the run script, the interpreter
    (``Interpreter.identity``: its version and a hash of its files) and the banger build
    recorded on it (so its health names the build that made it)."""
    h = hashlib.sha256(RUN_SH.encode() + json.dumps([build, python], sort_keys=True).encode())
    for name, data in sorted((sources if sources is not None else _guest_sources()).items()):
        h.update(name.encode() + b"\0" + data)
    return h.hexdigest()[:12]


_lock = threading.Lock()
#: an interpreter dir not used by a disk build, or another build's agent disk not used
#: by a boot, for this long is removed (another daemon sharing the cache may still be
#: about to use it)
OLD_PYTHON_S = 3600


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def disk_size_mib(tree: Path) -> int:
    """What the disk needs for ``tree`` (as ext4_from_tree counts it) and a quarter more."""
    data, entries = tree_needs(tree)
    need = -(-data // (1024 * 1024)) + (int(entries * 1.5) + 4096) * INODE_BYTES // (1024 * 1024) + 16
    return need + need // 4


def agent_disk(cache_dir: Path, build: dict[str, str | None]) -> Path:
    """The agent disk for this agent (built once, then reused); other builds' disks are
    removed once unused for OLD_PYTHON_S (each use touches its disk)."""
    where = cache_dir / "agent"
    with _lock:
        sources = _guest_sources()
        python = interpreter.ensure(where, sources)
        ident = disk_id(build, python.identity, sources)
        disk = where / f"agent-{ident}.ext4"
        if disk.exists():
            os.utime(disk)  # in use: kept by the clean-up below (in another daemon, of another build)
            return disk
        os.utime(python.root)  # in use: kept by the clean-up below (here or in another daemon)
        with fsutil.staged_dir(where / f"tree-{ident}") as tree:
            pkg = tree / "agent" / "banger_guest"
            pkg.mkdir(parents=True)
            for name, data in sources.items():
                (pkg / name).write_bytes(data)
            shutil.copytree(
                python.root,
                tree / "python",
                symlinks=True,
                copy_function=_link_or_copy,
                ignore=shutil.ignore_patterns("manifest.json"),
            )
            (tree / "modules").write_text(", ".join(python.probe) + "\n")
            (tree / "run").write_text(RUN_SH)
            (tree / "run").chmod(0o755)
            (tree / "build.json").write_text(json.dumps({**build, "disk": ident, "python": python.identity}) + "\n")
            ext4_from_tree(tree, disk, size_mib=disk_size_mib(tree), label=LABEL, what="the agent disk")
        shutil.rmtree(where / f"tree-{ident}", ignore_errors=True)
        for old in where.glob("agent-*.ext4"):
            # a running VM keeps its open file; one another daemon (another build sharing
            # this cache) is about to boot with must still be there: only unused ones go
            try:
                if old != disk and time.time() - old.stat().st_mtime > OLD_PYTHON_S:
                    old.unlink(missing_ok=True)
            except OSError:
                continue
        for old in where.glob("python-*"):
            try:
                if old != python.root and time.time() - old.stat().st_mtime > OLD_PYTHON_S:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                continue
        return disk
