"""What exchanges mean: sessions, exact accounting, tool calls, context use and events.

A batch of exchange records is applied in one store transaction: each exchange finds (or
opens) its session by the key order of SPEC 5, adds its tokens and cost (each billed
sampling priced by the model table), correlates tool results with the tool calls they
answer, moves the context gauge (main thread only), and emits its events; requests that are
not Messages calls only count as their client's traffic. Every figure also goes to the
15-minute bucket of the instant the exchange ended (figures over time). The writer's upkeep
ends sessions with no traffic for ``end_after``, trims event buffers, applies the retention
and prices history the table has learned.
"""
from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .billing import answering, bill, context_of
from .config import Client, Config
from .models import STANDARD, Cost, ModelTable
from .prompts import is_messages_call
from .records import ANONYMOUS, Exchange, Response, Usage, clean_text
from .store import (
    ACTIVE,
    BUCKET_SECONDS,
    ENDED,
    IDLE,
    Event,
    Message,
    ModelUsage,
    Session,
    Store,
    Transaction,
    UsageBucket,
)

log = logging.getLogger(__name__)

COMPACTION_FLOOR = 10_000
COMPACTION_DROP = 0.7
# Which thread of a Claude Code session a request belongs to.
MAIN, SUBAGENT, SIDE = "main", "subagent", "side"
# Sources of a session's key, in the order they are tried.
CLAUDE_CODE, HEADER, METADATA, REGISTERED, IMPLICIT = "claude_code", "header", "metadata", "registered", "implicit"
OLD_USER_ID = re.compile(r"user_[0-9a-f]+_account_[0-9a-f-]*_session_([0-9a-f-]{36})")
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


def status_of(session: Session, now: float, idle_after: float, end_after: float) -> str:
    """Return a session's status: ended as stored or past end_after, else active or idle by its last activity."""
    if session.status == ENDED or now - session.last_activity > end_after:
        return ENDED
    return IDLE if now - session.last_activity > idle_after else ACTIVE


def session_key(exchange: Exchange) -> tuple[str | None, str | None]:
    """Return (key, source) from the request, by the documented order; (None, None) if it has none."""
    headers = exchange.request.headers
    if headers.get("x-claude-code-session-id"):
        return headers["x-claude-code-session-id"], CLAUDE_CODE
    if headers.get("x-session-id"):
        return headers["x-session-id"], HEADER
    user_id = exchange.request.facts.metadata_user_id
    if user_id:
        try:
            decoded = json.loads(user_id)
        except ValueError:
            decoded = None
        if isinstance(decoded, dict) and isinstance(decoded.get("session_id"), str) and decoded["session_id"]:
            return decoded["session_id"], METADATA
        match = OLD_USER_ID.fullmatch(user_id)
        if match:
            return match.group(1), METADATA
    return None, None


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


def new_session_id() -> str:
    """Return a fresh session id."""
    return "s_" + uuid.uuid4().hex[:20]


def bucket_of(at: float) -> int:
    """Return the start of the 15-minute bucket an instant falls in."""
    return int(at // BUCKET_SECONDS) * BUCKET_SECONDS


@dataclass
class Accounted:
    """One exchange as a batch counted it in the store: whose it is, and each billed sampling (for /metrics)."""

    exchange: Exchange
    # The client after the migration shim; None for a legacy user.
    client: str | None
    # (model, tokens, cost in USD) of each billed sampling, as added to the store.
    samplings: list[tuple[str, Usage, float]] = field(default_factory=list)


@dataclass
class Batch:
    """What one batch of exchanges writes: each session once, all events at once."""

    sessions: dict[str, Session] = field(default_factory=dict)
    by_key: dict[tuple, str] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    # Per (session, model) and (session, tool) sums, written once per batch.
    models: dict[tuple[str, str, str], ModelUsage] = field(default_factory=dict)
    tools: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    # Requests outside any session, per (client, user): [requests, failed, last seen].
    traffic: dict[tuple[str | None, str], list[float]] = field(default_factory=dict)
    # Figures over time, per (bucket, session or None, client, user, model, price class), and
    # tool calls per (bucket, session, tool).
    buckets: dict[tuple, UsageBucket] = field(default_factory=dict)
    tool_buckets: dict[tuple[int, str, str], list[int]] = field(default_factory=dict)
    # Sessions whose key hash was set by this batch (they were anonymous).
    new_users: set[str] = field(default_factory=set)
    # Every exchange the batch counts (not those the store already had), in order.
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

    def add_tool_bucket(self, at: float, session_id: str, tool: str, calls: int, failed: int) -> None:
        """Add calls or failures of a tool to the bucket of an instant."""
        counts = self.tool_buckets.setdefault((bucket_of(at), session_id, tool), [0, 0])
        counts[0] += calls
        counts[1] += failed

    def add_model(self, session_id: str, model: str, usage: Usage, cost: Cost, requests: int = 1) -> None:
        """Add a sampling to a model's share of a session, in its price class."""
        share = self.models.setdefault((session_id, model, cost.price_class),
                                       ModelUsage(requests=0, priced=cost.priced))
        share.requests += requests
        share.usage = share.usage + usage
        share.cost_usd += cost.usd
        share.savings_usd += cost.savings_usd

    def add_tool(self, session_id: str, tool: str, calls: int, failed: int) -> None:
        """Add calls or failures of a tool to a session."""
        counts = self.tools.setdefault((session_id, tool), [0, 0])
        counts[0] += calls
        counts[1] += failed

    def write_shares(self, tx: Transaction) -> None:
        """Write the per-model and per-tool sums, and the figures over time."""
        for (session_id, model, klass), share in self.models.items():
            tx.add_model_usage(session_id, model, klass, share.usage, share.cost_usd, share.savings_usd,
                               share.priced, share.requests)
        for (session_id, tool), (calls, failed) in self.tools.items():
            tx.add_tool_counts(session_id, tool, calls, failed)
        for (client, user), (requests, failures, last_seen) in self.traffic.items():
            tx.add_traffic(client, user, int(requests), int(failures), last_seen)
        for session_id in sorted(self.new_users):
            tx.set_usage_user(session_id, self.sessions[session_id].user)
        # A session that took a key hash in this batch has it in all its buckets.
        for bucket in self.buckets.values():
            if bucket.session in self.new_users:
                bucket.user = self.sessions[bucket.session].user
        tx.add_usage(list(self.buckets.values()))
        tx.add_tool_usage([(*key, calls, failed) for key, (calls, failed) in self.tool_buckets.items()])


@dataclass
class Identity:
    """Whose traffic this is: a named client, or a legacy user known by key hash."""

    client: Client | None
    user: str


class Sessions:
    """Apply exchanges to sessions in the store, and answer session commands."""

    def __init__(self, config: Config, store: Store, models: ModelTable):
        self.config = config
        self.store = store
        self.models = models
        # Legacy key hashes that a client has taken over (the migration shim).
        self.hash_owner = {h: c for c in config.clients.values() for h in c.legacy_user_hashes}
        # Sessions written since the last upkeep, whose event buffers may need trimming.
        self.touched: set[str] = set()
        self.told_unpriced: set[str] = set()

    def identity(self, client_id: str | None, user: str) -> Identity:
        """Return the identity of traffic, applying the migration shim to legacy users."""
        if client_id is not None:
            return Identity(self.config.clients.get(client_id), user)
        return Identity(self.hash_owner.get(user), user)

    def record(self, exchanges: list[Exchange]) -> list[Accounted]:
        """Apply a batch of exchanges in one transaction; return what it counted, once committed."""
        with self.store.transaction() as tx:
            batch = Batch()
            # A journal gives back what a stopped worker held: the store may have part of it already.
            replayed = [e.id for e in exchanges if e.replayed]
            known = tx.already_recorded(replayed) if replayed else set()
            tx.mark_recorded([e.id for e in exchanges if e.id not in known], time.time())
            for exchange in exchanges:
                if exchange.id in known:
                    continue
                if not is_messages_call(exchange.request.method, exchange.request.path):
                    identity = self.identity(exchange.client, exchange.user)
                    client_id = identity.client.id if identity.client else None
                    batch.add_traffic(client_id, identity.user, failed_exchange(exchange), exchange.ended_at)
                    batch.accounted.append(Accounted(exchange, client_id))
                    continue
                session = self._session_for(tx, exchange, batch)
                self._apply(tx, session, exchange, batch)
            for session in batch.sessions.values():
                tx.save_session(session)
            batch.write_shares(tx)
            tx.add_events(batch.events)
            tx.add_messages(batch.messages)
        self.touched.update(batch.sessions)
        return batch.accounted

    def upkeep(self) -> None:
        """End idle-too-long sessions, trim event buffers, apply the retention, price history the table now knows."""
        now = time.time()
        with self.store.transaction() as tx:
            # Every upkeep: a share can turn unpriced again when a worker still on the old table
            # records into it during a reload.
            self.reprice(tx)
            self._expire(tx, now)
            tx.prune(sorted(self.touched), self.config.sessions.events_per_session,
                     now - self.config.store.retention_days * 86400)
        self.touched.clear()

    def _expire(self, tx: Transaction, now: float) -> None:
        end_after = self.config.sessions.end_after
        for session in tx.expire_sessions(now - end_after, end_after):
            tx.add_events([self._event(session, "session_end", session.ended or now,
                                       reason="timeout", stats=session_summary(session))])

    def start(self, client_id: str | None, user: str | None, key: str, source: str | None) -> tuple[Session, bool]:
        """Register a session for a client or user; return it and whether it is new."""
        identity = self.identity(client_id, user or ANONYMOUS)
        owner = identity.client.id if identity.client else None
        with self.store.transaction() as tx:
            self._expire(tx, time.time())
            found = tx.find_session(owner, identity.user, key)
            if found:
                return found, False
            return self._open(tx, identity, key, REGISTERED, time.time(), requested_source=source), True

    def end(self, key: str, reason: str) -> Session | None:
        """End a session now; return it as archived, or None if there is no such session."""
        now = time.time()
        with self.store.transaction() as tx:
            self._expire(tx, now)
            session = tx.get_session(key)
            if session is None:
                return None
            if session.status != ENDED:
                session.status, session.ended, session.end_reason = ENDED, now, reason
                tx.save_session(session)
                tx.add_events([self._event(session, "session_end", now, reason=reason,
                                           stats=session_summary(session))])
        return session

    def _session_for(self, tx: Transaction, exchange: Exchange, batch: Batch) -> Session:
        identity = self.identity(exchange.client, exchange.user)
        client_id = identity.client.id if identity.client else None
        key, source = session_key(exchange)
        known = (client_id, identity.user if client_id is None else None, key)
        if known in batch.by_key:
            return batch.sessions[batch.by_key[known]]
        if key is not None:
            session = tx.find_session(client_id, identity.user, key)
        else:
            session = (tx.find_session(client_id, identity.user, None, REGISTERED)
                       or tx.find_session(client_id, identity.user, None, IMPLICIT))
            source = IMPLICIT
        if session is not None and exchange.started_at - session.last_activity > self.config.sessions.end_after:
            # Past end_after it has ended, even if the upkeep has not marked it yet.
            session = None
        if session is None:
            # A key always comes with its source; without one, source is IMPLICIT here.
            session = self._open(tx, identity, key, source or IMPLICIT, exchange.started_at, events=batch.events)
        batch.by_key[known] = session.id
        batch.sessions.setdefault(session.id, session)
        return batch.sessions[session.id]

    def _open(self, tx: Transaction, identity: Identity, key: str | None, source: str, at: float,
              requested_source: str | None = None, events: list[Event] | None = None) -> Session:
        client = identity.client
        provider = client.provider if client else self.config.legacy.provider
        session = Session(id=new_session_id(), claude_session_id=key, source=source,
                          client=client.id if client else None, client_name=client.name if client else None,
                          provider=provider, user=identity.user, started=at, last_activity=at)
        tx.insert_session(session)
        start = self._event(session, "session_start", at, source=requested_source or source, claude_session_id=key)
        if events is None:
            tx.add_events([start])
        else:
            events.append(start)
        return session

    @staticmethod
    def _event(session: Session, kind: str, at: float, **data: Any) -> Event:
        return Event(type=kind, timestamp=at, session=session.id, client=session.client,
                     user=session.user, data=data)

    def _apply(self, tx: Transaction, s: Session, ex: Exchange, batch: Batch) -> None:
        """Add one exchange to its session and emit its events."""
        obs, request, facts, response = ex.observation, ex.request, ex.request.facts, ex.response
        done_at = ex.ended_at
        model = ex.model
        s.last_activity = max(s.last_activity, done_at)
        if s.user == ANONYMOUS and ex.user != ANONYMOUS:
            s.user = ex.user
            batch.new_users.add(s.id)
        failed = failed_exchange(ex)
        s.requests += 1
        s.failed += failed
        agent = request.headers.get("x-claude-code-agent-id")
        thread = SUBAGENT if agent else SIDE if facts.side else MAIN
        events = [self._event(s, "request", ex.started_at, method=request.method, path=request.path,
                              model=facts.model, stream=facts.stream, messages=facts.message_count,
                              tools=facts.tool_count, body_bytes=request.body_bytes, agent_id=agent, thread=thread)]
        for tool_use_id, is_error in facts.tool_results:
            pending = tx.take_tool_call(tool_use_id)
            if pending is None:
                continue
            _, tool_name, called_at = pending
            if is_error:
                s.tool_failed += 1
                batch.add_tool(s.id, tool_name, 0, 1)
                batch.add_tool_bucket(done_at, s.id, tool_name, 0, 1)
            events.append(self._event(s, "tool_result", ex.started_at, tool=tool_name, tool_use_id=tool_use_id,
                                      is_error=is_error, duration_ms=round((ex.started_at - called_at) * 1000, 1)))
        account = Accounted(ex, s.client)
        batch.accounted.append(account)
        cost_usd, unpriced, usage = 0.0, set(), Usage()
        parts = bill(ex)
        if obs.batch_results and not self._first_billing(tx, ex):
            parts = []
        counted = answering(parts)
        for i, part in enumerate(parts):
            cost = self.models.price(part)
            cost_usd += cost.usd
            usage = usage + part.usage
            s.cost_usd += cost.usd
            s.savings_usd += cost.savings_usd
            name = part.model or "unknown"
            if not cost.priced:
                unpriced.add(name)
            account.samplings.append((name, part.usage, cost.usd))
            # A response counts once, in the share of the model that answered it.
            batch.add_model(s.id, name, part.usage, cost, requests=int(i == counted))
            batch.add_bucket(done_at, s, name, cost.price_class, part.usage, cost, requests=int(i == counted),
                             failed=failed * int(i == counted))
        if not parts:
            # Nothing billed (a failure before any usage, results billed before): the request still counts.
            batch.add_bucket(done_at, s, model or None, STANDARD, requests=1, failed=int(failed))
        s.usage = s.usage + usage
        self._tell_unpriced(unpriced)
        ttfb_ms = response.ttfb_ms if response is not None else None
        if ttfb_ms is not None:
            s.ttfb_total_ms += ttfb_ms
            s.ttfb_count += 1
        events.append(self._event(
            s, "response", done_at, status=ex.status, model=model, stop_reason=obs.stop_reason,
            usage={"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
                   "cache_read": usage.cache_read, "cache_write_5m": usage.cache_write_5m,
                   "cache_write_1h": usage.cache_write_1h, "web_search_requests": usage.web_search_requests},
            cost_usd=round(cost_usd, 10), unpriced_models=sorted(unpriced) or None,
            ttfb_ms=round(ttfb_ms, 1) if ttfb_ms is not None else None,
            duration_ms=round(response.duration_ms if response is not None else 0.0, 1),
            request_id=response.request_id if response is not None else None, agent_id=agent,
            # Why the answer was only partly read (a bound reached, a broken stream), if it was.
            observation_error=obs.parse_error))
        capture = self.config.capture_content
        for text in obs.thinking:
            s.thinking_blocks += 1
            events.append(self._event(s, "thinking", done_at, chars=len(text),
                                      preview=text[:PREVIEW_CHARS] if capture else None))
        for tool in obs.tool_uses:
            if tool.server:
                continue
            s.tool_calls += 1
            batch.add_tool(s.id, tool.name, 1, 0)
            batch.add_tool_bucket(done_at, s.id, tool.name, 1, 0)
            tx.add_tool_call(tool.id, s.id, tool.name, done_at)
            events.append(self._event(s, "tool_call", done_at, tool=tool.name, tool_use_id=tool.id,
                                      input=bounded_input(tool.input) if capture else None,
                                      complete=tool.complete))
        for error in obs.errors:
            events.append(self._event(s, "error", done_at, status=ex.status, error_type=error.get("type"),
                                      message=str(error.get("message", ""))[:500]))
        if ex.error:
            events.append(self._event(s, "error", done_at, status=ex.status, error_type="proxy", message=ex.error))
        if response is not None and self._rate_limited(response):
            events.append(self._event(s, "rate_limit", done_at, status=ex.status, headers=response.rate_limits))
        # Only the main thread moves the gauge: a subagent or a side request has its own, smaller context.
        if thread == MAIN and obs.usage is not None and ex.status < 400:
            compact = self._move_context(s, ex)
            if compact:
                events.append(self._event(s, "context_compact", done_at, **compact))
        batch.events += events
        # Search holds the conversation: the user's own words, and the answers of the main thread
        # and its subagents; a subagent's prompt is the model's, and a side request is neither.
        if capture and thread != SIDE:
            if thread == MAIN and facts.prompt.strip():
                batch.messages.append(Message(s.id, s.client, s.user, "user", ex.started_at, facts.prompt))
            if obs.text.strip():
                batch.messages.append(Message(s.id, s.client, s.user, "assistant", done_at, clean_text(obs.text)))

    @staticmethod
    def _first_billing(tx: Transaction, ex: Exchange) -> bool:
        """Tell whether this download of a batch's results is the one to bill: the first complete one."""
        batch_id = ex.request.path.split("?", 1)[0].rstrip("/").split("/")[-2]
        complete = ex.response is not None and ex.response.complete
        return complete and ex.error is None and tx.first_billing_of_batch(batch_id, ex.started_at)

    def reprice(self, tx: Transaction) -> int:
        """Price the shares recorded while the table did not know their model; return how many."""
        priced = 0
        known = [model for model in tx.unpriced_models() if self.models.find(model)]
        for session_id, model, klass, usage in tx.unpriced_shares(known):
            cost = self.models.reprice(model, klass, usage)
            if cost is not None:
                tx.price_share(session_id, model, klass, cost.usd, cost.savings_usd)
                priced += 1
        buckets = []
        for bucket in tx.unpriced_usage(known):
            cost = self.models.reprice(bucket.model, bucket.price_class, bucket.usage)
            if cost is not None:
                buckets.append((bucket, cost.usd, cost.savings_usd))
        tx.price_usage(buckets)
        if priced:
            log.info("priced %d shares of history recorded before the model table knew their model", priced)
        return priced

    def _tell_unpriced(self, models: set[str]) -> None:
        """Log, once per model and process, that the table cannot price a model seen in traffic."""
        for model in sorted(models - self.told_unpriced):
            log.warning("no price for model %r: its cost counts as 0 until models.yaml has it "
                        "(aspy models lists what is missing)", model)
            self.told_unpriced.add(model)

    def _move_context(self, s: Session, ex: Exchange) -> dict[str, int] | None:
        """Set the context gauge from a main-thread response; return a detected compaction."""
        current = context_of(ex.observation.usage or {}, ex.request.facts.cache_ttl).context_tokens
        before = s.context_tokens
        s.context_tokens = current
        s.context_model = ex.model
        s.context_limit = self.models.context_limit(ex.model, ex.request.headers.get("anthropic-beta", ""))
        if before > COMPACTION_FLOOR and current < COMPACTION_DROP * before:
            s.compactions += 1
            return {"before_tokens": before, "after_tokens": current}
        return None

    @staticmethod
    def _rate_limited(response: Response) -> bool:
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


def session_summary(s: Session) -> dict[str, Any]:
    """Return the headline figures of a session, for its session_end event."""
    return {"requests": s.requests, "failed": s.failed, "input_tokens": s.usage.input_tokens,
            "output_tokens": s.usage.output_tokens, "cost_usd": round(s.cost_usd, 10),
            "tool_calls": s.tool_calls, "compactions": s.compactions}
