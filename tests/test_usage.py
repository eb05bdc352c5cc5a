"""Figures over time (GET /api/usage, `aspy report`) and the time and tag filters of the API.

Exchanges go through aspy under gunicorn to the fake upstream, and more are recorded
in-process, into the same store, at chosen instants: both sides of midnight in Los Angeles,
Kolkata and Kathmandu, the night Los Angeles leaves DST, the end of a month. Every answer
must equal the sum of those exchanges, bucketed by hand here with zoneinfo.
"""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import requests

from helpers import API_KEY, AspyProcess, api_get, eventually, standard_config, usage

LA, KOLKATA, KATHMANDU = "America/Los_Angeles", "Asia/Kolkata", "Asia/Kathmandu"
ADMIN = "usage-admin-token-0123456789"
PROXY_TOKEN = "pt_usage_token_0123456789abcdefghijkl"
SONNET, HAIKU, UNKNOWN = "claude-sonnet-4-5-20250929", "claude-haiku-4-5-20251001", "claude-future-9"
# List prices per million tokens: input, output, 5m write, 1h write, cache read.
RATES = {SONNET: (3, 15, 3.75, 6, 0.30), HAIKU: (1, 5, 1.25, 2, 0.10)}
CLIENTS = {"ana": ["team-a", "dev"], "bob": ["team-a"], "dev-1": ["dev"], "dev-2": [], "tok": ["solo"]}
LEGACY_USER = "0123456789abcdef"


def utc(text: str) -> float:
    """Return the epoch seconds of a UTC time written 2026-11-22T08:00:30."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


# (instant, client, session key, model, tokens, failed): the in-process part, around midnights.
CHOSEN = [
    (utc("2026-11-22T07:59:30"), "ana", "la-eve", SONNET, dict(i=100, o=10, read=1000, w5=50, w1=5), False),
    (utc("2026-11-22T08:00:30"), "ana", "la-eve", SONNET, dict(i=200, o=20, read=2000), False),
    (utc("2026-11-22T08:00:45"), "bob", "la-bob", HAIKU, dict(i=300, o=30, w1=70), False),
    (utc("2026-11-21T18:29:40"), "bob", "in-eve", HAIKU, dict(i=11, o=1), False),
    (utc("2026-11-21T18:30:20"), "bob", "in-eve", HAIKU, dict(i=13, o=3), False),
    (utc("2026-11-21T18:14:50"), "dev-1", "np-eve", SONNET, dict(i=17, o=7), False),
    (utc("2026-11-21T18:15:10"), "dev-1", "np-eve", SONNET, dict(i=19, o=9), False),
    (utc("2026-11-21T18:15:20"), "dev-1", "np-eve", SONNET, None, True),
    # Los Angeles falls back at 09:00Z on 1 November: 01:30 happens twice, the day has 25 hours.
    (utc("2026-11-01T07:30:00"), "dev-2", "dst", HAIKU, dict(i=23, o=2), False),
    (utc("2026-11-01T08:30:00"), "dev-2", "dst", HAIKU, dict(i=29, o=2), False),
    (utc("2026-11-01T09:30:00"), "dev-2", "dst", HAIKU, dict(i=31, o=2), False),
    (utc("2026-11-02T07:45:00"), "dev-2", "dst-late", UNKNOWN, dict(i=37, o=3), False),
    (utc("2026-11-02T08:15:00"), None, "legacy", SONNET, dict(i=41, o=4), False),
    (utc("2026-10-31T23:50:00"), "tok", "month-end", HAIKU, dict(i=43, o=5, read=400), False),
]


@dataclass
class Sent:
    """One exchange as recorded: what every answer must add up."""

    done: float
    client: str | None
    key: str
    model: str
    tokens: dict = field(default_factory=dict)
    failed: bool = False

    @property
    def cost(self) -> float:
        rates = RATES.get(self.model)
        t = self.tokens
        return 0.0 if rates is None else (t.get("i", 0) * rates[0] + t.get("o", 0) * rates[1] + t.get("w5", 0)
                                          * rates[2] + t.get("w1", 0) * rates[3] + t.get("read", 0) * rates[4]) / 1e6


def config_text(upstream_url: str, store: str) -> str:
    """Return a config with tagged clients (dev-1 carries "dev" already), one with a proxy token, and an API token."""
    clients = ('\n[clients.ana]\nname = "Ana"\nprovider = "fake"\ntags = ["team-a", "dev"]\n'
               '\n[clients.bob]\nname = "Bob"\nprovider = "fake"\ntags = ["team-a"]\n'
               f'\n[clients.tok]\nname = "Tok"\nprovider = "fake"\ntags = ["solo"]\nproxy_token = "{PROXY_TOKEN}"\n')
    return standard_config(upstream_url, clients + store, api_token=ADMIN)


def get(server, path: str, token: str = ADMIN, **params) -> requests.Response:
    """GET an API path with a bearer token."""
    return api_get(server, path, token, **params)


def figures(server, **params) -> dict:
    """Return /api/usage's JSON."""
    r = get(server, "usage", **params)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def served(upstream, tmp_path_factory, store_kind, fresh_store):
    """aspy recording to SQLite or PostgreSQL, with an API token and tagged clients."""
    tmp = tmp_path_factory.mktemp("usage")
    store = fresh_store() or f'\n[store]\nurl = "sqlite:///{tmp / "usage.db"}"\n'
    server = AspyProcess(tmp, config_text(upstream.url, store)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sent(served) -> list[Sent]:
    """Record the exchanges every test here adds up: through the proxy now, and in-process at chosen instants."""
    from aspy.config import load_config
    from aspy.models import load_models
    from aspy.sessions import Sessions
    from aspy.store import open_store

    run = uuid.uuid4().hex[:8]
    through = [("ana", SONNET, dict(i=500, o=50, read=5000, w5=500), False, True),
               ("bob", HAIKU, dict(i=600, o=60), False, False),
               ("dev-1", UNKNOWN, dict(i=700, o=70), False, False),
               ("dev-2", SONNET, {}, True, False),
               ("tok", HAIKU, dict(i=800, o=80, w1=8), False, True)]
    for client, model, tokens, failed, stream in through:
        headers = {"x-api-key": API_KEY, "x-claude-code-session-id": f"now-{client}-{run}"}
        if tokens:
            headers["x-fake-usage"] = json.dumps(usage(**tokens))
        if failed:
            headers["x-fake-status"] = "529"
        segment = PROXY_TOKEN if client == "tok" else client
        r = requests.post(f"{served.url}/{segment}/v1/messages", headers=headers, json={
            "model": model, "max_tokens": 8, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == (529 if failed else 200)
        r.content
    records = []
    for client, model, tokens, failed, _ in through:
        key = f"now-{client}-{run}"
        # The session is unknown (404) until its first exchange is written.
        [event] = eventually(lambda key=key: (r := get(served, "events", session=key, type="response")).status_code
                             == 200 and r.json()["events"])
        records.append(Sent(datetime.fromisoformat(event["timestamp"]).timestamp(), client, key, model, tokens,
                            failed))
    config = load_config(served.config)
    book = Sessions(config, open_store(config.store.url), load_models(served.config.parent))
    book.record([exchange(at, client, f"{key}-{run}", model, tokens, failed)
                 for at, client, key, model, tokens, failed in CHOSEN])
    book.store.close()
    return records + [Sent(at, client, f"{key}-{run}", model, tokens or {}, failed)
                      for at, client, key, model, tokens, failed in CHOSEN]


def exchange(at: float, client: str | None, key: str | None, model: str, tokens: dict | None = None,
             failed: bool = False, user: str = LEGACY_USER, path: str = "/v1/messages", tool: str | None = None):
    """Return an exchange as the proxy records it, that ended at an instant."""
    from aspy.records import Exchange, Observation, Request, RequestFacts, Response, ToolUse

    observation = Observation(model=model, usage=usage(**tokens) if tokens else None)
    if tool:
        observation.tool_uses = [ToolUse(id=f"toolu_{uuid.uuid4().hex[:12]}", name=tool, input={})]
    return Exchange(started_at=at - 0.002, client=client, provider="fake", user=user,
                    request=Request("POST" if path.endswith("messages") else "GET", path,
                                    {"x-claude-code-session-id": key} if key else {}, facts=RequestFacts(model=model)),
                    response=Response(529 if failed else 200, duration_ms=2.0, ttfb_ms=1.0, observation=observation))


def day_of(at: float, tz: str) -> datetime:
    """Return the local start of the 15-minute bucket an instant falls in."""
    return datetime.fromtimestamp(at // 900 * 900, ZoneInfo(tz))


def expected(records: list[Sent], by: tuple[str, ...], tz: str, since: float | None = None,
             until: float | None = None, clients: set | None = None) -> dict[tuple, list]:
    """Add the records up by hand: {group keys: [requests, failed, tokens, cost]}."""
    groups: dict[tuple, list] = defaultdict(lambda: [0, 0, defaultdict(int), 0.0])
    for r in records:
        start = r.done // 900 * 900
        if (since is not None and start < since) or (until is not None and start >= until):
            continue
        if clients is not None and r.client not in clients:
            continue
        local = day_of(r.done, tz).date()
        values = {"day": local.isoformat(), "week": (local - timedelta(days=local.weekday())).isoformat(),
                  "month": local.strftime("%Y-%m"), "client": r.client, "model": r.model, "session": r.key}
        tags = list(CLIENTS.get(r.client or "", [])) or [None]
        for tag in tags if "tag" in by else [None]:
            group = groups[tuple(tag if k == "tag" else values[k] for k in by)]
            group[0] += 1
            group[1] += r.failed
            for name, short in (("input", "i"), ("output", "o"), ("cache_read", "read"), ("cache_write_5m", "w5"),
                                ("cache_write_1h", "w1")):
                group[2][name] += r.tokens.get(short, 0)
            group[3] += r.cost
    return groups


def assert_rows_equal(answer: dict, want: dict[tuple, list], by: tuple[str, ...]) -> None:
    """Check an answer's rows against the sums by hand: counts exactly, cost to 1e-9."""
    got = {tuple(row["claude_session_id"] if k == "session" else row[k] for k in by): row for row in answer["rows"]}
    assert set(got) == set(want)
    for key, (requests_, failed, tokens, cost) in want.items():
        row = got[key]
        assert (row["requests"], row["failed"]) == (requests_, failed), key
        assert {k: row["tokens"][k] for k in tokens} == dict(tokens) and row["tokens"]["web_search_requests"] == 0
        assert abs(row["cost_usd"] - cost) <= 1e-9, key


def mine(records: list[Sent], answer_rows: list[dict]) -> list[dict]:
    """Return the rows of an answer about this run's sessions (the store may hold other tests' traffic)."""
    keys = {r.key for r in records}
    return [row for row in answer_rows if row.get("claude_session_id") in keys]


GROUPINGS = [("day",), ("week",), ("month",), ("client",), ("model",), ("tag",), ("session",), ("day", "client"),
             ("week", "model"), ("month", "tag"), ("day", "session"), ("client", "model"), ("tag", "model")]


@pytest.mark.parametrize("tz", [LA, KOLKATA, KATHMANDU])
@pytest.mark.parametrize("by", GROUPINGS, ids=",".join)
def test_usage_equals_the_sum_of_the_recorded_exchanges(served, sent, by, tz):
    answer = figures(served, group_by=",".join(by), tz=tz)
    assert answer["group_by"] == list(by) and answer["tz"] == tz
    assert_rows_equal(answer, expected(sent, by, tz), by)
    total = expected(sent, (), tz)[()]
    assert answer["total"]["requests"] == total[0] and answer["total"]["failed"] == total[1]
    assert abs(answer["total"]["cost_usd"] - total[3]) <= 1e-9
    assert answer["unpriced_models"] == [UNKNOWN]


def test_each_side_of_a_zones_midnight_is_its_own_day(served, sent):
    def days(key: str, tz: str) -> dict[str, int]:
        session = next(r.key for r in sent if r.key.startswith(key))
        return {r["day"]: r["tokens"]["input"] for r in figures(served, group_by="day", tz=tz, session=session)["rows"]}

    # 07:59:30Z and 08:00:30Z: 23:59 and 00:00 in Los Angeles, the same afternoon in Kolkata.
    assert days("la-eve-", LA) == {"2026-11-21": 100, "2026-11-22": 200}
    assert days("la-eve-", KOLKATA) == {"2026-11-22": 300}
    # 18:14:50Z and 18:15:10Z: either side of midnight in Kathmandu (+05:45), a quarter hour apart.
    assert days("np-eve-", KATHMANDU) == {"2026-11-21": 17, "2026-11-22": 19}
    assert days("np-eve-", KOLKATA) == {"2026-11-21": 17 + 19}
    # 18:29:40Z and 18:30:20Z: either side of midnight in Kolkata (+05:30).
    assert days("in-eve-", KOLKATA) == {"2026-11-21": 11, "2026-11-22": 13}
    assert days("in-eve-", KATHMANDU) == {"2026-11-22": 11 + 13}


def test_the_day_los_angeles_leaves_dst_has_25_hours(served, sent):
    rows = {r["day"]: r for r in figures(served, group_by="day", tz=LA, client="dev-2",
                                         since="2026-10-31", until="2026-11-03")["rows"]}
    # 00:30 PDT, 01:30 PDT, 01:30 PST and 23:45 PST are all 1 November there.
    assert rows["2026-11-01"]["requests"] == 4 and rows["2026-11-01"]["tokens"]["input"] == 23 + 29 + 31 + 37
    assert set(rows) == {"2026-11-01"}


def test_weeks_start_on_monday_and_months_are_calendar_months(served, sent):
    weeks = figures(served, group_by="week", tz=LA)["rows"]
    assert all(datetime.fromisoformat(r["week"]).weekday() == 0 for r in weeks)
    window = dict(group_by="month", client="tok", since="2026-10-15T00:00:00Z", until="2026-11-15T00:00:00Z")
    # 23:50Z on 31 October is 16:50 in Los Angeles (October), and 05:20 on 1 November in Kolkata.
    assert [(r["month"], r["tokens"]["input"]) for r in figures(served, tz=LA, **window)["rows"]] == [("2026-10", 43)]
    assert [(r["month"], r["tokens"]["input"]) for r in figures(served, tz=KOLKATA, **window)["rows"]] == \
        [("2026-11", 43)]


def test_rows_come_in_time_order_then_by_cost(served, sent):
    rows = figures(served, group_by="day,client", tz=LA)["rows"]
    order = [(r["day"], -r["cost_usd"]) for r in rows]
    assert order == sorted(order)
    by_cost = [r["cost_usd"] for r in figures(served, group_by="client")["rows"]]
    assert by_cost == sorted(by_cost, reverse=True)


def test_session_rows_name_the_claude_session_and_the_client(served, sent):
    rows = mine(sent, figures(served, group_by="session")["rows"])
    la = next(r for r in rows if r["claude_session_id"].startswith("la-eve-"))
    assert la["session"].startswith("s_") and la["client"] == "ana" and la["requests"] == 2


def test_a_tag_counts_each_client_carrying_it_and_null_for_none(served, sent):
    rows = {r["tag"]: r for r in figures(served, group_by="tag")["rows"]}
    team = expected(sent, ("tag",), LA)
    assert rows["team-a"]["requests"] == team[("team-a",)][0]
    # ana carries team-a and dev: her requests count in both; legacy traffic and dev-2 have no tag.
    assert rows["dev"]["requests"] == team[("dev",)][0] and rows[None]["requests"] == team[(None,)][0]


@pytest.mark.parametrize("tag,clients", [("team-a", {"ana", "bob"}), ("dev", {"ana", "dev-1"}), ("nobody", set())])
def test_tag_and_client_filters(served, sent, tag, clients):
    answer = figures(served, group_by="client", tag=tag, tz=LA)
    assert_rows_equal(answer, expected(sent, ("client",), LA, clients=clients), ("client",))
    stats = get(served, "stats", tag=tag).json()
    assert stats["requests"]["total"] == answer["total"]["requests"]
    sessions = get(served, "sessions", tag=tag, limit=500).json()["sessions"]
    assert {s["client"] for s in sessions} <= clients
    events = get(served, "events", tag=tag, limit=500).json()["events"]
    assert {e["client"] for e in events} <= clients
    one = figures(served, group_by="model", client="bob", tz=LA)
    assert_rows_equal(one, expected(sent, ("model",), LA, clients={"bob"}), ("model",))


def test_a_window_counts_the_buckets_that_start_in_it(served, sent):
    since, until = utc("2026-11-21T18:15:00"), utc("2026-11-22T08:00:00")
    answer = figures(served, group_by="day,client", tz=KOLKATA, since="2026-11-21T18:15:00Z",
                     until="2026-11-22T08:00:00+00:00")
    assert_rows_equal(answer, expected(sent, ("day", "client"), KOLKATA, since, until), ("day", "client"))
    assert answer["since"] == "2026-11-21T23:45:00+05:30" and answer["until"] == "2026-11-22T13:30:00+05:30"
    # A naive time is in tz; a bound inside a bucket counts from the next bucket.
    later = figures(served, group_by="day", tz=LA, since="2026-11-21T23:59:00", until="2026-11-22T00:10:00")
    assert later["since"] == "2026-11-22T00:00:00-08:00"
    # Two records of the fixture, and any of this run's own that fell in the window (at 08:00 UTC on 2026-11-22).
    window = [datetime.fromisoformat(later[bound]).timestamp() for bound in ("since", "until")]
    assert later["total"]["requests"] == expected(sent, (), LA, *window)[()][0] >= 2


def test_time_range_today_filters_stats_usage_sessions_and_events(served, sent):
    now = [r for r in sent if r.key.startswith("now-")]
    today = figures(served, group_by="client", time_range="today", tz="UTC")
    assert today["total"]["requests"] >= len(now)
    stats = get(served, "stats", time_range="today", tz="UTC").json()
    assert stats["requests"]["total"] == today["total"]["requests"]
    assert abs(stats["cost"]["total_usd"] - today["total"]["cost_usd"]) <= 1e-9
    assert stats["tokens"] == today["total"]["tokens"]
    # Nothing recorded in November 2026 before the 21st in Kolkata but the DST night and the month end.
    old = get(served, "stats", since="2026-10-01T00:00:00Z", until="2026-11-03T00:00:00Z").json()
    want = expected(sent, (), "UTC", utc("2026-10-01T00:00:00"), utc("2026-11-03T00:00:00"))[()]
    assert old["requests"] == {"total": want[0], "failed": want[1]}
    assert abs(old["cost"]["total_usd"] - want[3]) <= 1e-9
    assert old["cost"]["unpriced_models"] == [UNKNOWN] and UNKNOWN in old["cost"]["by_model"]
    assert old["sessions"]["ended"] + old["sessions"]["active"] + old["sessions"]["idle"] == 4
    sessions = get(served, "sessions", since="2026-11-01T00:00:00Z", until="2026-11-02T00:00:00Z").json()["sessions"]
    assert sorted(s["claude_session_id"].rsplit("-", 1)[0] for s in sessions) == ["dst"]
    events = get(served, "events", since="2026-11-01T08:00:00Z", until="2026-11-01T09:00:00Z", limit=500).json()
    assert {e["timestamp"][:16] for e in events["events"]} == {"2026-11-01T08:29", "2026-11-01T08:30"}
    none = get(served, "stats", time_range="yesterday", tz="Pacific/Kiritimati", client="tok").json()
    assert none["requests"]["total"] == 0 and none["tokens"]["input"] == 0


def test_csv_has_a_header_and_the_same_figures_as_the_json(served, sent):
    params = dict(group_by="day,session", tz=KOLKATA)
    answer = figures(served, **params)
    r = get(served, "usage", format="csv", **params)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert list(rows[0]) == ["day", "session", "claude_session_id", "client", "requests", "failed", "input", "output",
                             "cache_read", "cache_write_5m", "cache_write_1h", "web_search_requests", "cost_usd",
                             "savings_usd"]
    assert len(rows) == len(answer["rows"])
    for line, row in zip(rows, answer["rows"]):
        assert (line["day"], line["session"], line["claude_session_id"]) == (row["day"], row["session"],
                                                                            row["claude_session_id"] or "")
        assert int(line["requests"]) == row["requests"] and int(line["input"]) == row["tokens"]["input"]
        assert abs(float(line["cost_usd"]) - row["cost_usd"]) <= 1e-9


@pytest.mark.parametrize("params,name", [
    ({"group_by": "year"}, "group_by"), ({"group_by": "day,week"}, "group_by"),
    ({"group_by": "day,client,model"}, "group_by"), ({"group_by": "client,client"}, "group_by"),
    ({"tz": "Mars/Olympus_Mons"}, "tz"), ({"format": "xml"}, "format"), ({"since": "last tuesday"}, "since"),
    ({"until": "2026-13-01"}, "until"), ({"time_range": "forever"}, "time_range"),
    ({"time_range": "today", "since": "2026-11-01"}, "time_range"),
    ({"since": "2026-11-02", "until": "2026-11-01"}, "until"),
])
def test_bad_parameters_get_400_naming_the_parameter(served, params, name):
    for path in ("usage", "stats", "sessions", "events"):
        if path != "usage" and set(params) & {"group_by", "format"}:
            continue
        r = get(served, path, **params)
        assert r.status_code == 400, (path, r.text)
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
        assert name in r.json()["error"]["message"]


def test_a_proxy_token_sees_only_its_own_client(served, sent):
    answer = figures(served, group_by="client")
    assert len({r["client"] for r in answer["rows"]}) > 1
    own = get(served, "usage", token=PROXY_TOKEN, group_by="client,tag").json()
    assert {(r["client"], r["tag"]) for r in own["rows"]} == {("tok", "solo")}
    assert own["total"]["requests"] == expected(sent, (), LA, clients={"tok"})[()][0]
    assert get(served, "usage", token=PROXY_TOKEN, tag="team-a").json()["rows"] == []
    assert get(served, "usage", token=PROXY_TOKEN, client="ana").status_code == 403
    other = next(r.key for r in sent if r.client == "ana")
    assert get(served, "usage", token=PROXY_TOKEN, session=other).status_code == 404
    sessions = get(served, "usage", token=PROXY_TOKEN, group_by="session").json()["rows"]
    assert {r["client"] for r in sessions} == {"tok"}
    for path in ("stats", "sessions", "events"):
        r = get(served, path, token=PROXY_TOKEN, tag="team-a", time_range="all")
        assert r.status_code == 200
    assert get(served, "stats", token=PROXY_TOKEN, tag="team-a").json()["requests"]["total"] == 0
    assert get(served, "stats", token=PROXY_TOKEN, client="bob", time_range="today").status_code == 403


def report(server, *args: str) -> subprocess.CompletedProcess:
    """Run `aspy report` against the server's config and store."""
    return subprocess.run([sys.executable, "-m", "aspy", "report", "--config", str(server.config), *args],
                          capture_output=True, text=True, env=server.env, timeout=120)


@pytest.mark.parametrize("period,by", [("daily", ("day",)), ("weekly", ("week",)), ("monthly", ("month",)),
                                       ("sessions", ("session",))])
def test_report_json_equals_the_recorded_exchanges_from_the_store_and_the_api(served, sent, period, by):
    direct = report(served, period, "--json", "--tz", KATHMANDU)
    assert direct.returncode == 0, direct.stderr
    assert_rows_equal(json.loads(direct.stdout), expected(sent, by, KATHMANDU), by)
    env = {"ASPY_API_TOKEN": ADMIN}
    api = subprocess.run([sys.executable, "-m", "aspy", "report", period, "--json", "--tz", KATHMANDU,
                          "--url", served.url], capture_output=True, text=True, env=served.env | env, timeout=120)
    assert api.returncode == 0, api.stderr
    assert json.loads(api.stdout) == json.loads(direct.stdout)
    broken = report(served, period, "--breakdown", "--json", "--tz", KATHMANDU, "--tag", "team-a")
    assert_rows_equal(json.loads(broken.stdout), expected(sent, (*by, "model"), KATHMANDU, clients={"ana", "bob"}),
                      (*by, "model"))


def test_report_finds_the_api_as_aspy_top_does(served, sent):
    env = served.env | {"ASPY_URL": "", "ASPY_API_TOKEN": "",
                        "ANTHROPIC_BASE_URL": f"{served.url}/{PROXY_TOKEN}"}
    done = subprocess.run([sys.executable, "-m", "aspy", "report", "monthly", "--json", "--url"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    # The proxy token in ANTHROPIC_BASE_URL is the bearer token: its client's figures only.
    assert json.loads(done.stdout)["total"]["requests"] == expected(sent, (), LA, clients={"tok"})[()][0]


def test_report_table_fits_80_columns_and_lists_periods_and_models(served, sent):
    done = report(served, "daily", "--breakdown", "--tz", LA, "--since", "2026-11-21", "--until", "2026-11-23")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert lines[1].split() == ["day", "requests", "input", "output", "cache", "read", "cache", "write", "cost"]
    text = done.stdout
    assert "2026-11-21" in text and "2026-11-22" in text and "  - sonnet-4-5" in text and "  - haiku-4-5" in text
    assert lines[-1].startswith("total") or lines[-2].startswith("total")
    sessions = report(served, "sessions", "--client", "ana")
    assert sessions.returncode == 0 and max(len(line) for line in sessions.stdout.splitlines()) <= 80
    assert "la-eve-" in sessions.stdout


def test_report_says_what_is_wrong(served):
    unknown = report(served, "--client", "nobody")
    assert unknown.returncode == 2 and "unknown client 'nobody'" in unknown.stderr
    zone = report(served, "--tz", "Nowhere/Land")
    assert zone.returncode == 2 and "tz" in zone.stderr
    both = report(served, "--json", "--csv")
    assert both.returncode == 2
    csv_out = report(served, "weekly", "--csv", "--tz", LA)
    assert csv_out.stdout.splitlines()[0].startswith("week,requests,failed,input")


# The rollup in-process, on a store of each test's own: what needs a table swapped, an old
# store, a migration, or more exchanges than a test should send through a server.

@pytest.fixture
def book(store_kind, tmp_path, postgres_databases, model_table):
    """A sessions book on a new, empty store."""
    from aspy.config import parse_config
    from aspy.sessions import Sessions
    from aspy.store import open_store

    url = f"sqlite:///{tmp_path / 'aspy.db'}" if store_kind == "sqlite" else postgres_databases.take()
    config = parse_config({"store": {"url": url}, "clients": {
        c: {"name": c, "provider": "anthropic", "tags": t} for c, t in CLIENTS.items()}}, None)
    sessions = Sessions(config, open_store(url), model_table)
    yield sessions
    sessions.store.close()
    if store_kind != "sqlite":
        postgres_databases.give_back(url)


def ask(store, by: tuple[str, ...], tz: str = "UTC", since: float | None = None, until: float | None = None,
        **scope) -> dict:
    """Return usage.answer for a question, as /api/usage would."""
    from aspy import usage as figures_over_time
    from aspy.store import Scope

    question = figures_over_time.Question(by, tz, ZoneInfo(tz), since, until, Scope(**scope))
    return figures_over_time.answer(store, question, {c: tuple(t) for c, t in CLIENTS.items()})


def test_days_from_the_6_hour_summary_equal_days_from_the_buckets(book):
    import random

    rng = random.Random(13)
    records = []
    for n in range(400):
        # Two months across the northern autumn's DST changes, at any hour.
        at = utc("2026-10-01T00:00:00") + rng.random() * 60 * 86400
        client, model = rng.choice(["ana", "bob", "dev-1", None]), rng.choice([SONNET, HAIKU])
        tokens = dict(i=rng.randrange(1, 10_000), o=rng.randrange(1, 2_000), read=rng.randrange(0, 50_000))
        records.append(Sent(at, client, f"s{n % 23}-{client}", model, tokens, n % 17 == 0))
    book.record([exchange(r.done, r.client, r.key, r.model, r.tokens, r.failed) for r in records])
    for tz in (LA, KOLKATA, KATHMANDU, "Australia/Lord_Howe", "Pacific/Chatham", "UTC"):
        fast = ask(book.store, ("day", "client"), tz)
        assert_rows_equal(fast, expected(records, ("day", "client"), tz), ("day", "client"))
        # Grouping by session reads every bucket, never the summary: both must say the same.
        slow: dict[tuple, list] = defaultdict(lambda: [0, 0.0])
        for row in ask(book.store, ("day", "session"), tz)["rows"]:
            slow[(row["day"], row["client"])][0] += row["requests"]
            slow[(row["day"], row["client"])][1] += row["cost_usd"]
        assert {k: v[0] for k, v in slow.items()} == {(r["day"], r["client"]): r["requests"] for r in fast["rows"]}
        assert all(abs(slow[(r["day"], r["client"])][1] - r["cost_usd"]) <= 1e-9 for r in fast["rows"])


def test_buckets_recorded_without_a_price_are_priced_once_the_table_learns_the_model(book, tmp_path):
    from aspy.models import load_models
    from aspy.sessions import Sessions
    from aspy.store import Horizon, Scope

    model = "claude-in-house-9"
    book.record([exchange(utc("2026-11-10T10:00:00"), "ana", "k1", model, dict(i=1000, o=100)),
                 exchange(utc("2026-11-10T23:50:00"), "bob", "k2", model, dict(i=10, o=1)),
                 exchange(utc("2026-11-11T00:20:00"), "bob", "k2", SONNET, dict(i=10, o=1))])
    before = ask(book.store, ("day",), KOLKATA)
    assert before["unpriced_models"] == [model]
    assert abs(before["total"]["cost_usd"] - (10 * 3 + 15) / 1e6) <= 1e-12
    (tmp_path / "models.yaml").write_text(
        f"models:\n  {model}: {{input: 7, output: 21, cache_write_5m: 8.75, cache_write_1h: 14, cache_read: 0.7, "
        "context_window: 100000, source: 'our own deployment', taken: '2026-11-22'}\n")
    Sessions(book.config, book.store, load_models(tmp_path)).upkeep()
    want = (1010 * 7 + 101 * 21 + 10 * 3 + 15) / 1e6
    for by in (("day",), ("session",), ("client", "model"), ("week", "tag")):
        after = ask(book.store, by, KOLKATA)
        assert after["unpriced_models"] == [] and abs(after["total"]["cost_usd"] - want) <= 1e-9, by
    assert abs(sum(r["cost_usd"] for r in ask(book.store, ("day",), KOLKATA)["rows"]) - want) <= 1e-9
    stats = book.store.totals(Scope(), Horizon(0, 0))
    assert abs(stats.cost_usd - want) <= 1e-9


def downgrade(url: str) -> None:
    """Make a store look as aspy before figures over time left it: schema 3, no rollup, search by trigger."""
    drop = ["DROP TABLE usage_rollup", "DROP TABLE usage_rollup_6h", "DROP TABLE usage_tools",
            "UPDATE meta SET value = '3' WHERE key = 'schema_version'"]
    if url.startswith("sqlite:///"):
        import sqlite3

        from aspy.store.sqlite import SEARCH

        with sqlite3.connect(url[len("sqlite:///"):]) as conn:
            for statement in [*drop, "DELETE FROM meta WHERE key = 'search_indexed_to'", SEARCH[1]]:
                conn.execute(statement)
        return
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        for statement in drop:
            conn.execute(statement)


def test_an_old_store_gets_each_sessions_figures_at_its_last_activity(book):
    from aspy.store import Horizon, Scope, open_store
    from aspy.store.schema import SCHEMA_VERSION

    book.record([exchange(utc("2026-11-10T09:00:00"), "ana", "old-a", SONNET, dict(i=100, o=10, read=1000)),
                 exchange(utc("2026-11-12T09:00:00"), "ana", "old-a", HAIKU, dict(i=200, o=20), tool="Read"),
                 exchange(utc("2026-11-12T09:05:00"), "ana", "old-a", SONNET, None, failed=True),
                 exchange(utc("2026-11-11T09:00:00"), None, "old-b", UNKNOWN, dict(i=300, o=30)),
                 exchange(utc("2026-11-11T10:00:00"), "bob", None, SONNET, path="/v1/models")])
    horizon = Horizon(0, 0)
    stats = book.store.totals(Scope(), horizon)
    url = book.config.store.url
    book.store.close()
    downgrade(url)
    store = open_store(url)
    try:
        assert store.check()["schema_version"] == SCHEMA_VERSION
        rows = {(r["day"], r["claude_session_id"]): r for r in ask(store, ("day", "session"))["rows"]}
        assert set(rows) == {("2026-11-12", "old-a"), ("2026-11-11", "old-b"), ("2026-11-11", None)}
        a = rows[("2026-11-12", "old-a")]
        assert (a["requests"], a["failed"], a["tokens"]["input"]) == (3, 1, 300)
        total = ask(store, ("day", "model"))["total"]
        assert (total["requests"], total["failed"]) == (stats.requests, stats.failed) == (5, 1)
        assert total["tokens"]["input"] == stats.usage.input_tokens and abs(total["cost_usd"] - stats.cost_usd) <= 1e-9
        assert ask(store, ("model",))["unpriced_models"] == [UNKNOWN]
        window = store.totals(Scope(), horizon, utc("2026-11-12T00:00:00"), utc("2026-11-13T00:00:00"))
        assert window.tool_calls == 1 and window.requests == 3
    finally:
        store.close()


def test_a_migrated_key_hash_takes_its_figures_over_time_to_its_client(book):
    book.record([exchange(utc("2026-11-10T10:00:00"), None, "legacy-1", SONNET, dict(i=100, o=10)),
                 exchange(utc("2026-11-10T10:20:00"), "ana", "ana-1", SONNET, dict(i=1, o=1))])
    assert {r["client"]: r["requests"] for r in ask(book.store, ("client",))["rows"]} == {None: 1, "ana": 1}
    with book.store.transaction() as tx:
        assert tx.reattribute(LEGACY_USER, "ana", "Ana") == 1
    for by in (("client",), ("day", "client"), ("session",)):
        assert {r["client"] for r in ask(book.store, by, LA)["rows"]} == {"ana"}, by
    assert ask(book.store, ("client",))["rows"][0]["tokens"]["input"] == 101
    assert ask(book.store, ("day",), clients=("ana", "bob"))["total"]["requests"] == 2


def test_a_session_that_learns_its_key_hash_has_it_in_all_its_buckets(book):
    from aspy.store import Horizon, Scope

    at = utc("2026-11-10T10:00:00")
    book.record([exchange(at, "ana", "flip", SONNET, dict(i=5, o=1), user="anonymous")])
    book.record([exchange(at + 60, "ana", "flip", SONNET, dict(i=7, o=1)),
                 exchange(at + 1000, "ana", "flip", SONNET, dict(i=9, o=1))])
    assert ask(book.store, ("day",), user=LEGACY_USER)["total"]["tokens"]["input"] == 5 + 7 + 9
    assert book.store.totals(Scope(user=LEGACY_USER), Horizon(0, 0)).usage.input_tokens == 5 + 7 + 9
    assert ask(book.store, ("day",), user="anonymous")["rows"] == []


def test_requests_outside_sessions_count_with_no_session_and_no_model(book):
    from aspy.store import Horizon, Scope

    at = utc("2026-11-10T10:00:00")
    book.record([exchange(at, "ana", None, SONNET, path="/v1/models"),
                 exchange(at + 5, "ana", None, SONNET, failed=True, path="/v1/models")])
    [row] = ask(book.store, ("session",))["rows"]
    assert (row["session"], row["client"], row["requests"], row["failed"]) == (None, "ana", 2, 1)
    assert [r["model"] for r in ask(book.store, ("model",))["rows"]] == [None]
    assert book.store.totals(Scope(), Horizon(0, 0)).requests == 2


@pytest.mark.e2e
def test_report_reads_a_store_as_it_is_and_never_migrates_it(book, tmp_path, store_kind):
    book.record([exchange(utc("2026-11-10T10:00:00"), "ana", "r-1", SONNET, dict(i=100, o=10))])
    config = tmp_path / "config.toml"
    clients = "".join(f'[clients.{c}]\nname = "{c}"\nprovider = "anthropic"\n' for c in CLIENTS)
    config.write_text(f'[store]\nurl = "{book.config.store.url}"\n{clients}')

    def run() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "aspy", "report", "monthly", "--json", "--tz", "UTC",
                               "--config", str(config)], capture_output=True, text=True, timeout=120)

    assert json.loads(run().stdout)["rows"][0]["tokens"]["input"] == 100
    book.store.close()
    downgrade(book.config.store.url)
    older = run()
    assert older.returncode == 2 and "schema version 3" in older.stderr and "aspy serve" in older.stderr
    if store_kind == "sqlite":
        config.write_text(f'[store]\nurl = "sqlite:///{tmp_path / "none.db"}"\n')
        none = run()
        assert none.returncode == 2 and "nothing recorded" in none.stderr and not (tmp_path / "none.db").exists()
