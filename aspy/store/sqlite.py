"""The embedded store: one SQLite file in WAL mode, shared by every worker process.

Each process keeps one connection, used under a lock. Writes are short ``BEGIN IMMEDIATE``
transactions; SQLite's own busy wait is kept to 100 ms because it blocks the whole gevent
worker, and a longer wait is done here by sleeping, which under gevent lets the other
greenlets run. The file is opened, and its schema created or migrated, on first use, so a
store that cannot be opened never stops aspy from starting or forwarding.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..native import gevent_patched, native
from . import Hit, StoreError
from .sql import SqlStore, SqlTransaction, message_filters

SCHEMA_VERSION = 4
# How long a write waits for another process's transaction before giving up.
WRITE_PATIENCE = 2.0
MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE sessions (
            id TEXT PRIMARY KEY, claude_session_id TEXT, source TEXT NOT NULL, client_id TEXT,
            client_name TEXT, provider TEXT, user_hash TEXT NOT NULL, started REAL NOT NULL,
            last_activity REAL NOT NULL, status TEXT NOT NULL, ended REAL, end_reason TEXT,
            requests INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
            input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
            cache_read INTEGER NOT NULL DEFAULT 0, cache_write_5m INTEGER NOT NULL DEFAULT 0,
            cache_write_1h INTEGER NOT NULL DEFAULT 0, web_searches INTEGER NOT NULL DEFAULT 0,
            cost_usd REAL NOT NULL DEFAULT 0, savings_usd REAL NOT NULL DEFAULT 0,
            tool_calls INTEGER NOT NULL DEFAULT 0, tool_failed INTEGER NOT NULL DEFAULT 0,
            thinking_blocks INTEGER NOT NULL DEFAULT 0, ttfb_total_ms REAL NOT NULL DEFAULT 0,
            ttfb_count INTEGER NOT NULL DEFAULT 0, context_model TEXT,
            context_tokens INTEGER NOT NULL DEFAULT 0, context_limit INTEGER,
            compactions INTEGER NOT NULL DEFAULT 0)""",
        "CREATE INDEX sessions_client ON sessions (client_id, status, last_activity)",
        "CREATE INDEX sessions_user ON sessions (user_hash, status, last_activity)",
        "CREATE INDEX sessions_claude ON sessions (claude_session_id)",
        "CREATE INDEX sessions_activity ON sessions (status, last_activity)",
        """CREATE TABLE session_models (
            session_id TEXT NOT NULL, model TEXT NOT NULL, requests INTEGER NOT NULL,
            input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, cache_read INTEGER NOT NULL,
            cache_write_5m INTEGER NOT NULL, cache_write_1h INTEGER NOT NULL, web_searches INTEGER NOT NULL,
            cost_usd REAL NOT NULL, savings_usd REAL NOT NULL, priced INTEGER NOT NULL,
            PRIMARY KEY (session_id, model))""",
        """CREATE TABLE session_tools (
            session_id TEXT NOT NULL, tool TEXT NOT NULL, calls INTEGER NOT NULL, failed INTEGER NOT NULL,
            PRIMARY KEY (session_id, tool))""",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT, client_id TEXT, user_hash TEXT,
            type TEXT NOT NULL, timestamp REAL NOT NULL, data TEXT NOT NULL)""",
        "CREATE INDEX events_session ON events (session_id, id)",
        "CREATE INDEX events_time ON events (timestamp)",
        """CREATE TABLE tool_calls (
            tool_use_id TEXT PRIMARY KEY, session_id TEXT NOT NULL, tool TEXT NOT NULL, called_at REAL NOT NULL)""",
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL, client_id TEXT,
            user_hash TEXT, role TEXT NOT NULL, timestamp REAL NOT NULL, text TEXT NOT NULL)""",
        "CREATE INDEX messages_time ON messages (timestamp)",
        """CREATE VIRTUAL TABLE messages_fts USING fts5(
            text, content='messages', content_rowid='id', tokenize='unicode61 remove_diacritics 2')""",
        """CREATE TRIGGER messages_added AFTER INSERT ON messages BEGIN
            INSERT INTO messages_fts (rowid, text) VALUES (new.id, new.text); END""",
        """CREATE TRIGGER messages_removed AFTER DELETE ON messages BEGIN
            INSERT INTO messages_fts (messages_fts, rowid, text) VALUES ('delete', old.id, old.text); END""",
    ],
    # Log files read by `aspy migrate --import-logs`, so a second import adds nothing.
    2: [
        """CREATE TABLE imports (
            file_hash TEXT PRIMARY KEY, name TEXT NOT NULL, lines INTEGER NOT NULL, imported_at REAL NOT NULL)""",
        "CREATE INDEX events_user ON events (user_hash)",
        "CREATE INDEX messages_user ON messages (user_hash)",
    ],
    # Requests that are not Messages calls (probes, model lists, count_tokens): counted, no session.
    3: [
        """CREATE TABLE traffic (
            client_id TEXT NOT NULL, user_hash TEXT NOT NULL, requests INTEGER NOT NULL,
            failed INTEGER NOT NULL, last_seen REAL NOT NULL, PRIMARY KEY (client_id, user_hash))""",
        # Each model's share of a session is kept per price class (fast, batch, US-only...), so
        # tokens recorded before the table knew their model can be priced exactly later.
        """CREATE TABLE session_models_priced (
            session_id TEXT NOT NULL, model TEXT NOT NULL, price_class TEXT NOT NULL, requests INTEGER NOT NULL,
            input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, cache_read INTEGER NOT NULL,
            cache_write_5m INTEGER NOT NULL, cache_write_1h INTEGER NOT NULL, web_searches INTEGER NOT NULL,
            cost_usd REAL NOT NULL, savings_usd REAL NOT NULL, priced INTEGER NOT NULL,
            PRIMARY KEY (session_id, model, price_class))""",
        """INSERT INTO session_models_priced SELECT session_id, model, 'standard', requests, input_tokens,
            output_tokens, cache_read, cache_write_5m, cache_write_1h, web_searches, cost_usd, savings_usd, priced
            FROM session_models""",
        "DROP TABLE session_models",
        "ALTER TABLE session_models_priced RENAME TO session_models",
        "CREATE INDEX session_models_unpriced ON session_models (priced)",
        "CREATE TABLE batches (batch_id TEXT PRIMARY KEY, billed_at REAL NOT NULL)",
        # Exchanges recorded lately, so that one given back by a worker's journal is never recorded twice.
        "CREATE TABLE recorded (exchange_id TEXT PRIMARY KEY, recorded_at REAL NOT NULL)",
        "CREATE INDEX recorded_at ON recorded (recorded_at)",
    ],
    # Figures over time (GET /api/usage): each exchange's figures in its 15-minute bucket, per
    # session, model and price class; a summary per client in 6-hour blocks; tool calls per bucket.
    4: [
        """CREATE TABLE usage_rollup (
            bucket INTEGER NOT NULL, session_id TEXT NOT NULL, client_id TEXT NOT NULL, user_hash TEXT NOT NULL,
            model TEXT NOT NULL, price_class TEXT NOT NULL, requests INTEGER NOT NULL, failed INTEGER NOT NULL,
            input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, cache_read INTEGER NOT NULL,
            cache_write_5m INTEGER NOT NULL, cache_write_1h INTEGER NOT NULL, web_searches INTEGER NOT NULL,
            cost_usd REAL NOT NULL, savings_usd REAL NOT NULL, priced INTEGER NOT NULL,
            PRIMARY KEY (bucket, session_id, client_id, user_hash, model, price_class)) WITHOUT ROWID""",
        "CREATE INDEX usage_rollup_session ON usage_rollup (session_id)",
        "CREATE INDEX usage_rollup_client ON usage_rollup (client_id, bucket)",
        "CREATE INDEX usage_rollup_time_of_day ON usage_rollup ((bucket % 86400))",
        "CREATE INDEX usage_rollup_unpriced ON usage_rollup (model) WHERE priced = 0",
        """CREATE TABLE usage_rollup_6h (
            block INTEGER NOT NULL, client_id TEXT NOT NULL, model TEXT NOT NULL, price_class TEXT NOT NULL,
            requests INTEGER NOT NULL, failed INTEGER NOT NULL, input_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL, cache_read INTEGER NOT NULL, cache_write_5m INTEGER NOT NULL,
            cache_write_1h INTEGER NOT NULL, web_searches INTEGER NOT NULL, cost_usd REAL NOT NULL,
            savings_usd REAL NOT NULL, priced INTEGER NOT NULL,
            PRIMARY KEY (block, client_id, model, price_class)) WITHOUT ROWID""",
        "CREATE INDEX usage_rollup_6h_client ON usage_rollup_6h (client_id, block)",
        """CREATE TABLE usage_tools (
            bucket INTEGER NOT NULL, session_id TEXT NOT NULL, tool TEXT NOT NULL, calls INTEGER NOT NULL,
            failed INTEGER NOT NULL, PRIMARY KEY (bucket, session_id, tool)) WITHOUT ROWID""",
        # Older stores kept no figures over time: each session's go to the bucket of its last
        # activity, traffic outside sessions to that of its last request (docs/api.md says so).
        """INSERT INTO usage_rollup SELECT CAST(s.last_activity / 900 AS INTEGER) * 900, m.session_id,
            COALESCE(s.client_id, ''), s.user_hash, m.model, m.price_class, m.requests, 0, m.input_tokens,
            m.output_tokens, m.cache_read, m.cache_write_5m, m.cache_write_1h, m.web_searches, m.cost_usd,
            m.savings_usd, m.priced FROM session_models m JOIN sessions s ON s.id = m.session_id""",
        # Failures, and requests no answer billed, have no model there.
        """INSERT INTO usage_rollup SELECT CAST(s.last_activity / 900 AS INTEGER) * 900, s.id,
            COALESCE(s.client_id, ''), s.user_hash, '', 'standard',
            MAX(s.requests - COALESCE((SELECT SUM(m.requests) FROM session_models m WHERE m.session_id = s.id), 0), 0),
            s.failed, 0, 0, 0, 0, 0, 0, 0, 0, 1 FROM sessions s
            WHERE s.failed > 0 OR s.requests > COALESCE((SELECT SUM(m.requests) FROM session_models m
                                                         WHERE m.session_id = s.id), 0)""",
        """INSERT INTO usage_rollup SELECT CAST(last_seen / 900 AS INTEGER) * 900, '', client_id, user_hash, '', '',
            requests, failed, 0, 0, 0, 0, 0, 0, 0, 0, 1 FROM traffic""",
        """INSERT INTO usage_rollup_6h SELECT bucket - bucket % 21600, client_id, model, price_class, SUM(requests),
            SUM(failed), SUM(input_tokens), SUM(output_tokens), SUM(cache_read), SUM(cache_write_5m),
            SUM(cache_write_1h), SUM(web_searches), SUM(cost_usd), SUM(savings_usd), MIN(priced)
            FROM usage_rollup GROUP BY 1, 2, 3, 4""",
        """INSERT INTO usage_tools SELECT CAST(s.last_activity / 900 AS INTEGER) * 900, t.session_id, t.tool,
            t.calls, t.failed FROM session_tools t JOIN sessions s ON s.id = t.session_id""",
    ],
}


def _busy(exc: sqlite3.Error) -> bool:
    """Tell whether an error means another connection holds the lock."""
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))


class SqliteStore(SqlStore):
    """The SQLite implementation of the store."""

    kind = "sqlite"

    def __init__(self, path: str):
        self.path = Path(path).expanduser()
        # One connection per OS thread: the greenlets of a gevent worker share one (under a
        # gevent lock, one greenlet at a time), the recorder's own thread has another.
        self._slots: dict[tuple[int, int], tuple[sqlite3.Connection, Any]] = {}
        self._slots_lock = native("_thread", "allocate_lock")()
        self._hub_thread: int | None = None

    def serve_here(self) -> None:
        """Note that this OS thread runs the gevent hub that serves requests (a worker's, after fork)."""
        if gevent_patched():
            self._hub_thread = native("_thread", "get_ident")()

    def _on_the_hub(self) -> bool:
        """Tell whether this is the thread of the worker's hub, where blocking stops every request."""
        return self._hub_thread == native("_thread", "get_ident")()

    def _slot(self) -> tuple[sqlite3.Connection, Any]:
        """Return this thread's connection and its lock, opening and migrating the file on first use."""
        key = (os.getpid(), native("_thread", "get_ident")())
        slot = self._slots.get(key)
        if slot is not None:
            return slot
        with self._slots_lock:
            if key not in self._slots:
                # The hub's greenlets share the main thread's connection under gevent's lock (one may
                # wait for it without stopping the others); any other thread has its own, under a real lock.
                lock = threading.Lock() if self._on_the_hub() else native("_thread", "allocate_lock")()
                self._slots[key] = (self._open(), lock)
            return self._slots[key]

    def _open(self) -> sqlite3.Connection:
        """Open the file, creating or migrating its schema."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=0.1)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA busy_timeout = 100")
            self._migrate(conn)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the SQLite store {self.path}: {exc}") from None
        return conn

    def _begin(self, conn: sqlite3.Connection) -> None:
        """Take the write lock, waiting while another process holds it."""
        deadline = time.monotonic() + WRITE_PATIENCE
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.Error as exc:
                if not _busy(exc) or time.monotonic() > deadline:
                    raise
                # On the hub's thread, let other greenlets run meanwhile.
                (time.sleep if self._on_the_hub() else native("time", "sleep"))(0.02)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Create the schema, or bring it up to SCHEMA_VERSION."""
        self._begin(conn)
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            current = int(row[0]) if row else 0
            if current > SCHEMA_VERSION:
                raise StoreError(f"the store's schema version {current} is newer than this aspy "
                                 f"understands ({SCHEMA_VERSION}); upgrade aspy")
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                         "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(SCHEMA_VERSION),))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextmanager
    def transaction(self) -> Iterator[SqlTransaction]:
        conn, lock = self._slot()
        with lock:
            try:
                self._begin(conn)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot write to the SQLite store {self.path}: {exc}") from None
            try:
                yield SqlTransaction(self, conn.cursor())
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback(conn)
                raise StoreError(f"writing to the SQLite store {self.path} failed: {exc}") from None
            except BaseException:
                self._rollback(conn)
                raise

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        """Roll back if a transaction is still open."""
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def query(self, statement: str, params: Iterable[Any] = ()) -> list[tuple]:
        if self._on_the_hub():
            # A read blocks in C for as long as it takes: in one of gevent's OS threads the worker
            # goes on serving meanwhile, so a slow API query delays only its own answer.
            import gevent

            return gevent.get_hub().threadpool.apply(self._query, (statement, tuple(params)))
        return self._query(statement, params)

    def _query(self, statement: str, params: Iterable[Any]) -> list[tuple]:
        """Run one read on this thread's connection."""
        conn, lock = self._slot()
        with lock:
            try:
                return conn.execute(statement, tuple(params)).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"reading the SQLite store {self.path} failed: {exc}") from None

    def search(self, words, since, until, scope, role, limit):
        match = " ".join('"' + w.replace('"', '""') + '"' for w in words)
        narrow, narrow_params = message_filters(since, until, scope, role)
        where, params = "messages_fts MATCH ?" + narrow, [match, *narrow_params]
        base = "FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid WHERE " + where
        total = self.query(f"SELECT COUNT(*) {base}", params)[0][0]
        rows = self.query("SELECT m.session_id, m.client_id, m.timestamp, m.role, "
                          "snippet(messages_fts, 0, '**', '**', '…', 24), bm25(messages_fts) "
                          f"{base} ORDER BY bm25(messages_fts), m.timestamp DESC LIMIT ?", [*params, limit])
        return total, [Hit(session=r[0], client=r[1], timestamp=r[2], role=r[3], snippet=r[4], score=-r[5])
                       for r in rows]

    def check(self) -> dict[str, Any]:
        version = self.query("SELECT value FROM meta WHERE key = 'schema_version'")[0][0]
        return {"kind": self.kind, "path": str(self.path), "schema_version": int(version)}

    def inspect(self) -> dict[str, Any]:
        answer = {"kind": self.kind, "path": str(self.path), "expected_version": SCHEMA_VERSION}
        if not self.path.exists():
            folder = next(p for p in (self.path.parent, *self.path.parents) if p.exists())
            if not os.access(folder, os.W_OK):
                raise StoreError(f"cannot create the SQLite store {self.path}: {folder} is not writable")
            return answer | {"schema_version": None}
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=1)
            try:
                has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone()
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() \
                    if has_meta else None
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the SQLite store {self.path}: {exc}") from None
        return answer | {"schema_version": int(row[0]) if row else None}

    def close(self) -> None:
        with self._slots_lock:
            for (pid, _), (conn, _) in list(self._slots.items()):
                if pid == os.getpid():
                    conn.close()
            self._slots.clear()
