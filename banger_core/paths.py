"""The one path layout of banger. Everything on disk is named here.

Directories follow XDG, each overridable by an environment variable so tests and
system installs can relocate them:

=================  ======================  ==========================================
what               override                default
=================  ======================  ==========================================
config             ``BANGER_CONFIG_DIR``   ``$XDG_CONFIG_HOME/banger`` (~/.config/banger)
state (durable)    ``BANGER_STATE_DIR``    ``$XDG_STATE_HOME/banger`` (~/.local/state/banger)
cache              ``BANGER_CACHE_DIR``    ``$XDG_CACHE_HOME/banger`` (~/.cache/banger)
runtime (socket)   ``BANGER_RUNTIME_DIR``  ``$XDG_RUNTIME_DIR/banger`` or /tmp/banger-<uid>
guest memory       ``BANGER_MEMORY_DIR``   /dev/shm/banger-<uid> (a tmpfs: running VMs' RAM)
=================  ======================  ==========================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


STAGING = ".staging-"  # in the name of every staging dir (Paths.staging_dir)
ASIDE = ".old"  # the end of a replaced dir's name while its successor moves in (Paths.aside)
SNAPSHOT_MACHINE = "machine.json"  # in a snapshot's dir: the Machine it was taken with
SNAPSHOT_DISK = "root"  # in a snapshot's dir: the root disk layer, + ".qcow2" or ".img"
ROOTFS_TMP = ".rootfs.ext4.tmp"  # a managed rootfs being copied in and checked (images.publish_rootfs)


@dataclass(frozen=True)
class VMFiles:
    """The files of one VM's directory (``$STATE/vms/<id>/``), each named here once;
    the VMM drivers get the directory and name its files through this."""

    dir: Path

    @property
    def handles(self) -> Path:
        return self.dir / "handles.json"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    @property
    def machine(self) -> Path:
        """The Machine the VM was last booted with (JSON), written at each launch."""
        return self.dir / "machine.json"

    @property
    def vmm_pid(self) -> Path:
        return self.dir / "vmm.pid"

    @property
    def qmp_socket(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def firecracker_socket(self) -> Path:
        return self.dir / "firecracker.sock"

    @property
    def firecracker_log(self) -> Path:
        return self.dir / "firecracker.log"

    def root_disk(self, strategy: str) -> Path:
        return self.dir / ("root.qcow2" if strategy == "qcow2" else "root.img")

    @property
    def suspend_dir(self) -> Path:
        """The suspend image (``vm stop --suspend``): the driver's files and
        ``SNAPSHOT_MACHINE``; consumed by the next start."""
        return self.dir / "suspend"


@dataclass(frozen=True)
class Paths:
    config_dir: Path
    state_dir: Path
    cache_dir: Path
    runtime_dir: Path
    #: running QEMU guests' RAM, one file each (``QemuDriver``), so that a snapshot
    #: copies it and its restores map that copy privately: on a tmpfs
    memory_dir: Path = Path(f"/dev/shm/banger-{os.getuid()}")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Paths":
        env = dict(os.environ if env is None else env)

        def pick(override: str, xdg: str, fallback: str) -> Path:
            if env.get(override):
                return Path(env[override]).expanduser().absolute()
            if env.get(xdg) and os.path.isabs(env[xdg]):
                return Path(env[xdg]) / "banger"
            return Path.home() / fallback / "banger"

        if env.get("BANGER_RUNTIME_DIR"):
            runtime = Path(env["BANGER_RUNTIME_DIR"]).expanduser().absolute()
        elif env.get("XDG_RUNTIME_DIR") and os.path.isabs(env["XDG_RUNTIME_DIR"]):
            runtime = Path(env["XDG_RUNTIME_DIR"]) / "banger"
        else:
            runtime = Path(f"/tmp/banger-{os.getuid()}")
        if env.get("BANGER_MEMORY_DIR"):
            memory = Path(env["BANGER_MEMORY_DIR"]).expanduser().absolute()
        elif os.path.isdir("/dev/shm"):
            memory = Path(f"/dev/shm/banger-{os.getuid()}")
        else:
            memory = runtime / "memory"
        return cls(
            config_dir=pick("BANGER_CONFIG_DIR", "XDG_CONFIG_HOME", ".config"),
            state_dir=pick("BANGER_STATE_DIR", "XDG_STATE_HOME", ".local/state"),
            cache_dir=pick("BANGER_CACHE_DIR", "XDG_CACHE_HOME", ".cache"),
            runtime_dir=runtime,
            memory_dir=memory,
        )

    # --- config -------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"

    # --- state --------------------------------------------------------------------
    @property
    def db_file(self) -> Path:
        return self.state_dir / "banger.db"

    @property
    def daemon_log(self) -> Path:
        return self.state_dir / "bangerd.log"

    @property
    def vms_dir(self) -> Path:
        return self.state_dir / "vms"

    def vm_dir(self, vm_id: str) -> Path:
        return self.vms_dir / vm_id

    def vm_files(self, vm_id: str) -> "VMFiles":
        return VMFiles(self.vm_dir(vm_id))

    @property
    def snapshots_dir(self) -> Path:
        return self.state_dir / "snapshots"

    def snapshot_dir(self, snap_id: str) -> Path:
        """A snapshot's files: the driver's (device state, memory), its root disk layer
        (``SNAPSHOT_DISK``) and ``SNAPSHOT_MACHINE`` (the devices it was taken with)."""
        return self.snapshots_dir / snap_id

    def vm_handles(self, vm_id: str) -> Path:
        return self.vm_files(vm_id).handles

    @property
    def images_dir(self) -> Path:
        return self.state_dir / "images"

    @property
    def kernels_dir(self) -> Path:
        return self.state_dir / "kernels"

    @property
    def blobs_dir(self) -> Path:
        """Cached OCI layers, kept while a pulled image was made from them."""
        return self.cache_dir / "blobs"

    # --- runtime ------------------------------------------------------------------
    @property
    def builds_dir(self) -> Path:
        """Host-side build trees (kernel compiles, image roots), kept for the next build."""
        return self.cache_dir / "builds"

    @property
    def debs_dir(self) -> Path:
        """Packages sources download for their builds (kept: a rebuild needs no network)."""
        return self.cache_dir / "debs"

    @property
    def daemon_stderr(self) -> Path:
        """Where a daemon started by the CLI writes what it prints before its log is up."""
        return self.state_dir / "bangerd.stderr"

    @property
    def kvm_probe(self) -> Path:
        """What the last KVM probe boot found (accel auto)."""
        return self.state_dir / "kvm-probe.json"

    @property
    def bundles_dir(self) -> Path:
        """Bundles being fetched and unpacked (transient: consumed by the import)."""
        return self.cache_dir / "bundles"

    @property
    def scratch_dir(self) -> Path:
        """Work dirs of operations in flight (an OCI image's unpacked layers), each
        removed when its operation ends; whatever is here at daemon start is a
        leftover (``transient_leftovers``)."""
        return self.cache_dir / "scratch"

    @property
    def cli_index(self) -> Path:
        """Which plugin provides which CLI command (banger_core.cli.index)."""
        return self.cache_dir / "cli-index.json"

    @staticmethod
    def staging_dir(beside: Path) -> Path:
        """A new, empty staging dir next to ``beside`` (``.NAME.staging-XXXX``), renamed
        into place when complete; what a cut-off operation leaves of it is removed by
        the next daemon (``transient_leftovers``)."""
        import tempfile

        beside.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{beside.name}{STAGING}", dir=beside.parent))

    @staticmethod
    def aside(final: Path) -> Path:
        """Where a dir being replaced waits (``.NAME.old``) until its successor is in
        place (fsutil.replace_dir); a daemon cut off in between leaves it, and the next
        one puts it back (``transient_leftovers``)."""
        return final.with_name(f".{final.name}{ASIDE}")

    @staticmethod
    def aside_of(path: Path) -> Path | None:
        """The dir ``path`` was moved aside from (``aside``'s inverse), or None."""
        if path.name.startswith(".") and path.name.endswith(ASIDE):
            return path.with_name(path.name[1 : -len(ASIDE)])
        return None

    def transient_leftovers(self) -> list[Path]:
        """What an operation cut off mid-way (a daemon killed or stopped with work
        still running) leaves: staging dirs (``.NAME.staging-*``), a half-copied
        ``.rootfs.ext4.tmp``, a replaced kernel's ``.NAME.old``, unpacked bundles, the
        scratch dirs of OCI pulls. Only
        the daemon holding the lock may remove them (no operation is running then)."""
        found: list[Path] = []
        for d in (self.images_dir, self.kernels_dir, self.bundles_dir, self.snapshots_dir):
            if d.is_dir():
                found += [p for p in d.iterdir() if p.name.startswith(".") and (STAGING in p.name or p.name.endswith(ASIDE))]
        if self.images_dir.is_dir():
            found += list(self.images_dir.glob(f"*/{ROOTFS_TMP}"))
        if self.vms_dir.is_dir():  # a suspend image cut off mid-write
            found += list(self.vms_dir.glob(f"*/.*{STAGING}*"))
        for d in (self.bundles_dir, self.scratch_dir):  # everything in these is transient
            if d.is_dir():
                found += [p for p in d.iterdir() if p not in found]
        return sorted(set(found))

    @property
    def socket(self) -> Path:
        return self.runtime_dir / "bangerd.sock"

    @property
    def pid_file(self) -> Path:
        return self.runtime_dir / "bangerd.pid"

    @property
    def lock_file(self) -> Path:
        return self.runtime_dir / "bangerd.lock"

    def ensure(self) -> None:
        """Create the directories with owner-only permissions where it matters."""
        for d in (self.config_dir, self.state_dir, self.cache_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.runtime_dir, 0o700)


PROJECT_FILE = "banger.toml"
