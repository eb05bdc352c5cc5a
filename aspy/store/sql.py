"""The SQL that SQLite and PostgreSQL share: the store and its transactions, and the one migration runner.

:class:`SqlStore` and :class:`SqlTransaction` are put together from one part per concern:
the session ledger (``ledger``), events and conversation text (``events``), figures over
time (``rollup``). Statements use ``?`` placeholders, which a dialect that wants another
style rewrites in :meth:`SqlStore.sql`; rows are read by column name (``rows``). What
differs (connections, locking, a few words of DDL, text search) lives in the ``sqlite`` and
``postgres`` modules.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from ..native import gevent_patched, native
from ..records import Message
from . import Horizon, Scope, Store, StoreError, Totals, Transaction
from .events import EventReads, EventWrites
from .ledger import LedgerReads, LedgerWrites
from .rollup import RollupReads, RollupWrites
from .rows import Row
from .schema import SCHEMA_VERSION, Dialect, migrations

# An INSERT of one row of placeholders, which run_many sends as many rows at once.
MANY_ROWS = re.compile(r"(?P<head>INSERT INTO .+? VALUES )(?P<row>\(\?(?:, \?)*\))(?P<tail>.*)", re.S)
# Rows per statement of run_many.
ROWS_AT_ONCE = 1000


def schema_version(cursor: Any) -> int | None:
    """Return the schema version a store's meta table records, or None."""
    row = cursor.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row["value"]) if row else None


class SqlTransaction(LedgerWrites, EventWrites, RollupWrites, Transaction):
    """Writes through one open cursor; the store commits or rolls back around it."""

    def __init__(self, store: SqlStore, cursor: Any):
        self.store = store
        self.cur = cursor

    def execute(self, statement: str, params: Iterable[Any] = ()) -> Any:
        self.cur.execute(self.store.sql(statement), tuple(params))
        return self.cur

    def sending_together(self) -> AbstractContextManager[Any]:
        return self.store.sending_together(self.cur)

    def executemany(self, statement: str, rows: Iterable[Iterable[Any]]) -> None:
        self.store.run_many(self.cur, statement, [tuple(row) for row in rows])

    def add_messages(self, messages: list[Message]) -> None:
        super().add_messages(messages)
        if messages:
            for statement in self.store.dialect.index_new_messages:
                self.execute(statement)

    def reattribute(self, user: str, client: str, client_name: str) -> int:
        moved = self.reattribute_sessions(user, client, client_name)
        self.reattribute_usage(user, client)
        return moved


class SqlStore(LedgerReads, EventReads, RollupReads, Store):
    """Reads shared by the SQL stores, and their schema; subclasses give connections and dialect."""

    kind: str
    dialect: Dialect
    # The most parameters the database takes in one statement (SQLite's since 3.32).
    max_parameters = 32_766
    # The OS thread of the worker's gevent hub, once serve_here has named it.
    _hub_thread: int | None = None

    def serve_here(self) -> None:
        """Note that this OS thread runs the gevent hub that serves requests (a worker's, after fork)."""
        if gevent_patched():
            self._hub_thread = native("_thread", "get_ident")()

    def _on_the_hub(self) -> bool:
        """Tell whether this is the thread of the worker's hub, where blocking stops every request."""
        return self._hub_thread == native("_thread", "get_ident")()

    def query(self, statement: str, params: Iterable[Any] = ()) -> Sequence[Row]:
        if self._on_the_hub():
            # In one of gevent's OS threads a read waits, in C, for the disk or the database's
            # answers while the worker goes on serving, so a slow API query delays only its own
            # answer; on the hub a PostgreSQL read waited for a turn of the hub at each round trip
            # (630 ms for /api/stats under a saturating load).
            import gevent

            return gevent.get_hub().threadpool.apply(self._query, (statement, tuple(params)))
        return self._query(statement, params)

    def _query(self, statement: str, params: Iterable[Any]) -> Sequence[Row]:
        """Run one read in this thread."""
        raise NotImplementedError

    def sql(self, statement: str) -> str:
        """Return a statement in this dialect's placeholder style."""
        return statement

    def run_many(self, cursor: Any, statement: str, rows: list[tuple]) -> None:
        """Run an INSERT of many rows as statements of up to ROWS_AT_ONCE rows each; anything else, row by row.

        Row by row, psycopg sends each row as a statement of its own, and SQLite steps each one
        apart, giving up the interpreter lock for each step and waiting for it again behind a
        busy worker's hub. An upsert stays row by row: PostgreSQL refuses one statement that
        updates a row twice.
        """
        insert = MANY_ROWS.fullmatch(statement)
        if insert is None or "DO UPDATE" in insert["tail"] or len(rows) < 2:
            cursor.executemany(self.sql(statement), rows)
            return
        at_once = min(ROWS_AT_ONCE, self.max_parameters // len(rows[0]))
        for start in range(0, len(rows), at_once):
            chunk = rows[start:start + at_once]
            self.run_once(cursor, self.sql(insert["head"] + ", ".join([insert["row"]] * len(chunk)) + insert["tail"]),
                          [value for row in chunk for value in row])

    def run_once(self, cursor: Any, statement: str, params: list[Any]) -> None:
        """Run a statement made for one batch's rows."""
        cursor.execute(statement, params)

    def sending_together(self, cursor: Any) -> AbstractContextManager[Any]:
        """Send a transaction's statements made within at once, where the database can (SQLite runs in-process)."""
        return nullcontext()

    def write(self, conn: Any) -> AbstractContextManager[Any]:
        """Hold the write lock for one transaction on a connection; yield a cursor, commit at the end."""
        raise NotImplementedError

    def location(self) -> dict[str, str]:
        """Say where the store is, without credentials, for messages and checks."""
        raise NotImplementedError

    def migrate(self, conn: Any) -> None:
        """Create the schema, or bring it up to SCHEMA_VERSION, in one transaction under the write lock."""
        with self.write(conn) as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            current = schema_version(cur) or 0
            if current > SCHEMA_VERSION:
                raise StoreError(f"the store's schema version {current} is newer than this aspy understands "
                                 f"({SCHEMA_VERSION}); upgrade aspy")
            for statements in migrations(self.dialect)[current:]:
                for statement in statements:
                    cur.execute(statement)
            cur.execute(f"INSERT INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}') "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value")

    def totals(self, scope: Scope, horizon: Horizon, since: float | None = None,
               until: float | None = None) -> Totals:
        if since is None and until is None:
            return self.all_time_totals(scope, horizon)
        totals = self.window_totals(scope, since, until)
        counted = self.status_counts(scope, horizon, since, until)
        totals.active, totals.idle, totals.ended = counted.active, counted.idle, counted.ended
        return totals

    def check(self) -> dict[str, Any]:
        version = self.query("SELECT value FROM meta WHERE key = 'schema_version'")[0]["value"]
        return {"kind": self.kind, **self.location(), "schema_version": int(version)}

    def inspected(self, version: int | None) -> dict[str, Any]:
        """Return what :meth:`inspect` tells, given the version found (None: no store yet)."""
        return {"kind": self.kind, **self.location(), "schema_version": version, "expected_version": SCHEMA_VERSION}
