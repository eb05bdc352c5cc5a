"""The load client of W2 and W3: many streamed requests at once, on asyncio and plain sockets.

One :class:`Connection` per client, kept alive between its requests as an SDK's would be.
It reads answers as bytes and frames nothing it need not: a chunked stream ends with the
last chunk's ``0\\r\\n\\r\\n``, and a whole one must end with ``message_stop``. Times are
to the first bytes of the body (the first event) and to its last byte.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

# A stream that stays silent this long has failed (W3's events are one second apart).
SILENCE = 60.0


@dataclass
class Result:
    """One request's outcome: whether its stream ended with message_stop, and when its bytes came."""

    ok: bool
    ttfb: float = 0.0  # seconds to the first body bytes
    duration: float = 0.0  # seconds to the last one
    error: str = ""


class Connection:
    """One keep-alive HTTP/1.1 connection to a server, opened again after an error or a close."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str],
                   on_first_byte: Callable[[float], None] | None = None) -> Result:
        """Post a request and read its streamed answer to the end; never raises for the server's failures."""
        started = time.perf_counter()
        try:
            return await self._post(path, body, headers, started, on_first_byte)
        except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ValueError) as exc:
            self.close()
            return Result(False, error=f"{type(exc).__name__}: {str(exc)[:80]}")

    async def _post(self, path: str, body: bytes, headers: dict[str, str], started: float,
                    on_first_byte: Callable[[float], None] | None) -> Result:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        reader, writer = self.reader, self.writer
        assert reader is not None
        head = f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-length: {len(body)}\r\n" + \
            "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        writer.writelines([head.encode(), body])
        await writer.drain()
        async with asyncio.timeout(SILENCE):
            answer = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        status = int(answer[9:12])
        fields = dict(line.split(":", 1) for line in answer.split("\r\n")[1:] if ":" in line)
        length = int(fields["content-length"]) if "content-length" in fields else None
        chunked = "chunked" in fields.get("transfer-encoding", "")
        ttfb, tail, size = 0.0, b"", 0
        while length is None or size < length:
            async with asyncio.timeout(SILENCE):
                data = await reader.read(65536)
            if not data:
                if chunked or length is not None:
                    raise EOFError("the server closed the connection in the middle of the answer")
                break  # an answer that ends with its connection
            if not size:
                ttfb = time.perf_counter() - started
                if on_first_byte is not None:
                    on_first_byte(ttfb)
            size += len(data)
            tail = (tail + data)[-128:]
            if chunked and tail.endswith(b"0\r\n\r\n") and (size == 5 or tail.endswith(b"\r\n0\r\n\r\n")):
                break
        duration = time.perf_counter() - started
        if "close" in fields.get("connection", "") or length is None and not chunked:
            self.close()
        if status != 200:
            return Result(False, error=f"status {status}")
        if b"message_stop" not in tail:
            return Result(False, error="the stream ended without message_stop")
        return Result(True, ttfb, duration)

    def close(self) -> None:
        """Close the connection; the next request opens a new one."""
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None
