"""The SQL that SQLite and PostgreSQL share: rows to records, writes, and aggregate reads.

Statements use ``?`` placeholders; a dialect that wants another style rewrites them in
:meth:`SqlStore.sql`. What differs (connections, locking, schema, text search) lives in
the ``sqlite`` and ``postgres`` modules.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..records import Usage
from . import (
    ACTIVE,
    BUCKET_SECONDS,
    ENDED,
    IDLE,
    LIVE,
    Event,
    Horizon,
    LegacyUser,
    ModelUsage,
    Scope,
    Session,
    Store,
    Totals,
    Transaction,
    UsageBucket,
    UsageRow,
)

SESSION_COLUMNS = (
    "id", "claude_session_id", "source", "client_id", "client_name", "provider", "user_hash",
    "started", "last_activity", "status", "ended", "end_reason", "requests", "failed",
    "input_tokens", "output_tokens", "cache_read", "cache_write_5m", "cache_write_1h", "web_searches",
    "cost_usd", "savings_usd", "tool_calls", "tool_failed", "thinking_blocks", "ttfb_total_ms",
    "ttfb_count", "context_model", "context_tokens", "context_limit", "compactions",
)
USAGE_COLUMNS = ("input_tokens", "output_tokens", "cache_read", "cache_write_5m", "cache_write_1h", "web_searches")
SESSION_SELECT = "SELECT " + ", ".join(SESSION_COLUMNS) + " FROM sessions"
OPEN = f"status <> '{ENDED}'"
RECORDED_DAYS = 2
DAY = 86400
# The rollup's summary adds up each client's buckets in blocks of six hours: a day in any zone is
# its whole blocks, read there, and the one block around its midnight, read bucket by bucket.
BLOCK_SECONDS = 6 * 3600
ROLLUP_KEYS = ("bucket", "session_id", "client_id", "user_hash", "model", "price_class")
BLOCK_KEYS = ("block", "client_id", "model", "price_class")
ROLLUP_FIGURES = ("requests", "failed", *USAGE_COLUMNS, "cost_usd", "savings_usd")
# Windows longer than this read the buckets around each midnight through the time-of-day index.
BAND_BY_TIME_OF_DAY = 30 * DAY


def session_row(s: Session) -> tuple:
    """Return a session as a row in SESSION_COLUMNS order."""
    return (s.id, s.claude_session_id, s.source, s.client, s.client_name, s.provider, s.user,
            s.started, s.last_activity, s.status, s.ended, s.end_reason, s.requests, s.failed,
            *s.usage.astuple(), s.cost_usd, s.savings_usd, s.tool_calls, s.tool_failed,
            s.thinking_blocks, s.ttfb_total_ms, s.ttfb_count, s.context_model, s.context_tokens,
            s.context_limit, s.compactions)


def row_session(row: tuple) -> Session:
    """Return the session a row in SESSION_COLUMNS order holds."""
    (sid, claude, source, client, name, provider, user, started, last, status, ended, reason,
     requests, failed, i, o, cr, w5, w1, ws, cost, savings, tools, tools_failed, thinking,
     ttfb_total, ttfb_count, ctx_model, ctx_tokens, ctx_limit, compactions) = row
    return Session(
        id=sid, claude_session_id=claude, source=source, client=client, client_name=name,
        provider=provider, user=user, started=started, last_activity=last, status=status,
        ended=ended, end_reason=reason, requests=requests, failed=failed,
        usage=Usage(i, o, cr, w5, w1, ws), cost_usd=cost, savings_usd=savings, tool_calls=tools,
        tool_failed=tools_failed, thinking_blocks=thinking, ttfb_total_ms=ttfb_total,
        ttfb_count=ttfb_count, context_model=ctx_model, context_tokens=ctx_tokens,
        context_limit=ctx_limit, compactions=compactions,
    )


def scope_clause(scope: Scope, session_table: str = "") -> tuple[str, list[Any]]:
    """Return a WHERE fragment (and its parameters) selecting a scope's sessions."""
    prefix = f"{session_table}." if session_table else ""
    parts, params = [], []
    if scope.client is not None:
        parts.append(f"{prefix}client_id = ?")
        params.append(scope.client)
    if scope.user is not None:
        if scope.user_clients:
            marks = ", ".join("?" for _ in scope.user_clients)
            parts.append(f"({prefix}user_hash = ? OR {prefix}client_id IN ({marks}))")
            params += [scope.user, *scope.user_clients]
        else:
            parts.append(f"{prefix}user_hash = ?")
            params.append(scope.user)
    if scope.session is not None:
        parts.append(f"({prefix}id = ? OR {prefix}claude_session_id = ?)")
        params += [scope.session, scope.session]
    if scope.clients is not None:
        parts.append(_clients_in(f"{prefix}client_id", scope.clients))
        params += scope.clients
    return (" AND ".join(parts) or "1 = 1"), params


def _clients_in(column: str, clients: tuple[str, ...]) -> str:
    """Return a condition keeping rows of these clients (none, for an empty tuple)."""
    return f"{column} IN ({', '.join('?' for _ in clients)})" if clients else "1 = 0"


def usage_scope(scope: Scope, fine: bool) -> tuple[str, list[Any]]:
    """Return a WHERE fragment selecting a scope's rows of the rollup (``fine``) or of its 6-hour summary."""
    parts, params = [], []
    if scope.client is not None:
        parts.append("client_id = ?")
        params.append(scope.client)
    if scope.clients is not None:
        parts.append(_clients_in("client_id", scope.clients))
        params += scope.clients
    if fine and scope.user is not None:
        parts.append(f"(user_hash = ? OR {_clients_in('client_id', scope.user_clients)})")
        params += [scope.user, *scope.user_clients]
    if fine and scope.session is not None:
        parts.append("session_id IN (SELECT id FROM sessions WHERE id = ? OR claude_session_id = ?)")
        params += [scope.session, scope.session]
    return (" AND ".join(parts) or "1 = 1"), params


def needs_buckets(scope: Scope, by: tuple[str, ...]) -> bool:
    """Tell whether a usage question needs the buckets themselves: the summary has no session nor key hash."""
    return "session" in by or scope.user is not None or scope.session is not None


def bucket_window(since: float | None, until: float | None) -> tuple[int | None, int | None]:
    """Return a window as bucket starts: a bucket counts when it starts in [since, until)."""
    return (None if since is None else bucket_start(since)), (None if until is None else bucket_start(until))


def bucket_start(t: float) -> int:
    """Return the start of the first bucket at or after an instant."""
    return math.ceil(t / BUCKET_SECONDS) * BUCKET_SECONDS


def sums(sign: str = "") -> str:
    """Return the SUMs of the rollup's figures, with counts as whole numbers.

    PostgreSQL's SUM of a BIGINT is a NUMERIC, which the driver reads one Python Decimal at a time.
    """
    return ", ".join(f"SUM({sign}{c}) AS {c}" if c in ("cost_usd", "savings_usd") else
                     f"CAST(SUM({sign}{c}) AS BIGINT) AS {c}" for c in ROLLUP_FIGURES)


@dataclass(frozen=True)
class Piece:
    """Part of a usage question read from one table: a time range, and how its rows find their day.

    A row's day is its start plus ``shift`` (the zone's offset), divided by a day. ``times``
    keeps only rows starting at a UTC time of day in [from, to). ``midnight`` names the block
    that holds local midnight and the shift that puts it whole in the day of its larger side;
    ``moved`` is the shift of that day for buckets counted there, to be taken back out of it.
    """

    fine: bool
    start: int
    end: int
    shift: int = 0
    times: tuple[int, int] | None = None
    midnight: tuple[int, int] | None = None
    moved: int | None = None


def plan(since: int, until: int, by_day: bool, offsets: list[tuple[float, float, int]], fine_only: bool) -> list[Piece]:
    """Split a usage question into pieces whose rows each fall whole in one day of the zone."""
    segments = [(since, until, 0)]
    if by_day and offsets:
        # A bucket takes the offset in force at its start. The offsets cover the window; whatever
        # lies beyond them (written meanwhile) takes the nearest one.
        starts = [since] + [bucket_start(start) for start, _, _ in offsets[1:]]
        ends = starts[1:] + [until]
        segments = [(max(a, since), min(b, until), offset) for a, b, (_, _, offset) in zip(starts, ends, offsets)]
    pieces = []
    for start, end, offset in segments:
        if start >= end:
            continue
        first = -(-start // BLOCK_SECONDS) * BLOCK_SECONDS
        last = end // BLOCK_SECONDS * BLOCK_SECONDS
        if fine_only or first >= last:
            pieces.append(Piece(True, start, end, offset))
            continue
        pieces += ([Piece(True, start, first, offset)] * (start < first)
                   + [Piece(True, last, end, offset)] * (last < end))
        # Local midnight, as a UTC time of day, and how far into its block it falls.
        midnight = -offset % DAY
        into = midnight % BLOCK_SECONDS
        if not by_day or not into:
            pieces.append(Piece(False, first, last, offset))
            continue
        # That block spans two days: it counts whole in the day of its larger side, and the
        # buckets of its smaller side move from that day to their own.
        block = midnight - into
        after = into <= BLOCK_SECONDS - into
        larger = offset + BLOCK_SECONDS if after else offset
        smaller = (block, midnight) if after else (midnight, block + BLOCK_SECONDS)
        pieces += [Piece(False, first, last, offset, midnight=(block, larger)),
                   Piece(True, first, last, offset, times=smaller,
                         moved=offset + BLOCK_SECONDS if after else offset - BLOCK_SECONDS)]
    return pieces


def message_filters(since: float | None, until: float | None, scope: Scope, role: str | None) -> tuple[str, list[Any]]:
    """Return the AND-ed conditions (and parameters) that narrow a search of messages ``m``."""
    where = ""
    params: list[Any] = []
    if since is not None:
        where += " AND m.timestamp >= ?"
        params.append(since)
    if until is not None:
        where += " AND m.timestamp < ?"
        params.append(until)
    if role:
        where += " AND m.role = ?"
        params.append(role)
    scoped, scope_params = scope_clause(scope)
    if scoped != "1 = 1":
        where += f" AND m.session_id IN (SELECT id FROM sessions WHERE {scoped})"
        params += scope_params
    return where, params


def status_clause(status: str | None, horizon: Horizon) -> tuple[str, list[Any]]:
    """Return a WHERE fragment for a status derived from time (the writer marks ended sessions later)."""
    if status == ENDED:
        return f"(status = '{ENDED}' OR last_activity < ?)", [horizon.ended_before]
    if status == IDLE:
        return f"{OPEN} AND last_activity < ? AND last_activity >= ?", [horizon.idle_before, horizon.ended_before]
    if status == ACTIVE:
        return f"{OPEN} AND last_activity >= ? AND last_activity >= ?", [horizon.idle_before, horizon.ended_before]
    if status == LIVE:
        return f"{OPEN} AND last_activity >= ?", [horizon.ended_before]
    return "1 = 1", []


def active_clause(since: float | None, until: float | None) -> tuple[str, list[Any]]:
    """Return a WHERE fragment for sessions active in a window: some of their activity falls in it."""
    parts, params = [], []
    if until is not None:
        parts.append("started < ?")
        params.append(until)
    if since is not None:
        parts.append("last_activity >= ?")
        params.append(since)
    return (" AND ".join(parts) or "1 = 1"), params


class SqlTransaction(Transaction):
    """Writes through one open cursor; the store commits or rolls back around it."""

    def __init__(self, store: SqlStore, cursor: Any):
        self.store = store
        self.cur = cursor

    def execute(self, statement: str, params: Iterable[Any] = ()) -> Any:
        """Run one statement in this transaction."""
        self.cur.execute(self.store.sql(statement), tuple(params))
        return self.cur

    def find_session(self, client, user, claude_session_id, source=None):
        where = ["client_id = ?" if client is not None else "client_id IS NULL AND user_hash = ?", OPEN]
        params: list[Any] = [client if client is not None else user]
        if claude_session_id is not None:
            where.append("claude_session_id = ?")
            params.append(claude_session_id)
        else:
            where.append("source = ?")
            params.append(source)
        row = self.execute(f"{SESSION_SELECT} WHERE {' AND '.join(where)} "
                           "ORDER BY last_activity DESC LIMIT 1", params).fetchone()
        return row_session(row) if row else None

    def get_session(self, key):
        row = self.execute(f"{SESSION_SELECT} WHERE id = ? OR claude_session_id = ? "
                           "ORDER BY last_activity DESC LIMIT 1", (key, key)).fetchone()
        return row_session(row) if row else None

    def insert_session(self, session):
        marks = ", ".join("?" for _ in SESSION_COLUMNS)
        self.execute(f"INSERT INTO sessions ({', '.join(SESSION_COLUMNS)}) VALUES ({marks})",
                     session_row(session))

    def save_session(self, session):
        sets = ", ".join(f"{c} = ?" for c in SESSION_COLUMNS[1:])
        self.execute(f"UPDATE sessions SET {sets} WHERE id = ?", (*session_row(session)[1:], session.id))

    def add_model_usage(self, session_id, model, price_class, usage, cost_usd, savings_usd, priced, responses=1):
        adds = ", ".join(f"{c} = session_models.{c} + excluded.{c}"
                         for c in ("requests", *USAGE_COLUMNS, "cost_usd", "savings_usd"))
        self.execute(
            f"INSERT INTO session_models (session_id, model, price_class, requests, {', '.join(USAGE_COLUMNS)}, "
            "cost_usd, savings_usd, priced) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            # A share stays unpriced while any of it is: the repricing then prices it whole.
            f"ON CONFLICT (session_id, model, price_class) DO UPDATE SET {adds}, priced = CASE "
            "WHEN excluded.priced < session_models.priced THEN excluded.priced ELSE session_models.priced END",
            (session_id, model, price_class, responses, *usage.astuple(), cost_usd, savings_usd,
             1 if priced else 0))

    def already_recorded(self, exchange_ids):
        if not exchange_ids:
            return set()
        marks = ", ".join("?" for _ in exchange_ids)
        return {row[0] for row in self.execute(f"SELECT exchange_id FROM recorded WHERE exchange_id IN ({marks})",
                                               exchange_ids).fetchall()}

    def mark_recorded(self, exchange_ids, at):
        if exchange_ids:
            self.cur.executemany(self.store.sql("INSERT INTO recorded (exchange_id, recorded_at) VALUES (?, ?) "
                                                "ON CONFLICT (exchange_id) DO NOTHING"),
                                 [(eid, at) for eid in exchange_ids])

    def first_billing_of_batch(self, batch_id, at):
        row = self.execute("INSERT INTO batches (batch_id, billed_at) VALUES (?, ?) "
                           "ON CONFLICT (batch_id) DO NOTHING RETURNING batch_id", (batch_id, at)).fetchone()
        return row is not None

    def unpriced_models(self):
        return [row[0] for row in self.execute("SELECT model FROM session_models WHERE priced = 0 UNION "
                                               "SELECT model FROM usage_rollup WHERE priced = 0").fetchall()]

    def unpriced_shares(self, models):
        if not models:
            return []
        marks = ", ".join("?" for _ in models)
        rows = self.execute(f"SELECT session_id, model, price_class, {', '.join(USAGE_COLUMNS)} FROM session_models "
                            f"WHERE priced = 0 AND model IN ({marks})", models).fetchall()
        return [(sid, model, klass, Usage(*counts)) for sid, model, klass, *counts in rows]

    def price_share(self, session_id, model, price_class, cost_usd, savings_usd):
        key = (session_id, model, price_class)
        # Part of a share may have been priced when it was recorded: the session gains only the rest.
        old_cost, old_savings = self.execute("SELECT cost_usd, savings_usd FROM session_models "
                                             "WHERE session_id = ? AND model = ? AND price_class = ?", key).fetchone()
        self.execute("UPDATE session_models SET cost_usd = ?, savings_usd = ?, priced = 1 "
                     "WHERE session_id = ? AND model = ? AND price_class = ?", (cost_usd, savings_usd, *key))
        self.execute("UPDATE sessions SET cost_usd = cost_usd + ?, savings_usd = savings_usd + ? WHERE id = ?",
                     (cost_usd - old_cost, savings_usd - old_savings, session_id))

    def add_tool_counts(self, session_id, tool, calls, failed):
        self.execute(
            "INSERT INTO session_tools (session_id, tool, calls, failed) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (session_id, tool) DO UPDATE SET calls = session_tools.calls + excluded.calls, "
            "failed = session_tools.failed + excluded.failed", (session_id, tool, calls, failed))

    def add_usage(self, buckets):
        if not buckets:
            return
        self._add_rows("usage_rollup", ROLLUP_KEYS, [
            (b.start, b.session or "", b.client or "", b.user, b.model or "", b.price_class, b.requests, b.failed,
             *b.usage.astuple(), b.cost_usd, b.savings_usd, int(b.priced)) for b in buckets])
        blocks: dict[tuple, list] = {}
        for b in buckets:
            key = (b.start - b.start % BLOCK_SECONDS, b.client or "", b.model or "", b.price_class)
            sums = blocks.setdefault(key, [0] * len(ROLLUP_FIGURES) + [1])
            for i, value in enumerate((b.requests, b.failed, *b.usage.astuple(), b.cost_usd, b.savings_usd)):
                sums[i] += value
            sums[-1] = min(sums[-1], int(b.priced))
        self._add_rows("usage_rollup_6h", BLOCK_KEYS, [(*key, *sums) for key, sums in blocks.items()])

    def _add_rows(self, table: str, keys: tuple[str, ...], rows: list[tuple]) -> None:
        """Add figures to rows of the rollup or its summary, creating them as needed."""
        columns = (*keys, *ROLLUP_FIGURES, "priced")
        adds = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in ROLLUP_FIGURES)
        self.cur.executemany(self.store.sql(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) "
            # A row stays unpriced while any of it is: the repricing then prices it whole.
            f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {adds}, priced = CASE "
            f"WHEN excluded.priced < {table}.priced THEN excluded.priced ELSE {table}.priced END"), rows)

    def add_tool_usage(self, rows):
        if rows:
            self.cur.executemany(self.store.sql(
                "INSERT INTO usage_tools (bucket, session_id, tool, calls, failed) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (bucket, session_id, tool) DO UPDATE SET calls = usage_tools.calls + excluded.calls, "
                "failed = usage_tools.failed + excluded.failed"), rows)

    def set_usage_user(self, session_id, user):
        # The summary has no key hash: only the buckets change.
        self.execute("UPDATE usage_rollup SET user_hash = ? WHERE session_id = ? AND user_hash <> ?",
                     (user, session_id, user))

    def unpriced_usage(self, models):
        if not models:
            return []
        rows = self.execute(f"SELECT {', '.join(ROLLUP_KEYS)}, {', '.join(USAGE_COLUMNS)} FROM usage_rollup "
                            f"WHERE priced = 0 AND model IN ({', '.join('?' for _ in models)})", models).fetchall()
        return [UsageBucket(start, session or None, client or None, user, model, klass, usage=Usage(*counts),
                            priced=False) for start, session, client, user, model, klass, *counts in rows]

    def price_usage(self, priced):
        if not priced:
            return
        self.cur.executemany(self.store.sql(
            "UPDATE usage_rollup SET cost_usd = ?, savings_usd = ?, priced = 1 WHERE "
            + " AND ".join(f"{k} = ?" for k in ROLLUP_KEYS)),
            [(cost, savings, b.start, b.session or "", b.client or "", b.user, b.model, b.price_class)
             for b, cost, savings in priced])
        self._rebuild_blocks({(b.start - b.start % BLOCK_SECONDS, b.client or "", b.model, b.price_class)
                              for b, _, _ in priced})

    def _rebuild_blocks(self, keys: set[tuple[int, str, str, str]]) -> None:
        """Add up these rows of the 6-hour summary again from the buckets they hold."""
        if not keys:
            return
        match = " AND ".join(f"{k} = ?" for k in BLOCK_KEYS)
        self.cur.executemany(self.store.sql(f"DELETE FROM usage_rollup_6h WHERE {match}"), list(keys))
        sums = ", ".join(f"SUM({c})" for c in ROLLUP_FIGURES)
        self.cur.executemany(self.store.sql(
            f"INSERT INTO usage_rollup_6h ({', '.join(BLOCK_KEYS)}, {', '.join(ROLLUP_FIGURES)}, priced) "
            f"SELECT ?, client_id, model, price_class, {sums}, MIN(priced) FROM usage_rollup "
            "WHERE bucket >= ? AND bucket < ? AND client_id = ? AND model = ? AND price_class = ? "
            "GROUP BY client_id, model, price_class"),
            [(block, block, block + BLOCK_SECONDS, client, model, klass) for block, client, model, klass in keys])

    def add_events(self, events):
        if events:
            self.cur.executemany(
                self.store.sql("INSERT INTO events (session_id, client_id, user_hash, type, timestamp, data) "
                               "VALUES (?, ?, ?, ?, ?, ?)"),
                [(e.session, e.client, e.user, e.type, e.timestamp, json.dumps(e.data, separators=(",", ":")))
                 for e in events])

    def add_messages(self, messages):
        if messages:
            self.cur.executemany(
                self.store.sql("INSERT INTO messages (session_id, client_id, user_hash, role, timestamp, text) "
                               "VALUES (?, ?, ?, ?, ?, ?)"),
                [(m.session, m.client, m.user, m.role, m.timestamp, m.text) for m in messages])

    def add_traffic(self, client, user, requests, failed, last_seen):
        # A legacy user's traffic has client "" here: NULL would never match the primary key.
        self.execute("INSERT INTO traffic (client_id, user_hash, requests, failed, last_seen) VALUES (?, ?, ?, ?, ?) "
                     "ON CONFLICT (client_id, user_hash) DO UPDATE SET "
                     "requests = traffic.requests + excluded.requests, "
                     "failed = traffic.failed + excluded.failed, "
                     "last_seen = CASE WHEN excluded.last_seen > traffic.last_seen "
                     "THEN excluded.last_seen ELSE traffic.last_seen END",
                     (client or "", user, requests, failed, last_seen))

    def add_tool_call(self, tool_use_id, session_id, tool, called_at):
        self.execute("INSERT INTO tool_calls (tool_use_id, session_id, tool, called_at) VALUES (?, ?, ?, ?) "
                     "ON CONFLICT (tool_use_id) DO NOTHING", (tool_use_id, session_id, tool, called_at))

    def take_tool_call(self, tool_use_id):
        row = self.execute("DELETE FROM tool_calls WHERE tool_use_id = ? RETURNING session_id, tool, called_at",
                           (tool_use_id,)).fetchone()
        return tuple(row) if row else None

    def reattribute(self, user, client, client_name):
        moved = self.execute("UPDATE sessions SET client_id = ?, client_name = ? "
                             "WHERE client_id IS NULL AND user_hash = ? RETURNING id",
                             (client, client_name, user)).fetchall()
        ids = [row[0] for row in moved]
        for table in ("events", "messages"):
            self.execute(f"UPDATE {table} SET client_id = ? WHERE client_id IS NULL AND user_hash = ?",
                         (client, user))
        # Their figures over time move too; traffic outside sessions stays the key's, as in `traffic`.
        legacy = "client_id = '' AND user_hash = ? AND session_id <> ''"
        touched = self.execute(f"SELECT DISTINCT bucket - bucket % {BLOCK_SECONDS}, model, price_class "
                               f"FROM usage_rollup WHERE {legacy}", (user,)).fetchall()
        self.execute(f"UPDATE usage_rollup SET client_id = ? WHERE {legacy}", (client, user))
        self._rebuild_blocks({(block, owner, model, klass) for block, model, klass in touched
                              for owner in ("", client)})
        return len(ids)

    def mark_imported(self, file_hash, name, lines):
        row = self.execute("INSERT INTO imports (file_hash, name, lines, imported_at) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT (file_hash) DO NOTHING RETURNING file_hash",
                           (file_hash, name, lines, time.time())).fetchone()
        return row is not None

    def expire_sessions(self, ended_before, end_after):
        rows = self.execute(
            f"UPDATE sessions SET status = '{ENDED}', ended = last_activity + ?, end_reason = 'timeout' "
            f"WHERE {OPEN} AND last_activity < ? RETURNING " + ", ".join(SESSION_COLUMNS),
            (end_after, ended_before)).fetchall()
        return [row_session(r) for r in rows]

    def prune(self, session_ids, events_per_session, older_than):
        for sid in session_ids:
            self.execute("DELETE FROM events WHERE session_id = ? AND id <= (SELECT id FROM events "
                         "WHERE session_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                         (sid, sid, events_per_session))
        self.execute("DELETE FROM events WHERE timestamp < ?", (older_than,))
        self.execute("DELETE FROM messages WHERE timestamp < ?", (older_than,))
        self.execute("DELETE FROM tool_calls WHERE called_at < ?", (older_than,))
        # Journals are given back within minutes of a restart; two days is a wide margin.
        self.execute("DELETE FROM recorded WHERE recorded_at < ?", (time.time() - RECORDED_DAYS * 86400,))


class SqlStore(Store):
    """Reads shared by the SQL stores; subclasses give connections and dialect."""

    def sql(self, statement: str) -> str:
        """Return a statement in this dialect's placeholder style."""
        return statement

    def query(self, statement: str, params: Iterable[Any] = ()) -> list[tuple]:
        """Run one read and return all its rows."""
        raise NotImplementedError

    def _with_details(self, sessions: list[Session]) -> list[Session]:
        """Attach per-model and per-tool figures to sessions."""
        if not sessions:
            return sessions
        by_id = {s.id: s for s in sessions}
        marks = ", ".join("?" for _ in by_id)
        sums = ", ".join(f"SUM({c})" for c in ("requests", *USAGE_COLUMNS, "cost_usd", "savings_usd"))
        for row in self.query(f"SELECT session_id, model, {sums}, MIN(priced) FROM session_models "
                              f"WHERE session_id IN ({marks}) GROUP BY session_id, model", by_id):
            sid, model, requests, *counts, cost, savings, priced = row
            by_id[sid].by_model[model] = ModelUsage(requests, Usage(*counts), cost, savings, bool(priced))
        for sid, tool, calls, failed in self.query(
                f"SELECT session_id, tool, calls, failed FROM session_tools WHERE session_id IN ({marks})", by_id):
            by_id[sid].by_tool[tool] = [calls, failed]
        return sessions

    def get_session(self, key):
        rows = self.query(f"{SESSION_SELECT} WHERE id = ? OR claude_session_id = ? "
                          "ORDER BY last_activity DESC LIMIT 1", (key, key))
        return self._with_details([row_session(rows[0])])[0] if rows else None

    def sessions(self, scope, status, horizon, limit, since=None, until=None):
        where, params = scope_clause(scope)
        status_sql, status_params = status_clause(status, horizon)
        active_sql, active_params = active_clause(since, until)
        rows = self.query(f"{SESSION_SELECT} WHERE {where} AND {status_sql} AND {active_sql} "
                          "ORDER BY last_activity DESC LIMIT ?", [*params, *status_params, *active_params, limit])
        return self._with_details([row_session(r) for r in rows])

    def totals(self, scope, horizon, since=None, until=None):
        if since is not None or until is not None:
            return self._window_totals(scope, horizon, since, until)
        where, params = scope_clause(scope)
        sums = ", ".join(f"COALESCE(SUM({c}), 0)" for c in
                         ("requests", "failed", *USAGE_COLUMNS, "cost_usd", "savings_usd", "tool_calls", "tool_failed"))
        clauses = [status_clause(status, horizon) for status in (ACTIVE, IDLE, ENDED)]
        counts = ", ".join(f"COALESCE(SUM(CASE WHEN {clause} THEN 1 ELSE 0 END), 0)" for clause, _ in clauses)
        row = self.query(f"SELECT {sums}, {counts} FROM sessions WHERE {where}",
                         [*(p for _, ps in clauses for p in ps), *params])[0]
        requests, failed, *rest = row
        usage, (cost, savings, tools, tools_failed, active, idle, ended) = Usage(*rest[:6]), rest[6:]
        totals = Totals(requests=requests, failed=failed, usage=usage, cost_usd=cost, savings_usd=savings,
                        tool_calls=tools, tool_failed=tools_failed, active=active, idle=idle, ended=ended)
        if scope.session is None:
            # Requests outside any session still count as their client's traffic.
            sent, sent_failed = self.query(f"SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(failed), 0) "
                                           f"FROM traffic WHERE {where}", params)[0]
            totals.requests += sent
            totals.failed += sent_failed
        joined, joined_params = scope_clause(scope, "s")
        for model, requests, *counts, cost, savings, priced in self.query(
                f"SELECT m.model, SUM(m.requests), {', '.join(f'SUM(m.{c})' for c in USAGE_COLUMNS)}, "
                "SUM(m.cost_usd), SUM(m.savings_usd), MIN(m.priced) FROM session_models m "
                f"JOIN sessions s ON s.id = m.session_id WHERE {joined} GROUP BY m.model", joined_params):
            totals.by_model[model] = ModelUsage(requests, Usage(*counts), cost, savings, bool(priced))
        for tool, calls in self.query(
                "SELECT t.tool, SUM(t.calls) FROM session_tools t JOIN sessions s ON s.id = t.session_id "
                f"WHERE {joined} GROUP BY t.tool", joined_params):
            totals.by_tool[tool] = calls
        return totals

    def _window_totals(self, scope: Scope, horizon: Horizon, since: float | None, until: float | None) -> Totals:
        """Sum the figures of the exchanges in a window (by bucket), and count the sessions active in it."""
        totals = Totals()
        unpriced = set(self.usage_unpriced(scope, since, until))
        for row in self.usage(scope, since, until, ("model",), []):
            totals.requests += row.requests
            totals.failed += row.failed
            totals.usage = totals.usage + row.usage
            totals.cost_usd += row.cost_usd
            totals.savings_usd += row.savings_usd
            if row.model is not None:
                totals.by_model[row.model] = ModelUsage(row.requests, row.usage, row.cost_usd, row.savings_usd,
                                                        row.model not in unpriced)
        first, last = bucket_window(since, until)
        joined, joined_params = scope_clause(scope, "s")
        for tool, calls, failed in self.query(
                "SELECT t.tool, SUM(t.calls), SUM(t.failed) FROM usage_tools t JOIN sessions s ON s.id = t.session_id "
                f"WHERE t.bucket >= ? AND t.bucket < ? AND {joined} GROUP BY t.tool",
                [first if first is not None else 0, last if last is not None else 2 ** 62, *joined_params]):
            totals.tool_calls += calls
            totals.tool_failed += failed
            if calls:
                totals.by_tool[tool] = calls
        where, params = scope_clause(scope)
        active_sql, active_params = active_clause(since, until)
        clauses = [status_clause(status, horizon) for status in (ACTIVE, IDLE, ENDED)]
        counts = ", ".join(f"COALESCE(SUM(CASE WHEN {clause} THEN 1 ELSE 0 END), 0)" for clause, _ in clauses)
        totals.active, totals.idle, totals.ended = self.query(
            f"SELECT {counts} FROM sessions WHERE {where} AND {active_sql}",
            [*(p for _, ps in clauses for p in ps), *params, *active_params])[0]
        return totals

    def usage(self, scope, since, until, by, offsets):
        fine = needs_buckets(scope, by)
        since, until = bucket_window(since, until)
        if since is None or until is None:
            span = self.usage_span(scope)
            if span is None:
                return []
            since, until = since if since is not None else span[0], until if until is not None else span[1]
        pieces = plan(since, until, "day" in by, offsets, fine)
        if not pieces:
            return []
        names = [name for key, name in (("day", "day"), ("client", "client_id"), ("model", "model"),
                                        ("session", "session_id")) if key in by]
        selects, params = [], []
        for piece in pieces:
            sql, piece_params = self._piece(piece, names, scope)
            selects.append(sql)
            params += piece_params
        # The pieces' rows are added up here: a dict does it quicker than a second GROUP BY over them.
        width = len(names) + ("session" in by)
        merged: dict[tuple, list] = {}
        for row in self.query(" UNION ALL ".join(selects), params):
            key, figures = row[:width], row[width:]
            if figures[0] is None:
                continue  # a piece with no rows
            found = merged.get(key)
            merged[key] = list(figures) if found is None else [a + b for a, b in zip(found, figures)]
        # Where each key is in a row (None: not asked for).
        at = [names.index(n) if n in names else None for n in ("day", "client_id", "model", "session_id")]
        at.append(len(names) if "session" in by else None)
        answer = []
        for key, figures in merged.items():
            # Only buckets moved to another day: nothing left there.
            if not any(figures[:-2]):
                continue
            day, client, model, session, claude = (None if i is None else key[i] for i in at)
            answer.append(UsageRow(day, client or None, model or None, session or None, claude, figures[0],
                                   figures[1], Usage(*figures[2:-2]), figures[-2], figures[-1]))
        return answer

    def _piece(self, piece: Piece, names: list[str], scope: Scope) -> tuple[str, list[Any]]:
        """Return the SELECT (and parameters) that sums one piece of a usage question."""
        table, column = ("usage_rollup", "bucket") if piece.fine else ("usage_rollup_6h", "block")
        shift, sign, tables = str(int(piece.shift)), "", table
        if piece.midnight is not None:
            block, larger = piece.midnight
            shift = f"CASE WHEN block % {DAY} = {int(block)} THEN {int(larger)} ELSE {shift} END"
        if piece.moved is not None:
            # Each bucket twice: in its own day, and taken out of the day its block counted in. (A
            # CROSS JOIN keeps SQLite reading the buckets once, in the outer loop.)
            tables += (f" CROSS JOIN (SELECT {shift} AS shift, 1 AS sign"
                       f" UNION ALL SELECT {int(piece.moved)}, -1) AS moves")
            shift, sign = "moves.shift", "moves.sign * "
        keys = [f"({column} + {shift}) / {DAY} AS day" if n == "day" else n for n in names]
        if "session_id" in names:
            keys.append("(SELECT claude_session_id FROM sessions WHERE id = session_id)")
        where, params = [f"{column} >= ?", f"{column} < ?"], [piece.start, piece.end]
        if piece.fine and piece.times is not None and piece.end - piece.start > BAND_BY_TIME_OF_DAY:
            # A unary plus keeps SQLite from reading the whole range of buckets for a few of them.
            where = [f"+{w}" for w in where]
        if piece.times is not None:
            where += [f"{column} % {DAY} >= ?", f"{column} % {DAY} < ?"]
            params += list(piece.times)
        scoped, scope_params = usage_scope(scope, piece.fine)
        grouped = f" GROUP BY {', '.join(str(i + 1) for i in range(len(names)))}" if names else ""
        return (f"SELECT {', '.join([*keys, sums(sign)])} FROM {tables} "
                f"WHERE {' AND '.join(where)} AND {scoped}{grouped}", [*params, *scope_params])

    def usage_span(self, scope):
        fine = needs_buckets(scope, ())
        table, column, size = ("usage_rollup", "bucket", BUCKET_SECONDS) if fine else \
            ("usage_rollup_6h", "block", BLOCK_SECONDS)
        scoped, params = usage_scope(scope, fine)
        first, last = self.query(f"SELECT MIN({column}), MAX({column}) FROM {table} WHERE {scoped}", params)[0]
        return None if first is None else (first, last + size)

    def usage_unpriced(self, scope, since, until):
        first, last = bucket_window(since, until)
        scoped, params = usage_scope(scope, True)
        window = "".join([" AND bucket >= ?"] * (first is not None) + [" AND bucket < ?"] * (last is not None))
        return [row[0] for row in self.query(
            f"SELECT DISTINCT model FROM usage_rollup WHERE priced = 0{window} AND {scoped} ORDER BY model",
            [*(t for t in (first, last) if t is not None), *params])]

    def events(self, scope, types, since, limit, until=None):
        where, params = self._event_scope(scope)
        if types:
            where += f" AND type IN ({', '.join('?' for _ in types)})"
            params += types
        if since is not None:
            where += " AND timestamp >= ?"
            params.append(since)
        if until is not None:
            where += " AND timestamp < ?"
            params.append(until)
        rows = self.query(f"SELECT id, type, timestamp, session_id, client_id, user_hash, data FROM events "
                          f"WHERE {where} ORDER BY id DESC LIMIT ?", [*params, limit])
        return [Event(id=r[0], type=r[1], timestamp=r[2], session=r[3], client=r[4], user=r[5],
                      data=json.loads(r[6])) for r in rows]

    def _event_scope(self, scope: Scope) -> tuple[str, list[Any]]:
        """Return a WHERE fragment selecting events of a scope's sessions."""
        if scope == Scope():
            return "1 = 1", []
        where, params = scope_clause(scope)
        return f"session_id IN (SELECT id FROM sessions WHERE {where})", params

    def legacy_users(self):
        rows = self.query("SELECT user_hash, COUNT(*), SUM(requests), SUM(input_tokens), SUM(output_tokens), "
                          "SUM(cost_usd), MIN(started), MAX(last_activity) FROM sessions "
                          "WHERE client_id IS NULL GROUP BY user_hash ORDER BY MAX(last_activity) DESC")
        return [LegacyUser(*row) for row in rows]

    def unpriced_models(self):
        return [row[0] for row in self.query("SELECT DISTINCT model FROM session_models WHERE priced = 0 "
                                             "ORDER BY model")]

    def client_activity(self, horizon):
        live, live_params = status_clause(LIVE, horizon)
        rows = self.query(f"SELECT client_id, SUM(CASE WHEN {live} THEN 1 ELSE 0 END), "
                          "MAX(last_activity) FROM sessions WHERE client_id IS NOT NULL GROUP BY client_id",
                          live_params)
        activity = {client: (live, last) for client, live, last in rows}
        for client, last in self.query("SELECT client_id, MAX(last_seen) FROM traffic WHERE client_id <> '' "
                                       "GROUP BY client_id"):
            live, seen = activity.get(client, (0, None))
            activity[client] = (live, max(last, seen or last))
        return activity
