"""The store's contract, in-process on SQLite (and on PostgreSQL when ASPY_TEST_POSTGRES_URL is set).

Each test opens a store of its own: a file in tmp_path, or a PostgreSQL schema of the test
database. Old stores are built with the DDL aspy wrote for schema versions 1 to 3, kept here
as it was, so that what a migration does to a real old store stays tested.
"""
from __future__ import annotations

import re
import sqlite3
import statistics
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import fields, replace
from urllib.parse import quote

import psycopg
import pytest

from aspy.records import ENDED, Event, Message, ModelUsage, Session, Usage, exchange_id
from aspy.store import Horizon, Scope, StoreError, UsageBucket, open_store
from aspy.store import postgres as postgres_dialect
from aspy.store import sqlite as sqlite_dialect
from aspy.store.rows import USAGE_COLUMNS
from aspy.store.schema import SCHEMA_VERSION, migrations
from helpers import POSTGRES_URL

DAY = 86400
# 2026-11-10T00:00:00Z.
T0 = 1_794_268_800
SONNET, UNKNOWN = "claude-sonnet-4-5-20250929", "claude-in-house-9"
ALL = Horizon(0, 0)
# Six different counts, so a count read from another's column shows.
TOKENS = Usage(101, 202, 303, 404, 505, 6)


@pytest.fixture
def new_url(store_kind, tmp_path):
    """Return a function that gives the URL of a new, empty store of this kind."""
    schemas = []

    def make() -> str:
        name = f"aspy_test_{uuid.uuid4().hex[:12]}"
        if store_kind == "sqlite":
            return f"sqlite:///{tmp_path / name}.db"
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {name}")
        schemas.append(name)
        return f"{POSTGRES_URL}{'&' if '?' in POSTGRES_URL else '?'}options={quote(f'-csearch_path={name}')}"

    yield make
    for name in schemas:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {name} CASCADE")


@pytest.fixture
def url(new_url):
    """The URL of a new, empty store."""
    return new_url()


@pytest.fixture
def store(url):
    """A new store, open."""
    opened = open_store(url)
    yield opened
    opened.close()


@contextmanager
def raw(url: str):
    """Connect to a store's database past aspy; yield a function that runs one statement with ``?`` placeholders."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None)
        try:
            yield lambda sql, params=(): conn.execute(sql, params).fetchall()
        finally:
            conn.close()
        return
    with psycopg.connect(url, autocommit=True) as pg:

        def run(sql: str, params: tuple = ()) -> list:
            cur = pg.execute(sql.replace("?", "%s"), params or None)
            return cur.fetchall() if cur.description else []

        yield run


def session(sid: str, client: str | None = "ana", at: float = T0, **figures) -> Session:
    """Return a session of a client (or of a legacy key hash, without one) that started at an instant."""
    return Session(id=sid, claude_session_id=f"claude-{sid}", source="claude-code", client=client,
                   client_name=client and client.title(), provider="anthropic", user=f"key-{client or sid}",
                   started=at, last_activity=at, **figures)


def bucket(at: float, sid: str | None, client: str | None, model: str | None, usage: Usage = TOKENS,
           requests: int = 1, cost: float = 0.25, priced: bool = True) -> UsageBucket:
    """Return the figures of exchanges in the bucket starting at an instant."""
    return UsageBucket(at - at % 900, sid, client, f"key-{client or sid}", model, "standard", requests=requests,
                       usage=usage, cost_usd=cost, savings_usd=cost / 10, priced=priced)


def test_usage_columns_name_every_token_count():
    assert list(USAGE_COLUMNS) == [f.name for f in fields(Usage)]


def test_every_dialect_has_every_migration():
    for dialect in (sqlite_dialect.DIALECT, postgres_dialect.DIALECT):
        assert len(migrations(dialect)) == SCHEMA_VERSION


def test_a_new_store_is_created_at_the_current_version_on_first_use(store_kind, url):
    store = open_store(url)
    try:
        assert store.inspect()["schema_version"] is None
        assert store.check()["schema_version"] == SCHEMA_VERSION
        info = store.inspect()
        assert (info["kind"], info["schema_version"], info["expected_version"]) == \
            (store_kind, SCHEMA_VERSION, SCHEMA_VERSION)
    finally:
        store.close()


def test_a_store_newer_than_this_aspy_is_refused(store, url):
    store.check()
    with raw(url) as run:
        run("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    newer = open_store(url)
    try:
        assert newer.inspect()["schema_version"] == 99
        with pytest.raises(StoreError, match="newer than this aspy understands"):
            newer.check()
    finally:
        newer.close()


def test_a_session_reads_back_every_field_by_name(store):
    numbers = dict(requests=7, failed=2, usage=TOKENS, cost_usd=1.25, savings_usd=0.5, tool_calls=9,
                   tool_failed=3, thinking_blocks=4, ttfb_total_ms=812.5, ttfb_count=5, context_model=SONNET,
                   context_tokens=150_000, context_limit=200_000, compactions=1)
    written = session("s1", **numbers)
    with store.transaction() as tx:
        tx.insert_session(written)
        assert tx.get_session("s1") == written
    assert store.get_session("claude-s1") == written
    later = replace(written, last_activity=T0 + 60, usage=TOKENS + TOKENS, status=ENDED, ended=T0 + 90,
                    end_reason="timeout")
    with store.transaction() as tx:
        tx.save_session(later)
    assert store.get_session("s1") == later
    assert store.sessions(Scope(client="ana"), None, ALL, 10) == [later]


def test_the_open_session_of_an_identity_is_found_by_claude_session_id_or_by_source(store):
    with store.transaction() as tx:
        tx.insert_session(session("mine"))
        tx.insert_session(session("legacy", client=None))
        tx.insert_session(replace(session("other"), claude_session_id=None, source="sdk"))
        tx.insert_session(replace(session("over"), claude_session_id="claude-done", status=ENDED))
    with store.transaction() as tx:
        assert tx.find_session("ana", "key-ana", "claude-mine").id == "mine"
        assert tx.find_session(None, "key-legacy", "claude-legacy").id == "legacy"
        assert tx.find_session("ana", "key-ana", None, source="sdk").id == "other"
        assert tx.find_session("bob", "key-ana", "claude-mine") is None
        assert tx.find_session("ana", "key-ana", "claude-done") is None


def test_a_models_share_adds_up_and_stays_unpriced_while_any_of_it_is(store):
    with store.transaction() as tx:
        tx.insert_session(session("s1"))
        tx.add_model_usage("s1", UNKNOWN, "standard", TOKENS, 0.5, 0.25, True)
        tx.add_model_usage("s1", UNKNOWN, "standard", TOKENS, 0.0, 0.0, False, responses=2)
        tx.add_model_usage("s1", SONNET, "batch", TOKENS, 1.0, 0.0, True)
        tx.add_tool_counts("s1", "Read", 2, 1)
        tx.add_tool_counts("s1", "Read", 1, 0)
    found = store.get_session("s1")
    assert found.by_model == {UNKNOWN: ModelUsage(3, TOKENS + TOKENS, 0.5, 0.25, False),
                              SONNET: ModelUsage(1, TOKENS, 1.0, 0.0, True)}
    assert found.by_tool == {"Read": [3, 1]}
    assert store.unpriced_models() == [UNKNOWN]
    with store.transaction() as tx:
        assert tx.unpriced_shares([UNKNOWN]) == [("s1", UNKNOWN, "standard", TOKENS + TOKENS)]
        tx.price_share("s1", UNKNOWN, "standard", 2.0, 1.0)
    found = store.get_session("s1")
    # The session gains only what the share had not been priced at.
    assert (found.cost_usd, found.savings_usd) == (1.5, 0.75)
    assert found.by_model[UNKNOWN] == ModelUsage(3, TOKENS + TOKENS, 2.0, 1.0, True)
    assert store.unpriced_models() == []


def test_totals_add_sessions_and_traffic_outside_them(store):
    with store.transaction() as tx:
        tx.insert_session(session("s1", at=T0, requests=3, failed=1, usage=TOKENS, cost_usd=1.0, tool_calls=2))
        tx.insert_session(session("s2", at=T0 + 3600, requests=1, usage=TOKENS, cost_usd=0.5))
        tx.insert_session(session("s3", client="bob", at=T0, requests=5))
        tx.add_model_usage("s1", SONNET, "standard", TOKENS, 1.0, 0.0, True)
        tx.add_tool_counts("s1", "Bash", 2, 0)
        tx.add_traffic("ana", "key-ana", 4, 1, T0 + 7200)
        tx.add_traffic("ana", "key-ana", 1, 0, T0 + 60)
    totals = store.totals(Scope(client="ana"), Horizon(T0 + 1800, T0 - 1))
    assert (totals.requests, totals.failed, totals.usage, totals.cost_usd) == (3 + 1 + 5, 1 + 1, TOKENS + TOKENS, 1.5)
    assert (totals.tool_calls, totals.by_tool, totals.by_model) == (2, {"Bash": 2},
                                                                    {SONNET: ModelUsage(1, TOKENS, 1.0, 0.0, True)})
    assert (totals.active, totals.idle, totals.ended) == (1, 1, 0)
    assert store.totals(Scope(session="claude-s1"), ALL).requests == 3
    assert store.client_activity(Horizon(0, T0 + 1)) == {"ana": (1, T0 + 7200), "bob": (0, T0)}


def test_events_read_back_newest_first_by_type_window_and_scope(store):
    with store.transaction() as tx:
        tx.insert_session(session("s1"))
        tx.insert_session(session("s2", client="bob"))
        tx.add_events([Event("request", T0 + n, "s1" if n % 2 else "s2", None, "key", {"n": n, "ü": [n]})
                       for n in range(6)] + [Event("error", T0 + 10, None, "ana", "key")])
    every = store.events(Scope(), [], None, 100)
    assert [e.timestamp for e in every] == [T0 + 10, *(T0 + n for n in reversed(range(6)))]
    assert every[1].data == {"n": 5, "ü": [5]} and every[1].session == "s1" and every[1].id is not None
    assert [e.data["n"] for e in store.events(Scope(client="ana"), ["request"], T0 + 2, 100, until=T0 + 5)] == [3]
    assert [e.type for e in store.events(Scope(), ["error", "session_end"], None, 100)] == ["error"]
    assert len(store.events(Scope(), [], None, 2)) == 2


def test_search_finds_prompts_and_answers_holding_every_word(store):
    with store.transaction() as tx:
        tx.insert_session(session("s1"))
        tx.insert_session(session("s2", client="bob"))
        tx.add_messages([Message("s1", "ana", "key-ana", "user", T0, "the quick brown fox jumps"),
                         Message("s1", "ana", "key-ana", "assistant", T0 + 5, "a brown dog sleeps"),
                         Message("s2", "bob", "key-bob", "user", T0 + 9, "brown fox again")])
    total, hits = store.search(["brown", "fox"], None, None, Scope(), None, 10)
    assert total == 2 and {h.session for h in hits} == {"s1", "s2"}
    assert all("**" in h.snippet for h in hits) and all(h.score > 0 for h in hits)
    assert store.search(["brown"], None, None, Scope(client="ana"), "assistant", 10)[1][0].timestamp == T0 + 5
    assert store.search(["brown"], T0 + 1, T0 + 9, Scope(), None, 10)[0] == 1
    assert store.search(["cat"], None, None, Scope(), None, 10) == (0, [])


def searched(store, word: str) -> list[str]:
    """Return the sessions of every message holding a word, in order."""
    total, hits = store.search([word], None, None, Scope(), None, 100)
    assert total == len(hits)
    return sorted(h.session for h in hits)


def fts_intact(url: str) -> None:
    """Check SQLite's search index against the messages it indexes (PostgreSQL's is a column of the row)."""
    if url.startswith("sqlite:///"):
        with raw(url) as run:
            # Raises if the index holds a message that is not there, or as it is not.
            run("INSERT INTO messages_fts (messages_fts, rank) VALUES ('integrity-check', 1)")


def test_search_finds_messages_an_aspy_of_the_previous_schema_inserts_beside_this_one(store, url):
    # During an upgrade, a worker of the aspy before schema 5 may still insert messages, leaving
    # them to a trigger that is gone: this aspy's next transaction indexes them, each once.
    with store.transaction() as tx:
        tx.add_messages([Message("a", "ana", "key-a", "user", T0, "the quick brown fox")])
    with raw(url) as run:
        run("INSERT INTO messages (session_id, client_id, user_hash, role, timestamp, text) "
            "VALUES ('b', 'ana', 'key-b', 'user', ?, 'a zanzibar quokka and a fox')", (T0 + 1,))
    with store.transaction() as tx:
        tx.add_messages([Message("c", "ana", "key-c", "assistant", T0 + 2, "the lazy fox"),
                         Message("c", "ana", "key-c", "user", T0 + 3, "and another fox")])
    with store.transaction() as tx:
        tx.add_messages([Message("d", "ana", "key-d", "user", T0 + 4, "no animal here")])
    assert (searched(store, "quokka"), searched(store, "fox")) == (["b"], ["a", "b", "c", "c"])
    fts_intact(url)
    with store.transaction() as tx:
        tx.prune([], 100, T0 + 2)
    assert (searched(store, "quokka"), searched(store, "fox"), searched(store, "animal")) == ([], ["c", "c"], ["d"])
    fts_intact(url)


def test_a_store_of_schema_4_keeps_its_search_index_and_indexes_new_messages_once(store_kind, new_url):
    url, fresh = new_url(), new_url()
    dialect = sqlite_dialect.DIALECT if store_kind == "sqlite" else postgres_dialect.DIALECT
    with raw(url) as run:
        run("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        for statements in migrations(dialect)[:4]:
            for statement in statements:
                run(statement)
        run("INSERT INTO meta (key, value) VALUES ('schema_version', '4')")
        run("INSERT INTO messages (session_id, client_id, user_hash, role, timestamp, text) "
            "VALUES ('a', 'ana', 'key-a', 'user', ?, 'the quick brown fox')", (T0,))
    store = open_store(url)
    try:
        assert store.check()["schema_version"] == SCHEMA_VERSION
        with store.transaction() as tx:
            tx.add_messages([Message("b", "ana", "key-b", "user", T0 + 1, "a brown fox")])
        assert (searched(store, "fox"), searched(store, "quick")) == (["a", "b"], ["a"])
        fts_intact(url)
    finally:
        store.close()
    new = open_store(fresh)
    new.check()
    new.close()
    assert schema_of(url) == schema_of(fresh)


class Counting:
    """A cursor that counts the statements it runs."""

    def __init__(self, cursor):
        self.cursor, self.sent = cursor, 0

    def execute(self, *args, **kwargs):
        self.sent += 1
        return self.cursor.execute(*args, **kwargs)

    def executemany(self, statement, rows, **kwargs):
        self.sent += len(rows)
        return self.cursor.executemany(statement, rows, **kwargs)


def test_a_batch_inserts_many_rows_in_few_statements_and_upserts_row_by_row(store):
    """A statement per row was most of the writer's time under load: a GIL wait each; on PostgreSQL, a round trip."""
    with store.transaction() as tx:
        tx.cur = counting = Counting(tx.cur)
        tx.mark_recorded([f"many-{i}" for i in range(2500)], 1.0)
        inserted = counting.sent
        # Two rows for one key in one upsert: one statement would update the row twice, which PostgreSQL refuses.
        tx.add_tool_usage([(0, "s_1", "Read", 1, 0), (0, "s_1", "Read", 2, 1)])
        tx.add_messages([Message("a", "ana", "key-a", "user", T0 + i, f"message {i} of many") for i in range(1500)])
    assert inserted == 3  # 1,000 rows at a time
    assert store.query("SELECT COUNT(*) AS n FROM recorded WHERE exchange_id LIKE 'many-%'")[0]["n"] == 2500
    assert [dict(r) for r in store.query("SELECT calls, failed FROM usage_tools")] == [{"calls": 3, "failed": 1}]
    # In the order given, each once.
    assert [r["text"] for r in store.query("SELECT text FROM messages ORDER BY id")] == \
        [f"message {i} of many" for i in range(1500)]
    assert store.search(["many"], None, None, Scope(), None, 10)[0] == 1500


def test_exchanges_batches_and_log_files_count_once(store):
    with store.transaction() as tx:
        assert tx.already_recorded(["a", "b"]) == set()
        tx.mark_recorded(["a", "b"], T0)
        tx.mark_recorded(["b"], T0)
        assert tx.already_recorded(["a", "c"]) == {"a"}
        assert tx.first_billing_of_batch("msgbatch_1", T0) and not tx.first_billing_of_batch("msgbatch_1", T0)
        assert tx.mark_imported("f00d", "aspy.log", 12) and not tx.mark_imported("f00d", "aspy.log.1", 12)


def test_a_pending_tool_call_is_taken_once(store):
    with store.transaction() as tx:
        tx.add_tool_call("toolu_1", "s1", "Read", T0)
        tx.add_tool_call("toolu_1", "s1", "Bash", T0 + 1)
    with store.transaction() as tx:
        assert tx.take_tool_call("toolu_1") == ("s1", "Read", T0)
        assert tx.take_tool_call("toolu_1") is None


def test_expiry_ends_quiet_sessions_and_pruning_keeps_the_last_events(store):
    with store.transaction() as tx:
        tx.insert_session(session("quiet", at=T0))
        tx.insert_session(session("busy", at=T0 + 5000))
        tx.add_events([Event("request", T0 + n, "quiet", "ana", "key") for n in range(5)])
        tx.add_messages([Message("quiet", "ana", "key", "user", T0 - 10, "old words")])
    with store.transaction() as tx:
        [ended] = tx.expire_sessions(T0 + 100, 1800)
        assert (ended.id, ended.status, ended.ended, ended.end_reason) == ("quiet", ENDED, T0 + 1800, "timeout")
        tx.prune(["quiet"], 2, T0 - 1)
    assert [s.id for s in store.sessions(Scope(), ENDED, ALL, 10)] == ["quiet"]
    assert [e.timestamp for e in store.events(Scope(), [], None, 10)] == [T0 + 4, T0 + 3]
    assert store.search(["words"], None, None, Scope(), None, 10)[0] == 0


def test_a_legacy_key_hash_goes_to_a_client_with_its_figures_over_time(store):
    with store.transaction() as tx:
        tx.insert_session(session("old", client=None, requests=2, usage=TOKENS, cost_usd=0.5))
        tx.add_usage([bucket(T0, "old", None, SONNET, requests=2)])
        tx.add_events([Event("request", T0, "old", None, "key-old")])
    [legacy] = store.legacy_users()
    assert (legacy.user, legacy.sessions, legacy.requests, legacy.input_tokens, legacy.output_tokens) == \
        ("key-old", 1, 2, TOKENS.input_tokens, TOKENS.output_tokens)
    with store.transaction() as tx:
        assert tx.reattribute("key-old", "ana", "Ana") == 1
    assert store.legacy_users() == []
    assert store.get_session("old").client == "ana" and store.events(Scope(), [], None, 1)[0].client == "ana"
    # The 6-hour summary moved too: a question by client reads it.
    [row] = store.usage(Scope(), None, None, ("client",), [])
    assert (row.client, row.requests, row.usage) == ("ana", 2, TOKENS)


def test_figures_over_time_read_the_same_from_the_summary_and_the_buckets(store):
    # Across a day, with a zone five and a half hours ahead of UTC: midnight falls inside a 6-hour block.
    at = [T0 + h * 3600 for h in range(0, 48, 5)]
    with store.transaction() as tx:
        tx.add_usage([bucket(t, f"s{n % 3}", ("ana", "bob")[n % 2], SONNET) for n, t in enumerate(at)])
        tx.add_usage([bucket(at[0], "s0", "ana", SONNET)])
    offset = 5 * 3600 + 1800
    by_day = {}
    for t in at:
        by_day[(t + offset) // DAY] = by_day.get((t + offset) // DAY, 0) + 1
    by_day[(at[0] + offset) // DAY] += 1
    zone = [(T0 - DAY, T0 + 3 * DAY, offset)]
    fast = store.usage(Scope(), None, None, ("day",), zone)
    slow = store.usage(Scope(), None, None, ("day", "session"), zone)
    assert {r.day: r.requests for r in fast} == by_day
    assert {d: sum(r.requests for r in slow if r.day == d) for d in by_day} == by_day
    assert {r.claude_session_id for r in slow} == {None}
    assert sum((r.usage for r in fast), Usage()) == Usage(*(n * (len(at) + 1) for n in TOKENS.astuple()))
    # The span is read from the 6-hour summary, or from the buckets where the summary cannot say (a key hash).
    assert store.usage_span(Scope()) == (T0, T0 + 2 * DAY)
    assert store.usage_span(Scope(user="key-bob")) == (at[1], at[-1] + 900)
    assert store.usage_span(Scope(client="carol")) is None


def test_a_window_counts_the_buckets_that_start_in_it(store):
    with store.transaction() as tx:
        tx.insert_session(replace(session("s1", at=T0), last_activity=T0 + 3000))
        tx.add_usage([bucket(T0 + n * 900, "s1", "ana", SONNET, cost=1.0) for n in range(4)])
        tx.add_tool_usage([(T0 + 900, "s1", "Read", 2, 1), (T0 + 2700, "s1", "Read", 5, 0)])
    window = store.totals(Scope(), ALL, T0 + 1, T0 + 2700)
    assert (window.requests, window.usage, window.cost_usd) == (2, TOKENS + TOKENS, 2.0)
    assert (window.tool_calls, window.tool_failed, window.by_tool) == (2, 1, {"Read": 2})
    assert window.by_model == {SONNET: ModelUsage(2, TOKENS + TOKENS, 2.0, 0.2, True)}
    assert window.active == 1


def test_buckets_recorded_without_a_price_are_priced_later(store):
    with store.transaction() as tx:
        tx.add_usage([bucket(T0, "s1", "ana", UNKNOWN, cost=0.0, priced=False),
                      bucket(T0 + 900, "s1", "ana", UNKNOWN, cost=0.0, priced=False),
                      bucket(T0, "s2", "bob", SONNET)])
    assert store.usage_unpriced(Scope(), None, None) == [UNKNOWN]
    assert store.usage_unpriced(Scope(), T0 + 1800, None) == []
    with store.transaction() as tx:
        assert tx.unpriced_models() == [UNKNOWN]
        waiting = tx.unpriced_usage([UNKNOWN])
        assert sorted((b.start, b.session, b.client, b.user, b.usage) for b in waiting) == \
            [(T0, "s1", "ana", "key-ana", TOKENS), (T0 + 900, "s1", "ana", "key-ana", TOKENS)]
        tx.price_usage([(b, 3.0, 1.0) for b in waiting])
    assert store.usage_unpriced(Scope(), None, None) == []
    # By model the 6-hour summary answers, by session the buckets: both were priced.
    assert {r.model: r.cost_usd for r in store.usage(Scope(), None, None, ("model",), [])} == \
        {UNKNOWN: 6.0, SONNET: 0.25}
    assert {r.session: r.cost_usd for r in store.usage(Scope(), None, None, ("session",), [])} == \
        {"s1": 6.0, "s2": 0.25}


# The old stores' figures: (id, client, last activity, requests, failed, tokens, model, cost, priced, status).
OLD_SESSIONS = [("a", "ana", T0 + DAY + 3600, 3, 1, TOKENS, SONNET, 0.75, 1, "active"),
                ("b", None, T0 + 7200, 2, 0, Usage(7, 8, 9, 10, 11, 12), UNKNOWN, 0.0, 0, ENDED)]
TOKEN_NAMES = "input_tokens, output_tokens, cache_read, cache_write_5m, cache_write_1h, web_searches"


def build_old_store(url: str, kind: str, version: int) -> None:
    """Make a store as aspy at a schema version left it, holding OLD_SESSIONS and their traces."""
    with raw(url) as run:
        run("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        for v in range(1, version + 1):
            for statement in OLD_MIGRATIONS[kind][v]:
                run(statement)
        run("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(version),))
        klass = ", price_class" if version >= 3 else ""
        for sid, client, last, requests, failed, usage, model, cost, priced, status in OLD_SESSIONS:
            run("INSERT INTO sessions (id, claude_session_id, source, client_id, client_name, provider, user_hash, "
                f"started, last_activity, status, requests, failed, {TOKEN_NAMES}, cost_usd, savings_usd, "
                "tool_calls, tool_failed) VALUES (?, ?, 'claude-code', ?, ?, 'anthropic', ?, ?, ?, ?, ?, ?, "
                "?, ?, ?, ?, ?, ?, ?, 0, ?, ?)", (sid, f"claude-{sid}", client, client, f"key-{sid}", T0, last,
                                                 status, requests, failed, *usage.astuple(), cost, 2 * failed, failed))
            run(f"INSERT INTO session_models (session_id, model{klass}, requests, {TOKEN_NAMES}, cost_usd, "
                f"savings_usd, priced) VALUES (?, ?{', ?' * bool(klass)}, 2, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
                (sid, model, *(["standard"] if klass else []), *usage.astuple(), cost, priced))
        run("INSERT INTO session_tools VALUES ('a', 'Read', 2, 1)")
        run("INSERT INTO events (session_id, client_id, user_hash, type, timestamp, data) VALUES "
            "('a', 'ana', 'key-a', 'request', ?, '{\"n\": 1}'), ('b', NULL, 'key-b', 'error', ?, '{}')", (T0, T0 + 5))
        run("INSERT INTO messages (session_id, client_id, user_hash, role, timestamp, text) VALUES "
            "('a', 'ana', 'key-a', 'user', ?, 'the quick brown fox'), ('b', NULL, 'key-b', 'assistant', ?, 'lazy dog')",
            (T0, T0 + 5))
        if version >= 3:
            run("INSERT INTO traffic VALUES ('ana', 'key-a', 4, 1, ?)", (T0 + 2 * DAY,))


def schema_of(url: str) -> dict[str, tuple[set[str], set[str]]]:
    """Return each table's columns and primary key, and the names of indexes and triggers (under "")."""
    with raw(url) as run:
        if url.startswith("sqlite:///"):
            tables = [name for (name,) in run("SELECT name FROM sqlite_master WHERE type = 'table'")]
            shape = {t: ({c[1] for c in run(f"PRAGMA table_info('{t}')")},
                         {c[1] for c in run(f"PRAGMA table_info('{t}')") if c[5]}) for t in tables}
            indexes = run("SELECT name FROM sqlite_master WHERE type IN ('index', 'trigger') "
                          "AND name NOT LIKE 'sqlite_autoindex_%'")
        else:
            shape = {}
            for table, column in run("SELECT table_name, column_name FROM information_schema.columns "
                                     "WHERE table_schema = current_schema()"):
                shape.setdefault(table, (set(), set()))[0].add(column)
            for table, column in run(
                    "SELECT k.table_name, k.column_name FROM information_schema.table_constraints c "
                    "JOIN information_schema.key_column_usage k ON k.constraint_name = c.constraint_name "
                    "AND k.table_schema = c.table_schema "
                    "WHERE c.constraint_type = 'PRIMARY KEY' AND c.table_schema = current_schema()"):
                shape[table][1].add(column)
            indexes = run("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() "
                          "AND indexname NOT LIKE '%_pkey'")
    return shape | {"": ({name for (name,) in indexes}, set())}


@pytest.mark.parametrize("version", [1, 2, 3])
def test_an_old_store_migrates_to_the_schema_of_a_new_one_with_the_same_figures(store_kind, new_url, version):
    url, fresh = new_url(), new_url()
    build_old_store(url, store_kind, version)
    store = open_store(url)
    try:
        assert store.check()["schema_version"] == SCHEMA_VERSION
        a, b = OLD_SESSIONS[0][5], OLD_SESSIONS[1][5]
        traffic = version >= 3
        totals = store.totals(Scope(), ALL)
        assert (totals.requests, totals.failed, totals.usage, totals.cost_usd) == (5 + 4 * traffic, 1 + traffic,
                                                                                   a + b, 0.75)
        assert totals.by_model == {SONNET: ModelUsage(2, a, 0.75, 0.0, True),
                                   UNKNOWN: ModelUsage(2, b, 0.0, 0.0, False)}
        assert (totals.by_tool, totals.tool_calls, totals.active, totals.ended) == ({"Read": 2}, 2, 1, 1)
        assert store.get_session("claude-a").usage == a
        # Figures over time: each session's in the bucket of its last activity, traffic in that of its last request.
        rows = {(r.day, r.session): (r.requests, r.failed, r.usage, r.cost_usd)
                for r in store.usage(Scope(), None, None, ("day", "session"), [])}
        assert rows == {((T0 + DAY) // DAY, "a"): (3, 1, a, 0.75), (T0 // DAY, "b"): (2, 0, b, 0.0),
                        **({(T0 // DAY + 2, None): (4, 1, Usage(), 0.0)} if traffic else {})}
        by_model = store.usage(Scope(), None, None, ("model",), [])
        assert (sum(r.requests for r in by_model), sum((r.usage for r in by_model), Usage())) == \
            (totals.requests, totals.usage)
        assert store.usage_unpriced(Scope(), None, None) == [UNKNOWN]
        assert [h.session for h in store.search(["fox"], None, None, Scope(), None, 10)[1]] == ["a"]
        assert [e.type for e in store.events(Scope(), [], None, 10)] == ["error", "request"]
        # The rebuilt shares take new figures by model and price class.
        with store.transaction() as tx:
            tx.add_model_usage("a", SONNET, "standard", a, 0.25, 0.0, True)
        assert store.get_session("a").by_model[SONNET] == ModelUsage(3, a + a, 1.0, 0.0, True)
    finally:
        store.close()
    new = open_store(fresh)
    new.check()
    new.close()
    assert schema_of(url) == schema_of(fresh)


# The DDL of schema versions 1 to 3 as aspy wrote it for each dialect, before both shared one schema:
# kept as it was, to build old stores.
OLD_MIGRATIONS = {
    "sqlite": {
        1: [
            """CREATE TABLE sessions (
                id TEXT PRIMARY KEY, claude_session_id TEXT, source TEXT NOT NULL, client_id TEXT,
                client_name TEXT, provider TEXT, user_hash TEXT NOT NULL, started REAL NOT NULL,
                last_activity REAL NOT NULL, status TEXT NOT NULL, ended REAL, end_reason TEXT,
                requests INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
                input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
                cache_read INTEGER NOT NULL DEFAULT 0, cache_write_5m INTEGER NOT NULL DEFAULT 0,
                cache_write_1h INTEGER NOT NULL DEFAULT 0, web_searches INTEGER NOT NULL DEFAULT 0,
                cost_usd REAL NOT NULL DEFAULT 0, savings_usd REAL NOT NULL DEFAULT 0,
                tool_calls INTEGER NOT NULL DEFAULT 0, tool_failed INTEGER NOT NULL DEFAULT 0,
                thinking_blocks INTEGER NOT NULL DEFAULT 0, ttfb_total_ms REAL NOT NULL DEFAULT 0,
                ttfb_count INTEGER NOT NULL DEFAULT 0, context_model TEXT,
                context_tokens INTEGER NOT NULL DEFAULT 0, context_limit INTEGER,
                compactions INTEGER NOT NULL DEFAULT 0)""",
            "CREATE INDEX sessions_client ON sessions (client_id, status, last_activity)",
            "CREATE INDEX sessions_user ON sessions (user_hash, status, last_activity)",
            "CREATE INDEX sessions_claude ON sessions (claude_session_id)",
            "CREATE INDEX sessions_activity ON sessions (status, last_activity)",
            """CREATE TABLE session_models (
                session_id TEXT NOT NULL, model TEXT NOT NULL, requests INTEGER NOT NULL,
                input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, cache_read INTEGER NOT NULL,
                cache_write_5m INTEGER NOT NULL, cache_write_1h INTEGER NOT NULL, web_searches INTEGER NOT NULL,
                cost_usd REAL NOT NULL, savings_usd REAL NOT NULL, priced INTEGER NOT NULL,
                PRIMARY KEY (session_id, model))""",
            """CREATE TABLE session_tools (
                session_id TEXT NOT NULL, tool TEXT NOT NULL, calls INTEGER NOT NULL, failed INTEGER NOT NULL,
                PRIMARY KEY (session_id, tool))""",
            """CREATE TABLE events (
                id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT, client_id TEXT, user_hash TEXT,
                type TEXT NOT NULL, timestamp REAL NOT NULL, data TEXT NOT NULL)""",
            "CREATE INDEX events_session ON events (session_id, id)",
            "CREATE INDEX events_time ON events (timestamp)",
            """CREATE TABLE tool_calls (
                tool_use_id TEXT PRIMARY KEY, session_id TEXT NOT NULL, tool TEXT NOT NULL, called_at REAL NOT NULL)""",
            """CREATE TABLE messages (
                id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL, client_id TEXT,
                user_hash TEXT, role TEXT NOT NULL, timestamp REAL NOT NULL, text TEXT NOT NULL)""",
            "CREATE INDEX messages_time ON messages (timestamp)",
            """CREATE VIRTUAL TABLE messages_fts USING fts5(
                text, content='messages', content_rowid='id', tokenize='unicode61 remove_diacritics 2')""",
            """CREATE TRIGGER messages_added AFTER INSERT ON messages BEGIN
                INSERT INTO messages_fts (rowid, text) VALUES (new.id, new.text); END""",
            """CREATE TRIGGER messages_removed AFTER DELETE ON messages BEGIN
                INSERT INTO messages_fts (messages_fts, rowid, text) VALUES ('delete', old.id, old.text); END""",
        ],
        # Log files read by `aspy migrate --import-logs`, so a second import adds nothing.
        2: [
            """CREATE TABLE imports (
                file_hash TEXT PRIMARY KEY, name TEXT NOT NULL, lines INTEGER NOT NULL, imported_at REAL NOT NULL)""",
            "CREATE INDEX events_user ON events (user_hash)",
            "CREATE INDEX messages_user ON messages (user_hash)",
        ],
        # Requests that are not Messages calls (probes, model lists, count_tokens): counted, no session.
        3: [
            """CREATE TABLE traffic (
                client_id TEXT NOT NULL, user_hash TEXT NOT NULL, requests INTEGER NOT NULL,
                failed INTEGER NOT NULL, last_seen REAL NOT NULL, PRIMARY KEY (client_id, user_hash))""",
            # Each model's share of a session is kept per price class (fast, batch, US-only...), so
            # tokens recorded before the table knew their model can be priced exactly later.
            """CREATE TABLE session_models_priced (
                session_id TEXT NOT NULL, model TEXT NOT NULL, price_class TEXT NOT NULL, requests INTEGER NOT NULL,
                input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, cache_read INTEGER NOT NULL,
                cache_write_5m INTEGER NOT NULL, cache_write_1h INTEGER NOT NULL, web_searches INTEGER NOT NULL,
                cost_usd REAL NOT NULL, savings_usd REAL NOT NULL, priced INTEGER NOT NULL,
                PRIMARY KEY (session_id, model, price_class))""",
            """INSERT INTO session_models_priced SELECT session_id, model, 'standard', requests, input_tokens,
                output_tokens, cache_read, cache_write_5m, cache_write_1h, web_searches, cost_usd, savings_usd, priced
                FROM session_models""",
            "DROP TABLE session_models",
            "ALTER TABLE session_models_priced RENAME TO session_models",
            "CREATE INDEX session_models_unpriced ON session_models (priced)",
            "CREATE TABLE batches (batch_id TEXT PRIMARY KEY, billed_at REAL NOT NULL)",
            # Exchanges recorded lately, so that one given back by a worker's journal is never recorded twice.
            "CREATE TABLE recorded (exchange_id TEXT PRIMARY KEY, recorded_at REAL NOT NULL)",
            "CREATE INDEX recorded_at ON recorded (recorded_at)",
        ],
    },
    "postgresql": {
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
    },
}


def test_exchange_ids_are_unique_and_go_in_the_order_they_were_made():
    ids = [exchange_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids) and all(re.fullmatch("[0-9a-f]{32}", i) for i in ids)
    # In time order, each transaction's ids go to the end of the index of recorded exchanges.
    time.sleep(0.002)
    later = exchange_id()
    assert all(i < later for i in ids)


def test_the_writer_takes_the_write_lock_within_milliseconds_of_its_release(tmp_path):
    """SQLite's busy wait backs off to sleeps of 25 ms and more; the recorder's writer tries again every ms."""
    store = open_store(f"sqlite:///{tmp_path / 'aspy.db'}")
    store.query("SELECT 1")  # the file and its schema exist before the other connection holds the lock
    other = sqlite3.connect(tmp_path / "aspy.db", isolation_level=None)
    asked, got = threading.Event(), threading.Event()
    delays: list[float] = []
    released = [0.0]

    def writer() -> None:
        store.writer_thread()
        for n in range(7):
            asked.wait()
            asked.clear()
            with store.transaction() as tx:
                delays.append(time.monotonic() - released[0])
                tx.mark_recorded([f"lock-{n}"], time.time())
            got.set()

    thread = threading.Thread(target=writer)
    thread.start()
    for _ in range(7):
        other.execute("BEGIN IMMEDIATE")
        asked.set()
        time.sleep(0.08)  # the writer waits meanwhile: SQLite's own wait would be in a sleep of 25 ms
        released[0] = time.monotonic()
        other.execute("COMMIT")
        assert got.wait(5)
        got.clear()
    thread.join(5)
    assert len(store.query("SELECT * FROM recorded WHERE exchange_id LIKE 'lock-%'")) == 7
    assert statistics.median(delays) < 0.005, delays
