"""The plain records that cross modules: usage, sessions, events, messages.

Every module may import this one and it imports none of aspy's: data moves one way through
the modules above it, each handing these records to the next.
"""
from __future__ import annotations

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
    tool_calls: int = 0
    tool_failed: int = 0
    thinking_blocks: int = 0
    ttfb_total_ms: float = 0.0
    ttfb_count: int = 0
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
