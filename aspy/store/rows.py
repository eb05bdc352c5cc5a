"""Rows by column name: the store's column names, and records made from rows and back.

Both dialects hand rows over as mappings (``sqlite3.Row``, psycopg's ``dict_row``), so every
read names the columns it takes; an aggregate is given its column's name with ``AS``.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from ..records import Session, Usage


class Row(Protocol):
    """A row of a result, read by column name."""

    def __getitem__(self, column: str, /) -> Any: ...


# Each token count's column, by its name in Usage: the one place the two sets of names meet.
USAGE_COLUMNS = {
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
    "cache_read": "cache_read",
    "cache_write_5m": "cache_write_5m",
    "cache_write_1h": "cache_write_1h",
    "web_search_requests": "web_searches",
}
TOKEN_COLUMNS = tuple(USAGE_COLUMNS.values())
# Every session column but the token counts, by its name in Session.
SESSION_FIELDS = {
    "id": "id", "claude_session_id": "claude_session_id", "source": "source", "client": "client_id",
    "client_name": "client_name", "provider": "provider", "user": "user_hash", "started": "started",
    "last_activity": "last_activity", "status": "status", "ended": "ended", "end_reason": "end_reason",
    "requests": "requests", "failed": "failed", "cost_usd": "cost_usd", "savings_usd": "savings_usd",
    "tool_calls": "tool_calls", "tool_failed": "tool_failed", "thinking_blocks": "thinking_blocks",
    "ttfb_total_ms": "ttfb_total_ms", "ttfb_count": "ttfb_count", "context_model": "context_model",
    "context_tokens": "context_tokens", "context_limit": "context_limit", "compactions": "compactions",
}
SESSION_COLUMNS = (*SESSION_FIELDS.values(), *TOKEN_COLUMNS)
SESSION_SELECT = "SELECT " + ", ".join(SESSION_COLUMNS) + " FROM sessions"


def usage_of(row: Row) -> Usage:
    """Return the token counts a row holds in the columns named for them."""
    return Usage(**{name: row[column] for name, column in USAGE_COLUMNS.items()})


def usage_values(usage: Usage) -> tuple[int, ...]:
    """Return a usage's token counts in TOKEN_COLUMNS order."""
    return tuple(getattr(usage, name) for name in USAGE_COLUMNS)


def token_sums(table: str = "", sums: str = "SUM({})") -> str:
    """Return the six token columns (of a table), each summed as ``sums`` says, named as the column."""
    prefix = f"{table}." if table else ""
    return ", ".join(f"{sums.format(prefix + c)} AS {c}" for c in TOKEN_COLUMNS)


def session_row(session: Session) -> tuple:
    """Return a session's values in SESSION_COLUMNS order."""
    return (*(getattr(session, name) for name in SESSION_FIELDS), *usage_values(session.usage))


def row_session(row: Row) -> Session:
    """Return the session a row of the sessions table holds."""
    return Session(**{name: row[column] for name, column in SESSION_FIELDS.items()}, usage=usage_of(row))


class Reads:
    """What reads are made of: one statement, all its rows."""

    def query(self, statement: str, params: Iterable[Any] = ()) -> Sequence[Row]:
        """Run one read and return all its rows."""
        raise NotImplementedError


class Writes:
    """What writes are made of: statements in one open transaction."""

    def execute(self, statement: str, params: Iterable[Any] = ()) -> Any:
        """Run one statement in this transaction; return the cursor for its rows."""
        raise NotImplementedError

    def executemany(self, statement: str, rows: Iterable[Iterable[Any]]) -> None:
        """Run one statement once for each row of parameters."""
        raise NotImplementedError
