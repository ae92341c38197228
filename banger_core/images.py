"""Just enough artifact registration to boot: kernel import and image register.

Managed kernels are copied into the state dir (staging dir -> atomic rename -> DB
row, so a failure leaves nothing); registered images reference a rootfs in place.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from banger_core.errors import BangerError, ErrorCode
from banger_core.models import Image, Kernel
from banger_core.paths import Paths
from banger_core.store import Store

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
KERNEL_NAMES = ("vmlinux", "vmlinuz", "bzImage", "kernel")
INITRD_NAMES = ("initrd.img", "initrd", "initramfs.img", "initramfs")


def check_name(kind: str, name: str) -> str:
    if not NAME_RE.match(name):
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


def import_kernel(store: Store, paths: Paths, name: str, source: Path, force: bool = False) -> Kernel:
    check_name("kernel", name)
    source = source.expanduser()
    if not source.is_dir():
        raise BangerError(ErrorCode.BAD_REQUEST, f"--from {source}: not a directory")
    kernel = _find(source, KERNEL_NAMES)
    if kernel is None:
        raise BangerError(
            ErrorCode.BAD_REQUEST, f"--from {source}: no kernel found (looked for {', '.join(KERNEL_NAMES)})"
        )
    initrd = _find(source, INITRD_NAMES)
    modules = source / "modules" if (source / "modules").is_dir() else None
    try:
        store.get_kernel(name)
        if not force:
            raise BangerError(ErrorCode.ALREADY_EXISTS, f"kernel {name!r} already exists (use --force to replace)")
    except BangerError as exc:
        if exc.code is not ErrorCode.NOT_FOUND:
            raise
    paths.kernels_dir.mkdir(parents=True, exist_ok=True)
    final = paths.kernels_dir / name
    staging = Path(tempfile.mkdtemp(dir=paths.kernels_dir, prefix=f".{name}.staging-"))
    try:
        shutil.copy2(kernel, staging / kernel.name)
        if initrd:
            shutil.copy2(initrd, staging / initrd.name)
        if modules:
            shutil.copytree(modules, staging / "modules", symlinks=True)
        old = None
        if final.exists():
            old = final.with_name(f".{name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        staging.rename(final)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    k = Kernel(
        name=name,
        kernel=str(final / kernel.name),
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
    store.delete_kernel(name)
    shutil.rmtree(paths.kernels_dir / name, ignore_errors=True)


def register_image(store: Store, name: str, rootfs: Path, kernel_ref: str) -> Image:
    check_name("image", name)
    rootfs = rootfs.expanduser().absolute()
    if not rootfs.is_file():
        raise BangerError(ErrorCode.BAD_REQUEST, f"--rootfs {rootfs}: no such file")
    store.get_kernel(kernel_ref)
    try:
        store.get_image(name)
        raise BangerError(ErrorCode.ALREADY_EXISTS, f"image {name!r} already exists")
    except BangerError as exc:
        if exc.code is not ErrorCode.NOT_FOUND:
            raise
    image = Image(name=name, rootfs=str(rootfs), kernel_ref=kernel_ref, managed=False)
    store.upsert_image(image)
    return image


def delete_image(store: Store, name: str) -> None:
    store.get_image(name)
    users = [v.name for v in store.list_vms() if v.image == name]
    if users:
        raise BangerError(ErrorCode.BAD_REQUEST, f"image {name!r} is used by VM(s) {', '.join(users)}")
    store.delete_image(name)
