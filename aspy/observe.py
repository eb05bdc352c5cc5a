"""Turn the bytes of one exchange into plain facts, without ever holding a byte back.

The proxy hands every response chunk to an observer *after* relaying it. An
:class:`SseObserver` parses ``text/event-stream`` incrementally and gives the same result
however the bytes were split; a :class:`JsonObserver` reads a whole JSON message; any other
body is only counted. A parser that fails stops observing and says so in the record; the
stream itself is never touched. Request facts are read from the body once the response is
done, so a large body costs the client nothing.
"""
from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from . import claude_code as claude_code_rules
from .bedrock import BedrockDecoder
from .records import FIVE_MINUTES, ONE_HOUR

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
# No real response has a trillion tokens; a larger count is clamped so sums stay in 64 bits.
MAX_COUNT = 10**12
SURROGATE = re.compile("[\ud800-\udfff]")


def count(value: Any) -> int:
    """Return a token count, treating a missing or odd value as 0 and an absurd one as the ceiling."""
    return min(value, MAX_COUNT) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _dict(value: Any) -> dict:
    """Return a JSON object, or an empty one for anything else."""
    return value if isinstance(value, dict) else {}


def _key(value: Any) -> Any:
    """Return a content block index usable as a dict key (the API sends integers)."""
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    """Return a string field as clean text (no NUL, no lone surrogate), or None when it is not a string."""
    return clean_text(value) if isinstance(value, str) else None


def clean_text(text: str) -> str:
    """Return text that every store can hold: lone surrogates and NUL replaced with U+FFFD."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # JSON decodes a valid pair to one character: any surrogate left in a str is alone.
        text = SURROGATE.sub("\ufffd", text)
    return text


@dataclass
class ToolUse:
    """A ``tool_use`` (or server-side ``server_tool_use``) block the model produced."""

    id: str
    name: str
    input: Any
    server: bool = False
    # False when the stream ended before the input JSON was complete.
    complete: bool = True


@dataclass
class BatchResult:
    """One succeeded request of a Message Batch, as its results file reports it."""

    model: str | None
    usage: dict
    stop_reason: str | None
    produced_output: bool


@dataclass
class Observation:
    """What the response said: model, stop reason, usage, content, errors."""

    model: str | None = None
    stop_reason: str | None = None
    # The final usage object as the API reported it (message_delta's fields over message_start's),
    # and message_start's own: the bill is read from them once the request is known too.
    usage: dict | None = None
    start_usage: dict = field(default_factory=dict)
    # Whether any content came back: a refusal before any output is not billed.
    produced_output: bool = False
    # A Message Batches results download: each succeeded result, billed at batch rates.
    batch_results: list[BatchResult] = field(default_factory=list)
    tool_uses: list[ToolUse] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)
    text: str = ""
    errors: list[dict] = field(default_factory=list)
    message_id: str | None = None
    parse_error: str | None = None
    # An event stream that ended without message_stop (and without an error event).
    unfinished: bool = False


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


class SseObserver:
    """Parse a Messages API event stream incrementally, in time linear in its bytes.

    A line still incomplete is kept in one growing buffer (never re-joined with every
    chunk), and no event may exceed ``MAX_EVENT``: past it the observer gives up on the
    exchange, so a hostile stream costs bounded memory.
    """

    def __init__(self) -> None:
        self.obs = Observation()
        self.partial = bytearray()
        # A chunk that ended in CR may be the first half of a CRLF.
        self.cr_pending = False
        self.event: str | None = None
        self.data: list[bytes] = []
        self.data_size = 0
        self.usage: dict = {}
        # Open content blocks by index: [kind, parts, block, size]
        self.blocks: dict[int, list] = {}
        self.texts: list[str] = []
        self.text_size = 0
        self.stopped = False

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
        self.partial, self.data, self.blocks = bytearray(), [], {}

    def _feed(self, chunk: bytes) -> None:
        if self.cr_pending:
            chunk, self.cr_pending = b"\r" + chunk, False
        if chunk.endswith(b"\r"):
            chunk, self.cr_pending = chunk[:-1], True
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        if len(lines) > 1:
            first = lines[0]
            if self.partial:
                self.partial += first
                first, self.partial = bytes(self.partial), bytearray()
            self._line(first)
            for line in lines[1:-1]:
                self._line(line)
                if self.obs.parse_error:
                    return
        self.partial += lines[-1]
        if len(self.partial) > MAX_EVENT:
            self.give_up(f"an event stream line over {MAX_EVENT} bytes")

    def _line(self, line: bytes) -> None:
        if not line:
            self._dispatch()
        elif line.startswith(b"data:"):
            value = line[5:]
            value = value[1:] if value.startswith(b" ") else value
            self.data.append(value)
            self.data_size += len(value)
            if self.data_size > MAX_EVENT:
                self.give_up(f"an event over {MAX_EVENT} bytes")
        elif line.startswith(b"event:"):
            self.event = line[6:].strip().decode("utf-8", "replace")

    def _dispatch(self) -> None:
        data, event = self.data, self.event
        self.data, self.event, self.data_size = [], None, 0
        if not data:
            return
        try:
            payload = json.loads(b"\n".join(data))
        except (ValueError, RecursionError):
            return
        if isinstance(payload, dict):
            kind = payload.get("type")
            self._event(kind if isinstance(kind, str) else event, payload)

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


# Answers that stream: an SSE stream, or Bedrock's binary event stream.
STREAM_TYPES = ("text/event-stream", "application/vnd.amazon.eventstream")


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


# The paths of a Messages call on each provider: Anthropic and Azure Foundry, Vertex, Bedrock.
MESSAGES_PATH = re.compile(r"(?:/v1/messages|/publishers/anthropic/models/[^/]+:(?:stream)?rawPredict"
                           r"|/model/[^/]+/invoke(?:-with-response-stream)?)$", re.IGNORECASE)
# Downloading a Message Batch's results: where the batch's messages, and their bill, arrive.
BATCH_RESULTS_PATH = re.compile(r"/v1/messages/batches/[^/]+/results$")


def is_messages_call(method: str, path: str) -> bool:
    """Tell whether a request brings back messages to bill (not a probe, a model list or count_tokens)."""
    path = path.split("?", 1)[0]
    if method == "GET":
        return BATCH_RESULTS_PATH.search(path) is not None
    return method == "POST" and MESSAGES_PATH.search(path) is not None


Observer = SseObserver | JsonObserver | BatchResultsObserver | CountingObserver


@dataclass
class RequestFacts:
    """What the request body says: model, streaming, sizes, session hints, the user's turn."""

    model: str | None = None
    stream: bool = False
    message_count: int = 0
    tool_count: int = 0
    metadata_user_id: str | None = None
    # From the last user message: its text, and the tool results it carries.
    prompt: str = ""
    tool_results: list[tuple[str, bool]] = field(default_factory=list)
    # The lifetime cache writes take when the response does not split them.
    cache_ttl: str = FIVE_MINUTES
    # A Claude Code request beside the conversation (session title...): it never moves the gauge.
    side: bool = False


def read_request(body: bytes, content_type: str, claude_code: bool = False) -> RequestFacts:
    """Read the facts of a Messages API request body; an unreadable body gives empty facts.

    ``claude_code``: the request came from Claude Code, whose side requests and prompt
    wrappers :mod:`aspy.claude_code` knows.
    """
    facts = RequestFacts()
    if not body or "json" not in content_type.lower():
        return facts
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return facts
    if not isinstance(data, dict):
        return facts
    facts.model = _text(data.get("model"))
    facts.stream = data.get("stream") is True
    messages = data["messages"] if isinstance(data.get("messages"), list) else []
    facts.message_count = len(messages)
    facts.tool_count = len(data["tools"]) if isinstance(data.get("tools"), list) else 0
    metadata = data.get("metadata")
    if isinstance(metadata, dict):
        facts.metadata_user_id = _text(metadata.get("user_id"))
    # The user's turn is the last user message, even with system messages after it.
    last_user = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") != "system"), None)
    if isinstance(last_user, dict) and last_user.get("role") == "user":
        _read_user_turn(last_user.get("content"), facts)
    if claude_code:
        facts.side = claude_code_rules.is_side_request(data)
        facts.prompt = "" if facts.side else claude_code_rules.user_words(messages)
    facts.prompt = clean_text(facts.prompt)
    facts.cache_ttl = _cache_ttl(data)
    return facts


def _cache_ttl(request: dict) -> str:
    """Return the lifetime of the request's last cache breakpoint (tools, then system, then messages)."""
    last = FIVE_MINUTES
    blocks: list[Any] = []
    for key in ("tools", "system"):
        if isinstance(request.get(key), list):
            blocks += request[key]
    for message in request["messages"] if isinstance(request.get("messages"), list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            blocks += content
    for block in blocks:
        control = block.get("cache_control") if isinstance(block, dict) else None
        if isinstance(control, dict):
            last = ONE_HOUR if control.get("ttl") == ONE_HOUR else FIVE_MINUTES
    return last


def _read_user_turn(content: Any, facts: RequestFacts) -> None:
    """Collect the text and tool results of the user's last message."""
    if isinstance(content, str):
        facts.prompt = claude_code_rules.REMINDER.sub("", content).strip()
        return
    texts = []
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif block.get("type") == "tool_result":
            facts.tool_results.append((clean_text(str(block.get("tool_use_id", ""))), block.get("is_error") is True))
    facts.prompt = claude_code_rules.REMINDER.sub("", "\n".join(texts)).strip()


# The failure of an exchange whose client hung up before the end of the answer.
CLIENT_WENT_AWAY = "client went away before the response was complete"


@dataclass
class Exchange:
    """One request and its response as the proxy saw them: the record every later step reads."""

    started_at: float
    method: str
    path: str
    client: str | None
    provider: str
    user: str
    headers: dict[str, str]
    # The request body, kept only until its facts are read (then only its size).
    body: bytes = field(repr=False, default=b"")
    body_bytes: int = 0
    content_type: str = ""
    status: int = 0
    ttfb_ms: float | None = None
    duration_ms: float = 0.0
    response_type: str = ""
    response_bytes: int = 0
    request_id: str | None = None
    rate_limits: dict[str, str] = field(default_factory=dict)
    # What aspy saw go wrong outside the upstream's own answer.
    failure: str | None = None
    complete: bool = False
    observer: Any = field(default=None, repr=False)
    observation: Observation = field(default_factory=Observation)
    request: RequestFacts = field(default_factory=RequestFacts)
    # Unique, so that an exchange given back by the journal is never recorded twice.
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Given back by the journal of a worker that stopped: the store may have it already.
    replayed: bool = False

    def read_body(self) -> None:
        """Read the request's facts from its body, then let the body go (queued records stay small)."""
        self.request = read_request(self.body, self.content_type,
                                    claude_code="x-claude-code-session-id" in self.headers)
        self.body_bytes, self.body = len(self.body), b""

    @property
    def model(self) -> str | None:
        """Return the model that answered, else the one asked for."""
        return self.observation.model or self.request.model

    def summary(self) -> dict[str, Any]:
        """Return the exchange as one flat, secret-free dict for the log."""
        obs = self.observation
        return {
            "client": self.client, "provider": self.provider, "user": self.user,
            "method": self.method, "path": self.path, "status": self.status,
            "model": self.model, "stream": self.request.stream,
            "messages": self.request.message_count, "tools": self.request.tool_count,
            "body_bytes": self.body_bytes, "response_bytes": self.response_bytes,
            "ttfb_ms": round(self.ttfb_ms, 1) if self.ttfb_ms is not None else None,
            "duration_ms": round(self.duration_ms, 1), "stop_reason": obs.stop_reason,
            "usage": obs.usage, "batch_results": len(obs.batch_results) or None,
            "tool_uses": [t.name for t in obs.tool_uses], "thinking_blocks": len(obs.thinking),
            "errors": [e.get("type") for e in obs.errors], "request_id": self.request_id,
            "failure": self.failure, "parse_error": obs.parse_error,
        }
