"""qemu_stream.split on streams built here in QEMU 7.2's format (the real ones are
split in tests/test_fork.py, when a fork is forked)."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import pytest

from banger_core.errors import BangerError
from banger_core.vmm import qemu_stream as qs

MIB = 1 << 20
PAGE = qs.PAGE_SIZE


def name(s: str) -> bytes:
    return bytes([len(s)]) + s.encode()


def rec(addr: int, flags: int, block: str | None = None) -> bytes:
    return struct.pack(">Q", addr | flags | (0 if block else qs.CONTINUE)) + (name(block) if block else b"")


def config(subsections: bytes = b"") -> bytes:
    machine = b"microvm"
    return bytes([qs.CONFIGURATION]) + struct.pack(">I", len(machine)) + machine + subsections


CAPS = bytes([qs.SUBSECTION]) + name("configuration/capabilities") + struct.pack(">II", 1, 1) + name("x-ignore-shared")


def section(kind: int, sid: int, body: bytes, idstr: str | None = None) -> bytes:
    head = bytes([kind]) + struct.pack(">I", sid)
    if idstr is not None:
        head += name(idstr) + struct.pack(">II", 0, 4)
    return head + body + struct.pack(">Q", qs.EOS) + bytes([qs.FOOTER]) + struct.pack(">I", sid)


def stream(pages: bytes, subsections: bytes = CAPS) -> tuple[bytes, bytes]:
    """(the whole stream, what split must leave of it)"""
    blocks = name("ram") + struct.pack(">QQ", 4 * MIB, 0) + name("pc.bios") + struct.pack(">QQ", 64 * 1024, 0xFFFC0000)
    start = section(qs.SECTION_START, 2, struct.pack(">Q", (4 * MIB + 64 * 1024) | qs.MEM_SIZE) + blocks, "ram")
    bios = rec(0, qs.PAGE, "pc.bios") + b"B" * PAGE + rec(PAGE, qs.ZERO) + b"\0"
    devices = bytes([qs.SECTION_START + 3]) + b"device state, opaque" + bytes([0x10]) + b"json"
    head = struct.pack(">II", qs.MAGIC, qs.VERSION) + config(subsections)
    whole = head + start + section(qs.SECTION_PART, 2, pages + bios) + section(qs.SECTION_END, 2, b"") + devices
    kept = head + start + section(qs.SECTION_PART, 2, bios) + section(qs.SECTION_END, 2, b"") + devices
    return whole, kept


def test_split_writes_the_blocks_pages_to_a_sparse_file_and_passes_the_rest_on(tmp_path: Path) -> None:
    pages = (
        rec(0, qs.PAGE, "ram")
        + b"a" * PAGE
        + rec(PAGE, qs.ZERO)
        + b"\0"
        + rec(3 * MIB, qs.PAGE)
        + b"z" * PAGE
        + rec(0, qs.ZERO, "ram")  # sent again, now zero: the page is cleared
        + b"\0"
        + rec(2 * PAGE, qs.PAGE)
        + bytes(PAGE)  # a zero page sent whole: stays a hole
    )
    whole, kept = stream(pages)
    out = io.BytesIO()
    mem = tmp_path / "memory"
    written = qs.split(io.BufferedReader(io.BytesIO(whole)), out, str(mem))
    assert out.getvalue() == kept
    data = mem.read_bytes()
    assert len(data) == 4 * MIB and data[3 * MIB : 3 * MIB + PAGE] == b"z" * PAGE
    assert data[: 3 * MIB] == bytes(3 * MIB) and data[3 * MIB + PAGE :] == bytes(MIB - PAGE)
    assert written == 3 * PAGE  # a, z, and a's page cleared
    assert os.stat(mem).st_blocks * 512 <= 4 * PAGE


@pytest.mark.parametrize(
    ("mangle", "said"),
    [
        (lambda s: s[:-300], "ended early"),
        (lambda s: b"XXXX" + s[4:], "not a QEMU migration stream"),
        (lambda s: s.replace(b"configuration/capabilities", b"configuration/somethingnew"), "unknown configuration subsection"),
        (
            lambda s: s.replace(name("ram") + struct.pack(">QQ", 4 * MIB, 0), name("rom") + struct.pack(">QQ", 4 * MIB, 0)),
            "no RAM block",
        ),
    ],
)
def test_a_stream_it_cannot_read_is_refused_and_leaves_no_file(tmp_path: Path, mangle, said: str) -> None:
    whole, _ = stream(rec(0, qs.PAGE, "ram") + b"a" * PAGE)
    with pytest.raises(BangerError) as exc:
        qs.split(io.BufferedReader(io.BytesIO(mangle(whole))), io.BytesIO(), str(tmp_path / "memory"))
    assert said in exc.value.message
    assert not (tmp_path / "memory").exists()


def test_a_page_outside_the_block_or_a_compressed_one_is_refused(tmp_path: Path) -> None:
    for pages, said in (
        (rec(8 * MIB, qs.PAGE, "ram") + b"x" * PAGE, "outside the block"),
        (rec(0, qs.XBZRLE, "ram") + b"x" * 16, "compression, XBZRLE or RDMA"),
    ):
        whole, _ = stream(pages)
        with pytest.raises(BangerError) as exc:
            qs.split(io.BufferedReader(io.BytesIO(whole)), io.BytesIO(), str(tmp_path / "memory"))
        assert said in exc.value.message
        assert not (tmp_path / "memory").exists()
