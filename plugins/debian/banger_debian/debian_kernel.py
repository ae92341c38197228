"""Build a bootable kernel + initrd + module tree from Debian's cloud kernel package.

Debian's ``linux-image-cloud-amd64`` ships virtio_blk, virtio_pci and friends as
modules, so booting it with the root filesystem on a virtio disk needs an initrd.
This module makes one from nothing but the package and a static busybox:

    dest/vmlinuz              the bzImage from the package
    dest/vmlinux              the ELF kernel inside it (for Firecracker and PVH boots)
    dest/initrd.img           gzip'd newc cpio: busybox, the root-disk modules, /init
    dest/modules/<version>/   the package's /lib/modules tree, with modules.dep etc.
    dest/config               the kernel's build config
    dest/manifest.json        what was built (paths relative to dest)

Everything comes from Debian's package mirrors through apt; downloads are kept in
a cache directory so a second build (or a rebuild after the recipe changed) needs
no network.  Only the standard library and Debian's own tools (apt-get,
apt-cache, dpkg-deb, and depmod when installed) are used.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from banger_core import fsutil, proc
from banger_core.fsutil import locked
from banger_debian.common import (
    ArtifactBuildError,
    Log,
    deb_field,
    download_deb,
    extract_vmlinux,
)

__all__ = ["ArtifactBuildError", "build_debian_cloud_kernel", "busybox_applets", "static_busybox"]

META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"

# Bump when the layout or the initrd's contents change: a dest built by an older
# recipe is then rebuilt (from the cached .deb) instead of being reused.
RECIPE = 4  # 3: virtio_console in the initrd; 4: virtio_net too

# What the initrd loads to mount an ext4 root on a virtio disk.  Required ones must
# be built in or shipped as modules; optional ones are loaded when they are modules
# (virtio_mmio serves QEMU's microvm machine; crc32c backs ext4's checksums;
# virtio_console carries the guest agent's port and virtio_net the bridge NIC, and an
# image with no /lib/modules of this kernel, an OCI image, cannot load them later).
INITRD_REQUIRED_MODULES = ("virtio_blk", "ext4")
INITRD_OPTIONAL_MODULES = ("virtio_pci", "virtio_mmio", "crc32c_generic", "virtio_console", "virtio_net")

_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


# --------------------------------------------------------------------------- public


def build_debian_cloud_kernel(dest: Path, cache: Path | None = None, log: Log = print) -> dict[str, Any]:
    """Build (or reuse) Debian's cloud kernel, an initrd for it and its module tree.

    ``dest`` receives vmlinuz, initrd.img, config, modules/<version>/ and
    manifest.json.  ``cache`` holds downloaded .deb files (default ``dest/debs``).
    Returns the manifest with absolute paths: ``version``, ``package``,
    ``package_version``, ``kernel``, ``initrd``, ``modules``, ``config``,
    ``initrd_modules`` (load order) and ``recipe``.

    Idempotent: when dest/manifest.json from the same recipe exists and its files
    are present, it is returned without any work.  Safe to call from several
    processes at once (a lock file in dest serialises builds).
    """
    dest = Path(dest).resolve()
    cache = Path(cache).resolve() if cache is not None else dest / "debs"
    dest.mkdir(parents=True, exist_ok=True)
    with locked(dest / ".lock"):
        existing = _load_manifest(dest)
        if existing is not None:
            return existing
        cache.mkdir(parents=True, exist_ok=True)
        _build(dest, cache, log)
        manifest = _load_manifest(dest)
        if manifest is None:  # pragma: no cover - _build writes it last
            raise ArtifactBuildError(f"{dest}/manifest.json is missing after a build")
        return manifest


def static_busybox(cache: Path, log: Log = print) -> Path:
    """A statically linked busybox: the host's if it has one, else Debian's busybox-static.

    Debian's plain ``busybox`` package installs a dynamically linked /bin/busybox,
    which would not run inside an initrd or a bare root filesystem, so the binary
    is checked.  Without a static one on the host, the busybox-static package is
    downloaded into ``cache`` and unpacked there (nothing is installed on the host).
    """
    for candidate in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if candidate.is_file() and _is_static_elf(candidate):
            return candidate
    unpacked = Path(cache) / BUSYBOX_PACKAGE
    found = _find_busybox_in(unpacked)
    if found is not None:
        return found
    deb = download_deb(BUSYBOX_PACKAGE, None, Path(cache), log)
    with fsutil.staged_dir(unpacked) as tmp:
        proc.run(["dpkg-deb", "-x", deb, tmp], timeout=None, echo=log)
        if _find_busybox_in(tmp) is None:
            raise ArtifactBuildError(f"{deb.name} holds no static busybox binary")
    found = _find_busybox_in(unpacked)
    assert found is not None
    return found


def busybox_applets(busybox: Path) -> list[str]:
    """Install paths of busybox's applets relative to /, e.g. ``usr/bin/awk``."""
    out = proc.run([busybox, "--list-full"], text=True, what="listing busybox's applets").stdout
    return [line.strip().lstrip("/") for line in out.splitlines() if line.strip()]


# --------------------------------------------------------------------------- build steps


def _build(dest: Path, cache: Path, log: Log) -> None:
    package, version = _resolve_kernel_package(cache, log)
    deb = download_deb(package, version, cache, log)
    package, version = deb_field(deb, "Package"), deb_field(deb, "Version")
    busybox = static_busybox(cache, log)
    log(f"building kernel artifacts from {deb.name} into {dest}")

    work = Path(tempfile.mkdtemp(prefix=".build-", dir=dest))
    try:
        unpacked = work / "deb"
        proc.run(["dpkg-deb", "-x", deb, unpacked], timeout=None, echo=log)
        kver, modules_src = _find_modules_dir(unpacked, deb)
        bzimage = unpacked / "boot" / f"vmlinuz-{kver}"
        config = unpacked / "boot" / f"config-{kver}"
        if not bzimage.is_file():
            raise ArtifactBuildError(f"{deb.name} has no boot/vmlinuz-{kver}")

        # depmod wants BASE/lib/modules/VERSION; the package ships no modules.dep
        # (its postinst runs depmod), so generate it here.
        modroot = work / "modroot"
        staged_modules = modroot / "lib" / "modules" / kver
        staged_modules.parent.mkdir(parents=True)
        modules_src.rename(staged_modules)
        _depmod(modroot, kver, busybox, log)

        index = _ModuleIndex(staged_modules)
        order = index.load_order(INITRD_REQUIRED_MODULES, INITRD_OPTIONAL_MODULES)
        log(f"initrd modules (load order): {' '.join(n for n, _ in order) or '(none)'}")
        initrd = _initrd_bytes(busybox, [(n, _read_module(p, log)) for n, p in order])

        fsutil.atomic_write(dest / "vmlinuz", bzimage.read_bytes())
        # Firecracker (and QEMU's PVH path) boot only an uncompressed ELF kernel.
        fsutil.atomic_write(dest / "vmlinux", extract_vmlinux(bzimage.read_bytes()))
        fsutil.atomic_write(dest / "initrd.img", initrd)
        if config.is_file():
            fsutil.atomic_write(dest / "config", config.read_bytes())
        modules_dest = dest / "modules" / kver
        modules_dest.parent.mkdir(exist_ok=True)
        fsutil.replace_dir(staged_modules, modules_dest)

        manifest = {
            "version": kver,
            "package": package,
            "package_version": version,
            "kernel": "vmlinuz",
            "vmlinux": "vmlinux",
            "initrd": "initrd.img",
            "modules": f"modules/{kver}",
            "config": "config" if config.is_file() else None,
            "initrd_modules": [n for n, _ in order],
            "recipe": RECIPE,
        }
        # Written last: its presence marks a complete build.
        fsutil.atomic_write(dest / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        log(f"kernel {kver} ({package} {version}) ready in {dest}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _load_manifest(dest: Path) -> dict[str, Any] | None:
    path = dest / "manifest.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("recipe") != RECIPE:
        return None
    manifest: dict[str, Any] = dict(raw)
    for key in ("kernel", "vmlinux", "initrd", "modules", "config"):
        rel = raw.get(key)
        if rel is None and key == "config":
            continue
        if not isinstance(rel, str) or not (dest / rel).exists():
            return None
        manifest[key] = str(dest / rel)
    if not (Path(manifest["modules"]) / "modules.dep").is_file():
        return None
    return manifest


def _resolve_kernel_package(cache: Path, log: Log) -> tuple[str, str | None]:
    """The concrete linux-image-<abi>-cloud-amd64 package behind the meta package."""
    found = _apt_kernel_dependency(log)
    if found is None:
        log("apt-cache knows no kernel package yet: running apt-get update")
        try:
            proc.run(["apt-get", "update"], timeout=None, echo=log)
        except proc.CommandFailed as exc:
            log(f"apt-get update failed: {exc}")
        found = _apt_kernel_dependency(log)
    if found is not None:
        return found
    # Offline with stale lists: fall back to the newest kernel already downloaded.
    cached = sorted(cache.glob("linux-image-*-cloud-amd64_*.deb"), key=lambda p: p.stat().st_mtime)
    if cached:
        deb = cached[-1]
        log(f"apt cannot resolve {META_PACKAGE}; using cached {deb.name}")
        return deb_field(deb, "Package"), deb_field(deb, "Version")
    raise ArtifactBuildError(
        f"cannot find the package behind {META_PACKAGE} (apt-cache show found nothing, even after apt-get update)"
    )


def _apt_kernel_dependency(log: Log) -> tuple[str, str | None] | None:
    r = proc.run(["apt-cache", "show", "--no-all-versions", META_PACKAGE], check=False, timeout=None, echo=log, text=True)
    if r.returncode != 0:
        return None
    for line in r.stdout.splitlines():
        if not line.startswith(("Depends:", "Pre-Depends:")):
            continue
        for alternative in line.split(":", 1)[1].split(","):
            dep = alternative.split("|")[0].strip()
            name, _, constraint = dep.partition(" ")
            if name.startswith("linux-image-") and name != META_PACKAGE:
                constraint = constraint.strip("() ")
                version = constraint[2:].strip() if constraint.startswith("= ") else None
                return name, version
    return None


def _find_modules_dir(unpacked: Path, deb: Path) -> tuple[str, Path]:
    # Debian 12 ships /lib/modules; usr-merged packages (Debian 13+) /usr/lib/modules.
    for base in (unpacked / "lib" / "modules", unpacked / "usr" / "lib" / "modules"):
        if base.is_dir():
            versions = [p for p in base.iterdir() if p.is_dir()]
            if len(versions) == 1:
                return versions[0].name, versions[0]
            raise ArtifactBuildError(f"{deb.name}: expected one kernel version under {base}, found {len(versions)}")
    raise ArtifactBuildError(f"{deb.name} has no lib/modules directory")


def _depmod(base: Path, kver: str, busybox: Path, log: Log) -> None:
    """Generate modules.dep & co.: kmod's depmod when installed, else busybox's."""
    depmod = shutil.which("depmod") or next((p for p in ("/usr/sbin/depmod", "/sbin/depmod") if os.access(p, os.X_OK)), None)
    if depmod:
        proc.run([depmod, "-b", base, kver], timeout=None, echo=log)
    else:
        log("kmod's depmod is not installed: using busybox depmod")
        proc.run([busybox, "depmod", "-b", base, kver], timeout=None, echo=log)
    if not (base / "lib" / "modules" / kver / "modules.dep").is_file():
        raise ArtifactBuildError(f"depmod wrote no modules.dep for {kver}")


# --------------------------------------------------------------------------- modules


def _module_name(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


class _ModuleIndex:
    """modules.dep and modules.builtin of one kernel, by module name."""

    def __init__(self, tree: Path) -> None:
        self.tree = tree
        self.paths: dict[str, str] = {}
        self.deps: dict[str, list[str]] = {}
        for line in (tree / "modules.dep").read_text().splitlines():
            if ":" not in line:
                continue
            path, _, rest = line.partition(":")
            name = _module_name(path)
            self.paths[name] = path.strip()
            self.deps[name] = rest.split()
        builtin = tree / "modules.builtin"
        self.builtin = {_module_name(p) for p in builtin.read_text().split()} if builtin.is_file() else set()

    def load_order(self, required: Iterable[str], optional: Iterable[str] = ()) -> list[tuple[str, Path]]:
        """Modules to insmod, dependencies first, as modprobe would load them.

        modules.dep lists a module's dependencies so that loading them from last
        to first works (kmod's and busybox's modprobe both do that).
        """
        order: list[tuple[str, Path]] = []
        seen: set[str] = set()
        wanted = [(n, True) for n in required] + [(n, False) for n in optional]
        for raw, must in wanted:
            name = raw.replace("-", "_")
            if name in self.builtin:
                continue
            if name not in self.paths:
                if must:
                    raise ArtifactBuildError(f"kernel module {raw} is neither built in nor in modules.dep")
                continue
            for path in [*reversed(self.deps[name]), self.paths[name]]:
                dep = _module_name(path)
                if dep not in seen:
                    seen.add(dep)
                    order.append((dep, self.tree / path))
        return order


def _read_module(path: Path, log: Log) -> bytes:
    """The module's ELF bytes; busybox insmod does not decompress, so do it here."""
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        zstd = shutil.which("zstd") or shutil.which("unzstd")
        if zstd is None:
            raise ArtifactBuildError(f"{name} is zstd-compressed and no zstd tool is installed")
        return proc.run([zstd, "-dc", path], timeout=None, echo=log).stdout
    return path.read_bytes()


# --------------------------------------------------------------------------- initrd


_INIT_SCRIPT = r"""#!/bin/sh
# banger initrd: load the root disk's drivers, mount root=, switch_root into init=.
# Kernel parameters read: root= (/dev/..., UUID=, LABEL=), rootfstype=, rootflags=,
# rootdelay= (seconds to wait for the device, default 30), ro / rw (default rw),
# init= (default /sbin/init), rd.shell (on failure, a shell instead of power-off),
# and MODULE.PARAM=VALUE for the modules loaded here.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
MODULES="@MODULES@"

say() { echo "banger-initrd: $*"; }

fail() {
    say "ERROR: $*"
    say "block devices: $(ls /sys/class/block 2>/dev/null | tr '\n' ' ')"
    if [ -n "$rdshell" ]; then
        say "rd.shell given: starting a shell on the console"
        exec cttyhack sh
    fi
    say "powering off (add rd.shell to the kernel command line for a shell)"
    sync
    poweroff -f
    sleep 1000000
}

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev

set -f
CMDLINE=$(cat /proc/cmdline)
root= rootfstype= rootflags= init=/sbin/init mode=rw delay=30 rdshell=
for arg in $CMDLINE; do
    case "$arg" in
        root=*) root=${arg#root=} ;;
        rootfstype=*) rootfstype=${arg#rootfstype=} ;;
        rootflags=*) rootflags=${arg#rootflags=} ;;
        rootdelay=*) delay=${arg#rootdelay=} ;;
        init=*) init=${arg#init=} ;;
        ro) mode=ro ;;
        rw) mode=rw ;;
        rd.shell) rdshell=1 ;;
    esac
done

for m in $MODULES; do
    params=
    for arg in $CMDLINE; do
        case "$arg" in "$m".*=*) params="$params ${arg#$m.}" ;; esac
    done
    insmod "/lib/modules/$m.ko" $params || say "warning: insmod $m failed"
done
set +f

[ -n "$root" ] || fail "no root= on the kernel command line"
tries=0
while :; do
    case "$root" in
        UUID=*|LABEL=*) dev=$(findfs "$root" 2>/dev/null) ;;
        *) dev=$root ;;
    esac
    [ -n "$dev" ] && [ -b "$dev" ] && break
    [ "$tries" -ge $((delay * 10)) ] && fail "root device $root did not appear within ${delay}s"
    usleep 100000
    tries=$((tries + 1))
done

opts=$mode
[ -n "$rootflags" ] && opts="$opts,$rootflags"
mkdir -p /newroot
if [ -n "$rootfstype" ]; then
    mount -t "$rootfstype" -o "$opts" "$dev" /newroot
else
    mount -o "$opts" "$dev" /newroot
fi || fail "cannot mount $dev ($root) on /newroot with -o $opts"

# -e follows absolute symlinks inside the initrd, so also accept a symlink.
[ -e "/newroot$init" ] || [ -L "/newroot$init" ] || fail "init $init not found on $root"

for fs in dev proc sys; do
    if [ -d "/newroot/$fs" ]; then
        mount -o move "/$fs" "/newroot/$fs"
    else
        umount -l "/$fs"
    fi
done
exec switch_root /newroot "$init" "$@"
"""


def _initrd_bytes(busybox: Path, modules: Sequence[tuple[str, bytes]]) -> bytes:
    archive = _NewcArchive()
    for d in (
        "bin",
        "dev",
        "etc",
        "lib",
        "lib/modules",
        "newroot",
        "proc",
        "sbin",
        "sys",
        "tmp",
        "usr",
        "usr/bin",
        "usr/sbin",
        "run",
        "root",
    ):
        archive.add_dir(d, 0o1777 if d == "tmp" else 0o755)
    archive.add_chardev("dev/console", 0o600, 5, 1)
    archive.add_chardev("dev/null", 0o666, 1, 3)
    archive.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in busybox_applets(busybox):
        if applet != "bin/busybox":
            archive.add_symlink(applet, "/bin/busybox")
    for name, data in modules:
        archive.add_file(f"lib/modules/{name}.ko", data, 0o644)
    script = _INIT_SCRIPT.replace("@MODULES@", " ".join(name for name, _ in modules))
    archive.add_file("init", script.encode(), 0o755)
    return gzip.compress(archive.finish(), compresslevel=9, mtime=0)


class _NewcArchive:
    """A deterministic cpio archive in the kernel's "newc" format (uid/gid 0, mtime 0)."""

    _S_IFDIR, _S_IFREG, _S_IFLNK, _S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._ino = 0
        self._names: set[str] = set()

    def add_dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, self._S_IFDIR | perm, b"", nlink=2)

    def add_file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, self._S_IFREG | perm, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, self._S_IFLNK | 0o777, target.encode())

    def add_chardev(self, name: str, perm: int, major: int, minor: int) -> None:
        self._entry(name, self._S_IFCHR | perm, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"", nlink=1, count=False)
        return b"".join(self._chunks)

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes,
        *,
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
        count: bool = True,
    ) -> None:
        if count:
            if name in self._names:
                raise ValueError(f"duplicate cpio entry {name}")
            self._names.add(name)
            self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (
            self._ino if count else 0,
            mode,
            0,
            0,
            nlink,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        )
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._chunks.append(header + encoded + _pad(len(header) + len(encoded)))
        self._chunks.append(data + _pad(len(data)))


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


# --------------------------------------------------------------------------- helpers


def _find_busybox_in(root: Path) -> Path | None:
    for rel in ("bin/busybox", "usr/bin/busybox"):
        candidate = root / rel
        if candidate.is_file() and _is_static_elf(candidate):
            return candidate
    return None


def _is_static_elf(path: Path) -> bool:
    """True for an ELF64 little-endian executable without a PT_INTERP (dynamic loader)."""
    try:
        with open(path, "rb") as fh:
            ident = fh.read(64)
            if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
                return False
            (phoff,) = struct.unpack_from("<Q", ident, 32)
            phentsize, phnum = struct.unpack_from("<HH", ident, 54)
            fh.seek(phoff)
            table = fh.read(phentsize * phnum)
    except OSError:
        return False
    pt_interp = 3
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != pt_interp for i in range(phnum))
