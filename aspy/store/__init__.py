"""Where sessions, events and conversation text live: the records, and the store interface.

Only the store modules know SQL. ``schema`` holds the tables of both dialects and ``sql`` the
store they share, put together from ``ledger`` (sessions and their figures), ``events``
(events, conversation text, what counted already) and ``rollup`` (figures over time, which
``pieces`` plans), reading columns by name through ``rows`` with the WHERE fragments of
``clauses``; ``sqlite`` and ``postgres`` give connections, locking and text search.

``open_store(url)`` picks the implementation from the ``[store] url``: ``sqlite:///PATH``
(embedded, the default) or ``postgresql://...``. Writes happen in a :meth:`Store.transaction`
whose methods the sessions module calls; every write of one batch of exchanges is one short
transaction, so all worker processes (and all hosts on one PostgreSQL database) see the same figures.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from ..records import (  # noqa: F401 (the records the store keeps, named from here too)
    ACTIVE,
    ENDED,
    EVENT_TYPES,
    IDLE,
    LIVE,
    Event,
    Message,
    ModelUsage,
    Session,
    Usage,
)

# Figures over time are kept per 15-minute bucket of UTC time: every time zone in use today is
# a whole number of quarter hours from UTC, so its days (and DST changes) fall on bucket starts.
BUCKET_SECONDS = 900


class StoreError(Exception):
    """The store could not do what was asked (unreachable, locked, read-only, corrupt)."""


@dataclass
class Hit:
    """One search result."""

    session: str
    client: str | None
    timestamp: float
    role: str
    snippet: str
    score: float


@dataclass(frozen=True)
class Horizon:
    """When an open session counts as idle, and as ended: statuses are read from time, never written by reads."""

    idle_before: float
    ended_before: float


@dataclass(frozen=True)
class Scope:
    """Which sessions a question is about; empty means all.

    ``user`` matches sessions whose key hashed to it, and also every session of the clients
    in ``user_clients`` (the clients that took that hash over). ``clients``, when not None,
    keeps only the sessions of those clients (the clients carrying a tag; none at all if empty).
    """

    client: str | None = None
    user: str | None = None
    user_clients: tuple[str, ...] = ()
    session: str | None = None
    clients: tuple[str, ...] | None = None


@dataclass(kw_only=True)
class Figures:
    """What the store sums over exchanges: requests, failures, tokens, cost and savings."""

    requests: int = 0
    failed: int = 0
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    savings_usd: float = 0.0

    def add(self, other: Figures) -> None:
        """Add another's figures to these."""
        self.requests += other.requests
        self.failed += other.failed
        self.usage = self.usage + other.usage
        self.cost_usd += other.cost_usd
        self.savings_usd += other.savings_usd


@dataclass
class UsageBucket(Figures):
    """Figures of one 15-minute bucket: a session's (or, without one, its client's traffic) for a model and price class.

    ``model`` is None for requests that no answer billed (probes, failures before any usage).
    """

    start: int
    session: str | None
    client: str | None
    user: str
    model: str | None
    price_class: str
    priced: bool = True


@dataclass
class UsageRow(Figures):
    """Summed figures of one group of a usage question; keys not grouped on are None.

    ``day`` counts days since 1970-01-01 in the zone asked for.
    """

    day: int | None = None
    client: str | None = None
    model: str | None = None
    session: str | None = None
    claude_session_id: str | None = None


@dataclass
class Totals(Figures):
    """Aggregate figures over a scope."""

    by_model: dict[str, ModelUsage] = field(default_factory=dict)
    tool_calls: int = 0
    tool_failed: int = 0
    by_tool: dict[str, int] = field(default_factory=dict)
    active: int = 0
    idle: int = 0
    ended: int = 0


@dataclass
class LegacyUser:
    """A key hash seen on traffic that no client claims yet, with its figures."""

    user: str
    sessions: int
    requests: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    first_seen: float
    last_seen: float


class Transaction(ABC):
    """The writes of one batch, applied together or not at all."""

    def sending_together(self) -> AbstractContextManager[Any]:
        """Send the writes made within to the database at once, reading nothing back until the end."""
        return nullcontext()

    @abstractmethod
    def find_session(self, client: str | None, user: str, claude_session_id: str | None,
                     source: str | None = None) -> Session | None:
        """Return the newest open session of an identity with this key (or of this source)."""

    @abstractmethod
    def get_session(self, key: str) -> Session | None:
        """Return a session by id or Claude session id, newest first."""

    @abstractmethod
    def insert_session(self, session: Session) -> None:
        """Add a new session."""

    @abstractmethod
    def save_session(self, session: Session) -> None:
        """Write back a session's status and statistics."""

    @abstractmethod
    def add_model_usage(self, session_id: str, model: str, price_class: str, usage: Usage, cost_usd: float,
                        savings_usd: float, priced: bool, responses: int = 1) -> None:
        """Add responses (one, unless told) to a session's per-model figures in one price class."""

    @abstractmethod
    def already_recorded(self, exchange_ids: list[str]) -> set[str]:
        """Return which of these exchanges the store has recorded already."""

    @abstractmethod
    def mark_recorded(self, exchange_ids: list[str], at: float) -> None:
        """Remember that these exchanges are recorded (for a few days: long enough for any journal)."""

    @abstractmethod
    def first_billing_of_batch(self, batch_id: str, at: float) -> bool:
        """Note that a Message Batch's results were billed; return False if they were before."""

    @abstractmethod
    def unpriced_models(self) -> list[str]:
        """Return the models of shares recorded without a price."""

    @abstractmethod
    def unpriced_shares(self, models: list[str]) -> list[tuple[str, str, str, Usage]]:
        """Return (session id, model, price class, tokens) of the shares of these models recorded without a price."""

    @abstractmethod
    def price_share(self, session_id: str, model: str, price_class: str, cost_usd: float, savings_usd: float) -> None:
        """Give an unpriced share its price, and add it to its session's cost."""

    @abstractmethod
    def add_tool_counts(self, session_id: str, tool: str, calls: int, failed: int) -> None:
        """Add calls (and failures) of one tool to a session."""

    @abstractmethod
    def add_usage(self, buckets: list[UsageBucket]) -> None:
        """Add figures to their buckets (figures over time)."""

    @abstractmethod
    def add_tool_usage(self, rows: list[tuple[int, str, str, int, int]]) -> None:
        """Add (bucket start, session id, tool, calls, failed) to the tool calls over time."""

    @abstractmethod
    def set_usage_user(self, session_id: str, user: str) -> None:
        """Give a session's figures over time the key hash the session now has."""

    @abstractmethod
    def unpriced_usage(self, models: list[str]) -> list[UsageBucket]:
        """Return the buckets of these models recorded without a price."""

    @abstractmethod
    def price_usage(self, priced: list[tuple[UsageBucket, float, float]]) -> None:
        """Give unpriced buckets their (cost, savings)."""

    @abstractmethod
    def add_events(self, events: list[Event]) -> None:
        """Add events, in order."""

    @abstractmethod
    def add_messages(self, messages: list[Message]) -> None:
        """Keep prompts and answers for search."""

    @abstractmethod
    def add_traffic(self, client: str | None, user: str, requests: int, failed: int, last_seen: float) -> None:
        """Count requests that belong to no session (probes, model lists, count_tokens)."""

    @abstractmethod
    def add_tool_call(self, tool_use_id: str, session_id: str, tool: str, called_at: float) -> None:
        """Remember a tool_use until its result arrives."""

    @abstractmethod
    def take_tool_call(self, tool_use_id: str) -> tuple[str, str, float] | None:
        """Return (session id, tool, called at) of a pending tool_use and forget it."""

    @abstractmethod
    def reattribute(self, user: str, client: str, client_name: str) -> int:
        """Give every legacy session of a key hash to a client; return how many moved."""

    @abstractmethod
    def mark_imported(self, file_hash: str, name: str, lines: int) -> bool:
        """Note an imported log file; return False if it was imported before."""

    @abstractmethod
    def expire_sessions(self, ended_before: float, end_after: float) -> list[Session]:
        """End every open session with no traffic since ``ended_before``; return them."""

    @abstractmethod
    def prune(self, session_ids: list[str], events_per_session: int, older_than: float) -> None:
        """Keep the last events of each session, and nothing older than the retention."""


class Store(ABC):
    """A place all worker processes share."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Transaction]:
        """Open a short write transaction."""

    @abstractmethod
    def get_session(self, key: str) -> Session | None:
        """Return a session by id or Claude session id, with its per-model and per-tool figures."""

    @abstractmethod
    def sessions(self, scope: Scope, status: str | None, horizon: Horizon, limit: int,
                 since: float | None = None, until: float | None = None) -> list[Session]:
        """Return sessions (active in a window, if given), newest activity first, with per-model, per-tool figures."""

    @abstractmethod
    def totals(self, scope: Scope, horizon: Horizon, since: float | None = None,
               until: float | None = None) -> Totals:
        """Sum the figures of every session in a scope; with a window, of its exchanges and the sessions active then."""

    @abstractmethod
    def usage(self, scope: Scope, since: float | None, until: float | None, by: tuple[str, ...],
              offsets: list[tuple[float, float, int]]) -> list[UsageRow]:
        """Sum the figures of the exchanges in a window, grouped by ``day``, ``client``, ``model``, ``session``.

        A bucket counts when it starts in [since, until). ``offsets`` gives the zone's UTC offset
        (seconds) over [start, end) pieces covering the window; days follow it.
        """

    @abstractmethod
    def usage_span(self, scope: Scope) -> tuple[int, int] | None:
        """Return the start of the first and the end of the last bucket with figures, or None."""

    @abstractmethod
    def usage_unpriced(self, scope: Scope, since: float | None, until: float | None) -> list[str]:
        """Return the models whose figures in a window were recorded without a price."""

    @abstractmethod
    def events(self, scope: Scope, types: list[str], since: float | None, limit: int,
               until: float | None = None) -> list[Event]:
        """Return events, newest first."""

    @abstractmethod
    def search(self, words: list[str], since: float | None, until: float | None, scope: Scope,
               role: str | None, limit: int) -> tuple[int, list[Hit]]:
        """Find prompts and answers holding every word; return (total matches, best hits)."""

    @abstractmethod
    def unpriced_models(self) -> list[str]:
        """Return the models seen in traffic that the table could not price."""

    @abstractmethod
    def client_activity(self, horizon: Horizon) -> dict[str, tuple[int, float | None]]:
        """Return, per client, (sessions not ended, last activity)."""

    @abstractmethod
    def legacy_users(self) -> list[LegacyUser]:
        """Return each key hash with sessions that belong to no client, with its figures."""

    @abstractmethod
    def check(self) -> dict[str, Any]:
        """Return the store's kind and schema version (creating it if need be); raise StoreError if unreachable."""

    @abstractmethod
    def inspect(self) -> dict[str, Any]:
        """Return the store's kind and schema version without changing anything; raise StoreError if unreachable.

        ``schema_version`` is None for a store not created yet; ``expected_version`` is this aspy's.
        """

    @abstractmethod
    def close(self) -> None:
        """Close connections."""


def open_store(url: str) -> Store:
    """Open the store a ``[store] url`` names, creating or migrating its schema."""
    if url.startswith("sqlite:///"):
        from .sqlite import SqliteStore

        return SqliteStore(url[len("sqlite:///"):])
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(url)
    raise StoreError(f"unsupported store URL scheme in {url.split('://')[0]!r}")
