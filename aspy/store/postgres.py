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
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.abc import Buffer
from psycopg.adapt import Loader
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from ..native import native
from . import Hit, Scope, StoreError
from .clauses import message_filters
from .rows import Row
from .schema import SCHEMA_VERSION, Dialect
from .sql import SqlStore, SqlTransaction, schema_version

# One number for aspy's advisory lock: every write, and migrations, take it.
WRITE_LOCK = 0x61737079
# A tsvector of messages.text under a GIN index; searches match plainto_tsquery, ranked by ts_rank.
SEARCH = ("ALTER TABLE messages ADD COLUMN words TSVECTOR GENERATED ALWAYS AS (to_tsvector('simple', text)) STORED",
          "CREATE INDEX messages_words ON messages USING GIN (words)")
DIALECT = Dialect("BIGSERIAL PRIMARY KEY", "", "GREATEST", lambda number: f"floor({number})::BIGINT", SEARCH)


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
    dialect = DIALECT
    max_parameters = 65_535

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

    def run_once(self, cursor: Any, statement: str, params: list[Any]) -> None:
        cursor.execute(statement, params, prepare=False)

    def sending_together(self, cursor: Any) -> AbstractContextManager[Any]:
        # One round trip for a batch's writes, where each statement had its own: a round trip
        # is a wait for the interpreter lock too, behind a busy worker's hub.
        return cursor.connection.pipeline()

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
                        self.migrate(conn)
                except (psycopg.Error, PoolTimeout) as exc:
                    pool.close()
                    raise StoreError(f"cannot open the PostgreSQL store {self._where()}: {exc}") from None
                self._pool, self._pid = pool, os.getpid()
        return self._pool

    @contextmanager
    def write(self, conn: psycopg.Connection) -> Iterator[psycopg.Cursor[DictRow]]:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            yield conn.cursor(row_factory=dict_row)

    @contextmanager
    def transaction(self) -> Iterator[SqlTransaction]:
        try:
            with self._connection() as conn, self.write(conn) as cur:
                yield SqlTransaction(self, cur)
        except (psycopg.Error, PoolTimeout) as exc:
            self._drop_own()
            raise StoreError(f"writing to the PostgreSQL store {self._where()} failed: {exc}") from None

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """Lend a connection: an OS thread's own beside a worker's hub (the pool belongs to the hub), or the pool's."""
        # The recorder's writer, and in a worker the threads gevent runs the API's reads in.
        own = getattr(self._thread, "own", False) or (self._hub_thread is not None and not self._on_the_hub())
        if not own:
            with self._open().connection() as pooled:
                yield pooled
            return
        conn = getattr(self._thread, "conn", None)
        if conn is None or conn.closed:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
            _configure(conn)
            if not self._current(conn):
                self.migrate(conn)
            self._thread.conn = conn
        yield conn

    @staticmethod
    def _current(conn: psycopg.Connection) -> bool:
        """Tell whether the store's schema is the one this aspy writes (so a reader's connection writes nothing)."""
        try:
            return schema_version(conn.cursor(row_factory=dict_row)) == SCHEMA_VERSION
        except psycopg.errors.UndefinedTable:
            return False

    def _drop_own(self) -> None:
        """Close an OS thread's own connection after a failure: the next use opens a fresh one."""
        conn = getattr(self._thread, "conn", None)
        if conn is not None:
            self._thread.conn = None
            try:
                conn.close()
            except psycopg.Error:
                pass

    def _query(self, statement: str, params: Iterable[Any]) -> Sequence[Row]:
        try:
            with self._connection() as conn:
                return conn.cursor(row_factory=dict_row).execute(self.sql(statement), tuple(params)).fetchall()
        except (psycopg.Error, PoolTimeout) as exc:
            self._drop_own()
            raise StoreError(f"reading the PostgreSQL store {self._where()} failed: {exc}") from None

    def search(self, words: list[str], since: float | None, until: float | None, scope: Scope,
               role: str | None, limit: int) -> tuple[int, list[Hit]]:
        narrow, narrow_params = message_filters(since, until, scope, role)
        query = " ".join(words)
        where, params = f"m.words @@ plainto_tsquery('simple', ?) AND {narrow}", [query, *narrow_params]
        total = self.query(f"SELECT COUNT(*) AS n FROM messages m WHERE {where}", params)[0]["n"]
        rows = self.query(
            "SELECT m.session_id, m.client_id, m.timestamp, m.role, "
            "ts_headline('simple', m.text, plainto_tsquery('simple', ?), "
            "'StartSel=**, StopSel=**, MaxWords=24, MinWords=8, MaxFragments=1, FragmentDelimiter=…') AS snippet, "
            "ts_rank(m.words, plainto_tsquery('simple', ?)) AS score "
            f"FROM messages m WHERE {where} ORDER BY score DESC, m.timestamp DESC LIMIT ?",
            [query, query, *params, limit])
        return total, [Hit(session=r["session_id"], client=r["client_id"], timestamp=r["timestamp"], role=r["role"],
                           snippet=r["snippet"], score=float(r["score"])) for r in rows]

    def location(self) -> dict[str, str]:
        return {"database": self._where()}

    def inspect(self) -> dict[str, Any]:
        try:
            with psycopg.connect(self.url, connect_timeout=5, row_factory=dict_row) as conn:
                row = conn.execute("SELECT to_regclass('meta') AS meta").fetchone()
                version = schema_version(conn) if row is not None and row["meta"] else None
        except psycopg.Error as exc:
            raise StoreError(f"cannot reach the PostgreSQL store {self._where()}: {exc}") from None
        return self.inspected(version)

    def close(self) -> None:
        if self._pool is not None and self._pid == os.getpid():
            self._pool.close()
        self._pool = None
