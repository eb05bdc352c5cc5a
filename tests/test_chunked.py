"""Reading a chunked body as it arrives: any framing, split anywhere, gives the body; broken framing is an error."""
from __future__ import annotations

import select
import socket
import threading
import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from urllib3.exceptions import ProtocolError

from aspy import chunked
from aspy.chunked import MAX_LINE, Dechunker


def framed(pieces: list[bytes], extension: bool = False, trailers: tuple[bytes, ...] = ()) -> bytes:
    """Return the pieces as a chunked body, with chunk extensions and trailers if asked."""
    out = b"".join(b"%x%s\r\n%s\r\n" % (len(p), b";name=value" if extension else b"", p) for p in pieces if p)
    return out + b"0\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"


def read(raw: bytes, cuts: list[int]) -> tuple[bytes, Dechunker]:
    """Feed the bytes cut at the given places; return the data and the reader."""
    body, out, last = Dechunker(), [], 0
    for cut in [*sorted(set(cuts)), len(raw)]:
        out.append(body.feed(raw[last:cut]))
        last = cut
    return b"".join(out), body


@settings(max_examples=150, deadline=None)
@given(pieces=st.lists(st.binary(max_size=300), max_size=8), extension=st.booleans(),
       trailers=st.lists(st.sampled_from([b"x-trailer: 1", b"Digest: abc"]), max_size=2),
       data=st.data())
def test_any_split_of_any_framing_gives_the_body(pieces, extension, trailers, data):
    raw = framed(pieces, extension, tuple(trailers))
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(raw)), max_size=20))
    body, reader = read(raw, cuts)
    assert body == b"".join(pieces)
    assert reader.done and reader.extra == 0


def test_what_one_read_brought_comes_out_in_one_piece():
    events = [b"event: e\ndata: {}\n\n"] * 40
    assert Dechunker().feed(framed(events)) == b"".join(events)


def test_bytes_past_the_end_are_counted_not_given():
    body, reader = read(framed([b"abc"]) + b"HTTP/1.1 200 OK\r\n", [])
    assert body == b"abc" and reader.done and reader.extra == len(b"HTTP/1.1 200 OK\r\n")


def test_an_unfinished_body_is_not_done():
    body, reader = read(framed([b"abcdef"])[:8], [3])
    assert body == b"abcde" and not reader.done


@pytest.mark.parametrize("size", [b"zz", b"", b"-1", b"0x10", b"1_0", b" +5"])
def test_a_size_that_is_not_hex_is_broken_framing(size):
    with pytest.raises(ProtocolError):
        Dechunker().feed(size + b"\r\nabc\r\n0\r\n\r\n")


def test_a_line_that_never_ends_is_broken_framing():
    reader = Dechunker()
    with pytest.raises(ProtocolError):
        for _ in range(MAX_LINE // 1024 + 2):
            reader.feed(b"a" * 1024)


def test_a_silent_stream_is_read_only_once_bytes_have_come():
    # An empty reader reads into a buffer of the size asked and, under gevent, holds it through
    # the wait: 64 KiB for every silent stream. The socket is read only once it has bytes.
    pytest.importorskip("gevent")
    ours, theirs = socket.socketpair()
    reader = ours.makefile("rb")
    reads: list[bool] = []

    class Watched:
        def read1(self, size):
            reads.append(bool(select.select([ours], [], [], 0)[0]))
            return reader.read1(size)

    def send_slowly():
        for part in (b"3\r\nabc\r\n", b"2\r\nde\r\n", b"0\r\n\r\n"):
            time.sleep(0.05)
            theirs.sendall(part)

    original = SimpleNamespace(fp=Watched(), close=lambda: None)
    raw = SimpleNamespace(_fp=original, connection=SimpleNamespace(sock=ours), release_conn=lambda: None)
    sender = threading.Thread(target=send_slowly)
    sender.start()
    try:
        assert b"".join(chunked.relayed_chunks(SimpleNamespace(raw=raw), 65536)) == b"abcde"
    finally:
        sender.join()
        ours.close()
        theirs.close()
    # The first read takes what the reader holds (here nothing yet: it waits there once).
    assert len(reads) >= 3 and all(reads[1:])
