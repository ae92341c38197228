"""What every host-side artifact recipe shares: Debian packages, a build lock,
removing a build's scratch tree, an ext4 from a tree, and the vmlinux inside a bzImage.

Standard library plus Debian's own tools (apt-get, dpkg-deb) only.
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from banger_core import proc
from banger_core.vmm.base import ELF_MAGIC

Log = Callable[[str], Any]
Work = Callable[[int, int], None]  # a long build's progress: (steps done, expected steps)

LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"


class ArtifactBuildError(RuntimeError):
    """Building a guest artifact failed; the message says which step and why."""


# Commands run through banger_core.proc (run, run_long), which raises CommandFailed;
# a cancelled build raises banger_core.errors.Cancelled (what it started is stopped first).


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest first (from /proc/self/mountinfo)."""
    root = Path(os.path.realpath(path))
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) > 4:
            # the kernel escapes space, tab, newline and backslash as \ooo; the rest is as is
            point = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
            if point == root or root in point.parents:
                found.append(point)
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def remove_tree(path: Path) -> None:
    """Remove a build's scratch tree, first detaching anything still mounted inside it
    (a chroot builder killed mid-way leaves /proc, /sys or /dev mounts behind, and
    rmtree would walk into them). Raises if a mount cannot be detached: deleting
    through it could delete the host's files."""
    for point in mounts_under(path):
        proc.run(["umount", "--lazy", point], check=False, timeout=60, what="umount")
    left = mounts_under(path)
    if left:
        raise ArtifactBuildError(f"cannot unmount {', '.join(map(str, left))}: {path} left in place")
    shutil.rmtree(path, ignore_errors=True)


def download_deb(package: str, version: str | None, cache: Path, log: Log) -> Path:
    """The package's .deb in ``cache``, downloaded with apt-get unless already there."""
    cache.mkdir(parents=True, exist_ok=True)
    # apt-get download names files NAME_VERSION_ARCH.deb with ':' spelled %3a.
    stem = f"{package}_{version.replace(':', '%3a')}_" if version else f"{package}_"
    cached = sorted(cache.glob(f"{stem}*.deb"), key=lambda p: p.stat().st_mtime)
    if cached:
        log(f"using cached {cached[-1].name}")
        return cached[-1]
    spec = f"{package}={version}" if version else package
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    try:
        args = ["apt-get", "download", spec]
        if os.geteuid() == 0:
            # apt's _apt sandbox user cannot write into root's cache directory.
            args[1:1] = ["-o", "APT::Sandbox::User=root"]
        try:
            proc.run(args, cwd=tmp, timeout=None, echo=log)
        except proc.CommandFailed:
            log(f"apt-get download {spec} failed: refreshing package lists once")
            proc.run(["apt-get", "update"], timeout=None, echo=log)
            proc.run(args, cwd=tmp, timeout=None, echo=log)
        debs = list(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise ArtifactBuildError(f"apt-get download {spec} produced {len(debs)} .deb files")
        final = cache / debs[0].name
        debs[0].rename(final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def deb_field(deb: Path, field: str) -> str:
    return proc.run(["dpkg-deb", "-f", deb, field], text=True, what=f"reading {field} of {deb.name}").stdout.strip()


# --------------------------------------------------------------------------- ext4


# --------------------------------------------------------------------------- vmlinux


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside an x86 bzImage.

    The boot protocol (2.08+) header says where the compressed payload lies:
    ``payload_offset``/``payload_length`` relative to the protected-mode code that
    follows the ``setup_sects`` real-mode sectors. Firecracker boots only an ELF
    vmlinux, and so does QEMU's PVH path; distributions ship only the bzImage.
    """
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise ArtifactBuildError("not a bzImage (no 'HdrS' boot header)")
    version = struct.unpack_from("<H", bzimage, 0x206)[0]
    if version < 0x208:
        raise ArtifactBuildError(f"boot protocol {version >> 8}.{version & 0xFF} has no payload fields (need 2.08+)")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    if len(payload) != length:
        raise ArtifactBuildError("bzImage is truncated: its payload runs past the end of the file")
    elf = _decompress(payload)
    if elf[:4] != ELF_MAGIC:
        raise ArtifactBuildError("the bzImage payload does not decompress to an ELF image")
    return elf


def _decompress(payload: bytes) -> bytes:
    if payload.startswith(b"\x1f\x8b"):
        # one member only: the kernel appends its uncompressed size after the stream
        return zlib.decompressobj(wbits=31).decompress(payload)
    if payload.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload)
    if payload.startswith(b"\x5d\x00\x00"):
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(payload)
    if payload.startswith(b"\x28\xb5\x2f\xfd"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(payload)
    if payload.startswith(LZ4_LEGACY_MAGIC):
        return _lz4_legacy(payload)
    raise ArtifactBuildError(
        f"bzImage payload compressed with an unsupported method (magic {payload[:4].hex()}); "
        "gzip, xz, lzma, lz4 and zstd are supported"
    )


def _lz4_legacy(payload: bytes) -> bytes:
    """lz4's legacy frame, as the kernel's build writes it: the magic, then blocks of
    (u32 compressed size, data) that each expand to at most 8 MiB, then the kernel's
    own u32 of the total uncompressed size."""
    import lz4.block

    expected = struct.unpack_from("<I", payload, len(payload) - 4)[0]
    body, pos, out = payload[:-4], len(LZ4_LEGACY_MAGIC), bytearray()
    while pos + 4 <= len(body):
        size = struct.unpack_from("<I", body, pos)[0]
        if size == struct.unpack("<I", LZ4_LEGACY_MAGIC)[0]:  # a concatenated stream
            pos += 4
            continue
        block = body[pos + 4 : pos + 4 + size]
        if len(block) != size:
            raise ArtifactBuildError("bzImage lz4 payload is truncated")
        out += lz4.block.decompress(block, uncompressed_size=8 << 20)
        pos += 4 + size
    if len(out) != expected:
        raise ArtifactBuildError(f"bzImage lz4 payload expanded to {len(out)} bytes, its trailer says {expected}")
    return bytes(out)
