"""Read an answer's chunked body as it arrives: what one read of the socket brought, its framing removed.

urllib3 reads a chunked body chunk by chunk, a few reads and a generator step for each; a
stream sends one event a chunk. :func:`relayed_chunks` reads the connection once for all
that has arrived and gives its data in one piece, so the proxy writes it to the client in
one write (never waiting for more). Errors are urllib3's, as its own reader raises them.
"""
from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Iterator

from requests import Response
from urllib3.exceptions import ProtocolError, ReadTimeoutError

# A chunk-size or trailer line longer than this is not HTTP: the stream is broken.
MAX_LINE = 64 * 1024
HEX = frozenset(b"0123456789abcdefABCDEF")
SIZE, DATA, DATA_END, TRAILER = range(4)


class Dechunker:
    """Take a chunked body's bytes in whatever pieces they come; give back the data they carry."""

    __slots__ = ("state", "left", "line", "done", "extra")

    def __init__(self) -> None:
        self.state = SIZE
        # Data bytes of this chunk still to come, or of the CRLF after it.
        self.left = 0
        # A size or trailer line not complete yet.
        self.line = b""
        self.done = False
        # Bytes past the end of the body: the connection is then not reused.
        self.extra = 0

    def feed(self, data: bytes) -> bytes:
        """Return the body's data in these bytes; raise ProtocolError on broken framing."""
        out: list[bytes] = []
        pos, end = 0, len(data)
        while pos < end and not self.done:
            if self.state == DATA:
                take = min(self.left, end - pos)
                out.append(data if take == end else data[pos:pos + take])
                pos += take
                self.left -= take
                if not self.left:
                    self.state, self.left = DATA_END, 2
            elif self.state == DATA_END:
                # The CRLF that ends a chunk's data, skipped as urllib3 skips it.
                take = min(self.left, end - pos)
                pos += take
                self.left -= take
                if not self.left:
                    self.state = SIZE
            else:
                newline = data.find(b"\n", pos)
                if newline < 0:
                    self.line += data[pos:]
                    if len(self.line) > MAX_LINE:
                        raise ProtocolError("Invalid chunked framing: a line too long")
                    break
                line, self.line, pos = self.line + data[pos:newline + 1], b"", newline + 1
                if self.state == SIZE:
                    self._size(line)
                elif line.strip() == b"":
                    self.done = True
        if self.done:
            self.extra += end - pos
        return out[0] if len(out) == 1 else b"".join(out)

    def _size(self, line: bytes) -> None:
        size = line.split(b";", 1)[0].strip()
        if not size or not HEX.issuperset(size):
            raise ProtocolError(f"Invalid chunk length: {size[:20]!r}")
        self.left = int(size, 16)
        self.state = DATA if self.left else TRAILER


def readable(upstream: Response) -> bool:
    """Tell whether a chunked answer can be read here: a plain body (not compressed) on a buffered socket reader.

    http.client gives a chunked answer a length of None; an answer with no body (to HEAD, a 204
    or a 304) has 0.
    """
    original = getattr(upstream.raw, "_fp", None)
    encoding = upstream.headers.get("content-encoding", "").strip().lower()
    return encoding in ("", "identity") and getattr(original, "length", 0) is None \
        and hasattr(getattr(original, "fp", None), "read1")


def relayed_chunks(upstream: Response, size: int) -> Iterator[bytes]:
    """Yield the chunked body's data as it arrives, at most one read of ``size`` bytes at a time.

    Once the body has ended cleanly the connection goes back to the pool, as urllib3 does;
    on any error it is not, and closing the response closes it.
    """
    raw = upstream.raw
    original = raw._fp
    reader = original.fp
    wait = _waiter(raw.connection.sock if raw.connection is not None else None)
    body = Dechunker()
    # The first read takes what the reader holds from the head; it is empty from then on.
    first = True
    while not body.done:
        try:
            if not first:
                wait()
            first = False
            data = reader.read1(size)
        except TimeoutError as exc:
            raise ReadTimeoutError(None, None, "Read timed out.") from exc  # type: ignore[arg-type]
        except (OSError, ValueError) as exc:  # ValueError: the socket was closed under the read
            raise ProtocolError(f"Connection broken: {exc!r}", exc) from exc
        if not data:
            raise ProtocolError("Response ended prematurely")
        piece = body.feed(data)
        if piece:
            yield piece
    if not body.extra:
        # http.client's response is complete: the connection may carry the next request.
        original.close()
        raw.release_conn()


def _waiter(sock: socket.socket | None) -> Callable[[], None]:
    """Return what waits until the socket has bytes to read, under gevent (nothing to do outside it).

    An empty reader's read1 asks the socket for ``size`` bytes into a buffer of that size and
    holds it while it waits: 64 KiB for each open stream. Waiting first, the buffer is made
    only when there is something to put in it (W3, 1,000 streams open: 26 MB less).
    """
    if sock is None or "gevent" not in sys.modules:
        return lambda: None
    from gevent.socket import wait_read

    timeout = sock.gettimeout()
    return lambda: wait_read(sock.fileno(), timeout)
