"""What happened, kept for a while: events, conversation text, pending tool calls, what counted already.

:class:`EventReads` lists events for the API (searching the text is each dialect's own);
:class:`EventWrites` adds them, remembers which exchanges, batches and log files counted
already so that nothing counts twice, and prunes what is past the retention.
"""
from __future__ import annotations

import json
import time
from typing import Any

from ..records import Event, Message
from . import Scope
from .clauses import given, scope_clause
from .rows import Reads, Writes

# Journals are given back within minutes of a restart; two days is a wide margin.
RECORDED_DAYS = 2


class EventReads(Reads):
    """Events, newest first."""

    def events(self, scope: Scope, types: list[str], since: float | None, limit: int,
               until: float | None = None) -> list[Event]:
        where, params = self._event_scope(scope)
        window, window_params = given(("timestamp >= ?", since), ("timestamp < ?", until))
        kinds = f"type IN ({', '.join('?' for _ in types)})" if types else "1 = 1"
        rows = self.query(f"SELECT id, type, timestamp, session_id, client_id, user_hash, data FROM events "
                          f"WHERE {where} AND {kinds} AND {window} ORDER BY id DESC LIMIT ?",
                          [*params, *types, *window_params, limit])
        return [Event(id=r["id"], type=r["type"], timestamp=r["timestamp"], session=r["session_id"],
                      client=r["client_id"], user=r["user_hash"], data=json.loads(r["data"])) for r in rows]

    @staticmethod
    def _event_scope(scope: Scope) -> tuple[str, list[Any]]:
        """Return a WHERE fragment selecting events of a scope's sessions."""
        if scope == Scope():
            return "1 = 1", []
        where, params = scope_clause(scope)
        return f"session_id IN (SELECT id FROM sessions WHERE {where})", params


class EventWrites(Writes):
    """A transaction's events, messages and tool calls, and its marks of what counted."""

    def add_events(self, events: list[Event]) -> None:
        if events:
            self.executemany("INSERT INTO events (session_id, client_id, user_hash, type, timestamp, data) "
                             "VALUES (?, ?, ?, ?, ?, ?)",
                             [(e.session, e.client, e.user, e.type, e.timestamp,
                               json.dumps(e.data, separators=(",", ":"))) for e in events])

    def add_messages(self, messages: list[Message]) -> None:
        if messages:
            self.executemany("INSERT INTO messages (session_id, client_id, user_hash, role, timestamp, text) "
                             "VALUES (?, ?, ?, ?, ?, ?)",
                             [(m.session, m.client, m.user, m.role, m.timestamp, m.text) for m in messages])

    def add_tool_call(self, tool_use_id: str, session_id: str, tool: str, called_at: float) -> None:
        self.execute("INSERT INTO tool_calls (tool_use_id, session_id, tool, called_at) VALUES (?, ?, ?, ?) "
                     "ON CONFLICT (tool_use_id) DO NOTHING", (tool_use_id, session_id, tool, called_at))

    def take_tool_call(self, tool_use_id: str) -> tuple[str, str, float] | None:
        row = self.execute("DELETE FROM tool_calls WHERE tool_use_id = ? RETURNING session_id, tool, called_at",
                           (tool_use_id,)).fetchone()
        return (row["session_id"], row["tool"], row["called_at"]) if row else None

    def already_recorded(self, exchange_ids: list[str]) -> set[str]:
        if not exchange_ids:
            return set()
        marks = ", ".join("?" for _ in exchange_ids)
        return {row["exchange_id"] for row in self.execute(
            f"SELECT exchange_id FROM recorded WHERE exchange_id IN ({marks})", exchange_ids).fetchall()}

    def mark_recorded(self, exchange_ids: list[str], at: float) -> None:
        if exchange_ids:
            self.executemany("INSERT INTO recorded (exchange_id, recorded_at) VALUES (?, ?) "
                             "ON CONFLICT (exchange_id) DO NOTHING", [(eid, at) for eid in exchange_ids])

    def first_billing_of_batch(self, batch_id: str, at: float) -> bool:
        return self._first("batches", ("batch_id", "billed_at"), (batch_id, at))

    def mark_imported(self, file_hash: str, name: str, lines: int) -> bool:
        return self._first("imports", ("file_hash", "name", "lines", "imported_at"),
                           (file_hash, name, lines, time.time()))

    def _first(self, table: str, columns: tuple[str, ...], values: tuple[Any, ...]) -> bool:
        """Add a row keyed by its first column unless one is there; tell whether it was added."""
        row = self.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) "
                           f"ON CONFLICT ({columns[0]}) DO NOTHING RETURNING {columns[0]}", values).fetchone()
        return row is not None

    def prune(self, session_ids: list[str], events_per_session: int, older_than: float) -> None:
        for sid in session_ids:
            self.execute("DELETE FROM events WHERE session_id = ? AND id <= (SELECT id FROM events "
                         "WHERE session_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                         (sid, sid, events_per_session))
        self.execute("DELETE FROM events WHERE timestamp < ?", (older_than,))
        self.execute("DELETE FROM messages WHERE timestamp < ?", (older_than,))
        self.execute("DELETE FROM tool_calls WHERE called_at < ?", (older_than,))
        self.execute("DELETE FROM recorded WHERE recorded_at < ?", (time.time() - RECORDED_DAYS * 86400,))
