"""Unwrap AWS Bedrock response streams into Anthropic Messages API events.

Bedrock's InvokeModelWithResponseStream answers with ``application/vnd.amazon.eventstream``:
binary frames (prelude, typed headers, payload, two CRC32s) whose ``chunk`` payloads carry
one Messages API event as base64 JSON. This module owns that unwrapping only: the framing and
its checksums, the chunk payloads, the exception frames, and the invocation metrics Bedrock
adds to the last chunk. What the events mean is the SSE observer's business.

:class:`BedrockDecoder` reads incrementally, gives the same events however the bytes were
split, keeps at most one frame buffered, and never raises: at the first damaged or oversized
frame it stops and records why, because the proxy relays the bytes whatever happens here.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import struct
import uuid
import zlib
from typing import Any

log = logging.getLogger(__name__)

# Real Bedrock frames are well under a kilobyte or two; this bound only stops a damaged or
# hostile length field from making us buffer without limit.
MAX_FRAME = 16 * 1024 * 1024
# Total length, headers length, prelude CRC: all u32 big-endian.
PRELUDE = 12
# An empty frame is still its prelude and its message CRC.
MIN_FRAME = PRELUDE + 4
METRICS_KEY = "amazon-bedrock-invocationMetrics"

# One Messages API event, e.g. {"type": "message_start", "message": {...}}.
Event = dict[str, Any]

# Header value types with a fixed size; 6 (bytes) and 7 (string) carry a u16 length instead.
_FIXED_SIZE = {0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}
# byte, short, int, long, timestamp (milliseconds since the epoch): signed big-endian.
_INT_FORMAT = {2: ">b", 3: ">h", 4: ">i", 5: ">q", 8: ">q"}


class FrameError(ValueError):
    """The bytes are not a valid event stream frame."""


def read_headers(raw: bytes) -> dict[str, Any]:
    """Return one frame's headers by name; raise FrameError if they do not parse exactly."""
    headers: dict[str, Any] = {}
    pos, end = 0, len(raw)
    while pos < end:
        name_len = raw[pos]
        pos += 1
        # The name and its value type byte must both fit.
        if pos + name_len + 1 > end:
            raise FrameError("header name runs past the headers")
        name = raw[pos:pos + name_len].decode("utf-8", "replace")
        kind = raw[pos + name_len]
        pos += name_len + 1
        if kind in (6, 7):
            if pos + 2 > end:
                raise FrameError("header value length runs past the headers")
            (size,) = struct.unpack_from(">H", raw, pos)
            pos += 2
        elif kind in _FIXED_SIZE:
            size = _FIXED_SIZE[kind]
        else:
            raise FrameError(f"unknown header value type {kind}")
        if pos + size > end:
            raise FrameError("header value runs past the headers")
        headers[name] = _header_value(kind, raw[pos:pos + size])
        pos += size
    return headers


def _header_value(kind: int, value: bytes) -> Any:
    """Return a header value as Python: bool, int, bytes, str (strings and UUIDs)."""
    if kind in (0, 1):
        return kind == 0
    if kind in _INT_FORMAT:
        return struct.unpack(_INT_FORMAT[kind], value)[0]
    if kind == 7:
        return value.decode("utf-8", "replace")
    if kind == 9:
        return str(uuid.UUID(bytes=value))
    return value


def _json(data: bytes) -> Any:
    """Return parsed JSON, or None when the bytes are not JSON."""
    try:
        return json.loads(data)
    except ValueError:  # includes UnicodeDecodeError
        return None


def _is_count(value: Any) -> bool:
    """Tell whether a metric is a plain integer (bool is an int subclass, so excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


class BedrockDecoder:
    """Turn event stream bytes, split anyhow, into Messages API events; stop at the first damage."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        # Why decoding stopped (damaged, oversized or truncated stream); None while healthy.
        self.error: str | None = None
        # The last chunk's "amazon-bedrock-invocationMetrics", integers only.
        self.invocation_metrics: dict[str, int] | None = None
        self.frames = 0
        # Well-framed frames that carried no event we read (other event types, bad payloads).
        self.skipped = 0
        # Stream offset of the first byte still buffered, so errors say where they were.
        self.position = 0
        self._buffer = bytearray()
        # The checked total length of the frame being collected; None until its prelude is in.
        self._total: int | None = None

    @property
    def buffered(self) -> int:
        """Return how many bytes are held waiting for the rest of their frame."""
        return len(self._buffer)

    def feed(self, chunk: bytes) -> list[Event]:
        """Take the next bytes; return the events of every frame they complete."""
        if self.error is not None or not chunk:
            return []
        self._buffer += chunk
        events: list[Event] = []
        try:
            self._drain(events)
        except FrameError as exc:
            self._stop(f"{exc} (frame at byte {self.position})")
        except Exception as exc:  # a decoder bug must never reach the stream
            log.exception("Bedrock event stream decoder failed; decoding stops for this exchange")
            self._stop(f"{type(exc).__name__}: {exc} (frame at byte {self.position})")
        return events

    def finish(self) -> None:
        """End the stream: bytes left over mean it was cut inside a frame."""
        if self.error is None and self._buffer:
            self._stop(f"stream ended inside a frame ({len(self._buffer)} bytes of it, "
                       f"at byte {self.position})")

    close = finish

    def metrics_usage(self) -> dict[str, int] | None:
        """Return the invocation metrics as a Messages API ``usage`` object, or None."""
        metrics = self.invocation_metrics
        if metrics is None:
            return None
        usage = {"input_tokens": metrics.get("inputTokenCount", 0),
                 "output_tokens": metrics.get("outputTokenCount", 0)}
        # Bedrock counts cache tokens apart from inputTokenCount, as the Messages API does.
        if "cacheReadInputTokenCount" in metrics:
            usage["cache_read_input_tokens"] = metrics["cacheReadInputTokenCount"]
        if "cacheWriteInputTokenCount" in metrics:
            usage["cache_creation_input_tokens"] = metrics["cacheWriteInputTokenCount"]
        return usage

    def _stop(self, reason: str) -> None:
        """Record why decoding stopped and let go of the buffer."""
        self.error = reason
        self._buffer = bytearray()
        self._total = None

    def _drain(self, events: list[Event]) -> None:
        """Read every complete frame in the buffer, then drop their bytes once."""
        buf = self._buffer
        offset = 0
        try:
            while True:
                available = len(buf) - offset
                if self._total is None:
                    if available < PRELUDE:
                        break
                    # Checked as soon as it arrives, so a bad length never makes us wait or buffer.
                    self._total = self._prelude(buf[offset:offset + PRELUDE])
                total = self._total
                if available < total:
                    break
                self._frame(bytes(buf[offset:offset + total]), events)
                offset += total
                self.position += total
                self._total = None
        finally:
            # One deletion per feed keeps the work linear in the bytes seen.
            del buf[:offset]

    def _prelude(self, prelude: bytes | bytearray) -> int:
        """Check a prelude; return the frame's total length."""
        total: int
        total, headers_len, crc = struct.unpack(">III", prelude)
        if zlib.crc32(prelude[:8]) != crc:
            raise FrameError("prelude CRC mismatch")
        if total > self.max_frame:
            raise FrameError(f"frame of {total} bytes exceeds the {self.max_frame}-byte bound")
        if total < MIN_FRAME or headers_len > total - MIN_FRAME:
            raise FrameError(f"inconsistent frame lengths (total {total}, headers {headers_len})")
        return total

    def _frame(self, frame: bytes, events: list[Event]) -> None:
        """Check one whole frame and turn it into an event, if it carries one."""
        (crc,) = struct.unpack_from(">I", frame, len(frame) - 4)
        if zlib.crc32(memoryview(frame)[:-4]) != crc:
            raise FrameError("message CRC mismatch")
        (headers_len,) = struct.unpack_from(">I", frame, 4)
        headers = read_headers(frame[PRELUDE:PRELUDE + headers_len])
        self.frames += 1
        event = self._event(headers, frame[PRELUDE + headers_len:-4])
        if event is None:
            self.skipped += 1
        else:
            events.append(event)

    def _event(self, headers: dict[str, Any], payload: bytes) -> Event | None:
        """Return the Messages API event a well-framed frame stands for, or None."""
        # AWS SDKs treat a frame without :message-type as an event.
        kind = headers.get(":message-type", "event")
        if kind == "event":
            return self._chunk(payload) if headers.get(":event-type") == "chunk" else None
        if kind == "exception":
            body = _json(payload)
            message = body.get("message", body.get("Message")) if isinstance(body, dict) else None
            if message is None:
                message = payload.decode("utf-8", "replace")
            return {"type": "error", "error": {"type": str(headers.get(":exception-type", "exception")),
                                               "message": str(message)}}
        if kind == "error":
            # Protocol-level errors put their code and message in headers, not in the payload.
            return {"type": "error", "error": {"type": str(headers.get(":error-code", "error")),
                                               "message": str(headers.get(":error-message", ""))}}
        return None

    def _chunk(self, payload: bytes) -> Event | None:
        """Unwrap a chunk payload ``{"bytes": <base64 event JSON>}``; note invocation metrics."""
        body = _json(payload)
        if not isinstance(body, dict) or not isinstance(body.get("bytes"), str):
            return None
        try:
            event = _json(base64.b64decode(body["bytes"], validate=True))
        except (binascii.Error, ValueError):
            return None
        if not isinstance(event, dict):
            return None
        metrics = event.get(METRICS_KEY)
        if isinstance(metrics, dict):
            self.invocation_metrics = {k: v for k, v in metrics.items() if _is_count(v)}
        return event
