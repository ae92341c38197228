"""Bundles: ``.tar.zst`` archives of an image (manifest.json + rootfs.ext4) or a kernel
(manifest.json + vmlinuz/vmlinux + optional initrd.img + optional modules/).

Downloads are streamed to a staging file and checked against the catalog's sha256 and
size before anything is unpacked; unpacking refuses absolute paths, '..', links that
leave the target, and device or FIFO entries. Everything happens in a staging
directory that is renamed into place only when complete, so a failure leaves nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import zstandard

from banger_core import fsutil
from banger_core.errors import BangerError, ErrorCode

CHUNK = 1 << 20
Progress = Callable[[int, int | None], None]


def bad(msg: str) -> BangerError:
    return BangerError(ErrorCode.BAD_REQUEST, msg)


def download(url: str, dest: Path, sha256: str, size: int | None, progress: Progress | None = None, timeout: float = 60) -> None:
    """Stream ``url`` to ``dest``, verifying size and sha256; ``dest`` exists only if both match."""
    h = hashlib.sha256()
    got = 0
    try:
        with fsutil.atomic_file(dest) as tmp:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:  # catalog URLs
                total = size or (int(resp.headers["Content-Length"]) if resp.headers.get("Content-Length") else None)
                while chunk := resp.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    got += len(chunk)
                    if size is not None and got > size:
                        raise bad(f"{url}: more than the {size} bytes the catalog promises")
                    if progress:
                        progress(got, total)
            if size is not None and got != size:
                raise bad(f"{url}: got {got} bytes, the catalog says {size} (truncated download?)")
            if h.hexdigest() != sha256.lower():
                raise bad(f"{url}: sha256 {h.hexdigest()} does not match the catalog's {sha256}")
    except OSError as exc:
        raise BangerError(ErrorCode.OPERATION_FAILED, f"downloading {url}: {exc}") from None


def _check_member(m: tarfile.TarInfo, root: Path) -> None:
    name = PurePosixPath(m.name)
    if name.is_absolute() or ".." in name.parts:
        raise bad(f"bundle entry {m.name!r}: absolute or '..' paths are not allowed")
    if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
        raise bad(f"bundle entry {m.name!r}: devices, FIFOs and other special files are not allowed")
    if m.issym() or m.islnk():
        target = PurePosixPath(m.linkname)
        base = PurePosixPath(m.name).parent if m.issym() else PurePosixPath()
        resolved = Path(os.path.normpath(root / base / target))
        if target.is_absolute() or not str(resolved).startswith(str(root) + os.sep):
            raise bad(f"bundle entry {m.name!r}: link to {m.linkname!r} leaves the bundle")


def _place(tar: tarfile.TarFile, m: tarfile.TarInfo, root: Path) -> None:
    """One member (checked by ``_check_member``) under ``root``, as tarfile's "data"
    filter would put it, without needing it (Debian 12's Python 3.11.2 predates it):
    no owner taken from the archive, no setuid/setgid/sticky or group/other write bits,
    the owner's read and write kept; files written sparse."""
    dest = root / m.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if m.isdir():
        dest.mkdir(exist_ok=True)
        os.chmod(dest, (m.mode & 0o755) | 0o700)
    elif m.issym():
        dest.unlink(missing_ok=True)
        os.symlink(m.linkname, dest)
    elif m.islnk():
        dest.unlink(missing_ok=True)
        os.link(root / m.linkname, dest)
    else:
        _write_sparse(tar.extractfile(m), dest, m.size)
        os.chmod(dest, (m.mode & 0o755) | 0o600)


def _write_sparse(src: Any, dest: Path, size: int) -> None:
    """Copy a member's data, leaving holes where it is zeros: a rootfs is mostly empty
    blocks, and a hostile one may be nothing but (its check comes after unpacking)."""
    zero = bytes(CHUNK)
    with open(dest, "wb") as out:
        while chunk := src.read(CHUNK):
            if chunk == zero[: len(chunk)]:
                out.seek(len(chunk), os.SEEK_CUR)
            else:
                out.write(chunk)
        out.truncate(size)


def _zstd_complete(path: Path) -> bool:
    """Whether ``path`` is a run of complete zstd frames, walked by their headers
    (nothing decompressed): zstandard's stream reader just stops where a cut-short
    frame does, so a truncated bundle would read as a short or empty tar."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        pos = 0
        if size == 0:
            return False
        while pos < size:
            fh.seek(pos)
            head = fh.read(18)
            if len(head) < 8:
                return False
            magic = int.from_bytes(head[:4], "little")
            if 0x184D2A50 <= magic <= 0x184D2A5F:  # a skippable frame
                pos += 8 + int.from_bytes(head[4:8], "little")
                continue
            if magic != 0xFD2FB528:
                return True  # not zstd at all: the decompressor says so
            fhd = head[4]
            single = fhd >> 5 & 1
            fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
            pos += 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
            while True:
                fh.seek(pos)
                bh = fh.read(3)
                if len(bh) < 3:
                    return False
                v = int.from_bytes(bh, "little")
                pos += 3 + (1 if (v >> 1) & 3 == 1 else v >> 3)
                if v & 1:
                    break
            pos += 4 if fhd & 4 else 0
        return pos == size


# what tarfile says when the stream ends early (inside the tar, or before it began)
_SHORT = ("empty file", "truncated header", "unexpected end of data")


def extract(bundle: Path, target: Path, max_file_bytes: int | None = None, label: str | None = None) -> dict[str, Any]:
    """Unpack a .tar.zst into ``target`` (new or empty); return its manifest. Files
    are written sparse; one larger than ``max_file_bytes`` is refused before it is.
    Errors name ``label`` (the bundle's URL), else the file."""
    label = label or bundle.name
    if not _zstd_complete(bundle):
        raise bad(f"{label}: truncated or incomplete bundle (the archive ends inside a zstd frame)")
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    try:
        with open(bundle, "rb") as fh:
            reader = zstandard.ZstdDecompressor().stream_reader(fh)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for m in tar:
                    _check_member(m, root)
                    if max_file_bytes is not None and m.isfile() and m.size > max_file_bytes:
                        raise bad(
                            f"bundle entry {m.name!r}: {m.size / (1 << 20):.0f} MiB is over "
                            f"[images] max_rootfs_size ({max_file_bytes >> 20} MiB)"
                        )
                    _place(tar, m, root)
    except (tarfile.TarError, EOFError) as exc:
        if str(exc) in _SHORT:
            raise bad(f"{label}: truncated or incomplete bundle (the tar inside ends early: {exc})") from None
        raise bad(f"{label}: not a valid .tar.zst bundle: {exc}") from None
    except zstandard.ZstdError as exc:
        raise bad(f"{label}: not a valid .tar.zst bundle: {exc}") from None
    try:
        manifest: dict[str, Any] = json.loads((target / "manifest.json").read_text())
    except (OSError, ValueError):
        raise bad(f"{label}: no valid manifest.json") from None
    for rel in manifest.get("files", {}).values():
        if rel and not (target / rel).exists():
            raise bad(f"{label}: manifest names {rel}, which the bundle lacks")
    return manifest


# Fixed names inside a bundle; the kernel keeps its own (vmlinuz, vmlinux, bzImage...).
ARCNAMES = {"rootfs": "rootfs.ext4", "initrd": "initrd.img", "modules": "modules", "vmlinux": "vmlinux"}


def create(
    output: Path, kind: str, name: str, files: dict[str, Path | None], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write a reproducible bundle; return {path, sha256, size} for a catalog entry."""
    arc = {k: (ARCNAMES.get(k, v.name) if v else None) for k, v in files.items()}
    manifest = {"kind": kind, "name": name, "files": arc, **(extra or {})}
    with fsutil.atomic_file(output) as tmp, open(tmp, "wb") as raw:
        with zstandard.ZstdCompressor(level=10, threads=-1).stream_writer(raw) as zw:
            with tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                data = json.dumps(manifest, indent=2, sort_keys=True).encode()
                info = tarfile.TarInfo("manifest.json")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))

                def reset(ti: tarfile.TarInfo) -> tarfile.TarInfo:
                    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "root", "root"
                    return ti

                for key, path in files.items():
                    if path is not None:
                        tar.add(path, arcname=arc[key], filter=reset)
    h = hashlib.sha256()
    with open(output, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return {"path": str(output), "sha256": h.hexdigest(), "size": output.stat().st_size}


def fetch_and_extract(
    url: str, sha256: str, size: int | None, target: Path, progress: Progress | None = None, max_file_bytes: int | None = None
) -> dict[str, Any]:
    """Download + verify + unpack into ``target`` via a sibling staging dir (the
    archive beside it, named after it, removed either way)."""
    with fsutil.staged_dir(target) as staging:
        archive = staging.with_name(staging.name + ".tar.zst")
        try:
            download(url, archive, sha256, size, progress)
            return extract(archive, staging, max_file_bytes, label=url)
        finally:
            archive.unlink(missing_ok=True)
