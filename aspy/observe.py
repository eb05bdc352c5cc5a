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
from dataclasses import dataclass, field
from typing import Any

from .bedrock import BedrockDecoder

log = logging.getLogger(__name__)

# Non-streaming answers are parsed only up to this size; past it they are counted.
MAX_JSON_BODY = 32 * 1024 * 1024


@dataclass
class Usage:
    """Tokens of one response as billed: cache writes split by lifetime, web searches counted."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    web_search_requests: int = 0

    @property
    def cache_write(self) -> int:
        """Return cache writes of both lifetimes."""
        return self.cache_write_5m + self.cache_write_1h

    @property
    def context_tokens(self) -> int:
        """Return what this response held in its context window."""
        return self.input_tokens + self.cache_read + self.cache_write

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(a + b for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple[int, ...]:
        """Return the counts in field order."""
        return (self.input_tokens, self.output_tokens, self.cache_read, self.cache_write_5m,
                self.cache_write_1h, self.web_search_requests)

    @classmethod
    def from_api(cls, usage: dict) -> Usage:
        """Read one API ``usage`` object (no iterations)."""
        total_write = _count(usage.get("cache_creation_input_tokens"))
        split = usage.get("cache_creation") or {}
        write_1h = _count(split.get("ephemeral_1h_input_tokens"))
        write_5m = total_write - write_1h if "cache_creation_input_tokens" in usage else \
            _count(split.get("ephemeral_5m_input_tokens"))
        server_tools = usage.get("server_tool_use") or {}
        return cls(
            input_tokens=_count(usage.get("input_tokens")),
            output_tokens=_count(usage.get("output_tokens")),
            cache_read=_count(usage.get("cache_read_input_tokens")),
            cache_write_5m=max(write_5m, 0),
            cache_write_1h=write_1h,
            web_search_requests=_count(server_tools.get("web_search_requests")),
        )


def billed_usage(usage: dict) -> tuple[Usage, Usage]:
    """Return (billed, last) usage; with ``iterations`` the bill is their sum, the context the last."""
    iterations = usage.get("iterations")
    top = Usage.from_api(usage)
    if not isinstance(iterations, list) or not iterations:
        return top, top
    parts = [Usage.from_api(it) for it in iterations if isinstance(it, dict)]
    billed = sum(parts, Usage())
    # Web searches are reported once, for the whole response.
    billed.web_search_requests = top.web_search_requests
    return billed, parts[-1]


def _count(value: Any) -> int:
    """Return a token count, treating a missing or odd value as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


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
class Observation:
    """What the response said: model, stop reason, usage, content, errors."""

    model: str | None = None
    stop_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    context: Usage = field(default_factory=Usage)
    has_usage: bool = False
    tool_uses: list[ToolUse] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)
    text: str = ""
    errors: list[dict] = field(default_factory=list)
    message_id: str | None = None
    parse_error: str | None = None


def read_message(message: dict, obs: Observation) -> None:
    """Fill an observation from a whole (non-streaming) Message object."""
    obs.message_id = message.get("id")
    obs.model = message.get("model")
    obs.stop_reason = message.get("stop_reason")
    texts = []
    for block in message.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind in ("thinking", "redacted_thinking"):
            obs.thinking.append(block.get("thinking", ""))
        elif kind in ("tool_use", "server_tool_use"):
            obs.tool_uses.append(ToolUse(block.get("id", ""), block.get("name", ""),
                                         block.get("input", {}), server=kind == "server_tool_use"))
    obs.text = "".join(texts)
    if isinstance(message.get("usage"), dict):
        obs.usage, obs.context = billed_usage(message["usage"])
        obs.has_usage = True


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
        except ValueError as exc:
            self.obs.parse_error = f"invalid JSON: {exc}"
            return self.obs
        if isinstance(data, dict) and data.get("type") == "error":
            self.obs.errors.append(data.get("error") or {})
        elif isinstance(data, dict) and data.get("type") == "message":
            read_message(data, self.obs)
        return self.obs


class SseObserver:
    """Parse a Messages API event stream incrementally."""

    def __init__(self) -> None:
        self.obs = Observation()
        self.pending = b""
        self.event: str | None = None
        self.data: list[bytes] = []
        self.usage: dict = {}
        # Open content blocks by index: [kind, parts, block]
        self.blocks: dict[int, list] = {}
        self.texts: list[str] = []

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the stream, in whatever pieces they came."""
        if self.obs.parse_error:
            return
        try:
            self._feed(chunk)
        except Exception as exc:  # a parser bug must never reach the stream
            log.exception("event stream parser failed; observation stops for this exchange")
            self.obs.parse_error = f"{type(exc).__name__}: {exc}"

    def _feed(self, chunk: bytes) -> None:
        buf = self.pending + chunk
        # A CR at the end may be the first half of a CRLF: wait for the next chunk.
        if buf.endswith(b"\r"):
            buf, self.pending = buf[:-1], b"\r"
        else:
            self.pending = b""
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self.pending = lines.pop() + self.pending
        for line in lines:
            self._line(line)

    def _line(self, line: bytes) -> None:
        if not line:
            self._dispatch()
        elif line.startswith(b"data:"):
            value = line[5:]
            self.data.append(value[1:] if value.startswith(b" ") else value)
        elif line.startswith(b"event:"):
            self.event = line[6:].strip().decode("utf-8", "replace")

    def _dispatch(self) -> None:
        data, event = self.data, self.event
        self.data, self.event = [], None
        if not data:
            return
        try:
            payload = json.loads(b"\n".join(data))
        except ValueError:
            return
        if isinstance(payload, dict):
            self._event(payload.get("type") or event, payload)

    def _event(self, kind: str | None, payload: dict) -> None:
        obs = self.obs
        if kind == "content_block_delta":
            block = self.blocks.get(payload.get("index"))
            delta = payload.get("delta") or {}
            if block is not None:
                piece = delta.get("text") or delta.get("partial_json") or delta.get("thinking")
                if isinstance(piece, str):
                    block[1].append(piece)
        elif kind == "content_block_start":
            block = payload.get("content_block") or {}
            self.blocks[payload.get("index")] = [block.get("type"), [], block]
        elif kind == "content_block_stop":
            self._close_block(payload.get("index"))
        elif kind == "message_start":
            message = payload.get("message") or {}
            obs.message_id = message.get("id")
            obs.model = message.get("model")
            self.usage = dict(message.get("usage") or {})
        elif kind == "message_delta":
            obs.stop_reason = (payload.get("delta") or {}).get("stop_reason", obs.stop_reason)
            # Cumulative: every field present replaces what came before.
            self.usage.update(payload.get("usage") or {})
        elif kind == "error":
            obs.errors.append(payload.get("error") or {})

    def _close_block(self, index: Any, complete: bool = True) -> None:
        entry = self.blocks.pop(index, None)
        if entry is None:
            return
        kind, parts, block = entry
        if kind == "text":
            self.texts.append("".join(parts))
        elif kind in ("thinking", "redacted_thinking"):
            self.obs.thinking.append("".join(parts))
        elif kind in ("tool_use", "server_tool_use"):
            raw = "".join(parts)
            try:
                value = json.loads(raw) if raw.strip() else block.get("input") or {}
            except ValueError:
                value, complete = raw, False
            self.obs.tool_uses.append(ToolUse(block.get("id", ""), block.get("name", ""), value,
                                              server=kind == "server_tool_use", complete=complete))

    def finish(self) -> Observation:
        """Close the stream: flush a last event and any block left open."""
        if not self.obs.parse_error:
            try:
                self._end_of_stream()
                for index in sorted(self.blocks, key=lambda i: (not isinstance(i, int), i or 0)):
                    self._close_block(index, complete=False)
                self.obs.text = "".join(self.texts)
                if self.usage:
                    self.obs.usage, self.obs.context = billed_usage(self.usage)
                    self.obs.has_usage = True
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


class CountingObserver:
    """Observe a body that is not parsed (files, anything but JSON and event streams): count its bytes."""

    def __init__(self) -> None:
        self.obs = Observation()

    def feed(self, chunk: bytes) -> None:
        """Ignore the bytes; the proxy counts them."""

    def finish(self) -> Observation:
        """Return the empty observation."""
        return self.obs


def observer_for(content_type: str) -> SseObserver | JsonObserver | CountingObserver:
    """Pick how to observe a response by its content type."""
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


def is_messages_call(method: str, path: str) -> bool:
    """Tell whether a request asks a model for a message (not a probe, a model list or count_tokens)."""
    return method == "POST" and MESSAGES_PATH.search(path.split("?", 1)[0]) is not None


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


def read_request(body: bytes, content_type: str) -> RequestFacts:
    """Read the facts of a Messages API request body; an unreadable body gives empty facts."""
    facts = RequestFacts()
    if not body or "json" not in content_type.lower():
        return facts
    try:
        data = json.loads(body)
    except ValueError:
        return facts
    if not isinstance(data, dict):
        return facts
    facts.model = data.get("model") if isinstance(data.get("model"), str) else None
    facts.stream = data.get("stream") is True
    messages = data.get("messages") if isinstance(data.get("messages"), list) else []
    facts.message_count = len(messages)
    facts.tool_count = len(data["tools"]) if isinstance(data.get("tools"), list) else 0
    metadata = data.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        facts.metadata_user_id = metadata["user_id"]
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "user":
        _read_user_turn(messages[-1].get("content"), facts)
    return facts


def _read_user_turn(content: Any, facts: RequestFacts) -> None:
    """Collect the text and tool results of the user's last message."""
    if isinstance(content, str):
        facts.prompt = content
        return
    texts = []
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif block.get("type") == "tool_result":
            facts.tool_results.append((str(block.get("tool_use_id", "")), block.get("is_error") is True))
    facts.prompt = "\n".join(texts)


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

    def read_body(self) -> None:
        """Read the request's facts from its body, then let the body go (queued records stay small)."""
        self.request = read_request(self.body, self.content_type)
        self.body_bytes, self.body = len(self.body), b""

    @property
    def model(self) -> str | None:
        """Return the model that answered, else the one asked for."""
        return self.observation.model or self.request.model

    def summary(self) -> dict[str, Any]:
        """Return the exchange as one flat, secret-free dict for the log."""
        obs, usage = self.observation, self.observation.usage
        return {
            "client": self.client, "provider": self.provider, "user": self.user,
            "method": self.method, "path": self.path, "status": self.status,
            "model": self.model, "stream": self.request.stream,
            "messages": self.request.message_count, "tools": self.request.tool_count,
            "body_bytes": self.body_bytes, "response_bytes": self.response_bytes,
            "ttfb_ms": round(self.ttfb_ms, 1) if self.ttfb_ms is not None else None,
            "duration_ms": round(self.duration_ms, 1), "stop_reason": obs.stop_reason,
            "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
            "cache_read": usage.cache_read, "cache_write_5m": usage.cache_write_5m,
            "cache_write_1h": usage.cache_write_1h, "web_searches": usage.web_search_requests,
            "tool_uses": [t.name for t in obs.tool_uses], "thinking_blocks": len(obs.thinking),
            "errors": [e.get("type") for e in obs.errors], "request_id": self.request_id,
            "failure": self.failure, "parse_error": obs.parse_error,
        }
