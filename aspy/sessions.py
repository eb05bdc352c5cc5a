"""The session ledger: find or open each exchange's session, and write what it adds, in one transaction.

A batch of exchange records is applied in one store transaction: each exchange finds (or
opens) its session by the key order of SPEC 5, for its identity (:mod:`aspy.identity`), and
:mod:`aspy.accounting` adds its tokens, cost, tools, context and events to it; requests that
are not Messages calls only count as their client's traffic. The ledger brings what only the
store knows (the tool calls that results answer, whether a batch's results were billed
already) and writes the sums once per batch. Its upkeep ends sessions with no traffic for
``end_after``, trims event buffers, applies the retention and prices history the table has
learned.
"""
from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from .accounting import Accounted, Tally, account, event, failed_exchange, session_summary
from .config import Config
from .identity import Identities, Identity
from .models import ModelTable
from .prompts import is_messages_call
from .records import ANONYMOUS, Exchange, Session
from .store import Store, Transaction

log = logging.getLogger(__name__)

# Sources of a session's key, in the order they are tried.
CLAUDE_CODE, HEADER, METADATA, REGISTERED, IMPLICIT = "claude_code", "header", "metadata", "registered", "implicit"
OLD_USER_ID = re.compile(r"user_[0-9a-f]+_account_[0-9a-f-]*_session_([0-9a-f-]{36})")


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


def new_session_id() -> str:
    """Return a fresh session id."""
    return "s_" + uuid.uuid4().hex[:20]


@dataclass
class Batch(Tally):
    """What one batch of exchanges writes: its tally, and each session it touches, once."""

    sessions: dict[str, Session] = field(default_factory=dict)
    by_key: dict[tuple, str] = field(default_factory=dict)
    # Sessions whose key hash was set by this batch (they were anonymous).
    new_users: set[str] = field(default_factory=set)


def write_tally(tx: Transaction, tally: Tally) -> None:
    """Write what a tally adds: model and tool shares, traffic, figures over time, events, text for search."""
    for (session_id, model, klass), share in tally.models.items():
        tx.add_model_usage(session_id, model, klass, share.usage, share.cost_usd, share.savings_usd,
                           share.priced, share.requests)
    for (session_id, tool), (calls, failed) in tally.tools.items():
        tx.add_tool_counts(session_id, tool, calls, failed)
    for (client, user), (requests, failures, last_seen) in tally.traffic.items():
        tx.add_traffic(client, user, int(requests), int(failures), last_seen)
    tx.add_usage(list(tally.buckets.values()))
    tx.add_tool_usage([(*key, calls, failed) for key, (calls, failed) in tally.tool_buckets.items()])
    tx.add_events(tally.events)
    tx.add_messages(tally.messages)


class Sessions:
    """Apply exchanges to sessions in the store, and keep the store up to date."""

    def __init__(self, config: Config, store: Store, models: ModelTable):
        self.config = config
        self.store = store
        self.models = models
        self.identities = Identities(config)
        # Sessions written since the last upkeep, whose event buffers may need trimming.
        self.touched: set[str] = set()
        self.told_unpriced: set[str] = set()

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
                    identity = self.identities.of(exchange.client, exchange.user)
                    batch.add_traffic(identity.client_id, identity.user, failed_exchange(exchange), exchange.ended_at)
                    batch.accounted.append(Accounted(exchange, identity.client_id))
                    continue
                self._apply(tx, self._session_for(tx, exchange, batch), exchange, batch)
            # A session that took a key hash in this batch has it in all its buckets.
            for bucket in batch.buckets.values():
                if bucket.session in batch.new_users:
                    bucket.user = batch.sessions[bucket.session].user
            # Only writes from here: they go to the store at once.
            with tx.sending_together():
                for session in batch.sessions.values():
                    tx.save_session(session)
                for session_id in sorted(batch.new_users):
                    tx.set_usage_user(session_id, batch.sessions[session_id].user)
                write_tally(tx, batch)
        self.touched.update(batch.sessions)
        return batch.accounted

    def upkeep(self) -> None:
        """End idle-too-long sessions, trim event buffers, apply the retention, price history the table now knows."""
        now = time.time()
        with self.store.transaction() as tx:
            # Every upkeep: a share can turn unpriced again when a worker still on the old table
            # records into it during a reload.
            self.reprice(tx)
            self.expire(tx, now)
            tx.prune(sorted(self.touched), self.config.sessions.events_per_session,
                     now - self.config.store.retention_days * 86400)
        self.touched.clear()

    def expire(self, tx: Transaction, now: float) -> None:
        """End the sessions with no traffic for end_after, each with its session_end event."""
        end_after = self.config.sessions.end_after
        for session in tx.expire_sessions(now - end_after, end_after):
            tx.add_events([event(session, "session_end", session.ended or now, reason="timeout",
                                 stats=session_summary(session))])

    def open(self, tx: Transaction, identity: Identity, key: str | None, source: str, at: float,
             requested_source: str | None = None, tally: Tally | None = None) -> Session:
        """Open a session for an identity; its session_start event goes to the tally, else to the store now."""
        client = identity.client
        session = Session(id=new_session_id(), claude_session_id=key, source=source,
                          client=client.id if client else None, client_name=client.name if client else None,
                          provider=client.provider if client else self.config.legacy.provider,
                          user=identity.user, started=at, last_activity=at)
        tx.insert_session(session)
        start = event(session, "session_start", at, source=requested_source or source, claude_session_id=key)
        if tally is None:
            tx.add_events([start])
        else:
            tally.events.append(start)
        return session

    def _session_for(self, tx: Transaction, exchange: Exchange, batch: Batch) -> Session:
        identity = self.identities.of(exchange.client, exchange.user)
        client_id = identity.client_id
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
            session = self.open(tx, identity, key, source or IMPLICIT, exchange.started_at, tally=batch)
        batch.by_key[known] = session.id
        batch.sessions.setdefault(session.id, session)
        return batch.sessions[session.id]

    def _apply(self, tx: Transaction, s: Session, ex: Exchange, batch: Batch) -> None:
        """Add one exchange to its session, with what the store knows of its tool results and batch results."""
        if s.user == ANONYMOUS and ex.user != ANONYMOUS:
            s.user = ex.user
            batch.new_users.add(s.id)
        results = []
        for tool_use_id, is_error in ex.request.facts.tool_results:
            pending = tx.take_tool_call(tool_use_id)
            if pending is not None:
                results.append((tool_use_id, pending[1], pending[2], is_error))
        billed = account(batch, s, ex, self.models, self.config.capture_content, results,
                         bill_results=bool(ex.observation.batch_results) and self._first_billing(tx, ex))
        for tool in ex.observation.tool_uses:
            if not tool.server:
                tx.add_tool_call(tool.id, s.id, tool.name, ex.ended_at)
        self._tell_unpriced(billed.unpriced)

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
