"""The session ledger in SQL: sessions with their per-model and per-tool figures, and traffic outside them.

:class:`LedgerReads` answers the API's questions about sessions and their all-time totals;
:class:`LedgerWrites` is what a transaction does to them. Figures over time live in ``rollup``,
events and conversation text in ``events``.
"""
from __future__ import annotations

from ..records import ACTIVE, ENDED, IDLE, LIVE, ModelUsage, Session, Usage
from . import Horizon, LegacyUser, Scope, Totals
from .clauses import OPEN, Clause, active_clause, scope_clause, status_clause
from .rows import (
    SESSION_COLUMNS,
    SESSION_SELECT,
    TOKEN_COLUMNS,
    Reads,
    Row,
    Writes,
    row_session,
    session_row,
    token_sums,
    usage_of,
    usage_values,
)

SESSION_BY_KEY = f"{SESSION_SELECT} WHERE id = ? OR claude_session_id = ? ORDER BY last_activity DESC LIMIT 1"
# A model's share of sessions, summed: read back with model_usage.
MODEL_SUMS = ("SUM(m.requests) AS requests, " + token_sums("m") + ", SUM(m.cost_usd) AS cost_usd, "
              "SUM(m.savings_usd) AS savings_usd, MIN(m.priced) AS priced")
FIGURES = ("requests", "failed", "cost_usd", "savings_usd", "tool_calls", "tool_failed")


def model_usage(row: Row) -> ModelUsage:
    """Return a model's share from a row of MODEL_SUMS."""
    return ModelUsage(row["requests"], usage_of(row), row["cost_usd"], row["savings_usd"], bool(row["priced"]))


def status_columns(horizon: Horizon) -> Clause:
    """Return the columns ``active``, ``idle`` and ``ended``: how many sessions of a group have each status."""
    clauses = {status: status_clause(status, horizon) for status in (ACTIVE, IDLE, ENDED)}
    return (", ".join(f"COALESCE(SUM(CASE WHEN {sql} THEN 1 ELSE 0 END), 0) AS {status}"
                      for status, (sql, _) in clauses.items()),
            [p for _, params in clauses.values() for p in params])


class LedgerReads(Reads):
    """Sessions, their totals, and who has traffic: the reads of the API."""

    def _with_details(self, sessions: list[Session]) -> list[Session]:
        """Attach per-model and per-tool figures to sessions."""
        if not sessions:
            return sessions
        by_id = {s.id: s for s in sessions}
        marks = ", ".join("?" for _ in by_id)
        for row in self.query(f"SELECT m.session_id, m.model, {MODEL_SUMS} FROM session_models m "
                              f"WHERE m.session_id IN ({marks}) GROUP BY m.session_id, m.model", by_id):
            by_id[row["session_id"]].by_model[row["model"]] = model_usage(row)
        for row in self.query(f"SELECT session_id, tool, calls, failed FROM session_tools "
                              f"WHERE session_id IN ({marks})", by_id):
            by_id[row["session_id"]].by_tool[row["tool"]] = [row["calls"], row["failed"]]
        return sessions

    def get_session(self, key: str) -> Session | None:
        rows = self.query(SESSION_BY_KEY, (key, key))
        return self._with_details([row_session(rows[0])])[0] if rows else None

    def sessions(self, scope: Scope, status: str | None, horizon: Horizon, limit: int,
                 since: float | None = None, until: float | None = None) -> list[Session]:
        where, params = scope_clause(scope)
        status_sql, status_params = status_clause(status, horizon)
        active_sql, active_params = active_clause(since, until)
        rows = self.query(f"{SESSION_SELECT} WHERE {where} AND {status_sql} AND {active_sql} "
                          "ORDER BY last_activity DESC LIMIT ?", [*params, *status_params, *active_params, limit])
        return self._with_details([row_session(r) for r in rows])

    def status_counts(self, scope: Scope, horizon: Horizon, since: float | None, until: float | None) -> Totals:
        """Count a scope's sessions (active in a window, if given) by status."""
        where, params = scope_clause(scope)
        active_sql, active_params = active_clause(since, until)
        counts, count_params = status_columns(horizon)
        row = self.query(f"SELECT {counts} FROM sessions WHERE {where} AND {active_sql}",
                         [*count_params, *params, *active_params])[0]
        return Totals(active=row[ACTIVE], idle=row[IDLE], ended=row[ENDED])

    def all_time_totals(self, scope: Scope, horizon: Horizon) -> Totals:
        """Sum the figures of every session in a scope, and of its traffic outside sessions."""
        where, params = scope_clause(scope)
        counts, count_params = status_columns(horizon)
        sums = ", ".join(f"COALESCE(SUM({c}), 0) AS {c}" for c in FIGURES)
        row = self.query(f"SELECT {sums}, {token_sums(sums='COALESCE(SUM({}), 0)')}, {counts} "
                         f"FROM sessions WHERE {where}", [*count_params, *params])[0]
        totals = Totals(usage=usage_of(row), active=row[ACTIVE], idle=row[IDLE], ended=row[ENDED],
                        **{c: row[c] for c in FIGURES})
        if scope.session is None:
            # Requests outside any session still count as their client's traffic.
            sent = self.query("SELECT COALESCE(SUM(requests), 0) AS requests, COALESCE(SUM(failed), 0) AS failed "
                              f"FROM traffic WHERE {where}", params)[0]
            totals.requests += sent["requests"]
            totals.failed += sent["failed"]
        joined, joined_params = scope_clause(scope, "s")
        for row in self.query(f"SELECT m.model, {MODEL_SUMS} FROM session_models m "
                              f"JOIN sessions s ON s.id = m.session_id WHERE {joined} GROUP BY m.model", joined_params):
            totals.by_model[row["model"]] = model_usage(row)
        for row in self.query("SELECT t.tool, SUM(t.calls) AS calls FROM session_tools t "
                              f"JOIN sessions s ON s.id = t.session_id WHERE {joined} GROUP BY t.tool", joined_params):
            totals.by_tool[row["tool"]] = row["calls"]
        return totals

    def legacy_users(self) -> list[LegacyUser]:
        rows = self.query("SELECT user_hash, COUNT(*) AS sessions, SUM(requests) AS requests, "
                          "SUM(input_tokens) AS input_tokens, SUM(output_tokens) AS output_tokens, "
                          "SUM(cost_usd) AS cost_usd, MIN(started) AS first_seen, MAX(last_activity) AS last_seen "
                          "FROM sessions WHERE client_id IS NULL GROUP BY user_hash ORDER BY MAX(last_activity) DESC")
        return [LegacyUser(row["user_hash"], row["sessions"], row["requests"], row["input_tokens"],
                           row["output_tokens"], row["cost_usd"], row["first_seen"], row["last_seen"]) for row in rows]

    def unpriced_models(self) -> list[str]:
        return [row["model"] for row in self.query("SELECT DISTINCT model FROM session_models WHERE priced = 0 "
                                                   "ORDER BY model")]

    def client_activity(self, horizon: Horizon) -> dict[str, tuple[int, float | None]]:
        live, live_params = status_clause(LIVE, horizon)
        rows = self.query(f"SELECT client_id, SUM(CASE WHEN {live} THEN 1 ELSE 0 END) AS live, "
                          "MAX(last_activity) AS last FROM sessions WHERE client_id IS NOT NULL GROUP BY client_id",
                          live_params)
        activity = {row["client_id"]: (row["live"], row["last"]) for row in rows}
        for row in self.query("SELECT client_id, MAX(last_seen) AS last FROM traffic WHERE client_id <> '' "
                              "GROUP BY client_id"):
            live, seen = activity.get(row["client_id"], (0, None))
            activity[row["client_id"]] = (live, max(row["last"], seen or row["last"]))
        return activity


class LedgerWrites(Writes):
    """A transaction's writes to sessions, their shares and tools, and traffic outside sessions."""

    def find_session(self, client: str | None, user: str, claude_session_id: str | None,
                     source: str | None = None) -> Session | None:
        owner = "client_id = ?" if client is not None else "client_id IS NULL AND user_hash = ?"
        key = ("claude_session_id = ?", claude_session_id) if claude_session_id is not None else ("source = ?", source)
        row = self.execute(f"{SESSION_SELECT} WHERE {owner} AND {OPEN} AND {key[0]} ORDER BY last_activity DESC "
                           "LIMIT 1", (client if client is not None else user, key[1])).fetchone()
        return row_session(row) if row else None

    def get_session(self, key: str) -> Session | None:
        row = self.execute(SESSION_BY_KEY, (key, key)).fetchone()
        return row_session(row) if row else None

    def insert_session(self, session: Session) -> None:
        marks = ", ".join("?" for _ in SESSION_COLUMNS)
        self.execute(f"INSERT INTO sessions ({', '.join(SESSION_COLUMNS)}) VALUES ({marks})", session_row(session))

    def save_session(self, session: Session) -> None:
        sets = ", ".join(f"{c} = ?" for c in SESSION_COLUMNS[1:])
        self.execute(f"UPDATE sessions SET {sets} WHERE id = ?", (*session_row(session)[1:], session.id))

    def add_model_usage(self, session_id: str, model: str, price_class: str, usage: Usage, cost_usd: float,
                        savings_usd: float, priced: bool, responses: int = 1) -> None:
        figures = ("requests", *TOKEN_COLUMNS, "cost_usd", "savings_usd")
        adds = ", ".join(f"{c} = session_models.{c} + excluded.{c}" for c in figures)
        columns = ("session_id", "model", "price_class", *figures, "priced")
        self.execute(
            f"INSERT INTO session_models ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) "
            # A share stays unpriced while any of it is: the repricing then prices it whole.
            f"ON CONFLICT (session_id, model, price_class) DO UPDATE SET {adds}, priced = CASE "
            "WHEN excluded.priced < session_models.priced THEN excluded.priced ELSE session_models.priced END",
            (session_id, model, price_class, responses, *usage_values(usage), cost_usd, savings_usd, int(priced)))

    def unpriced_models(self) -> list[str]:
        return [row["model"] for row in self.execute("SELECT model FROM session_models WHERE priced = 0 UNION "
                                                     "SELECT model FROM usage_rollup WHERE priced = 0").fetchall()]

    def unpriced_shares(self, models: list[str]) -> list[tuple[str, str, str, Usage]]:
        if not models:
            return []
        rows = self.execute(f"SELECT session_id, model, price_class, {', '.join(TOKEN_COLUMNS)} FROM session_models "
                            f"WHERE priced = 0 AND model IN ({', '.join('?' for _ in models)})", models).fetchall()
        return [(row["session_id"], row["model"], row["price_class"], usage_of(row)) for row in rows]

    def price_share(self, session_id: str, model: str, price_class: str, cost_usd: float, savings_usd: float) -> None:
        key = (session_id, model, price_class)
        # Part of a share may have been priced when it was recorded: the session gains only the rest.
        old = self.execute("SELECT cost_usd, savings_usd FROM session_models "
                           "WHERE session_id = ? AND model = ? AND price_class = ?", key).fetchone()
        self.execute("UPDATE session_models SET cost_usd = ?, savings_usd = ?, priced = 1 "
                     "WHERE session_id = ? AND model = ? AND price_class = ?", (cost_usd, savings_usd, *key))
        self.execute("UPDATE sessions SET cost_usd = cost_usd + ?, savings_usd = savings_usd + ? WHERE id = ?",
                     (cost_usd - old["cost_usd"], savings_usd - old["savings_usd"], session_id))

    def add_tool_counts(self, session_id: str, tool: str, calls: int, failed: int) -> None:
        self.execute(
            "INSERT INTO session_tools (session_id, tool, calls, failed) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (session_id, tool) DO UPDATE SET calls = session_tools.calls + excluded.calls, "
            "failed = session_tools.failed + excluded.failed", (session_id, tool, calls, failed))

    def add_traffic(self, client: str | None, user: str, requests: int, failed: int, last_seen: float) -> None:
        # A legacy user's traffic has client "" here: NULL would never match the primary key.
        self.execute("INSERT INTO traffic (client_id, user_hash, requests, failed, last_seen) VALUES (?, ?, ?, ?, ?) "
                     "ON CONFLICT (client_id, user_hash) DO UPDATE SET "
                     "requests = traffic.requests + excluded.requests, "
                     "failed = traffic.failed + excluded.failed, "
                     "last_seen = CASE WHEN excluded.last_seen > traffic.last_seen "
                     "THEN excluded.last_seen ELSE traffic.last_seen END",
                     (client or "", user, requests, failed, last_seen))

    def reattribute_sessions(self, user: str, client: str, client_name: str) -> int:
        """Give every legacy session of a key hash, and its events and messages, to a client; return how many."""
        moved = self.execute("UPDATE sessions SET client_id = ?, client_name = ? "
                             "WHERE client_id IS NULL AND user_hash = ? RETURNING id",
                             (client, client_name, user)).fetchall()
        for table in ("events", "messages"):
            self.execute(f"UPDATE {table} SET client_id = ? WHERE client_id IS NULL AND user_hash = ?",
                         (client, user))
        return len(moved)

    def expire_sessions(self, ended_before: float, end_after: float) -> list[Session]:
        rows = self.execute(
            f"UPDATE sessions SET status = '{ENDED}', ended = last_activity + ?, end_reason = 'timeout' "
            f"WHERE {OPEN} AND last_activity < ? RETURNING " + ", ".join(SESSION_COLUMNS),
            (end_after, ended_before)).fetchall()
        return [row_session(r) for r in rows]
