"""Build the default image, ``debian-bookworm``, on the host from Debian's packages.

    dest/rootfs.ext4      ext4 root filesystem, owned by root
    dest/manifest.json    what was built

mmdebstrap makes a minbase tree with systemd (and dbus, which logind needs to act on
the ACPI power button), openssh-server, python3, git, iproute2, ca-certificates and curl; banger then puts in what a VM needs to come up on its own
(the kernel's modules, a hostname, a serial console login, DHCP-free networking left
to banger's guest side) and makes the filesystem with ``mkfs.ext4 -d``, sized
max(tree x 1.5, 1 GiB). Everything is staged and renamed into place at the end, so a
failed build leaves nothing.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

from banger_core import proc
from banger_debian.common import ArtifactBuildError, Log, Work, remove_tree
from banger_core.fsutil import staged_dir, tree_bytes
from banger_core.sources import GuestPayload

RECIPE = 4
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "openssh-server",
    "python3",
    "git",
    "iproute2",
    "ca-certificates",
    "curl",
    "kmod",
)

# dpkg's "Unpacking P" and "Setting up P" lines in a build of PACKAGES, counted on
# one: the denominator of the progress bar (which stops short of 100% if a build has more).
EXPECTED_STEPS = 346


# Units a disposable VM has no use for, masked: under TCG every unit costs the one vCPU
# a second or more at boot (systemd-analyze blame on the default kernel). Kernel
# debug/tracing/config filesystems, hugepages, binfmt_misc, pstore, the modprobe@ units
# for modules a VM doesn't load early (fuse and loop still load when first used), the
# getty on tty1 (no display), ext4 scrubbing and the periodic timers (apt, dpkg backup,
# fstrim) that would start work under a user's command.
MASKED_UNITS = (
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "dev-hugepages.mount",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
    "systemd-binfmt.service",
    "systemd-pstore.service",
    "modprobe@drm.service",
    "modprobe@efi_pstore.service",
    "modprobe@dm_mod.service",
    "modprobe@configfs.service",
    "modprobe@fuse.service",
    "modprobe@loop.service",
    "sys-fs-fuse-connections.mount",
    "getty@tty1.service",
    "e2scrub_reap.service",
    "e2scrub_all.timer",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "fstrim.timer",
)
# Modules udev would load by alias for the emulated PC's devices and CPU features that a
# VM doesn't use (its disk and network are virtio): each costs a second or more of a TCG
# boot. Blacklisted, not removed: `modprobe kvm_intel` (nested virtualization) still works.
BLACKLISTED_MODULES = (
    "kvm_amd",
    "kvm_intel",
    "ata_piix",
    "ata_generic",
    "pata_acpi",
    "floppy",
    "pcspkr",
    "serio_raw",
    "psmouse",
    "joydev",
    "i2c_piix4",
    "powernow_k8",
    "acpi_cpufreq",
    "ccp",
    "evbug",
    "bochs",
    "aesni_intel",
    "ghash_clmulni_intel",
    "crc32_pclmul",
    "sha512_ssse3",
    "sha256_ssse3",
    "sha1_ssse3",
)


def mask_units(tree: Path, units: tuple[str, ...] = MASKED_UNITS) -> None:
    """``systemctl mask`` without a running systemd: a link to /dev/null in /etc, and
    the unit's enablement links removed."""
    etc = tree / "etc/systemd/system"
    etc.mkdir(parents=True, exist_ok=True)
    for unit in units:
        for wanted in etc.glob(f"*.wants/{unit}"):
            wanted.unlink()
        link = etc / unit
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")


def customize(tree: Path, modules_dir: Path | None) -> None:
    """What banger adds to the Debian tree so a VM boots to a usable state."""
    (tree / "etc/hostname").write_text("banger\n")
    (tree / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 banger\n")
    # root logs in on the serial console without a password (the VM is the user's own)
    getty = tree / "etc/systemd/system/serial-getty@ttyS0.service.d"
    getty.mkdir(parents=True, exist_ok=True)
    (getty / "autologin.conf").write_text(
        "[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 %I $TERM\n"
    )
    (tree / "etc/fstab").write_text("/dev/vda / ext4 defaults,errors=remount-ro 0 1\n")
    mask_units(tree)
    blacklist = tree / "etc/modprobe.d/banger-vm.conf"
    blacklist.parent.mkdir(parents=True, exist_ok=True)
    blacklist.write_text(
        "# banger: the emulated PC's devices a VM does not use\n" + "".join(f"blacklist {m}\n" for m in BLACKLISTED_MODULES)
    )
    if modules_dir is not None:
        dest = tree / "lib/modules" / modules_dir.name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(modules_dir, dest, symlinks=True)
        load = tree / "etc/modules-load.d/banger.conf"
        load.parent.mkdir(parents=True, exist_ok=True)
        # button + evdev: systemd-logind sees the ACPI power button (graceful `vm stop`)
        load.write_text("button\nevdev\nvirtio_net\nvirtio_console\nvsock\nvmw_vsock_virtio_transport\n")


def build_debian_image(
    dest: Path,
    modules_dir: Path | None = None,
    log: Log = print,
    size_mib: int | None = None,
    *,
    cancel: threading.Event | None = None,
    work: Work | None = None,
    payload: GuestPayload | None = None,
) -> dict[str, Any]:
    """Build (or reuse) the image into ``dest``; return its manifest with an absolute
    ``rootfs``. ``cancel`` stops mmdebstrap (and unmounts what it left); ``work``
    is told how far dpkg got. ``payload`` (what banger's plugins put into every image)
    goes into the tree before the filesystem is made; a build with another payload is
    not reused."""
    dest = Path(dest)
    manifest_path = dest / "manifest.json"
    if manifest_path.exists():
        m = json.loads(manifest_path.read_text())
        same_modules = m.get("kernel_modules") == (modules_dir.name if modules_dir else None)
        same_payload = m.get("payload", "") == (payload.id if payload else "")
        if m.get("recipe") == RECIPE and same_modules and same_payload and (dest / m["rootfs"]).exists():
            return {**m, "rootfs": str(dest / m["rootfs"])}
    if shutil.which("mmdebstrap") is None:
        raise ArtifactBuildError("mmdebstrap is not installed (apt install mmdebstrap)")
    # a failure unmounts what mmdebstrap left before removing the staging dir
    with staged_dir(dest, discard=remove_tree) as staging:
        tree = staging / "tree"
        log(f"building {SUITE} root filesystem with mmdebstrap (a minute or two)")
        steps = 0

        def on_line(line: str) -> None:
            nonlocal steps
            if line.startswith(("Unpacking ", "Setting up ")):
                steps += 1
                if work is not None:
                    work(min(steps, EXPECTED_STEPS - 1), EXPECTED_STEPS)
            elif line.startswith(("I: ", "E: ", "W: ")):
                log(line[3:])

        proc.run_long(
            [
                "mmdebstrap",
                "--verbose",
                "--variant=minbase",
                "--mode=root",
                f"--include={','.join(PACKAGES)}",
                "--dpkgopt=path-exclude=/usr/share/{doc,man,locale}/*",
                "--dpkgopt=path-include=/usr/share/locale/locale.alias",
                SUITE,
                str(tree),
                MIRROR,
            ],
            echo=log,
            cancel=cancel,
            on_line=on_line,
        )
        if work is not None:
            work(EXPECTED_STEPS, EXPECTED_STEPS)
        log(f"{steps} package steps done")
        customize(tree, modules_dir)
        if payload is not None:
            payload.apply(tree)
        used_mib = tree_bytes(tree) // (1024 * 1024)
        size = max(size_mib or 0, int(used_mib * 1.5), 1024)
        rootfs = staging / "rootfs.ext4"
        with open(rootfs, "wb") as fh:
            fh.truncate(size * 1024 * 1024)
        log(f"making a {size} MiB ext4 from the {used_mib} MiB tree")
        proc.run(["mkfs.ext4", "-q", "-F", "-L", "banger-root", "-d", tree, rootfs], timeout=None, echo=log)
        remove_tree(tree)
        manifest = {
            "name": "debian-bookworm",
            "suite": SUITE,
            "packages": list(PACKAGES),
            "rootfs": "rootfs.ext4",
            "size_mib": size,
            "recipe": RECIPE,
            "kernel_modules": modules_dir.name if modules_dir else None,
            "payload": payload.id if payload else "",
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return {**manifest, "rootfs": str(dest / "rootfs.ext4")}
