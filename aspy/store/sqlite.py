"""The embedded store: one SQLite file in WAL mode, shared by every worker process.

Each process keeps one connection, used under a lock. Writes are short ``BEGIN IMMEDIATE``
transactions; SQLite's own busy wait is kept to 100 ms because it blocks the whole gevent
worker, and a longer wait is done here by sleeping, which under gevent lets the other
greenlets run. The recorder's writer, in its own OS thread, waits for another process's
transaction by trying again every millisecond instead: SQLite's busy wait backs off to sleeps
of 25 to 100 ms, which under load kept one worker's writer waiting up to a quarter of a second
while the other's wrote. The file is opened, and its schema created or migrated, on first use,
so a store that cannot be opened never stops aspy from starting or forwarding.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..native import native
from . import Hit, Scope, StoreError
from .clauses import message_filters
from .rows import Row
from .schema import Dialect
from .sql import SqlStore, SqlTransaction, schema_version

# How long a write waits for another process's transaction before giving up.
WRITE_PATIENCE = 2.0
# Seconds between two tries for the write lock: in an OS thread, and on the hub (where other greenlets run meanwhile).
RETRY_OFF_HUB, RETRY_ON_HUB = 0.001, 0.02
# FTS5 over messages.text; searches MATCH quoted words, ranked by bm25.
SEARCH = (
    """CREATE VIRTUAL TABLE messages_fts USING fts5(
        text, content='messages', content_rowid='id', tokenize='unicode61 remove_diacritics 2')""",
    """CREATE TRIGGER messages_added AFTER INSERT ON messages BEGIN
        INSERT INTO messages_fts (rowid, text) VALUES (new.id, new.text); END""",
    """CREATE TRIGGER messages_removed AFTER DELETE ON messages BEGIN
        INSERT INTO messages_fts (messages_fts, rowid, text) VALUES ('delete', old.id, old.text); END""",
)
# Indexing a transaction's new messages in one statement costs a tenth of what the trigger
# did row by row (about 3 µs a message against 25-30 µs, even for a few words). The messages
# above the mark are the ones not indexed yet, whoever inserted them: an aspy of schema 4
# still running beside this one during an upgrade inserts without indexing, and the next
# transaction of this one indexes them. AUTOINCREMENT never gives an id twice.
SEARCH_BY_TRANSACTION = (
    """INSERT INTO meta (key, value) SELECT 'search_indexed_to', CAST(COALESCE(MAX(id), 0) AS TEXT) FROM messages""",
    "DROP TRIGGER messages_added",
)
INDEX_NEW_MESSAGES = (
    """INSERT INTO messages_fts (rowid, text) SELECT id, text FROM messages
        WHERE id > (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'search_indexed_to')""",
    """UPDATE meta SET value = (SELECT CAST(MAX(id) AS TEXT) FROM messages) WHERE key = 'search_indexed_to'""",
)
DIALECT = Dialect("INTEGER PRIMARY KEY AUTOINCREMENT", " WITHOUT ROWID", "MAX",
                  lambda number: f"CAST({number} AS INTEGER)", SEARCH, SEARCH_BY_TRANSACTION, INDEX_NEW_MESSAGES)


def _busy(exc: sqlite3.Error) -> bool:
    """Tell whether an error means another connection holds the lock."""
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))


@contextmanager
def _committing(conn: sqlite3.Connection) -> Iterator[None]:
    """Commit a begun transaction at the end, or roll it back on any error."""
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class SqliteStore(SqlStore):
    """The SQLite implementation of the store."""

    kind = "sqlite"
    dialect = DIALECT

    def __init__(self, path: str):
        self.path = Path(path).expanduser()
        # One connection per OS thread: the greenlets of a gevent worker share one (under a
        # gevent lock, one greenlet at a time), the recorder's own thread has another.
        self._slots: dict[tuple[int, int], tuple[sqlite3.Connection, Any]] = {}
        self._slots_lock = native("_thread", "allocate_lock")()
        self._writer_thread: int | None = None

    def writer_thread(self) -> None:
        """Note that this OS thread is the recorder's writer: it waits for the write lock in short steps of its own."""
        self._writer_thread = native("_thread", "get_ident")()

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
                conn = self._open()
                if self._writer_thread == key[1]:
                    # Every statement of the writer's but BEGIN runs in a transaction it holds:
                    # none of them waits, and _begin does BEGIN's waiting.
                    conn.execute("PRAGMA busy_timeout = 0")
                self._slots[key] = (conn, lock)
            return self._slots[key]

    def _open(self) -> sqlite3.Connection:
        """Open the file, creating or migrating its schema."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=0.1)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA busy_timeout = 100")
            self.migrate(conn)
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
                if self._on_the_hub():
                    time.sleep(RETRY_ON_HUB)
                else:
                    native("time", "sleep")(RETRY_OFF_HUB)

    @contextmanager
    def write(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Cursor]:
        self._begin(conn)
        with _committing(conn):
            yield conn.cursor()

    @contextmanager
    def transaction(self) -> Iterator[SqlTransaction]:
        conn, lock = self._slot()
        with lock:
            try:
                self._begin(conn)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot write to the SQLite store {self.path}: {exc}") from None
            try:
                with _committing(conn):
                    yield SqlTransaction(self, conn.cursor())
            except sqlite3.Error as exc:
                raise StoreError(f"writing to the SQLite store {self.path} failed: {exc}") from None

    def _query(self, statement: str, params: Iterable[Any]) -> Sequence[Row]:
        """Run one read on this thread's connection."""
        conn, lock = self._slot()
        with lock:
            try:
                return conn.execute(statement, tuple(params)).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"reading the SQLite store {self.path} failed: {exc}") from None

    def search(self, words: list[str], since: float | None, until: float | None, scope: Scope,
               role: str | None, limit: int) -> tuple[int, list[Hit]]:
        match = " ".join('"' + w.replace('"', '""') + '"' for w in words)
        narrow, narrow_params = message_filters(since, until, scope, role)
        params = [match, *narrow_params]
        base = f"FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid WHERE messages_fts MATCH ? AND {narrow}"
        total = self.query(f"SELECT COUNT(*) AS n {base}", params)[0]["n"]
        rows = self.query("SELECT m.session_id, m.client_id, m.timestamp, m.role, "
                          "snippet(messages_fts, 0, '**', '**', '…', 24) AS snippet, bm25(messages_fts) AS rank "
                          f"{base} ORDER BY bm25(messages_fts), m.timestamp DESC LIMIT ?", [*params, limit])
        return total, [Hit(session=r["session_id"], client=r["client_id"], timestamp=r["timestamp"], role=r["role"],
                           snippet=r["snippet"], score=-r["rank"]) for r in rows]

    def location(self) -> dict[str, str]:
        return {"path": str(self.path)}

    def inspect(self) -> dict[str, Any]:
        if not self.path.exists():
            folder = next(p for p in (self.path.parent, *self.path.parents) if p.exists())
            if not os.access(folder, os.W_OK):
                raise StoreError(f"cannot create the SQLite store {self.path}: {folder} is not writable")
            return self.inspected(None)
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=1)
            conn.row_factory = sqlite3.Row
            try:
                has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone()
                version = schema_version(conn) if has_meta else None
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the SQLite store {self.path}: {exc}") from None
        return self.inspected(version)

    def close(self) -> None:
        with self._slots_lock:
            for (pid, _), (conn, _) in list(self._slots.items()):
                if pid == os.getpid():
                    conn.close()
            self._slots.clear()
