"""Turn the bytes of one answer into plain facts, without ever holding a byte back.

The proxy hands every response chunk to an observer *after* relaying it. An
:class:`SseObserver` parses ``text/event-stream`` incrementally and gives the same result
however the bytes were split (:class:`BedrockObserver` the same events in Bedrock's binary
frames); a :class:`JsonObserver` reads a whole JSON message; a
:class:`BatchResultsObserver` reads a Message Batch's results file; any other body is only
counted. Each gives an :class:`~aspy.records.Observation`. A parser that fails stops
observing and says so in the observation; the stream itself is never touched.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import orjson

from .bedrock import BedrockDecoder
from .prompts import BATCH_RESULTS_PATH
from .records import BatchResult, Observation, ToolUse, clean_text

log = logging.getLogger(__name__)

# Non-streaming answers are parsed only up to this size; past it they are counted.
MAX_JSON_BODY = 32 * 1024 * 1024
# A Message Batch holds at most 100,000 requests; a results download is observed up to that many
# (about 60 MB at most, for the largest batch), past it counted only.
MAX_BATCH_RESULTS = 100_000
# One stream event (or line) larger than this stops the observation of its exchange.
MAX_EVENT = 4 * 1024 * 1024
# Assistant text, thinking and each tool input are kept up to this size (for search and events).
MAX_TEXT = 256 * 1024
# The events read with orjson alone (read_event): of W2's 80 events, 76.
FAST_EVENTS = frozenset({"content_block_delta", "content_block_stop", "ping"})


def _dict(value: Any) -> dict:
    """Return a JSON object, or an empty one for anything else."""
    return value if isinstance(value, dict) else {}


def _key(value: Any) -> Any:
    """Return a content block index usable as a dict key (the API sends integers)."""
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    """Return a string field as clean text (no NUL, no lone surrogate), or None when it is not a string."""
    return clean_text(value) if isinstance(value, str) else None


def read_event(data: bytes) -> Any:
    """Parse one event's JSON as the standard library does, with orjson's speed on the events that are most of a stream.

    orjson refuses a few documents json accepts (read again by json), and makes a float of an
    integer past 64 bits where json makes an int: only a delta or a block's end, which carry
    strings and an index, is kept from orjson, and only when its index is not a float.
    Usage and everything else is read by json, so a count is the same whatever its size.
    """
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)
    if type(payload) is dict and payload.get("type") in FAST_EVENTS \
            and not isinstance(payload.get("index"), float):
        return payload
    return json.loads(data)


def produced_output(content: Any) -> bool:
    """Tell whether a message's content holds output (a fallback block marks a handoff, not output)."""
    if isinstance(content, list):
        return any(_dict(block).get("type") != "fallback" for block in content)
    return bool(content)


def read_message(message: dict, obs: Observation) -> None:
    """Fill an observation from a whole (non-streaming) Message object, reading only what has the right type."""
    obs.message_id = _text(message.get("id"))
    obs.model = _text(message.get("model"))
    obs.stop_reason = _text(message.get("stop_reason"))
    texts, size = [], 0
    content = message.get("content")
    for block in content if isinstance(content, list) else []:
        block = _dict(block)
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            if size < MAX_TEXT:
                texts.append(block["text"][:MAX_TEXT - size])
            size += len(block["text"])
        elif kind in ("thinking", "redacted_thinking"):
            obs.thinking.append(_text(block.get("thinking")) or "")
        elif kind in ("tool_use", "server_tool_use"):
            obs.tool_uses.append(ToolUse(_text(block.get("id")) or "", _text(block.get("name")) or "",
                                         block.get("input", {}), server=kind == "server_tool_use"))
    obs.text = "".join(texts)
    obs.produced_output = produced_output(content)
    if isinstance(message.get("usage"), dict):
        obs.usage = message["usage"]


class JsonObserver:
    """Collect a JSON body and read it when it is complete."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.obs = Observation()

    def feed(self, chunk: bytes) -> None:
        """Keep a chunk, up to the size worth parsing."""
        self.size += len(chunk)
        if self.size <= MAX_JSON_BODY:
            self.chunks.append(chunk)

    def finish(self) -> Observation:
        """Parse the body: a Message, or an error object."""
        if self.size > MAX_JSON_BODY:
            self.obs.parse_error = "body too large to observe"
            return self.obs
        try:
            data = json.loads(b"".join(self.chunks))
        except (ValueError, RecursionError) as exc:
            self.obs.parse_error = f"invalid JSON: {type(exc).__name__}"
            return self.obs
        finally:
            self.chunks = []
        if isinstance(data, dict) and data.get("type") == "error":
            self.obs.errors.append(_dict(data.get("error")))
        elif isinstance(data, dict) and data.get("type") == "message":
            read_message(data, self.obs)
        return self.obs


class EventStream:
    """Split a ``text/event-stream`` into events incrementally, in time linear in its bytes.

    A line still incomplete is kept in one growing buffer (never re-joined with every
    chunk), and no event may exceed ``MAX_EVENT``: past it the observer gives up on the
    exchange, so a hostile stream costs bounded memory. Each event's JSON goes to
    :meth:`_event`, which a subclass reads.
    """

    def __init__(self) -> None:
        self.obs = Observation()
        self.partial = bytearray()
        # A chunk that ended in CR may be the first half of a CRLF.
        self.cr_pending = False
        self.event: str | None = None
        self.data: list[bytes] = []
        self.data_size = 0

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the stream, in whatever pieces they came."""
        if self.obs.parse_error:
            return
        try:
            self._feed(chunk)
        except Exception as exc:  # a parser bug must never reach the stream
            log.exception("event stream parser failed; observation stops for this exchange")
            self.give_up(f"{type(exc).__name__}: {exc}")

    def give_up(self, reason: str) -> None:
        """Stop observing this exchange, say why, and let go of what was buffered."""
        self.obs.parse_error = reason
        self.partial, self.data = bytearray(), []

    def _feed(self, chunk: bytes) -> None:
        if self.cr_pending:
            chunk, self.cr_pending = b"\r" + chunk, False
        if chunk.endswith(b"\r"):
            chunk, self.cr_pending = chunk[:-1], True
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        # The last piece is a line still to be completed by the next chunk.
        tail = lines.pop()
        if lines and self.partial:
            self.partial += lines[0]
            lines[0], self.partial = bytes(self.partial), bytearray()
        # The line rules inline, not a call per line: a stream has three lines an event.
        for line in lines:
            if not line:
                self._dispatch()
            elif line.startswith(b"data:"):
                value = line[6:] if line.startswith(b"data: ") else line[5:]
                self.data.append(value)
                self.data_size += len(value)
                if self.data_size > MAX_EVENT:
                    self.give_up(f"an event over {MAX_EVENT} bytes")
            elif line.startswith(b"event:"):
                self.event = line[6:].strip().decode("utf-8", "replace")
            if self.obs.parse_error:
                return
        self.partial += tail
        if len(self.partial) > MAX_EVENT:
            self.give_up(f"an event stream line over {MAX_EVENT} bytes")

    def _dispatch(self) -> None:
        data, event = self.data, self.event
        self.data, self.event, self.data_size = [], None, 0
        if not data:
            return
        try:
            payload = read_event(data[0] if len(data) == 1 else b"\n".join(data))
        except (ValueError, RecursionError):
            return
        if isinstance(payload, dict):
            kind = payload.get("type")
            self._event(kind if isinstance(kind, str) else event, payload)

    def _event(self, kind: str | None, payload: dict) -> None:
        """Read one event (the subclass's job)."""


class SseObserver(EventStream):
    """Observe a Messages API event stream: message, content blocks, usage, stop, errors."""

    def __init__(self) -> None:
        super().__init__()
        self.usage: dict = {}
        # Open content blocks by index: [kind, parts, block, size]
        self.blocks: dict[int, list] = {}
        self.texts: list[str] = []
        self.text_size = 0
        self.stopped = False

    def give_up(self, reason: str) -> None:
        """Stop observing this exchange, say why, and let go of what was buffered."""
        super().give_up(reason)
        self.blocks = {}

    def _event(self, kind: str | None, payload: dict) -> None:
        obs = self.obs
        if kind == "content_block_delta":
            block = self.blocks.get(_key(payload.get("index")))
            delta = _dict(payload.get("delta"))
            piece = delta.get("text") or delta.get("partial_json") or delta.get("thinking")
            if block is not None and isinstance(piece, str):
                # Past MAX_TEXT a block is counted, not kept: a huge answer costs bounded memory.
                if block[3] + len(piece) <= MAX_TEXT:
                    block[1].append(piece)
                block[3] += len(piece)
        elif kind == "content_block_start":
            started = _dict(payload.get("content_block"))
            # A fallback block marks a handoff between models, not output.
            obs.produced_output = obs.produced_output or started.get("type") != "fallback"
            self.blocks[_key(payload.get("index"))] = [started.get("type"), [], started, 0]
        elif kind == "content_block_stop":
            self._close_block(_key(payload.get("index")))
        elif kind == "message_start":
            message = _dict(payload.get("message"))
            obs.message_id = _text(message.get("id"))
            obs.model = _text(message.get("model"))
            self.usage = dict(_dict(message.get("usage")))
            self.obs.start_usage = dict(self.usage)
        elif kind == "message_delta":
            stop_reason = _dict(payload.get("delta")).get("stop_reason")
            obs.stop_reason = _text(stop_reason) or obs.stop_reason
            # Cumulative: every field present replaces what came before.
            self.usage.update(_dict(payload.get("usage")))
        elif kind == "message_stop":
            self.stopped = True
        elif kind == "error":
            obs.errors.append(_dict(payload.get("error")))

    def _close_block(self, index: Any, complete: bool = True) -> None:
        entry = self.blocks.pop(index, None)
        if entry is None:
            return
        kind, parts, block, size = entry
        kept = "".join(parts)
        if kind == "text":
            if self.text_size < MAX_TEXT:
                self.texts.append(kept[:MAX_TEXT - self.text_size])
            self.text_size += size
        elif kind in ("thinking", "redacted_thinking"):
            self.obs.thinking.append(kept)
        elif kind in ("tool_use", "server_tool_use"):
            if size > MAX_TEXT:
                value: Any = f"(input of {size} characters, not kept)"
                complete = False
            else:
                try:
                    value = json.loads(kept) if kept.strip() else block.get("input") or {}
                except (ValueError, RecursionError):
                    value, complete = kept, False
            self.obs.tool_uses.append(ToolUse(_text(block.get("id")) or "", _text(block.get("name")) or "", value,
                                              server=kind == "server_tool_use", complete=complete))

    def finish(self) -> Observation:
        """Close the stream: flush a last event and any block left open."""
        if not self.obs.parse_error:
            try:
                self._end_of_stream()
                for index in sorted(self.blocks, key=lambda i: (not isinstance(i, int), i or 0)):
                    self._close_block(index, complete=False)
                self.obs.text = "".join(self.texts)
                self.obs.unfinished = not self.stopped and not self.obs.errors
                if self.usage:
                    self.obs.usage = self.usage
            except Exception as exc:
                log.exception("event stream parser failed at the end of the stream")
                self.obs.parse_error = f"{type(exc).__name__}: {exc}"
        return self.obs


    def _end_of_stream(self) -> None:
        """Dispatch an event the stream left without its closing blank line."""
        self._feed(b"\n\n")


class BedrockObserver(SseObserver):
    """Observe a Bedrock event stream: its binary frames carry the same Messages events as SSE."""

    def __init__(self) -> None:
        super().__init__()
        self.frames = BedrockDecoder()

    def _feed(self, chunk: bytes) -> None:
        for event in self.frames.feed(chunk):
            self._event(event.get("type"), event)

    def _end_of_stream(self) -> None:
        self.frames.finish()
        if self.frames.error:
            self.obs.parse_error = f"Bedrock frames: {self.frames.error}"
        # The invocation metrics stand in for usage when the events carried none.
        metrics = self.frames.metrics_usage()
        if not self.usage and metrics:
            self.usage = metrics


class BatchResultsObserver:
    """Read a Message Batches results file (JSONL) line by line: each succeeded result is billed."""

    def __init__(self) -> None:
        self.obs = Observation()
        self.partial = bytearray()

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes; read every line they complete."""
        if self.obs.parse_error:
            return
        lines = chunk.split(b"\n")
        if len(lines) > 1:
            self.partial += lines[0]
            self._line(bytes(self.partial))
            self.partial = bytearray()
            for line in lines[1:-1]:
                self._line(line)
        self.partial += lines[-1]
        if len(self.partial) > MAX_JSON_BODY:
            self.obs.parse_error = f"a batch result over {MAX_JSON_BODY} bytes"
            self.partial = bytearray()

    def _line(self, line: bytes) -> None:
        if not line.strip() or self.obs.parse_error:
            return
        if len(self.obs.batch_results) >= MAX_BATCH_RESULTS:
            self.obs.parse_error = f"more than {MAX_BATCH_RESULTS} batch results"
            return
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            return
        result = _dict(_dict(entry).get("result"))
        message = _dict(result.get("message"))
        if result.get("type") == "succeeded" and isinstance(message.get("usage"), dict):
            content = message.get("content")
            self.obs.batch_results.append(BatchResult(_text(message.get("model")), message["usage"],
                                                      _text(message.get("stop_reason")), produced_output(content)))

    def finish(self) -> Observation:
        """Read a last line left without its newline."""
        if self.partial and not self.obs.parse_error:
            self._line(bytes(self.partial))
        return self.obs


class CountingObserver:
    """Observe a body that is not parsed (files, anything but JSON and event streams): count its bytes."""

    def __init__(self) -> None:
        self.obs = Observation()

    def feed(self, chunk: bytes) -> None:
        """Ignore the bytes; the proxy counts them."""

    def finish(self) -> Observation:
        """Return the empty observation."""
        return self.obs


def observer_for(content_type: str, path: str = "") -> Observer:
    """Pick how to observe a response by its content type (or, for batch results, its path)."""
    if BATCH_RESULTS_PATH.search(path.split("?", 1)[0]):
        return BatchResultsObserver()
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime == "text/event-stream":
        return SseObserver()
    if mime == "application/vnd.amazon.eventstream":
        return BedrockObserver()
    if mime == "application/json":
        return JsonObserver()
    return CountingObserver()


Observer = SseObserver | JsonObserver | BatchResultsObserver | CountingObserver

