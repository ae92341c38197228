"""Splitting a QEMU migration stream into a RAM file and a device-state stream.

A guest whose RAM QEMU maps privately (a VM restored from a snapshot) cannot be
snapshotted with its RAM left out of the stream (``x-ignore-shared`` skips shared RAM
only), so its snapshot's stream carries every page. ``split`` reads such a stream, as
QEMU writes it (7.2's format, ``x-ignore-shared`` on, no compression or XBZRLE),
writes the pages of one RAM block into a sparse file of the block's size, and passes
everything else through unchanged: the result is what a snapshot of a guest with
shared RAM is, a memory file its restores map privately (sharing its pages) beside a
stream of device state.

The stream: magic and version; the configuration section (with its subsections);
``ram``'s START section (the block list), PART sections and END section, each page a
big-endian 64-bit offset|flags, the block's name unless ``CONTINUE``, then one fill
byte (``ZERO``) or a page (``PAGE``), until ``EOS``, then a footer; then the devices'
sections, the EOF byte and a JSON description, which are copied as they are.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

from banger_core.errors import BangerError, ErrorCode

MAGIC = 0x5145564D  # "QEVM"
VERSION = 3
SECTION_START, SECTION_PART, SECTION_END = 0x01, 0x02, 0x03
SUBSECTION = 0x05
CONFIGURATION = 0x07
FOOTER = 0x7E
# RAM records (migration/ram.c)
ZERO, MEM_SIZE, PAGE, EOS, CONTINUE, XBZRLE, HOOK, COMPRESS = 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x100
PAGE_SIZE = 4096
_ZEROS = bytes(PAGE_SIZE)


def _fail(why: str) -> BangerError:
    return BangerError(ErrorCode.OPERATION_FAILED, f"cannot split the guest's RAM out of QEMU's snapshot stream: {why}")


class _Reader:
    def __init__(self, f: BinaryIO, out: BinaryIO) -> None:
        self.f, self.out = f, out

    def take(self, n: int, keep: bool = True) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise _fail("the stream ended early")
        if keep:
            self.out.write(data)
        return data

    def byte(self, keep: bool = True) -> int:
        return self.take(1, keep)[0]

    def be32(self, keep: bool = True) -> int:
        v: int = struct.unpack(">I", self.take(4, keep))[0]
        return v

    def be64(self, keep: bool = True) -> int:
        v: int = struct.unpack(">Q", self.take(8, keep))[0]
        return v

    def name(self, keep: bool = True) -> str:
        return self.take(self.byte(keep), keep).decode()

    def peek(self) -> int:
        data: bytes = self.f.peek(1)[:1]  # type: ignore[attr-defined]
        if not data:
            raise _fail("the stream ended early")
        return data[0]


def split(src: BinaryIO, state_out: BinaryIO, memory_path: str, block: str = "ram") -> int:
    """Read the stream ``src`` (a buffered reader); write the stream without
    ``block``'s pages to ``state_out`` and those pages to a new file ``memory_path`` (its
    size the block's). Returns the bytes of RAM written."""
    r = _Reader(src, state_out)
    if r.be32() != MAGIC or r.be32() != VERSION:
        raise _fail("not a QEMU migration stream of version 3")
    if r.peek() == CONFIGURATION:
        r.byte()
        r.take(r.be32())  # the machine type
        while r.peek() == SUBSECTION:
            r.byte()
            sub = r.name()
            r.be32()  # version
            if sub == "configuration/capabilities":
                for _ in range(r.be32()):
                    r.name()
            elif sub == "configuration/target-page-bits":
                if r.be32() != 12:
                    raise _fail("the guest's pages are not 4 KiB")
            elif sub == "configuration/uuid":
                r.take(16)
            else:
                raise _fail(f"unknown configuration subsection {sub!r}")
    fd = os.open(memory_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    written = 0
    try:
        ram_section: int | None = None
        current: str | None = None
        size: int | None = None
        dirty = bytearray()  # a bit per page written non-zero (a later ZERO record must clear it)
        while True:
            kind = r.peek()
            if kind not in (SECTION_START, SECTION_PART, SECTION_END):
                break  # the devices' sections, EOF and the description: as they are
            r.byte()
            section = r.be32()
            if kind == SECTION_START:
                idstr = r.name()
                r.be32()  # instance
                r.be32()  # version
                if idstr != "ram":
                    raise _fail(f"an iterative section {idstr!r} besides RAM")
                ram_section = section
            elif section != ram_section:
                raise _fail(f"section {section} is not RAM's")
            while True:
                hdr = r.take(8, keep=False)
                (value,) = struct.unpack(">Q", hdr)
                flags, addr = value & (PAGE_SIZE - 1), value & ~(PAGE_SIZE - 1)
                if flags & MEM_SIZE:  # the block list: kept whole (restores check it)
                    r.out.write(hdr)
                    total = addr
                    while total > 0:
                        name = r.name()
                        length = r.be64()
                        r.be64()  # the block's address (x-ignore-shared)
                        if name == block:
                            size = length
                            os.ftruncate(fd, length)
                            dirty = bytearray(length // PAGE_SIZE // 8 + 1)
                        total -= length
                    if size is None:
                        raise _fail(f"no RAM block named {block!r} in the stream")
                    continue
                if flags & EOS:
                    r.out.write(hdr)
                    break
                if flags & (XBZRLE | COMPRESS | HOOK):
                    raise _fail(f"records of kind {flags:#x} (compression, XBZRLE or RDMA) are not read")
                name_bytes = b""
                if not flags & CONTINUE:
                    n = r.byte(keep=False)
                    name_bytes = bytes([n]) + r.take(n, keep=False)
                    current = name_bytes[1:].decode()
                if current != block:  # another block's page (ROMs): passed on
                    r.out.write(hdr + name_bytes)
                    r.take(1 if flags & ZERO else PAGE_SIZE)
                    continue
                if size is None or addr + PAGE_SIZE > size:
                    raise _fail(f"a page of {block} at {addr:#x} outside the block")
                page = addr // PAGE_SIZE
                if flags & ZERO:
                    fill = r.byte(keep=False)
                    if fill or dirty[page // 8] & (1 << (page % 8)):
                        os.pwrite(fd, bytes([fill]) * PAGE_SIZE, addr)
                        written += PAGE_SIZE
                        if fill:
                            dirty[page // 8] |= 1 << (page % 8)
                elif flags & PAGE:
                    data = r.take(PAGE_SIZE, keep=False)
                    if data != _ZEROS or dirty[page // 8] & (1 << (page % 8)):
                        os.pwrite(fd, data, addr)
                        written += PAGE_SIZE
                        dirty[page // 8] |= 1 << (page % 8)
                else:
                    raise _fail(f"an unknown record {flags:#x}")
            if r.peek() == FOOTER:
                r.byte()
                r.be32()
        if size is None:
            raise _fail(f"no RAM block named {block!r} in the stream")
        while chunk := src.read(1 << 20):
            state_out.write(chunk)
    except BaseException:
        os.close(fd)
        os.unlink(memory_path)
        raise
    os.close(fd)
    return written
