"""Figures over time in SQL: each exchange's figures in its 15-minute bucket, and the 6-hour summary.

:class:`RollupWrites` adds a batch's buckets (and keeps the summary's blocks their sums);
:class:`RollupReads` answers ``/api/usage`` from the pieces ``pieces.plan`` splits a question into.
"""
from __future__ import annotations

from typing import Any

from ..records import ModelUsage
from . import BUCKET_SECONDS, Scope, Totals, UsageBucket, UsageRow
from .clauses import Clause, clients_in, given, scope_clause
from .pieces import BLOCK_SECONDS, DAY, Piece, bucket_window, needs_buckets, plan
from .rows import TOKEN_COLUMNS, Reads, Writes, usage_of, usage_values

ROLLUP_KEYS = ("bucket", "session_id", "client_id", "user_hash", "model", "price_class")
BLOCK_KEYS = ("block", "client_id", "model", "price_class")
ROLLUP_FIGURES = ("requests", "failed", *TOKEN_COLUMNS, "cost_usd", "savings_usd")
# Windows longer than this read the buckets around each midnight through the time-of-day index.
BAND_BY_TIME_OF_DAY = 30 * DAY
# What a usage question groups by, and the column each is read from.
GROUPS = {"day": "day", "client": "client_id", "model": "model", "session": "session_id"}


def sums(sign: str = "") -> str:
    """Return the SUMs of the rollup's figures, with counts as whole numbers.

    PostgreSQL's SUM of a BIGINT is a NUMERIC, which the driver reads one Python Decimal at a time.
    """
    return ", ".join(f"SUM({sign}{c}) AS {c}" if c in ("cost_usd", "savings_usd") else
                     f"CAST(SUM({sign}{c}) AS BIGINT) AS {c}" for c in ROLLUP_FIGURES)


def figures_of(bucket: UsageBucket) -> tuple[Any, ...]:
    """Return a bucket's figures in ROLLUP_FIGURES order."""
    return (bucket.requests, bucket.failed, *usage_values(bucket.usage), bucket.cost_usd, bucket.savings_usd)


def usage_scope(scope: Scope, fine: bool) -> Clause:
    """Return a WHERE fragment selecting a scope's rows of the rollup (``fine``) or of its 6-hour summary."""
    parts, params = [], []
    if scope.client is not None:
        parts.append("client_id = ?")
        params.append(scope.client)
    if scope.clients is not None:
        parts.append(clients_in("client_id", scope.clients))
        params += scope.clients
    if fine and scope.user is not None:
        parts.append(f"(user_hash = ? OR {clients_in('client_id', scope.user_clients)})")
        params += [scope.user, *scope.user_clients]
    if fine and scope.session is not None:
        parts.append("session_id IN (SELECT id FROM sessions WHERE id = ? OR claude_session_id = ?)")
        params += [scope.session, scope.session]
    return (" AND ".join(parts) or "1 = 1"), params


def usage_row(row: dict[str, Any]) -> UsageRow:
    """Return a group's figures, from a merged row of a usage question's pieces."""
    return UsageRow(day=row.get("day"), client=row.get("client_id") or None, model=row.get("model") or None,
                    session=row.get("session_id") or None, claude_session_id=row.get("claude_session_id"),
                    requests=row["requests"], failed=row["failed"], usage=usage_of(row), cost_usd=row["cost_usd"],
                    savings_usd=row["savings_usd"])


class RollupReads(Reads):
    """Figures over time, summed over windows and grouped as asked."""

    def usage(self, scope: Scope, since: float | None, until: float | None, by: tuple[str, ...],
              offsets: list[tuple[float, float, int]]) -> list[UsageRow]:
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
        names = [column for key, column in GROUPS.items() if key in by]
        selects, params = [], []
        for piece in pieces:
            sql, piece_params = self._piece(piece, names, scope)
            selects.append(sql)
            params += piece_params
        # The pieces' rows are added up here: a dict does it quicker than a second GROUP BY over them.
        keys = [*names, *(["claude_session_id"] if "session_id" in names else [])]
        merged: dict[tuple, list] = {}
        for row in self.query(" UNION ALL ".join(selects), params):
            figures = [row[c] for c in ROLLUP_FIGURES]
            if figures[0] is None:
                continue  # a piece with no rows
            key = tuple(row[k] for k in keys)
            found = merged.get(key)
            merged[key] = figures if found is None else [a + b for a, b in zip(found, figures)]
        # A group of only buckets moved to another day has nothing left in its own: left out.
        return [usage_row(dict(zip((*keys, *ROLLUP_FIGURES), (*key, *figures))))
                for key, figures in merged.items() if any(figures[:-2])]

    def _piece(self, piece: Piece, names: list[str], scope: Scope) -> Clause:
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
            keys.append("(SELECT claude_session_id FROM sessions WHERE id = session_id) AS claude_session_id")
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

    def usage_span(self, scope: Scope) -> tuple[int, int] | None:
        fine = needs_buckets(scope, ())
        table, column, size = ("usage_rollup", "bucket", BUCKET_SECONDS) if fine else \
            ("usage_rollup_6h", "block", BLOCK_SECONDS)
        scoped, params = usage_scope(scope, fine)
        row = self.query(f"SELECT MIN({column}) AS first, MAX({column}) AS last FROM {table} WHERE {scoped}",
                         params)[0]
        return None if row["first"] is None else (row["first"], row["last"] + size)

    def usage_unpriced(self, scope: Scope, since: float | None, until: float | None) -> list[str]:
        first, last = bucket_window(since, until)
        window, window_params = given(("bucket >= ?", first), ("bucket < ?", last))
        scoped, params = usage_scope(scope, True)
        return [row["model"] for row in self.query(
            f"SELECT DISTINCT model FROM usage_rollup WHERE priced = 0 AND {window} AND {scoped} ORDER BY model",
            [*window_params, *params])]

    def window_totals(self, scope: Scope, since: float | None, until: float | None) -> Totals:
        """Sum the figures of the exchanges in a window (by bucket), with its tool calls."""
        totals = Totals()
        unpriced = set(self.usage_unpriced(scope, since, until))
        for row in self.usage(scope, since, until, ("model",), []):
            totals.add(row)
            if row.model is not None:
                totals.by_model[row.model] = ModelUsage(row.requests, row.usage, row.cost_usd, row.savings_usd,
                                                        row.model not in unpriced)
        first, last = bucket_window(since, until)
        joined, joined_params = scope_clause(scope, "s")
        for tools in self.query(
                "SELECT t.tool, SUM(t.calls) AS calls, SUM(t.failed) AS failed FROM usage_tools t "
                f"JOIN sessions s ON s.id = t.session_id WHERE t.bucket >= ? AND t.bucket < ? AND {joined} "
                "GROUP BY t.tool", [first if first is not None else 0, last if last is not None else 2 ** 62,
                                    *joined_params]):
            totals.tool_calls += tools["calls"]
            totals.tool_failed += tools["failed"]
            if tools["calls"]:
                totals.by_tool[tools["tool"]] = tools["calls"]
        return totals


class RollupWrites(Writes):
    """A transaction's figures over time: added, priced, and moved to a client."""

    def add_usage(self, buckets: list[UsageBucket]) -> None:
        if not buckets:
            return
        self._add_rows("usage_rollup", ROLLUP_KEYS, [
            (b.start, b.session or "", b.client or "", b.user, b.model or "", b.price_class, *figures_of(b),
             int(b.priced)) for b in buckets])
        blocks: dict[tuple, list] = {}
        for b in buckets:
            key = (b.start - b.start % BLOCK_SECONDS, b.client or "", b.model or "", b.price_class)
            block = blocks.setdefault(key, [0] * len(ROLLUP_FIGURES) + [1])
            for i, value in enumerate(figures_of(b)):
                block[i] += value
            block[-1] = min(block[-1], int(b.priced))
        self._add_rows("usage_rollup_6h", BLOCK_KEYS, [(*key, *block) for key, block in blocks.items()])

    def _add_rows(self, table: str, keys: tuple[str, ...], rows: list[tuple]) -> None:
        """Add figures to rows of the rollup or its summary, creating them as needed."""
        columns = (*keys, *ROLLUP_FIGURES, "priced")
        adds = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in ROLLUP_FIGURES)
        self.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) "
            # A row stays unpriced while any of it is: the repricing then prices it whole.
            f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {adds}, priced = CASE "
            f"WHEN excluded.priced < {table}.priced THEN excluded.priced ELSE {table}.priced END", rows)

    def add_tool_usage(self, rows: list[tuple[int, str, str, int, int]]) -> None:
        if rows:
            self.executemany(
                "INSERT INTO usage_tools (bucket, session_id, tool, calls, failed) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (bucket, session_id, tool) DO UPDATE SET calls = usage_tools.calls + excluded.calls, "
                "failed = usage_tools.failed + excluded.failed", rows)

    def set_usage_user(self, session_id: str, user: str) -> None:
        # The summary has no key hash: only the buckets change.
        self.execute("UPDATE usage_rollup SET user_hash = ? WHERE session_id = ? AND user_hash <> ?",
                     (user, session_id, user))

    def unpriced_usage(self, models: list[str]) -> list[UsageBucket]:
        if not models:
            return []
        rows = self.execute(f"SELECT {', '.join(ROLLUP_KEYS)}, {', '.join(TOKEN_COLUMNS)} FROM usage_rollup "
                            f"WHERE priced = 0 AND model IN ({', '.join('?' for _ in models)})", models).fetchall()
        return [UsageBucket(row["bucket"], row["session_id"] or None, row["client_id"] or None, row["user_hash"],
                            row["model"], row["price_class"], usage=usage_of(row), priced=False) for row in rows]

    def price_usage(self, priced: list[tuple[UsageBucket, float, float]]) -> None:
        if not priced:
            return
        self.executemany(
            "UPDATE usage_rollup SET cost_usd = ?, savings_usd = ?, priced = 1 WHERE "
            + " AND ".join(f"{k} = ?" for k in ROLLUP_KEYS),
            [(cost, savings, b.start, b.session or "", b.client or "", b.user, b.model, b.price_class)
             for b, cost, savings in priced])
        self._rebuild_blocks({(b.start - b.start % BLOCK_SECONDS, b.client or "", b.model, b.price_class)
                              for b, _, _ in priced})

    def reattribute_usage(self, user: str, client: str) -> None:
        """Give the figures over time of a key hash's legacy sessions to a client."""
        # Traffic outside sessions stays the key's, as in `traffic`.
        legacy = "client_id = '' AND user_hash = ? AND session_id <> ''"
        touched = self.execute(f"SELECT DISTINCT bucket - bucket % {BLOCK_SECONDS} AS block, model, price_class "
                               f"FROM usage_rollup WHERE {legacy}", (user,)).fetchall()
        self.execute(f"UPDATE usage_rollup SET client_id = ? WHERE {legacy}", (client, user))
        self._rebuild_blocks({(row["block"], owner, row["model"], row["price_class"]) for row in touched
                              for owner in ("", client)})

    def _rebuild_blocks(self, keys: set[tuple[int, str, str | None, str]]) -> None:
        """Add up these rows of the 6-hour summary again from the buckets they hold."""
        if not keys:
            return
        match = " AND ".join(f"{k} = ?" for k in BLOCK_KEYS)
        self.executemany(f"DELETE FROM usage_rollup_6h WHERE {match}", list(keys))
        self.executemany(
            f"INSERT INTO usage_rollup_6h ({', '.join(BLOCK_KEYS)}, {', '.join(ROLLUP_FIGURES)}, priced) "
            f"SELECT ?, client_id, model, price_class, {', '.join(f'SUM({c})' for c in ROLLUP_FIGURES)}, "
            "MIN(priced) FROM usage_rollup "
            "WHERE bucket >= ? AND bucket < ? AND client_id = ? AND model = ? AND price_class = ? "
            "GROUP BY client_id, model, price_class",
            [(block, block, block + BLOCK_SECONDS, client, model, klass) for block, client, model, klass in keys])
