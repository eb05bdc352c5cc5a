"""The plain records that cross modules: exchanges, usage, sessions, events, messages.

Every module may import this one and it imports none of aspy's: data moves one way through
the modules above it, each handing these records to the next. The record of one exchange
(:class:`Exchange`) is made by the proxy when the answer has ended, with its three parts each
set once: the :class:`Request`, the :class:`Response` (None when none came) and the error
(aspy's own failure text, None when there was none), as mitmproxy's ``HTTPFlow`` has them.
"""
from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

# Cache lifetimes a request can ask for (cache_control.ttl).
FIVE_MINUTES, ONE_HOUR = "5m", "1h"
# The identity of requests that name no client and carry no key.
ANONYMOUS = "anonymous"
# Stored status is "active" or "ended"; "idle" is derived from last_activity when read.
ACTIVE, IDLE, ENDED = "active", "idle", "ended"
# Not ended: active or idle.
LIVE = "live"
# The error of an exchange whose client hung up before the end of the answer.
CLIENT_WENT_AWAY = "client went away before the response was complete"
# The error of an exchange whose worker stopped before it ended (given back by the journal).
WORKER_STOPPED = "aspy's worker stopped before the exchange ended"
# Answers that stream: an SSE stream, or Bedrock's binary event stream.
STREAM_TYPES = ("text/event-stream", "application/vnd.amazon.eventstream")
SURROGATE = re.compile("[\ud800-\udfff]")


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
    def prompt_tokens(self) -> int:
        """Return the whole prompt: new input, cache reads and cache writes."""
        return self.input_tokens + self.cache_read + self.cache_write

    @property
    def context_tokens(self) -> int:
        """Return what this response held in its context window."""
        return self.prompt_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(a + b for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple[int, ...]:
        """Return the counts in field order."""
        return (self.input_tokens, self.output_tokens, self.cache_read, self.cache_write_5m,
                self.cache_write_1h, self.web_search_requests)


def status_of(session: Session, now: float, idle_after: float, end_after: float) -> str:
    """Return a session's status: ended as stored or past end_after, else active or idle by its last activity."""
    if session.status == ENDED or now - session.last_activity > end_after:
        return ENDED
    return IDLE if now - session.last_activity > idle_after else ACTIVE


@dataclass
class Session:
    """One session of one identity, with its running statistics."""

    id: str
    claude_session_id: str | None
    source: str
    client: str | None
    client_name: str | None
    provider: str | None
    user: str
    started: float
    last_activity: float
    status: str = ACTIVE
    ended: float | None = None
    end_reason: str | None = None
    requests: int = 0
    failed: int = 0
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    savings_usd: float = 0.0
    # Tool calls, those whose result was an error, and thinking blocks.
    tool_calls: int = 0
    tool_failed: int = 0
    thinking_blocks: int = 0
    # Summed over the requests the upstream answered, for the average time to first byte.
    ttfb_total_ms: float = 0.0
    ttfb_count: int = 0
    # The context gauge: the main thread's last model, tokens and window; and compactions seen.
    context_model: str | None = None
    context_tokens: int = 0
    context_limit: int | None = None
    compactions: int = 0
    # Filled when read for the API: {model: ModelUsage}, {tool: [calls, failed]}.
    by_model: dict[str, ModelUsage] = field(default_factory=dict)
    by_tool: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class ModelUsage:
    """One model's share of a session (or of a total)."""

    requests: int = 0
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    savings_usd: float = 0.0
    priced: bool = True


# Every kind of event, as /api/events names them.
EVENT_TYPES = ("request", "response", "tool_call", "tool_result", "thinking", "error", "rate_limit",
               "context_compact", "session_start", "session_end")


@dataclass
class Event:
    """One thing that happened, as listed by /api/events."""

    type: str
    timestamp: float
    session: str | None
    client: str | None
    user: str | None
    data: dict[str, Any] = field(default_factory=dict)
    id: int | None = None


@dataclass
class Message:
    """A user prompt or assistant answer kept for search."""

    session: str
    client: str | None
    user: str
    role: str
    timestamp: float
    text: str


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


@dataclass
class Request:
    """The request as aspy read it: where it went, the headers worth keeping, what its body said.

    The body itself is not kept: only its size and its facts (:mod:`aspy.prompts` reads them
    once the answer is out, so that a large body costs the client nothing).
    """

    method: str
    path: str
    # Session keys and context hints, never credentials (proxy.OBSERVED_HEADERS).
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = ""
    body_bytes: int = 0
    facts: RequestFacts = field(default_factory=RequestFacts)


@dataclass
class Response:
    """The answer as the client got it: the upstream's, or aspy's own when it answered instead."""

    status: int
    duration_ms: float
    # Until the upstream's response headers; None when aspy answered itself.
    ttfb_ms: float | None = None
    content_type: str = ""
    request_id: str | None = None
    # The upstream's anthropic-ratelimit-* headers, names in lower case.
    rate_limits: dict[str, str] = field(default_factory=dict)
    bytes: int = 0
    # Whether the whole answer was relayed (a HEAD answer and aspy's own are whole).
    complete: bool = False
    observation: Observation = field(default_factory=Observation)


def exchange_id() -> str:
    """Return a new exchange id: 32 hex digits, the microsecond it was made, then 76 random bits."""
    # In time order, ids go to the end of the store's index of recorded exchanges, one page per
    # transaction; random ones (uuid4) touched a page each (bench: 4.5 of a 5-exchange write's 55).
    return f"{time.time_ns() // 1000:013x}{secrets.randbits(76):019x}"


@dataclass
class Exchange:
    """One request and its answer as the proxy saw them: the record every later step reads.

    ``response`` is None when no answer came (the worker stopped first); ``error`` is what aspy
    saw go wrong outside the upstream's own answer (an unreachable upstream, a broken stream, a
    client that left), None when nothing did.
    """

    started_at: float
    client: str | None
    provider: str
    user: str
    request: Request
    response: Response | None = None
    error: str | None = None
    # Unique, so that an exchange given back by the journal is never recorded twice.
    id: str = field(default_factory=exchange_id)
    # Given back by the journal of a worker that stopped: the store may have it already.
    replayed: bool = False

    @property
    def status(self) -> int:
        """Return the status the client got, 0 when no answer came."""
        return self.response.status if self.response is not None else 0

    @property
    def observation(self) -> Observation:
        """Return what the answer said (nothing, when no answer came)."""
        return self.response.observation if self.response is not None else Observation()

    @property
    def model(self) -> str | None:
        """Return the model that answered, else the one asked for."""
        return self.observation.model or self.request.facts.model

    @property
    def ended_at(self) -> float:
        """Return the instant the answer ended (its start when none came)."""
        return self.started_at + (self.response.duration_ms / 1000 if self.response is not None else 0.0)

    def summary(self) -> dict[str, Any]:
        """Return the exchange as one flat, secret-free dict for the log."""
        request, facts, response, obs = self.request, self.request.facts, self.response, self.observation
        return {
            "client": self.client, "provider": self.provider, "user": self.user,
            "method": request.method, "path": request.path, "status": self.status,
            "model": self.model, "stream": facts.stream,
            "messages": facts.message_count, "tools": facts.tool_count,
            "body_bytes": request.body_bytes, "response_bytes": response.bytes if response else 0,
            "ttfb_ms": round(response.ttfb_ms, 1) if response and response.ttfb_ms is not None else None,
            "duration_ms": round(response.duration_ms, 1) if response else 0.0, "stop_reason": obs.stop_reason,
            "usage": obs.usage, "batch_results": len(obs.batch_results) or None,
            "tool_uses": [t.name for t in obs.tool_uses], "thinking_blocks": len(obs.thinking),
            "errors": [e.get("type") for e in obs.errors], "request_id": response.request_id if response else None,
            "failure": self.error, "parse_error": obs.parse_error,
        }
