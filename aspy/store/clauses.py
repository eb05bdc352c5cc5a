"""The WHERE fragments questions share: which sessions a scope means, statuses read from time, windows.

Each returns SQL with ``?`` placeholders and the list of its parameters, to be AND-ed into a statement.
"""
from __future__ import annotations

from typing import Any

from ..records import ACTIVE, ENDED, IDLE, LIVE
from . import Horizon, Scope

OPEN = f"status <> '{ENDED}'"
Clause = tuple[str, list[Any]]


def given(*conditions: tuple[str, Any]) -> Clause:
    """AND the conditions whose value is not None; return them with those values."""
    kept = [(sql, value) for sql, value in conditions if value is not None]
    return " AND ".join(sql for sql, _ in kept) or "1 = 1", [value for _, value in kept]


def clients_in(column: str, clients: tuple[str, ...]) -> str:
    """Return a condition keeping rows of these clients (none, for an empty tuple)."""
    return f"{column} IN ({', '.join('?' for _ in clients)})" if clients else "1 = 0"


def scope_clause(scope: Scope, session_table: str = "") -> Clause:
    """Return a WHERE fragment selecting a scope's sessions."""
    prefix = f"{session_table}." if session_table else ""
    parts, params = [], []
    if scope.client is not None:
        parts.append(f"{prefix}client_id = ?")
        params.append(scope.client)
    if scope.user is not None:
        if scope.user_clients:
            parts.append(f"({prefix}user_hash = ? OR {clients_in(prefix + 'client_id', scope.user_clients)})")
            params += [scope.user, *scope.user_clients]
        else:
            parts.append(f"{prefix}user_hash = ?")
            params.append(scope.user)
    if scope.session is not None:
        parts.append(f"({prefix}id = ? OR {prefix}claude_session_id = ?)")
        params += [scope.session, scope.session]
    if scope.clients is not None:
        parts.append(clients_in(f"{prefix}client_id", scope.clients))
        params += scope.clients
    return (" AND ".join(parts) or "1 = 1"), params


def status_clause(status: str | None, horizon: Horizon) -> Clause:
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


def active_clause(since: float | None, until: float | None) -> Clause:
    """Return a WHERE fragment for sessions active in a window: some of their activity falls in it."""
    return given(("started < ?", until), ("last_activity >= ?", since))


def message_filters(since: float | None, until: float | None, scope: Scope, role: str | None) -> Clause:
    """Return the AND-ed conditions (and parameters) that narrow a search of messages ``m``."""
    where, params = given(("m.timestamp >= ?", since), ("m.timestamp < ?", until), ("m.role = ?", role or None))
    scoped, scope_params = scope_clause(scope)
    if scoped != "1 = 1":
        where += f" AND m.session_id IN (SELECT id FROM sessions WHERE {scoped})"
        params += scope_params
    return where, params
