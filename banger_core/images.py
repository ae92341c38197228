"""Just enough artifact registration to boot: kernel import and image register.

Managed kernels are copied into the state dir (staging dir -> atomic rename -> DB
row, so a failure leaves nothing); registered images reference a rootfs in place.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from banger_core import fsutil, proc
from banger_core.config import DEFAULT_MAX_ROOTFS_MIB
from banger_core.errors import BangerError, ErrorCode
from banger_core.models import Image, Kernel
from banger_core.paths import ROOTFS_TMP, Paths
from banger_core.store import Store
from banger_core.vmm.base import kernel_is_elf

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")  # always fullmatch
# A compressed bzImage is preferred as the kernel QEMU boots (-M pc, with the initrd);
# an ELF vmlinux beside it is kept too (Firecracker boots only that). A directory with
# only a vmlinux boots it everywhere (QEMU then uses -M microvm).
KERNEL_NAMES = ("vmlinuz", "bzImage", "kernel", "vmlinux")
INITRD_NAMES = ("initrd.img", "initrd", "initramfs.img", "initramfs")


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise BangerError(
            ErrorCode.BAD_REQUEST,
            f"invalid {kind} name {name!r}: use 1-63 of a-z, 0-9, '.', '_', '-', starting with a letter or digit",
        )
    return name


def _find(directory: Path, names: tuple[str, ...], prefix_ok: bool = True) -> Path | None:
    for n in names:
        if (directory / n).is_file():
            return directory / n
    if prefix_ok:
        for n in names:
            found = sorted(p for p in directory.glob(f"{n}-*") if p.is_file())
            if found:
                return found[-1]
    return None


@dataclass
class KernelFiles:
    """What an import takes from a source directory."""

    kernel: Path
    vmlinux: Path | None = None
    initrd: Path | None = None
    modules: Path | None = None  # flat layout: modules/ (holding <version>/); package: lib/modules/<version>
    version: str | None = None  # package layout only

    def taken(self) -> dict[str, str | None]:
        def s(p: Path | None) -> str | None:
            return str(p) if p else None

        return {
            "version": self.version,
            "kernel": str(self.kernel),
            "vmlinux": s(self.vmlinux),
            "initrd": s(self.initrd),
            "modules": s(self.modules),
        }


PACKAGE_KERNEL = re.compile(r"(vmlinuz|bzImage|vmlinux)-(.+)")


def _package_files(source: Path, boot: Path, mods: Path, version: str | None) -> KernelFiles:
    """An unpacked kernel package: boot/vmlinuz-V (or vmlinux-V), boot/initrd.img-V (or
    initramfs-V[.img]), lib/modules/V/; V is the version present in both boot/ and
    lib/modules/ (``version`` picks one when there are several)."""
    in_boot = {m.group(2) for p in boot.iterdir() if p.is_file() and (m := PACKAGE_KERNEL.fullmatch(p.name))}
    in_mods = {p.name for p in mods.iterdir() if p.is_dir()}
    both = sorted(in_boot & in_mods)
    rel = mods.relative_to(source)
    if version is not None and version not in both:
        raise BangerError(
            ErrorCode.BAD_REQUEST,
            f"--from {source}: no kernel version {version!r} in both boot/ and {rel}/ (there: {', '.join(both) or 'none'})",
        )
    if version is None:
        if not both:
            raise BangerError(
                ErrorCode.BAD_REQUEST,
                f"--from {source}: no kernel version in both boot/ "
                f"({', '.join(sorted(in_boot)) or 'none'}) and {rel}/ ({', '.join(sorted(in_mods)) or 'none'})",
            )
        if len(both) > 1:
            raise BangerError(
                ErrorCode.BAD_REQUEST,
                f"--from {source}: several kernel versions in boot/ and {rel}/: {', '.join(both)}; pick one with --version",
            )
        version = both[0]

    def first(*names: str) -> Path | None:
        return next((boot / n for n in names if (boot / n).is_file()), None)

    kernel = first(f"vmlinuz-{version}", f"bzImage-{version}", f"vmlinux-{version}")
    assert kernel is not None
    vmlinux = first(f"vmlinux-{version}")
    return KernelFiles(
        kernel=kernel,
        vmlinux=vmlinux if vmlinux != kernel and vmlinux and kernel_is_elf(vmlinux) else None,
        initrd=first(f"initrd.img-{version}", f"initrd-{version}", f"initramfs-{version}.img", f"initramfs-{version}"),
        modules=mods / version,
        version=version,
    )


def find_kernel_files(source: Path, version: str | None = None) -> KernelFiles:
    """The files a kernel import takes from ``source``: an unpacked kernel package
    (boot/ + lib/modules/ or usr/lib/modules/), else a flat directory (vmlinuz|bzImage
    and/or vmlinux, optional initrd.img, modules/)."""
    source = source.expanduser()
    if not source.is_dir():
        raise BangerError(ErrorCode.BAD_REQUEST, f"--from {source}: not a directory")
    boot = source / "boot"
    mods = next((m for m in (source / "lib" / "modules", source / "usr" / "lib" / "modules") if m.is_dir()), None)
    if boot.is_dir() and mods is not None:
        return _package_files(source, boot, mods, version)
    if version is not None:
        raise BangerError(
            ErrorCode.BAD_REQUEST,
            f"--from {source}: --version picks among the versions of a package "
            "tree (boot/ + lib/modules/); this is a flat directory",
        )
    kernel = _find(source, KERNEL_NAMES)
    if kernel is None:
        raise BangerError(
            ErrorCode.BAD_REQUEST,
            f"--from {source}: no kernel found (looked for {', '.join(KERNEL_NAMES)}, "
            "or boot/vmlinuz-VERSION with lib/modules/VERSION/)",
        )
    vmlinux = _find(source, ("vmlinux",))
    return KernelFiles(
        kernel=kernel,
        vmlinux=vmlinux if vmlinux != kernel else None,
        initrd=_find(source, INITRD_NAMES),
        modules=source / "modules" if (source / "modules").is_dir() else None,
    )


def import_kernel_tree(
    store: Store,
    paths: Paths,
    name: str,
    source: Path,
    force: bool = False,
    origin: str | None = None,
    version: str | None = None,
) -> tuple[Kernel, KernelFiles]:
    """Import what find_kernel_files finds in ``source``; the kernel and the files taken.
    ``origin`` is recorded as the kernel's source (default ``import:DIR``)."""
    check_name("kernel", name)
    files = find_kernel_files(source, version)
    k = import_kernel_files(
        store,
        paths,
        name,
        files.kernel,
        files.initrd,
        files.modules,
        force,
        vmlinux=files.vmlinux,
        source=origin or f"import:{source.expanduser()}",
        modules_version=files.version,
    )
    return k, files


def import_kernel(store: Store, paths: Paths, name: str, source: Path, force: bool = False, origin: str | None = None) -> Kernel:
    """import_kernel_tree's kernel."""
    return import_kernel_tree(store, paths, name, source, force, origin)[0]


def is_modules_version_dir(d: Path) -> bool:
    """``d`` is one kernel version's modules dir (``lib/modules/<version>``), not the
    dir holding such version dirs: depmod's files or the ``kernel/`` tree are in it."""
    return any((d / f).exists() for f in ("modules.dep", "modules.order", "modules.builtin", "kernel"))


def import_kernel_files(
    store: Store,
    paths: Paths,
    name: str,
    kernel: Path,
    initrd: Path | None,
    modules: Path | None,
    force: bool = False,
    *,
    vmlinux: Path | None = None,
    source: str | None = None,
    modules_version: str | None = None,
) -> Kernel:
    """Copy a kernel (+ initrd, modules, ELF vmlinux) into managed storage:
    staging dir -> rename -> DB row. With ``modules_version``, ``modules`` is that
    version's own dir and lands as modules/<version>/."""
    check_name("kernel", name)
    if vmlinux is not None and not kernel_is_elf(vmlinux):
        raise BangerError(ErrorCode.BAD_REQUEST, f"vmlinux {vmlinux}: not an ELF kernel")
    for what, p in (("kernel", kernel), ("initrd", initrd)):
        if p is not None and not p.is_file():
            raise BangerError(ErrorCode.BAD_REQUEST, f"{what} {p}: no such file")
    if modules is not None and not modules.is_dir():
        raise BangerError(ErrorCode.BAD_REQUEST, f"modules {modules}: not a directory")
    if modules is not None and modules_version is None and is_modules_version_dir(modules):
        # --modules /lib/modules/6.1.0-28-amd64: one version's own dir, kept under its name
        # like every other kernel's (modules/<version>/), not spread into modules/
        modules_version = modules.name
    if store.find_kernel(name) and not force:
        raise BangerError(ErrorCode.ALREADY_EXISTS, f"kernel {name!r} already exists (use --force to replace)")
    final = paths.kernels_dir / name
    with fsutil.staged_dir(final) as staging:  # an existing kernel stays until the new one is in place
        shutil.copy2(kernel, staging / kernel.name)
        if vmlinux:
            shutil.copy2(vmlinux, staging / "vmlinux")
        if initrd:
            shutil.copy2(initrd, staging / initrd.name)
        if modules:
            shutil.copytree(
                modules, staging / "modules" / modules_version if modules_version else staging / "modules", symlinks=True
            )
    k = Kernel(
        name=name,
        kernel=str(final / kernel.name),
        vmlinux=str(final / "vmlinux") if vmlinux else (str(final / kernel.name) if kernel_is_elf(kernel) else None),
        source=source,
        initrd=str(final / initrd.name) if initrd else None,
        modules=str(final / "modules") if modules else None,
    )
    store.upsert_kernel(k)
    return k


def remove_kernel(store: Store, paths: Paths, name: str) -> None:
    store.get_kernel(name)
    users = [i.name for i in store.list_images() if i.kernel_ref == name]
    if users:
        raise BangerError(ErrorCode.BAD_REQUEST, f"kernel {name!r} is used by image(s) {', '.join(users)}")
    vm_users = [v.name for v in store.list_vms() if v.spec.kernel == name]
    if vm_users:
        raise BangerError(ErrorCode.BAD_REQUEST, f"kernel {name!r} is used by VM(s) {', '.join(vm_users)} (vm create --kernel)")
    store.delete_kernel(name)
    shutil.rmtree(paths.kernels_dir / name, ignore_errors=True)


def register_image(
    store: Store,
    paths: Paths,
    name: str,
    rootfs: Path,
    kernel_ref: str | None = None,
    kernel: Path | None = None,
    initrd: Path | None = None,
    modules: Path | None = None,
    *,
    init: str | None = None,
    max_rootfs_mib: int = DEFAULT_MAX_ROOTFS_MIB,
) -> Image:
    """Register a rootfs in place, booted with ``kernel_ref`` or with its own kernel
    triple (imported as a kernel of the same name). Exactly one of the two. The rootfs
    is checked as a managed one would be (check_rootfs), read-only. ``init``: the
    program the kernel starts (``init=``) when it is not /sbin/init; it must exist in
    the rootfs (e.g. the ``init`` of a pulled image, ``banger image show``)."""
    check_name("image", name)
    if init is not None and (not re.fullmatch(r"(/[A-Za-z0-9._+-]+)+", init) or "/../" in f"{init}/" or "/./" in f"{init}/"):
        raise BangerError(ErrorCode.BAD_REQUEST, f"--init {init!r}: must be an absolute path in the image, without . or ..")
    if (kernel_ref is None) == (kernel is None):
        raise BangerError(ErrorCode.BAD_REQUEST, "give either --kernel-ref or --kernel [--initrd] [--modules], not both")
    if kernel is None and (initrd or modules):
        raise BangerError(ErrorCode.BAD_REQUEST, "--initrd and --modules go with --kernel")
    rootfs = rootfs.expanduser().absolute()
    if not rootfs.is_file():
        raise BangerError(ErrorCode.BAD_REQUEST, f"--rootfs {rootfs}: no such file")
    if store.find_image(name):
        raise BangerError(ErrorCode.ALREADY_EXISTS, f"image {name!r} already exists")
    check_rootfs(rootfs, max_rootfs_mib)
    if kernel_ref is not None:
        store.get_kernel(kernel_ref)
    else:
        assert kernel is not None
        kernel_ref = import_kernel_files(store, paths, name, kernel, initrd, modules).name
    if init is not None:
        found = proc.run(["debugfs", "-R", f"stat {init}", rootfs], check=False, timeout=30, text=True, what="debugfs")
        if found.returncode != 0 or "Inode:" not in found.stdout:
            raise BangerError(ErrorCode.BAD_REQUEST, f"--init {init}: not in {rootfs}")
    image = Image(name=name, rootfs=str(rootfs), kernel_ref=kernel_ref, managed=False, source=str(rootfs), init=init)
    store.upsert_image(image)
    return image


def _ext4_bytes(path: Path) -> int | None:
    """The size an ext2/3/4 superblock says its filesystem has (blocks x block size),
    or None when ``path`` has no such superblock."""
    with open(path, "rb") as fh:
        fh.seek(1024)
        sb = fh.read(1024)
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != 0xEF53:
        return None
    log_block: int = struct.unpack_from("<I", sb, 0x18)[0]
    if log_block > 6:  # 64 KiB blocks at most
        return None
    blocks: int = struct.unpack_from("<I", sb, 0x04)[0]
    if struct.unpack_from("<I", sb, 0x60)[0] & 0x80:  # INCOMPAT_64BIT: the high half counts too
        blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
    return blocks * (1024 << log_block)


def check_rootfs_size(path: Path, max_mib: int) -> None:
    """Refuse a rootfs whose apparent size exceeds ``max_mib`` (a stat: cheap, done before copying)."""
    size = path.stat().st_size
    if size > max_mib * 1024 * 1024:
        raise BangerError(
            ErrorCode.BAD_REQUEST,
            f"rootfs {path}: {size / (1 << 20):.0f} MiB is over [images] max_rootfs_size ({max_mib} MiB)",
        )


def check_rootfs(path: Path, max_mib: int) -> None:
    """Refuse a rootfs that is not a regular file holding exactly one clean ext4 of the
    file's apparent size, no larger than ``max_mib``. Reads only (e2fsck -fn)."""

    if not path.is_file():
        raise BangerError(ErrorCode.BAD_REQUEST, f"rootfs {path}: not a regular file")
    check_rootfs_size(path, max_mib)
    size = path.stat().st_size
    fs = _ext4_bytes(path)
    if fs is None:
        raise BangerError(ErrorCode.BAD_REQUEST, f"rootfs {path}: not an ext4 filesystem (no ext4 superblock)")
    if fs != size:
        how = "truncated" if size < fs else "extended"
        raise BangerError(
            ErrorCode.BAD_REQUEST,
            f"rootfs {path}: its ext4 superblock says {fs} bytes but the file has {size} "
            f"(the file was {how} after mkfs, or is not what it claims to be)",
        )
    r = proc.run(["e2fsck", "-fn", path], check=False, timeout=1800, what="checking the rootfs")
    if r.returncode != 0:
        lines = [
            ln
            for ln in r.stdout.decode(errors="replace").splitlines() + r.stderr.decode(errors="replace").splitlines()
            if ln.strip() and not ln.startswith(("e2fsck ", "Pass "))
        ]
        raise BangerError(
            ErrorCode.BAD_REQUEST,
            f"rootfs {path}: not a clean ext4 filesystem (e2fsck -fn exited {r.returncode}: {'; '.join(lines[:3])})",
        )


def publish_rootfs(paths: Paths, name: str, src: Path, max_mib: int, *, move: bool = False) -> Path:
    """The one step every managed rootfs goes through (catalog bundles and builds, OCI
    pulls, promote): refuse it unless it is a clean ext4 of its file's size within
    ``max_mib`` (check_rootfs), then put it in place as ``images/NAME/rootfs.ext4``.

    ``move`` renames ``src`` (a file banger made, in the state dir); otherwise it is
    copied (reflink where possible, else sparse). The copy is what gets checked, so a
    source changing meanwhile cannot slip through. A refusal leaves nothing: no temp
    file, and no image dir that was not there before."""

    final = paths.images_dir / name / "rootfs.ext4"
    made_dir = not final.parent.exists()
    try:
        check_rootfs_size(src, max_mib)
        # a fixed temp name: the daemon's start-up sweep knows it (Paths.transient_leftovers)
        with fsutil.atomic_file(final, tmp=final.with_name(ROOTFS_TMP)) as tmp:
            if move:
                os.rename(src, tmp)
            else:
                proc.run(["cp", "--reflink=auto", "--sparse=always", src, tmp], timeout=1800, what="copying the image")
            try:
                check_rootfs(tmp, max_mib)
            except BangerError as exc:  # name what the caller gave, not our temp file
                exc.message = exc.message.replace(str(tmp), str(src), 1)
                raise
    except BaseException:
        if made_dir:
            shutil.rmtree(final.parent, ignore_errors=True)
        raise
    return final


def promote_image(store: Store, paths: Paths, name: str, max_rootfs_mib: int = DEFAULT_MAX_ROOTFS_MIB) -> Image:
    """Copy a registered (unmanaged) image's rootfs into banger's own storage."""
    image = store.get_image(name)
    if image.managed:
        raise BangerError(ErrorCode.BAD_REQUEST, f"image {name!r} is already managed by banger")
    rootfs = publish_rootfs(paths, name, Path(image.rootfs), max_rootfs_mib)
    promoted = image.model_copy(update={"rootfs": str(rootfs), "managed": True})
    store.upsert_image(promoted)
    return promoted


def refuse_if_snapshotted(store: Store, paths: Paths, name: str, doing: str) -> None:
    """Snapshots' disks are layers over the image's rootfs: its templates go (unused
    ones), its user snapshots must be deleted first."""
    from banger_core.vm.snapshots import image_snapshots

    snaps = image_snapshots(store, paths, name)
    if snaps:
        raise BangerError(
            ErrorCode.BAD_REQUEST,
            f"image {name!r} is under snapshot(s) {', '.join(snaps)}: delete them before {doing} (banger snapshot delete)",
        )


def delete_image(store: Store, paths: Paths, name: str) -> None:
    """Delete an image no VM uses; a managed image's files go too."""
    image = store.get_image(name)
    users = [v.name for v in store.list_vms() if v.image == name]
    if users:
        raise BangerError(ErrorCode.BAD_REQUEST, f"image {name!r} is used by VM(s) {', '.join(users)}")
    refuse_if_snapshotted(store, paths, name, "deleting it")
    store.delete_image(name)
    if image.managed:
        shutil.rmtree(paths.images_dir / name, ignore_errors=True)


# --- a rootfs from a tree (for sources) -------------------------------------------

INODE_BYTES = 256  # mkfs.ext4's default inode size
BLOCK = 4096


def tree_needs(tree: Path) -> tuple[int, int]:
    """(bytes, entries) ``tree`` needs in an ext4: each file's data in whole 4 KiB
    blocks (or what it occupies here, if more), a block per directory, and one inode
    per entry. Small files cost a block each however small they are."""
    data, entries = 0, 0
    for dirpath, _dirs, files in os.walk(tree):
        entries += 1
        data += BLOCK
        for f in files:
            entries += 1
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            data += max(-(-st.st_size // BLOCK) * BLOCK, st.st_blocks * 512)
    return data, entries


def ext4_from_tree(
    tree: Path,
    out: Path,
    size_mib: int | None = None,
    label: str = "banger-root",
    max_mib: int | None = None,
    what: str = "the image",
) -> dict[str, int]:
    """Make ``out`` an ext4 holding ``tree`` (mkfs.ext4 -d). The default size is
    max(tree x 1.5 + its inode tables, 1 GiB), the tree counted in whole blocks; the
    inode count is what the tree has x 1.5 (+4096), never fewer than mkfs's default
    ratio gives (mkfs's one-inode-per-16-KiB alone runs out on a tree of small files).
    Refused when ``size_mib`` is too small for the tree or over ``max_mib``. A temp
    file until complete. Returns {"size_mib", "tree_mib", "inodes"}."""
    data, entries = tree_needs(tree)
    used = data // (1024 * 1024)
    inodes = int(entries * 1.5) + 4096
    tables = inodes * INODE_BYTES // (1024 * 1024)
    size = size_mib or max(int(used * 1.5) + tables + 16, 1024)
    if size < used + tables + 16:
        raise BangerError(
            ErrorCode.BAD_REQUEST,
            f"--size {size} MiB is too small for the {used} MiB image ({entries} files, {tables} MiB of inode tables)",
        )
    if max_mib is not None and size > max_mib:  # refused before it is made (the publish step checks again)
        raise BangerError(ErrorCode.BAD_REQUEST, f"{what}: a {size} MiB rootfs is over [images] max_rootfs_size ({max_mib} MiB)")
    inodes = max(inodes, size * 1024 * 1024 // 16384)
    with fsutil.atomic_file(out) as tmp:
        with open(tmp, "wb") as fh:
            fh.truncate(size * 1024 * 1024)
        proc.run(
            ["mkfs.ext4", "-q", "-F", "-L", label, "-N", str(inodes), "-I", str(INODE_BYTES), "-d", tree, tmp],
            timeout=1800,
            what="mkfs.ext4 -d",
        )
    return {"size_mib": size, "tree_mib": used, "inodes": inodes}
