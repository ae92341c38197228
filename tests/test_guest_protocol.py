"""The host<->guest wire format (guest/banger_guest/protocol.py): frames survive any
split of the byte stream, a cut frame or garbage is skipped and the reader
resynchronises on the next frame, and SYNC unsticks a reader holding a cut header."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from banger_guest import protocol as P

frames_st = st.lists(st.tuples(st.sampled_from(sorted(P.NAMES)), st.integers(0, 2**32 - 1), st.binary(max_size=300)), max_size=8)


@given(frames=frames_st, cuts=st.lists(st.integers(1, 97), max_size=40))
@settings(max_examples=200, deadline=None)
def test_frames_come_out_whole_however_the_stream_is_split(frames, cuts):
    stream = b"".join(P.encode(k, s, p) for k, s, p in frames)
    d = P.Decoder()
    got: list[P.Frame] = []
    at = 0
    for n in cuts:
        got += d.feed(stream[at : at + n])
        at += n
    got += d.feed(stream[at:])
    assert [(f.kind, f.session, f.payload) for f in got] == frames
    assert d.skipped == 0


def test_garbage_and_a_cut_frame_are_skipped_then_frames_resume():
    hello = P.encode_json(P.HELLO, 0, {"nonce": "n1", "version": P.VERSION})
    cut = P.encode(P.STDOUT, 7, os.urandom(5000))[:2000]  # the host went away mid-frame
    d = P.Decoder()
    out = d.feed(b"junk" + P.MAGIC + b"\x09" + cut + P.SYNC + hello)
    assert [f.kind for f in out] == [P.HELLO] and out[0].obj() == {"nonce": "n1", "version": P.VERSION}
    assert d.skipped > 0


def test_a_reader_stuck_on_a_cut_header_is_freed_by_sync():
    """Without SYNC the cut frame's header (claiming 60 KB) swallows the HELLO behind it;
    SYNC is longer than any frame, so the cut frame fails its CRC and HELLO is found."""
    cut = P.encode(P.STDIN, 3, b"x" * 60000)[:100]
    hello = P.encode_json(P.HELLO, 0, {"nonce": "n2", "version": P.VERSION})
    stuck = P.Decoder()
    assert stuck.feed(cut + hello) == []
    freed = P.Decoder()
    assert [f.kind for f in freed.feed(cut + P.SYNC + hello)] == [P.HELLO]


def test_a_corrupted_frame_is_dropped_and_the_next_one_kept():
    a = bytearray(P.encode(P.STDOUT, 1, b"hello"))
    a[-1] ^= 0xFF
    b = P.encode(P.STDOUT, 1, b"world")
    assert [f.payload for f in P.Decoder().feed(bytes(a) + b)] == [b"world"]


def test_data_is_split_into_bounded_frames_and_bad_frames_are_refused():
    data = random.randbytes(3 * P.MAX_PAYLOAD + 5)
    frames = P.encode_data(P.STDIN, 9, data)
    assert len(frames) == 4
    out = P.Decoder().feed(b"".join(frames))
    assert b"".join(f.payload for f in out) == data and {f.session for f in out} == {9}
    assert P.encode_data(P.STDIN, 9, b"") == []
    with pytest.raises(P.ProtocolError):
        P.encode(P.STDIN, 1, b"x" * (P.MAX_PAYLOAD + 1))
    with pytest.raises(P.ProtocolError):
        P.encode(99, 1)
    with pytest.raises(P.ProtocolError):
        P.Frame(P.OPEN, 1, b"[1]").obj()
    with pytest.raises(P.ProtocolError):
        P.Frame(P.OPEN, 1, b"\xff").obj()
