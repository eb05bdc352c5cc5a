"""The shared store: PostgreSQL, for several aspy hosts behind one load balancer.

psycopg 3 with a connection pool per worker process (psycopg waits cooperatively when gevent
has patched the standard library). Every write transaction first takes one advisory lock,
so finding-or-opening a session is serialized across all hosts exactly as ``BEGIN
IMMEDIATE`` serializes it across SQLite's processes: one session, exact totals, wherever
its requests land. Search uses PostgreSQL's own full-text search.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.abc import Buffer
from psycopg.adapt import Loader
from psycopg_pool import ConnectionPool, PoolTimeout

from ..native import native
from . import Hit, StoreError
from .sql import SqlStore, SqlTransaction, message_filters

SCHEMA_VERSION = 4
# One number for aspy's advisory lock: every write, and migrations, take it.
WRITE_LOCK = 0x61737079
MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE sessions (
            id TEXT PRIMARY KEY, claude_session_id TEXT, source TEXT NOT NULL, client_id TEXT,
            client_name TEXT, provider TEXT, user_hash TEXT NOT NULL, started DOUBLE PRECISION NOT NULL,
            last_activity DOUBLE PRECISION NOT NULL, status TEXT NOT NULL, ended DOUBLE PRECISION, end_reason TEXT,
            requests BIGINT NOT NULL DEFAULT 0, failed BIGINT NOT NULL DEFAULT 0,
            input_tokens BIGINT NOT NULL DEFAULT 0, output_tokens BIGINT NOT NULL DEFAULT 0,
            cache_read BIGINT NOT NULL DEFAULT 0, cache_write_5m BIGINT NOT NULL DEFAULT 0,
            cache_write_1h BIGINT NOT NULL DEFAULT 0, web_searches BIGINT NOT NULL DEFAULT 0,
            cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0, savings_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
            tool_calls BIGINT NOT NULL DEFAULT 0, tool_failed BIGINT NOT NULL DEFAULT 0,
            thinking_blocks BIGINT NOT NULL DEFAULT 0, ttfb_total_ms DOUBLE PRECISION NOT NULL DEFAULT 0,
            ttfb_count BIGINT NOT NULL DEFAULT 0, context_model TEXT,
            context_tokens BIGINT NOT NULL DEFAULT 0, context_limit BIGINT,
            compactions BIGINT NOT NULL DEFAULT 0)""",
        "CREATE INDEX sessions_client ON sessions (client_id, status, last_activity)",
        "CREATE INDEX sessions_user ON sessions (user_hash, status, last_activity)",
        "CREATE INDEX sessions_claude ON sessions (claude_session_id)",
        "CREATE INDEX sessions_activity ON sessions (status, last_activity)",
        """CREATE TABLE session_models (
            session_id TEXT NOT NULL, model TEXT NOT NULL, requests BIGINT NOT NULL,
            input_tokens BIGINT NOT NULL, output_tokens BIGINT NOT NULL, cache_read BIGINT NOT NULL,
            cache_write_5m BIGINT NOT NULL, cache_write_1h BIGINT NOT NULL, web_searches BIGINT NOT NULL,
            cost_usd DOUBLE PRECISION NOT NULL, savings_usd DOUBLE PRECISION NOT NULL, priced INTEGER NOT NULL,
            PRIMARY KEY (session_id, model))""",
        """CREATE TABLE session_tools (
            session_id TEXT NOT NULL, tool TEXT NOT NULL, calls BIGINT NOT NULL, failed BIGINT NOT NULL,
            PRIMARY KEY (session_id, tool))""",
        """CREATE TABLE events (
            id BIGSERIAL PRIMARY KEY, session_id TEXT, client_id TEXT, user_hash TEXT,
            type TEXT NOT NULL, timestamp DOUBLE PRECISION NOT NULL, data TEXT NOT NULL)""",
        "CREATE INDEX events_session ON events (session_id, id)",
        "CREATE INDEX events_time ON events (timestamp)",
        """CREATE TABLE tool_calls (
            tool_use_id TEXT PRIMARY KEY, session_id TEXT NOT NULL, tool TEXT NOT NULL,
            called_at DOUBLE PRECISION NOT NULL)""",
        """CREATE TABLE messages (
            id BIGSERIAL PRIMARY KEY, session_id TEXT NOT NULL, client_id TEXT, user_hash TEXT,
            role TEXT NOT NULL, timestamp DOUBLE PRECISION NOT NULL, text TEXT NOT NULL,
            words TSVECTOR GENERATED ALWAYS AS (to_tsvector('simple', text)) STORED)""",
        "CREATE INDEX messages_time ON messages (timestamp)",
        "CREATE INDEX messages_words ON messages USING GIN (words)",
    ],
    2: [
        """CREATE TABLE imports (
            file_hash TEXT PRIMARY KEY, name TEXT NOT NULL, lines BIGINT NOT NULL,
            imported_at DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX events_user ON events (user_hash)",
        "CREATE INDEX messages_user ON messages (user_hash)",
    ],
    3: [
        """CREATE TABLE traffic (
            client_id TEXT NOT NULL, user_hash TEXT NOT NULL, requests BIGINT NOT NULL,
            failed BIGINT NOT NULL, last_seen DOUBLE PRECISION NOT NULL, PRIMARY KEY (client_id, user_hash))""",
        "ALTER TABLE session_models ADD COLUMN price_class TEXT NOT NULL DEFAULT 'standard'",
        "ALTER TABLE session_models DROP CONSTRAINT session_models_pkey",
        "ALTER TABLE session_models ADD PRIMARY KEY (session_id, model, price_class)",
        "CREATE INDEX session_models_unpriced ON session_models (priced)",
        "CREATE TABLE batches (batch_id TEXT PRIMARY KEY, billed_at DOUBLE PRECISION NOT NULL)",
        # Exchanges recorded lately, so that one given back by a worker's journal is never recorded twice.
        "CREATE TABLE recorded (exchange_id TEXT PRIMARY KEY, recorded_at DOUBLE PRECISION NOT NULL)",
        "CREATE INDEX recorded_at ON recorded (recorded_at)",
    ],
    # Figures over time (GET /api/usage): each exchange's figures in its 15-minute bucket, per
    # session, model and price class; a summary per client in 6-hour blocks; tool calls per bucket.
    4: [
        """CREATE TABLE usage_rollup (
            bucket BIGINT NOT NULL, session_id TEXT NOT NULL, client_id TEXT NOT NULL, user_hash TEXT NOT NULL,
            model TEXT NOT NULL, price_class TEXT NOT NULL, requests BIGINT NOT NULL, failed BIGINT NOT NULL,
            input_tokens BIGINT NOT NULL, output_tokens BIGINT NOT NULL, cache_read BIGINT NOT NULL,
            cache_write_5m BIGINT NOT NULL, cache_write_1h BIGINT NOT NULL, web_searches BIGINT NOT NULL,
            cost_usd DOUBLE PRECISION NOT NULL, savings_usd DOUBLE PRECISION NOT NULL, priced INTEGER NOT NULL,
            PRIMARY KEY (bucket, session_id, client_id, user_hash, model, price_class))""",
        "CREATE INDEX usage_rollup_session ON usage_rollup (session_id)",
        "CREATE INDEX usage_rollup_client ON usage_rollup (client_id, bucket)",
        "CREATE INDEX usage_rollup_time_of_day ON usage_rollup ((bucket % 86400))",
        "CREATE INDEX usage_rollup_unpriced ON usage_rollup (model) WHERE priced = 0",
        """CREATE TABLE usage_rollup_6h (
            block BIGINT NOT NULL, client_id TEXT NOT NULL, model TEXT NOT NULL, price_class TEXT NOT NULL,
            requests BIGINT NOT NULL, failed BIGINT NOT NULL, input_tokens BIGINT NOT NULL,
            output_tokens BIGINT NOT NULL, cache_read BIGINT NOT NULL, cache_write_5m BIGINT NOT NULL,
            cache_write_1h BIGINT NOT NULL, web_searches BIGINT NOT NULL, cost_usd DOUBLE PRECISION NOT NULL,
            savings_usd DOUBLE PRECISION NOT NULL, priced INTEGER NOT NULL,
            PRIMARY KEY (block, client_id, model, price_class))""",
        "CREATE INDEX usage_rollup_6h_client ON usage_rollup_6h (client_id, block)",
        """CREATE TABLE usage_tools (
            bucket BIGINT NOT NULL, session_id TEXT NOT NULL, tool TEXT NOT NULL, calls BIGINT NOT NULL,
            failed BIGINT NOT NULL, PRIMARY KEY (bucket, session_id, tool))""",
        # Older stores kept no figures over time: each session's go to the bucket of its last
        # activity, traffic outside sessions to that of its last request (docs/api.md says so).
        """INSERT INTO usage_rollup SELECT floor(s.last_activity / 900)::BIGINT * 900, m.session_id,
            COALESCE(s.client_id, ''), s.user_hash, m.model, m.price_class, m.requests, 0, m.input_tokens,
            m.output_tokens, m.cache_read, m.cache_write_5m, m.cache_write_1h, m.web_searches, m.cost_usd,
            m.savings_usd, m.priced FROM session_models m JOIN sessions s ON s.id = m.session_id""",
        # Failures, and requests no answer billed, have no model there.
        """INSERT INTO usage_rollup SELECT floor(s.last_activity / 900)::BIGINT * 900, s.id,
            COALESCE(s.client_id, ''), s.user_hash, '', 'standard',
            GREATEST(s.requests - COALESCE((SELECT SUM(m.requests) FROM session_models m
                                            WHERE m.session_id = s.id), 0), 0),
            s.failed, 0, 0, 0, 0, 0, 0, 0, 0, 1 FROM sessions s
            WHERE s.failed > 0 OR s.requests > COALESCE((SELECT SUM(m.requests) FROM session_models m
                                                         WHERE m.session_id = s.id), 0)""",
        """INSERT INTO usage_rollup SELECT floor(last_seen / 900)::BIGINT * 900, '', client_id, user_hash, '', '',
            requests, failed, 0, 0, 0, 0, 0, 0, 0, 0, 1 FROM traffic""",
        """INSERT INTO usage_rollup_6h SELECT bucket - bucket % 21600, client_id, model, price_class, SUM(requests),
            SUM(failed), SUM(input_tokens), SUM(output_tokens), SUM(cache_read), SUM(cache_write_5m),
            SUM(cache_write_1h), SUM(web_searches), SUM(cost_usd), SUM(savings_usd), MIN(priced)
            FROM usage_rollup GROUP BY 1, 2, 3, 4""",
        """INSERT INTO usage_tools SELECT floor(s.last_activity / 900)::BIGINT * 900, t.session_id, t.tool,
            t.calls, t.failed FROM session_tools t JOIN sessions s ON s.id = t.session_id""",
    ],
}


class WholeNumberLoader(Loader):
    """Load NUMERIC (what SUM over BIGINT gives) as int when whole, else float."""

    def load(self, data: Buffer) -> int | float:
        value = Decimal(bytes(data).decode())
        return int(value) if value == value.to_integral_value() else float(value)


def _configure(conn: psycopg.Connection) -> None:
    conn.adapters.register_loader("numeric", WholeNumberLoader)


class PostgresStore(SqlStore):
    """The PostgreSQL implementation of the store."""

    kind = "postgresql"

    def __init__(self, url: str):
        self.url = url
        self._pool: ConnectionPool | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()
        # The recorder's writer, when it is an OS thread beside gevent's hub, has a connection of its own.
        self._thread = native("threading", "local")()

    def writer_thread(self) -> None:
        """Give the calling OS thread a connection of its own for its transactions, outside the pool.

        Under gevent the pool's connections belong to the worker's hub, where a writer greenlet
        waits behind every busy request; in an OS thread it gets its turn from the GIL instead.
        """
        self._thread.own = True

    def sql(self, statement: str) -> str:
        # psycopg reads % as the start of a placeholder: a modulo is written %%.
        return statement.replace("%", "%%").replace("?", "%s")

    def _where(self) -> str:
        """Name the database without credentials, for messages."""
        info = psycopg.conninfo.conninfo_to_dict(self.url)
        return f"postgresql://{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"

    def _open(self) -> ConnectionPool:
        """Return this process's pool, opening it (and migrating the schema) on first use."""
        if self._pool is not None and self._pid == os.getpid():
            return self._pool
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                pool = ConnectionPool(self.url, min_size=1, max_size=8, open=False, configure=_configure,
                                      timeout=5, kwargs={"connect_timeout": 5})
                try:
                    pool.open(wait=True, timeout=5)
                    with pool.connection() as conn:
                        self._migrate(conn)
                except (psycopg.Error, PoolTimeout) as exc:
                    pool.close()
                    raise StoreError(f"cannot open the PostgreSQL store {self._where()}: {exc}") from None
                self._pool, self._pid = pool, os.getpid()
        return self._pool

    def _migrate(self, conn: psycopg.Connection) -> None:
        """Create the schema, or bring it up to SCHEMA_VERSION, under the write lock."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            current = self._version(conn)
            if current > SCHEMA_VERSION:
                raise StoreError(f"the store's schema version {current} is newer than this aspy understands "
                                 f"({SCHEMA_VERSION}); upgrade aspy")
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', %s) "
                         "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(SCHEMA_VERSION),))

    @staticmethod
    def _version(conn: psycopg.Connection) -> int:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    @contextmanager
    def transaction(self) -> Iterator[SqlTransaction]:
        try:
            with self._connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                yield SqlTransaction(self, conn.cursor())
        except (psycopg.Error, PoolTimeout) as exc:
            self._drop_own()
            raise StoreError(f"writing to the PostgreSQL store {self._where()} failed: {exc}") from None

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """Lend a connection: the writer thread's own (the pool belongs to the hub), or one of the pool's."""
        if not getattr(self._thread, "own", False):
            with self._open().connection() as pooled:
                yield pooled
            return
        conn = getattr(self._thread, "conn", None)
        if conn is None or conn.closed:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
            _configure(conn)
            self._migrate(conn)
            self._thread.conn = conn
        yield conn

    def _drop_own(self) -> None:
        """Close the writer thread's connection after a failure: the next transaction opens a fresh one."""
        conn = getattr(self._thread, "conn", None)
        if conn is not None:
            self._thread.conn = None
            try:
                conn.close()
            except psycopg.Error:
                pass

    def query(self, statement: str, params: Iterable[Any] = ()) -> list[tuple]:
        pool = self._open()
        try:
            with pool.connection() as conn:
                return conn.execute(self.sql(statement), tuple(params)).fetchall()
        except (psycopg.Error, PoolTimeout) as exc:
            raise StoreError(f"reading the PostgreSQL store {self._where()} failed: {exc}") from None

    def search(self, words, since, until, scope, role, limit):
        narrow, narrow_params = message_filters(since, until, scope, role)
        where, params = "m.words @@ plainto_tsquery('simple', ?)" + narrow, [" ".join(words), *narrow_params]
        total = self.query(f"SELECT COUNT(*) FROM messages m WHERE {where}", params)[0][0]
        rows = self.query(
            "SELECT m.session_id, m.client_id, m.timestamp, m.role, "
            "ts_headline('simple', m.text, plainto_tsquery('simple', ?), "
            "'StartSel=**, StopSel=**, MaxWords=24, MinWords=8, MaxFragments=1, FragmentDelimiter=…'), "
            "ts_rank(m.words, plainto_tsquery('simple', ?)) AS score "
            f"FROM messages m WHERE {where} ORDER BY score DESC, m.timestamp DESC LIMIT ?",
            [params[0], params[0], *params, limit])
        return total, [Hit(session=r[0], client=r[1], timestamp=r[2], role=r[3], snippet=r[4], score=float(r[5]))
                       for r in rows]

    def check(self) -> dict[str, Any]:
        version = self.query("SELECT value FROM meta WHERE key = 'schema_version'")[0][0]
        return {"kind": self.kind, "database": self._where(), "schema_version": int(version)}

    def inspect(self) -> dict[str, Any]:
        try:
            with psycopg.connect(self.url, connect_timeout=5) as conn:
                row = conn.execute("SELECT to_regclass('meta')").fetchone()
                has_meta = row is not None and row[0]
                version = self._version(conn) if has_meta else None
        except psycopg.Error as exc:
            raise StoreError(f"cannot reach the PostgreSQL store {self._where()}: {exc}") from None
        return {"kind": self.kind, "database": self._where(), "schema_version": version,
                "expected_version": SCHEMA_VERSION}

    def close(self) -> None:
        if self._pool is not None and self._pid == os.getpid():
            self._pool.close()
        self._pool = None
