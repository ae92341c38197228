"""The ELF vmlinux inside a bzImage: found through the boot-protocol header and
decompressed whatever the kernel was built with; anything else is refused clearly."""

from __future__ import annotations

import gzip
import lzma
import struct

import lz4.block
import pytest
import zstandard

from banger_debian.common import LZ4_LEGACY_MAGIC, ArtifactBuildError, extract_vmlinux

ELF = b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 300  # compressible, not trivial


def lz4_legacy(data: bytes) -> bytes:
    """What the kernel's build writes for CONFIG_KERNEL_LZ4: lz4 -l, then the size."""
    out = bytearray(LZ4_LEGACY_MAGIC)
    for i in range(0, len(data), 8 << 20):
        block = lz4.block.compress(data[i : i + (8 << 20)], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return bytes(out)


def with_size(payload: bytes, data: bytes) -> bytes:
    return payload + struct.pack("<I", len(data))  # the kernel appends the uncompressed size


def bzimage(payload: bytes, version: int = 0x20F, setup_sects: int = 3) -> bytes:
    img = bytearray((setup_sects + 1) * 512)
    img[0x1F1] = setup_sects
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, version)
    offset = 0x40  # the payload sits a little into the protected-mode code
    struct.pack_into("<II", img, 0x248, offset, len(payload))
    return bytes(img) + b"\x90" * offset + payload + b"\0" * 100  # trailing padding, as real images have


@pytest.mark.parametrize(
    "method,compress",
    [
        ("gzip", lambda d: with_size(gzip.compress(d), d)),
        ("xz", lambda d: with_size(lzma.compress(d, format=lzma.FORMAT_XZ), d)),
        ("lzma", lambda d: with_size(lzma.compress(d, format=lzma.FORMAT_ALONE), d)),
        ("zstd", lambda d: with_size(zstandard.ZstdCompressor().compress(d), d)),
        ("lz4", lambda d: with_size(lz4_legacy(d), d)),
    ],
)
def test_every_kernel_compression_round_trips(method, compress):
    assert extract_vmlinux(bzimage(compress(ELF))) == ELF


def test_bad_images_are_refused_with_the_reason():
    good = bzimage(with_size(gzip.compress(ELF), ELF))
    with pytest.raises(ArtifactBuildError, match=r"not a bzImage \(no 'HdrS' boot header\)"):
        extract_vmlinux(ELF)
    with pytest.raises(ArtifactBuildError, match=r"boot protocol 2\.6 has no payload fields"):
        extract_vmlinux(bzimage(b"x", version=0x206))
    with pytest.raises(ArtifactBuildError, match="truncated"):
        extract_vmlinux(good[:-200])
    with pytest.raises(ArtifactBuildError, match=r"unsupported method \(magic 42414443\)"):
        extract_vmlinux(bzimage(b"BADCOMPRESSION"))
    with pytest.raises(ArtifactBuildError, match="does not decompress to an ELF image"):
        extract_vmlinux(bzimage(gzip.compress(b"MZ not an elf")))
    lz4_short = with_size(lz4_legacy(ELF), ELF + b"x")
    with pytest.raises(ArtifactBuildError, match=r"lz4 payload expanded to \d+ bytes, its trailer says \d+"):
        extract_vmlinux(bzimage(lz4_short))
