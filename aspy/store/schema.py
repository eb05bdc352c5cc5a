"""The store's tables, written once for SQLite and PostgreSQL, as the migrations that build them.

Migration N brings a store from schema version N - 1 to N; a new store runs them all. Where the
dialects differ the statements name it through the :class:`Dialect`: a few words of DDL and
full-text search, which each dialect states once. Column types are PostgreSQL's names:
SQLite gives ``BIGINT`` integer affinity and ``DOUBLE PRECISION`` real affinity, so they
store exactly what ``INTEGER`` and ``REAL`` would.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

SCHEMA_VERSION = 5

# The six token counts, as every table of figures holds them.
TOKENS = ("input_tokens BIGINT NOT NULL, output_tokens BIGINT NOT NULL, cache_read BIGINT NOT NULL, "
          "cache_write_5m BIGINT NOT NULL, cache_write_1h BIGINT NOT NULL, web_searches BIGINT NOT NULL")


@dataclass(frozen=True)
class Dialect:
    """What a database's DDL, and the upkeep of its text search, say in its own words."""

    # A row id that grows with every insert.
    id_pk: str
    # After a CREATE TABLE whose rows are found by their primary key only.
    without_rowid: str
    # The larger of two values (SQLite's MAX takes two arguments, PostgreSQL's is GREATEST).
    greatest: str
    # A number rounded down to a whole number, as an integer.
    floor: Callable[[str], str]
    # Text search over messages.text (migration 1): an index the searches of the dialect read.
    search: tuple[str, ...]
    # Migration 5: the search index kept up to date once per transaction rather than row by row.
    search_by_transaction: tuple[str, ...] = ()
    # Run by a transaction after it inserts messages, to index them (none where the index keeps itself).
    index_new_messages: tuple[str, ...] = ()


def bucket_of(d: Dialect, seconds: str) -> str:
    """Return the start of the 15-minute bucket of an instant, in SQL."""
    return f"{d.floor(f'{seconds} / 900')} * 900"


def migrations(d: Dialect) -> list[list[str]]:
    """Return the statements of each migration, in this dialect: item N - 1 makes version N."""
    return [
        [
            """CREATE TABLE sessions (
                id TEXT PRIMARY KEY, claude_session_id TEXT, source TEXT NOT NULL, client_id TEXT,
                client_name TEXT, provider TEXT, user_hash TEXT NOT NULL, started DOUBLE PRECISION NOT NULL,
                last_activity DOUBLE PRECISION NOT NULL, status TEXT NOT NULL, ended DOUBLE PRECISION,
                end_reason TEXT, requests BIGINT NOT NULL DEFAULT 0, failed BIGINT NOT NULL DEFAULT 0,
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
            f"""CREATE TABLE session_models (
                session_id TEXT NOT NULL, model TEXT NOT NULL, requests BIGINT NOT NULL, {TOKENS},
                cost_usd DOUBLE PRECISION NOT NULL, savings_usd DOUBLE PRECISION NOT NULL, priced INTEGER NOT NULL,
                PRIMARY KEY (session_id, model))""",
            """CREATE TABLE session_tools (
                session_id TEXT NOT NULL, tool TEXT NOT NULL, calls BIGINT NOT NULL, failed BIGINT NOT NULL,
                PRIMARY KEY (session_id, tool))""",
            f"""CREATE TABLE events (
                id {d.id_pk}, session_id TEXT, client_id TEXT, user_hash TEXT,
                type TEXT NOT NULL, timestamp DOUBLE PRECISION NOT NULL, data TEXT NOT NULL)""",
            "CREATE INDEX events_session ON events (session_id, id)",
            "CREATE INDEX events_time ON events (timestamp)",
            """CREATE TABLE tool_calls (
                tool_use_id TEXT PRIMARY KEY, session_id TEXT NOT NULL, tool TEXT NOT NULL,
                called_at DOUBLE PRECISION NOT NULL)""",
            f"""CREATE TABLE messages (
                id {d.id_pk}, session_id TEXT NOT NULL, client_id TEXT, user_hash TEXT,
                role TEXT NOT NULL, timestamp DOUBLE PRECISION NOT NULL, text TEXT NOT NULL)""",
            "CREATE INDEX messages_time ON messages (timestamp)",
            *d.search,
        ],
        # Log files read by `aspy migrate --import-logs`, so a second import adds nothing.
        [
            """CREATE TABLE imports (
                file_hash TEXT PRIMARY KEY, name TEXT NOT NULL, lines BIGINT NOT NULL,
                imported_at DOUBLE PRECISION NOT NULL)""",
            "CREATE INDEX events_user ON events (user_hash)",
            "CREATE INDEX messages_user ON messages (user_hash)",
        ],
        # Requests that are not Messages calls (probes, model lists, count_tokens): counted, no session.
        [
            """CREATE TABLE traffic (
                client_id TEXT NOT NULL, user_hash TEXT NOT NULL, requests BIGINT NOT NULL,
                failed BIGINT NOT NULL, last_seen DOUBLE PRECISION NOT NULL, PRIMARY KEY (client_id, user_hash))""",
            # Each model's share of a session is kept per price class (fast, batch, US-only...), so
            # tokens recorded before the table knew their model can be priced exactly later.
            f"""CREATE TABLE session_models_priced (
                session_id TEXT NOT NULL, model TEXT NOT NULL, price_class TEXT NOT NULL, requests BIGINT NOT NULL,
                {TOKENS}, cost_usd DOUBLE PRECISION NOT NULL, savings_usd DOUBLE PRECISION NOT NULL,
                priced INTEGER NOT NULL, PRIMARY KEY (session_id, model, price_class))""",
            """INSERT INTO session_models_priced SELECT session_id, model, 'standard', requests, input_tokens,
                output_tokens, cache_read, cache_write_5m, cache_write_1h, web_searches, cost_usd, savings_usd, priced
                FROM session_models""",
            "DROP TABLE session_models",
            "ALTER TABLE session_models_priced RENAME TO session_models",
            "CREATE INDEX session_models_unpriced ON session_models (priced)",
            "CREATE TABLE batches (batch_id TEXT PRIMARY KEY, billed_at DOUBLE PRECISION NOT NULL)",
            # Exchanges recorded lately, so that one given back by a worker's journal is never recorded twice.
            "CREATE TABLE recorded (exchange_id TEXT PRIMARY KEY, recorded_at DOUBLE PRECISION NOT NULL)",
            "CREATE INDEX recorded_at ON recorded (recorded_at)",
        ],
        # Figures over time (GET /api/usage): each exchange's figures in its 15-minute bucket, per
        # session, model and price class; a summary per client in 6-hour blocks; tool calls per bucket.
        [
            f"""CREATE TABLE usage_rollup (
                bucket BIGINT NOT NULL, session_id TEXT NOT NULL, client_id TEXT NOT NULL, user_hash TEXT NOT NULL,
                model TEXT NOT NULL, price_class TEXT NOT NULL, requests BIGINT NOT NULL, failed BIGINT NOT NULL,
                {TOKENS}, cost_usd DOUBLE PRECISION NOT NULL, savings_usd DOUBLE PRECISION NOT NULL,
                priced INTEGER NOT NULL,
                PRIMARY KEY (bucket, session_id, client_id, user_hash, model, price_class)){d.without_rowid}""",
            "CREATE INDEX usage_rollup_session ON usage_rollup (session_id)",
            "CREATE INDEX usage_rollup_client ON usage_rollup (client_id, bucket)",
            "CREATE INDEX usage_rollup_time_of_day ON usage_rollup ((bucket % 86400))",
            "CREATE INDEX usage_rollup_unpriced ON usage_rollup (model) WHERE priced = 0",
            f"""CREATE TABLE usage_rollup_6h (
                block BIGINT NOT NULL, client_id TEXT NOT NULL, model TEXT NOT NULL, price_class TEXT NOT NULL,
                requests BIGINT NOT NULL, failed BIGINT NOT NULL, {TOKENS}, cost_usd DOUBLE PRECISION NOT NULL,
                savings_usd DOUBLE PRECISION NOT NULL, priced INTEGER NOT NULL,
                PRIMARY KEY (block, client_id, model, price_class)){d.without_rowid}""",
            "CREATE INDEX usage_rollup_6h_client ON usage_rollup_6h (client_id, block)",
            f"""CREATE TABLE usage_tools (
                bucket BIGINT NOT NULL, session_id TEXT NOT NULL, tool TEXT NOT NULL, calls BIGINT NOT NULL,
                failed BIGINT NOT NULL, PRIMARY KEY (bucket, session_id, tool)){d.without_rowid}""",
            # Older stores kept no figures over time: each session's go to the bucket of its last
            # activity, traffic outside sessions to that of its last request (docs/api.md says so).
            f"""INSERT INTO usage_rollup SELECT {bucket_of(d, 's.last_activity')}, m.session_id,
                COALESCE(s.client_id, ''), s.user_hash, m.model, m.price_class, m.requests, 0, m.input_tokens,
                m.output_tokens, m.cache_read, m.cache_write_5m, m.cache_write_1h, m.web_searches, m.cost_usd,
                m.savings_usd, m.priced FROM session_models m JOIN sessions s ON s.id = m.session_id""",
            # Failures, and requests no answer billed, have no model there.
            f"""INSERT INTO usage_rollup SELECT {bucket_of(d, 's.last_activity')}, s.id,
                COALESCE(s.client_id, ''), s.user_hash, '', 'standard',
                {d.greatest}(s.requests - COALESCE((SELECT SUM(m.requests) FROM session_models m
                                                    WHERE m.session_id = s.id), 0), 0),
                s.failed, 0, 0, 0, 0, 0, 0, 0, 0, 1 FROM sessions s
                WHERE s.failed > 0 OR s.requests > COALESCE((SELECT SUM(m.requests) FROM session_models m
                                                             WHERE m.session_id = s.id), 0)""",
            f"""INSERT INTO usage_rollup SELECT {bucket_of(d, 'last_seen')}, '', client_id, user_hash, '', '',
                requests, failed, 0, 0, 0, 0, 0, 0, 0, 0, 1 FROM traffic""",
            """INSERT INTO usage_rollup_6h SELECT bucket - bucket % 21600, client_id, model, price_class,
                SUM(requests), SUM(failed), SUM(input_tokens), SUM(output_tokens), SUM(cache_read),
                SUM(cache_write_5m), SUM(cache_write_1h), SUM(web_searches), SUM(cost_usd), SUM(savings_usd),
                MIN(priced) FROM usage_rollup GROUP BY 1, 2, 3, 4""",
            f"""INSERT INTO usage_tools SELECT {bucket_of(d, 's.last_activity')}, t.session_id, t.tool,
                t.calls, t.failed FROM session_tools t JOIN sessions s ON s.id = t.session_id""",
        ],
        list(d.search_by_transaction),
    ]

