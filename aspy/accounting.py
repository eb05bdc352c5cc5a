"""What an exchange adds to its session: requests, tokens and cost, tools, thinking, the context gauge, events.

Pure: nothing here reads or writes the store. A :class:`Tally` sums what a batch of exchanges
(or the sessions of an imported log) adds, per session, model, tool and 15-minute bucket, and
collects the events and the text kept for search; the session ledger (:mod:`aspy.sessions`)
writes it in one transaction. :func:`account` applies one exchange of live traffic to its
session; ``aspy migrate --import-logs`` (:mod:`aspy.migration`) applies the earlier aspy's log
records through the same :class:`Tally` steps, so both count alike.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from .billing import Sampling, answering, bill, context_of
from .models import STANDARD, Cost, ModelTable
from .records import ANONYMOUS, Event, Exchange, Message, ModelUsage, Response, Session, Usage, clean_text
from .store import BUCKET_SECONDS, UsageBucket

log = logging.getLogger(__name__)

COMPACTION_FLOOR = 10_000
COMPACTION_DROP = 0.7
# Which thread of a Claude Code session a request belongs to.
MAIN, SUBAGENT, SIDE = "main", "subagent", "side"
# A rate_limit event is emitted on 429, or when a remaining count falls under this share of its limit.
RATE_LIMIT_LOW = 0.1
PREVIEW_CHARS = 200
# A tool_call event keeps the tool's input up to this much JSON (a Write of a large file is not kept whole).
MAX_TOOL_INPUT = 16 * 1024


def warning_level(pct: float) -> str:
    """Return the context warning level for a usage percentage."""
    if pct >= 95:
        return "critical"
    if pct >= 85:
        return "high"
    if pct >= 70:
        return "warning"
    return "normal"


def bounded_input(value: Any) -> Any:
    """Return a tool input as an event keeps it: whole up to 16 KiB of JSON, else the start of it as text."""
    text = json.dumps(value, separators=(",", ":"), default=str)
    if len(text) <= MAX_TOOL_INPUT:
        return value
    return f"{text[:MAX_TOOL_INPUT]}... ({len(text)} characters in all)"


def failed_exchange(exchange: Exchange) -> bool:
    """Tell whether an exchange failed: an error status, an error in the answer, a broken exchange or stream."""
    obs = exchange.observation
    return exchange.status >= 400 or exchange.error is not None or bool(obs.errors) or obs.unfinished


def rate_limited(response: Response) -> bool:
    """Tell whether an answer hit, or came close to, a rate limit."""
    if response.status == 429:
        return True
    limits = response.rate_limits
    for name, value in limits.items():
        if name.endswith("-remaining"):
            limit = limits.get(name[:-len("-remaining")] + "-limit")
            try:
                if limit and int(value) < RATE_LIMIT_LOW * int(limit):
                    return True
            except ValueError:
                continue
    return False


def bucket_of(at: float) -> int:
    """Return the start of the 15-minute bucket an instant falls in."""
    return int(at // BUCKET_SECONDS) * BUCKET_SECONDS


def session_summary(s: Session) -> dict[str, Any]:
    """Return the headline figures of a session, for its session_end event."""
    return {"requests": s.requests, "failed": s.failed, "input_tokens": s.usage.input_tokens,
            "output_tokens": s.usage.output_tokens, "cost_usd": round(s.cost_usd, 10),
            "tool_calls": s.tool_calls, "compactions": s.compactions}


def event(s: Session, kind: str, at: float, **data: Any) -> Event:
    """Return an event of a session."""
    return Event(type=kind, timestamp=at, session=s.id, client=s.client, user=s.user, data=data)


@dataclass
class Accounted:
    """One exchange as a batch counted it in the store: whose it is, and each billed sampling (for /metrics)."""

    exchange: Exchange
    # The client after the migration shim; None for a legacy user.
    client: str | None
    # (model, tokens, cost in USD) of each billed sampling, as added to the store.
    samplings: list[tuple[str, Usage, float]] = field(default_factory=list)


@dataclass
class Billed:
    """What a response's samplings came to."""

    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    unpriced: set[str] = field(default_factory=set)
    # (model, tokens, cost in USD) of each sampling.
    samplings: list[tuple[str, Usage, float]] = field(default_factory=list)


@dataclass
class Tally:
    """What a batch adds to the store, summed by session, model, tool and bucket before it is written."""

    events: list[Event] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    # Per (session, model, price class) and (session, tool) sums.
    models: dict[tuple[str, str, str], ModelUsage] = field(default_factory=dict)
    tools: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    # Requests outside any session, per (client, user): [requests, failed, last seen].
    traffic: dict[tuple[str | None, str], list[float]] = field(default_factory=dict)
    # Figures over time, per (bucket, session or None, client, user, model, price class), and
    # tool calls per (bucket, session, tool).
    buckets: dict[tuple, UsageBucket] = field(default_factory=dict)
    tool_buckets: dict[tuple[int, str, str], list[int]] = field(default_factory=dict)
    # Every exchange counted, in order (live traffic only).
    accounted: list[Accounted] = field(default_factory=list)

    def add_traffic(self, client: str | None, user: str, failed: bool, at: float) -> None:
        """Count a request that opens no session as its identity's traffic."""
        counts = self.traffic.setdefault((client, user), [0, 0, at])
        counts[0] += 1
        counts[1] += failed
        counts[2] = max(counts[2], at)
        self.add_bucket(at, None, None, "", requests=1, failed=int(failed), client=client, user=user)

    def add_bucket(self, at: float, session: Session | None, model: str | None, price_class: str,
                   usage: Usage | None = None, cost: Cost | None = None, requests: int = 0, failed: int = 0,
                   client: str | None = None, user: str = ANONYMOUS) -> None:
        """Add figures to the bucket of an instant, for a session (or, without one, a client's traffic) and a model."""
        if session is not None:
            client, user = session.client, session.user
        start = bucket_of(at)
        key = (start, session.id if session else None, client, user, model, price_class)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = UsageBucket(start, key[1], client, user, model, price_class)
        bucket.requests += requests
        bucket.failed += failed
        if usage is not None:
            bucket.usage = bucket.usage + usage
        if cost is not None:
            bucket.cost_usd += cost.usd
            bucket.savings_usd += cost.savings_usd
            bucket.priced = bucket.priced and cost.priced

    def add_tool(self, s: Session, at: float, tool: str, calls: int, failed: int) -> None:
        """Add calls or failures of a tool to a session, and to the bucket of an instant."""
        counts = self.tools.setdefault((s.id, tool), [0, 0])
        counts[0] += calls
        counts[1] += failed
        counts = self.tool_buckets.setdefault((bucket_of(at), s.id, tool), [0, 0])
        counts[0] += calls
        counts[1] += failed

    def bill(self, s: Session, at: float, parts: list[Sampling], pricing: ModelTable, counted: int | None,
             failed: bool = False) -> Billed:
        """Price a response's samplings into its session, its model shares and its buckets.

        The response counts once, in the share of sampling ``counted`` (the model that answered
        it); its buckets count it too unless ``counted`` is None (the caller counted the request).
        """
        billed = Billed()
        for i, part in enumerate(parts):
            cost = pricing.price(part)
            billed.cost_usd += cost.usd
            billed.usage = billed.usage + part.usage
            s.cost_usd += cost.usd
            s.savings_usd += cost.savings_usd
            name = part.model or "unknown"
            if not cost.priced:
                billed.unpriced.add(name)
            billed.samplings.append((name, part.usage, cost.usd))
            answers = int(i == (counted or 0))
            share = self.models.setdefault((s.id, name, cost.price_class), ModelUsage(requests=0, priced=cost.priced))
            share.requests += answers
            share.usage = share.usage + part.usage
            share.cost_usd += cost.usd
            share.savings_usd += cost.savings_usd
            in_bucket = answers if counted is not None else 0
            self.add_bucket(at, s, name, cost.price_class, part.usage, cost, requests=in_bucket,
                            failed=failed * in_bucket)
        s.usage = s.usage + billed.usage
        return billed

    def tool_call(self, s: Session, at: float, name: str, /, **data: Any) -> None:
        """Count a call of the tool ``name`` in a session, and note its event (``data``)."""
        s.tool_calls += 1
        self.add_tool(s, at, name, 1, 0)
        self.events.append(event(s, "tool_call", at, **data))

    def tool_result(self, s: Session, at: float, name: str, error: bool, event_at: float, /, **data: Any) -> None:
        """Count a result of the tool ``name`` (a failed call when it is an error), and note its event."""
        if error:
            s.tool_failed += 1
            self.add_tool(s, at, name, 0, 1)
        self.events.append(event(s, "tool_result", event_at, **data))

    def thinking(self, s: Session, at: float, **data: Any) -> None:
        """Count a thinking block, and note its event."""
        s.thinking_blocks += 1
        self.events.append(event(s, "thinking", at, **data))

    def compaction(self, s: Session, at: float, **data: Any) -> None:
        """Count a compaction of the context, and note its event."""
        s.compactions += 1
        self.events.append(event(s, "context_compact", at, **data))

    def ttfb(self, s: Session, ms: float | None) -> None:
        """Add a time to first byte to a session's average."""
        if ms is not None:
            s.ttfb_total_ms += ms
            s.ttfb_count += 1

    def text(self, s: Session, role: str, at: float, text: str) -> None:
        """Keep a prompt or an answer for search."""
        self.messages.append(Message(s.id, s.client, s.user, role, at, text))


def account(tally: Tally, s: Session, ex: Exchange, pricing: ModelTable, capture: bool,
            results: list[tuple[str, str, float, bool]], bill_results: bool) -> Billed:
    """Add one Messages exchange of live traffic to its session, and note its events.

    ``results``: the tool results it carries whose call is known, as (tool_use_id, tool, called
    at, is_error); ``bill_results``: whether its Message Batch results are billed (only their
    first complete download is).
    """
    obs, request, facts, response = ex.observation, ex.request, ex.request.facts, ex.response
    done_at = ex.ended_at
    failed = failed_exchange(ex)
    s.last_activity = max(s.last_activity, done_at)
    s.requests += 1
    s.failed += failed
    agent = request.headers.get("x-claude-code-agent-id")
    thread = SUBAGENT if agent else SIDE if facts.side else MAIN
    tally.events.append(event(s, "request", ex.started_at, method=request.method, path=request.path,
                              model=facts.model, stream=facts.stream, messages=facts.message_count,
                              tools=facts.tool_count, body_bytes=request.body_bytes, agent_id=agent, thread=thread))
    for tool_use_id, name, called_at, is_error in results:
        tally.tool_result(s, done_at, name, is_error, ex.started_at, tool=name, tool_use_id=tool_use_id,
                          is_error=is_error, duration_ms=round((ex.started_at - called_at) * 1000, 1))
    accounted = Accounted(ex, s.client)
    tally.accounted.append(accounted)
    parts = bill(ex) if bill_results or not obs.batch_results else []
    billed = tally.bill(s, done_at, parts, pricing, answering(parts), failed)
    accounted.samplings = billed.samplings
    if not parts:
        # Nothing billed (a failure before any usage, results billed before): the request still counts.
        tally.add_bucket(done_at, s, ex.model or None, STANDARD, requests=1, failed=int(failed))
    ttfb_ms = response.ttfb_ms if response is not None else None
    tally.ttfb(s, ttfb_ms)
    usage = billed.usage
    tally.events.append(event(
        s, "response", done_at, status=ex.status, model=ex.model, stop_reason=obs.stop_reason,
        usage={"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
               "cache_read": usage.cache_read, "cache_write_5m": usage.cache_write_5m,
               "cache_write_1h": usage.cache_write_1h, "web_search_requests": usage.web_search_requests},
        cost_usd=round(billed.cost_usd, 10), unpriced_models=sorted(billed.unpriced) or None,
        ttfb_ms=round(ttfb_ms, 1) if ttfb_ms is not None else None,
        duration_ms=round(response.duration_ms if response is not None else 0.0, 1),
        request_id=response.request_id if response is not None else None, agent_id=agent,
        # Why the answer was only partly read (a bound reached, a broken stream), if it was.
        observation_error=obs.parse_error))
    for text in obs.thinking:
        tally.thinking(s, done_at, chars=len(text), preview=text[:PREVIEW_CHARS] if capture else None)
    for tool in obs.tool_uses:
        if not tool.server:
            tally.tool_call(s, done_at, tool.name, tool=tool.name, tool_use_id=tool.id,
                            input=bounded_input(tool.input) if capture else None, complete=tool.complete)
    for error in obs.errors:
        tally.events.append(event(s, "error", done_at, status=ex.status, error_type=error.get("type"),
                                  message=str(error.get("message", ""))[:500]))
    if ex.error:
        tally.events.append(event(s, "error", done_at, status=ex.status, error_type="proxy", message=ex.error))
    if response is not None and rate_limited(response):
        tally.events.append(event(s, "rate_limit", done_at, status=ex.status, headers=response.rate_limits))
    # Only the main thread moves the gauge: a subagent or a side request has its own, smaller context.
    if thread == MAIN and obs.usage is not None and ex.status < 400:
        move_context(tally, s, ex, pricing, done_at)
    # Search holds the conversation: the user's own words, and the answers of the main thread
    # and its subagents; a subagent's prompt is the model's, and a side request is neither.
    if capture and thread != SIDE:
        if thread == MAIN and facts.prompt.strip():
            tally.text(s, "user", ex.started_at, facts.prompt)
        if obs.text.strip():
            tally.text(s, "assistant", done_at, clean_text(obs.text))
    return billed


def move_context(tally: Tally, s: Session, ex: Exchange, pricing: ModelTable, at: float) -> None:
    """Set the context gauge from a main-thread response; count a compaction when it dropped."""
    current = context_of(ex.observation.usage or {}, ex.request.facts.cache_ttl).context_tokens
    before = s.context_tokens
    s.context_tokens = current
    s.context_model = ex.model
    s.context_limit = pricing.context_limit(ex.model, ex.request.headers.get("anthropic-beta", ""))
    if before > COMPACTION_FLOOR and current < COMPACTION_DROP * before:
        tally.compaction(s, at, before_tokens=before, after_tokens=current)
