"""The JSON API in-process (docs/api.md): figures of exchanges sent through the proxy, filters, access, errors.

Each test that sends traffic has an aspy of its own (create_app, a SQLite store in tmp_path)
whose upstream is faked by ``responses``; ``traffic.send`` returns once the exchange is recorded.
The tests of access and of bad requests share one aspy that has seen no traffic (``idle``).
"""
from __future__ import annotations

import csv
import io

import pytest

from helpers import (
    API_KEY,
    APP_PROXY_TOKEN,
    APP_TOKEN,
    MODEL,
    assert_anthropic_error,
    bearer,
    key_hash,
    make_app,
    price,
    usage,
)

ADMIN = bearer(APP_TOKEN)
TOKEN_CLIENT = bearer(APP_PROXY_TOKEN)


def get(test_client, path: str, headers: dict | None = None, /, **params):
    """GET /api/<path> with the API token (or the headers given)."""
    return test_client.get(f"/api/{path}", query_string=params, headers=ADMIN if headers is None else headers)


def api(test_client, path: str, headers: dict | None = None, /, **params) -> dict:
    """GET /api/<path> and return its JSON, which must come with 200."""
    r = get(test_client, path, headers, **params)
    assert r.status_code == 200, r.data[:300]
    return r.json


@pytest.fixture(scope="module")
def idle(tmp_path_factory, model_table):
    """The test client of an aspy that no test sends traffic through."""
    return make_app(tmp_path_factory.mktemp("idle-api"), models=model_table).test_client()


def post(client, path: str, body, headers: dict | None = None):
    """POST a JSON body to /api/<path> with the API token."""
    return client.post(f"/api/{path}", json=body, headers=ADMIN if headers is None else headers)


# Access

@pytest.mark.parametrize("headers", [{}, bearer("not-the-token-0123456789"), {"Authorization": APP_TOKEN},
                                     {"Authorization": f"Basic {APP_TOKEN}"}])
@pytest.mark.parametrize("path", ["stats", "sessions", "events", "context", "clients", "in_flight", "usage"])
def test_every_endpoint_needs_the_api_token(idle, path, headers):
    assert_anthropic_error(get(idle, path, headers), 401, "authentication_error")
    assert get(idle, path).status_code == 200


def test_the_bearer_scheme_is_read_in_any_case(idle):
    assert get(idle, "stats", {"Authorization": f"bearer {APP_TOKEN}"}).status_code == 200


def test_a_proxy_token_sees_its_own_clients_data_only(client, traffic):
    traffic.send("dev-1", session="mine-not", usage=usage(100, 10))
    traffic.send(APP_PROXY_TOKEN, session="tok-session", usage=usage(7, 3))
    stats = api(client, "stats", TOKEN_CLIENT)
    assert stats["requests"]["total"] == 1 and stats["tokens"]["input"] == 7
    assert [s["client"] for s in api(client, "sessions", TOKEN_CLIENT)["sessions"]] == ["tok"]
    assert [c["id"] for c in api(client, "clients", TOKEN_CLIENT)["clients"]] == ["tok"]
    assert {e["client"] for e in api(client, "events", TOKEN_CLIENT)["events"]} == {"tok"}
    assert api(client, "usage", TOKEN_CLIENT, group_by="client")["total"]["requests"] == 1
    # Other clients' data: 403 by client, 404 by session, nothing by a wider filter.
    assert_anthropic_error(get(client, "stats", TOKEN_CLIENT, client="dev-1"), 403, "permission_error")
    assert_anthropic_error(get(client, "sessions", TOKEN_CLIENT, session="mine-not"), 404, "not_found_error")
    assert api(client, "stats", TOKEN_CLIENT, tag="dev")["requests"]["total"] == 1
    r = post(client, "session/start", {"client": "dev-1", "session_id": "x"}, TOKEN_CLIENT)
    assert_anthropic_error(r, 403, "permission_error")


# /api/stats

def test_stats_are_the_tokens_and_cost_the_upstream_billed(client, traffic):
    traffic.send(session="s1", usage=usage(1_000, 200, read=5_000, w5=300, w1=100))
    traffic.send(session="s1", usage=usage(10, 20))
    stats = api(client, "stats")
    assert stats["requests"] == {"total": 2, "failed": 0}
    assert stats["tokens"] == {"input": 1_010, "output": 220, "cache_read": 5_000, "cache_write_5m": 300,
                               "cache_write_1h": 100, "web_search_requests": 0}
    cost = price(1_010, 220, read=5_000, w5=300, w1=100)
    assert stats["cost"]["total_usd"] == pytest.approx(cost, abs=1e-9)
    assert stats["cost"]["by_model"] == {MODEL: pytest.approx(cost, abs=1e-9)}
    assert stats["cost"]["savings_usd"] == pytest.approx(5_000 * (3 - 0.3) / 1e6, abs=1e-9)
    assert stats["cost"]["unpriced_models"] == []
    assert stats["sessions"] == {"active": 1, "idle": 0, "ended": 0}


def test_a_model_the_table_does_not_know_costs_nothing_and_is_listed(client, traffic):
    traffic.send(model="claude-unheard-of-9", usage=usage(1_000, 1_000))
    cost = api(client, "stats")["cost"]
    assert cost["total_usd"] == 0 and cost["unpriced_models"] == ["claude-unheard-of-9"]


def test_an_upstream_error_counts_as_failed_with_an_error_event(client, traffic):
    r = traffic.send(session="busy", status=529)
    assert r.status_code == 529 and r.json["error"]["type"] == "overloaded_error"
    assert api(client, "stats")["requests"] == {"total": 1, "failed": 1}
    [error] = api(client, "events", type="error")["events"]
    assert error["status"] == 529 and error["error_type"] == "overloaded_error"
    assert error["message"] == "the upstream says no"


def test_tool_calls_are_counted_by_tool_with_their_input(client, traffic):
    traffic.send(session="tools", tool="Read")
    traffic.send(session="tools", tool="Read")
    tools = api(client, "stats")["tools"]
    assert tools == {"total_calls": 2, "failed_calls": 0, "by_tool": {"Read": 2}}
    call = api(client, "events", type="tool_call")["events"][0]
    assert call["tool"] == "Read" and call["input"] == {"command": "ls"} and call["complete"] is True


@pytest.mark.parametrize("params,requests", [
    ({}, 4), ({"client": "dev-1"}, 2), ({"client": "dev-2"}, 1), ({"tag": "dev"}, 3), ({"tag": "solo"}, 1),
    ({"tag": "nobody-has-it"}, 0), ({"session": "one"}, 1), ({"user": key_hash(API_KEY)}, 4),
    ({"user": "anonymous"}, 0), ({"time_range": "today"}, 4), ({"since": "2999-01-01"}, 0),
])
def test_stats_filter_by_client_tag_session_user_and_time(client, traffic, params, requests):
    traffic.send("dev-1", session="one")
    traffic.send("dev-1", session="two")
    traffic.send("dev-2", session="three")
    traffic.send(APP_PROXY_TOKEN, session="four")
    assert api(client, "stats", **params)["requests"]["total"] == requests


def test_legacy_traffic_is_known_by_its_key_hash(client, traffic):
    traffic.send("", headers={"x-api-key": "sk-ant-legacy-key-000000"})
    assert api(client, "stats", user=key_hash("sk-ant-legacy-key-000000"))["requests"]["total"] == 1
    [session] = api(client, "sessions")["sessions"]
    assert session["client"] is None and session["user"] == key_hash("sk-ant-legacy-key-000000")


def test_requests_that_are_not_messages_calls_count_but_open_no_session(client, traffic):
    traffic.send(method="GET", path="/v1/models", answer={"data": []})
    assert api(client, "stats")["requests"]["total"] == 1
    assert api(client, "sessions")["sessions"] == []


# /api/sessions, /api/session/start and /end

def test_sessions_come_with_their_figures_most_recently_active_first(client, traffic):
    traffic.send(session="older", usage=usage(5, 1))
    traffic.send(session="newer", usage=usage(7, 2), tool="Bash")
    first, second = api(client, "sessions")["sessions"]
    assert (first["claude_session_id"], second["claude_session_id"]) == ("newer", "older")
    assert first["source"] == "claude_code" and first["status"] == "active" and first["ended"] is None
    assert first["client"] == "dev-1" and first["client_name"] == "Dev Laptop" and first["provider"] == "fake"
    assert first["stats"]["requests"] == {"total": 1, "failed": 0}
    assert first["stats"]["tokens"]["input"] == 7 and first["stats"]["tools"]["by_tool"] == {"Bash": 1}
    assert first["stats"]["cost"]["total_usd"] == pytest.approx(price(7, 2), abs=1e-9)
    assert api(client, "sessions", limit=1)["sessions"] == [first]
    assert api(client, "sessions", session=second["id"])["sessions"] == [second]


def test_a_registered_session_takes_keyless_traffic_and_ending_it_archives_it(client, traffic):
    r = post(client, "session/start", {"client": "dev-1", "session_id": "reg-1", "source": "ide"})
    assert r.status_code == 201 and r.json["created"] is True
    again = post(client, "session/start", {"client": "dev-1", "session_id": "reg-1"})
    assert again.status_code == 200 and again.json["created"] is False
    traffic.send(usage=usage(11, 1))
    [session] = api(client, "sessions", status="active")["sessions"]
    assert session["claude_session_id"] == "reg-1" and session["source"] == "registered"
    assert session["stats"]["tokens"]["input"] == 11
    ended = post(client, "session/end", {"session_id": "reg-1", "reason": "user_exit"})
    assert ended.status_code == 200
    assert ended.json["session"]["status"] == "ended" and ended.json["session"]["end_reason"] == "user_exit"
    assert api(client, "sessions", status="active")["sessions"] == []
    assert [s["claude_session_id"] for s in api(client, "sessions", status="ended")["sessions"]] == ["reg-1"]
    [end] = api(client, "events", type="session_end")["events"]
    assert end["reason"] == "user_exit" and end["stats"]["requests"] == 1 and end["stats"]["input_tokens"] == 11


def test_ending_an_unknown_session_gets_404(idle):
    assert_anthropic_error(post(idle, "session/end", {"session_id": "nope"}), 404, "not_found_error")


# /api/events

def test_events_come_newest_first_and_filter_by_type(client, traffic):
    traffic.send(session="ev", prompt="first")
    traffic.send(session="ev", prompt="second")
    events = api(client, "events")["events"]
    assert [e["id"] for e in events] == sorted((e["id"] for e in events), reverse=True)
    assert {"session_start", "request", "response"} <= {e["type"] for e in events}
    responses = api(client, "events", type="response")["events"]
    assert len(responses) == 2 and all(e["status"] == 200 and e["request_id"] == "req_test" for e in responses)
    assert responses[0]["usage"]["input_tokens"] == 12 and responses[0]["model"] == MODEL
    both = api(client, "events", type="request,response", limit=3)["events"]
    assert len(both) == 3 and {e["type"] for e in both} <= {"request", "response"}
    assert api(client, "events", client="dev-2")["events"] == []


# /api/context

def test_the_context_gauge_follows_the_last_main_thread_answer(client, traffic):
    traffic.send(session="ctx", usage=usage(50_000, 10, read=100_000))
    gauge = api(client, "context", session="ctx")
    assert gauge["current_tokens"] == 150_000 and gauge["limit_tokens"] == 200_000
    assert gauge["usage_pct"] == 75.0 and gauge["warning_level"] == "warning"
    # A subagent's answer counts, but leaves the gauge where it was.
    traffic.send(session="ctx", usage=usage(1_000, 10), headers={"x-claude-code-agent-id": "agent-1"})
    assert api(client, "context", client="dev-1")["current_tokens"] == 150_000
    assert [c["session"] for c in api(client, "context")["contexts"]] == [gauge["session"]]
    assert api(client, "context", client="dev-2")["session"] is None


# /api/clients

def test_clients_are_the_configured_ones_with_their_live_sessions(client, traffic):
    traffic.send("dev-1", session="a")
    traffic.send("dev-1", session="b")
    clients = {c["id"]: c for c in api(client, "clients")["clients"]}
    assert list(clients) == ["dev-1", "dev-2", "gone", "tok"]
    assert clients["dev-1"]["active_sessions"] == 2 and clients["dev-1"]["last_seen"] is not None
    assert clients["dev-1"]["tags"] == ["dev"] and clients["dev-1"]["name"] == "Dev Laptop"
    assert clients["dev-2"]["active_sessions"] == 0 and clients["dev-2"]["last_seen"] is None


# /api/search

def test_search_finds_prompts_and_answers_with_the_match_in_bold(client, traffic):
    traffic.send(session="zoo", prompt="where does the zebra sleep at night", text="a zebra sleeps standing up")
    traffic.send("dev-2", session="other", prompt="nothing about animals")
    found = post(client, "search", {"keyword": "zebra"}).json
    assert found["total_matches"] == 2 and {r["role"] for r in found["results"]} == {"user", "assistant"}
    mine = post(client, "search", {"keyword": "zebra", "role": "user"}).json["results"]
    assert [r["snippet"] for r in mine] == ["where does the **zebra** sleep at night"]
    assert mine[0]["client"] == "dev-1" and mine[0]["session"] == api(client, "sessions")["sessions"][-1]["id"]
    assert post(client, "search", {"keyword": "zebra night"}).json["total_matches"] == 1
    assert post(client, "search", {"keyword": "zebra", "client": "dev-2"}).json["total_matches"] == 0
    assert post(client, "search", {"keyword": "zebra", "time_range": "last_hour"}).json["total_matches"] == 2


@pytest.mark.parametrize("body,named", [
    ({}, "keyword"), ({"keyword": "   "}, "keyword"), ({"keyword": "?!"}, "keyword"),
    ({"keyword": "x", "role": "system"}, "role"), ({"keyword": "x", "limit": 0}, "limit"),
    ({"keyword": "x", "limit": True}, "limit"), ({"keyword": "x", "time_range": "forever"}, "time_range"),
    (["keyword"], "JSON object"),
])
def test_a_bad_search_gets_400_naming_what_is_wrong(idle, body, named):
    assert named in assert_anthropic_error(post(idle, "search", body), 400, "invalid_request_error")


# /api/usage

def test_usage_rows_add_up_to_the_stats(client, traffic):
    traffic.send("dev-1", usage=usage(100, 10))
    traffic.send("dev-1", usage=usage(200, 20))
    traffic.send("dev-2", usage=usage(300, 30))
    figures = api(client, "usage", group_by="day,client", tz="Europe/Paris")
    assert figures["group_by"] == ["day", "client"] and figures["tz"] == "Europe/Paris"
    rows = {row["client"]: row for row in figures["rows"]}
    assert rows["dev-1"]["requests"] == 2 and rows["dev-1"]["tokens"]["input"] == 300
    assert rows["dev-2"]["cost_usd"] == pytest.approx(price(300, 30), abs=1e-9)
    stats = api(client, "stats")
    assert figures["total"]["requests"] == stats["requests"]["total"] == 3
    assert figures["total"]["tokens"] == stats["tokens"]
    assert figures["total"]["cost_usd"] == pytest.approx(stats["cost"]["total_usd"], abs=1e-9)
    by_tag = api(client, "usage", group_by="tag")["rows"]
    assert {row["tag"]: row["requests"] for row in by_tag} == {"dev": 2, None: 1}


def test_usage_as_csv_has_a_header_and_the_same_rows(client, traffic):
    traffic.send("dev-1", usage=usage(100, 10))
    r = get(client, "usage", group_by="client", format="csv")
    assert r.status_code == 200 and r.mimetype == "text/csv"
    [row] = list(csv.DictReader(io.StringIO(r.get_data(as_text=True))))
    assert row["client"] == "dev-1" and row["requests"] == "1" and row["input"] == "100"


# /api/in_flight

def test_a_request_is_in_flight_until_its_answer_is_done(client, traffic):
    traffic.send(session="warm-up")
    # Unbuffered, the answer stays open (as a stream would) until it is closed.
    held = client.post("/dev-1/v1/messages", json={"model": MODEL, "max_tokens": 8, "messages": []},
                       headers={"x-api-key": API_KEY, "x-claude-code-session-id": "long-turn"})
    [entry] = api(client, "in_flight")["in_flight"]
    assert entry["client"] == "dev-1" and entry["session"] == "long-turn" and entry["model"] == MODEL
    assert entry["method"] == "POST" and entry["path"] == "/v1/messages" and entry["streaming"] is False
    assert entry["user"] == key_hash(API_KEY) and entry["elapsed_ms"] >= 0 and entry["ttfb_ms"] is not None
    assert [e["session"] for e in api(client, "in_flight", session="long-turn")["in_flight"]] == ["long-turn"]
    assert api(client, "in_flight", client="dev-2")["in_flight"] == []
    assert api(client, "in_flight", TOKEN_CLIENT)["in_flight"] == []
    held.close()
    assert api(client, "in_flight")["in_flight"] == []


# Bad parameters

@pytest.mark.parametrize("path,params,named", [
    ("sessions", {"limit": "0"}, "limit"), ("sessions", {"limit": "501"}, "limit"),
    ("events", {"limit": "ten"}, "limit"), ("sessions", {"status": "zombie"}, "status"),
    ("events", {"type": "telepathy"}, "telepathy"), ("stats", {"user": "ABC"}, "user"),
    ("stats", {"time_range": "forever"}, "time_range"), ("stats", {"since": "last tuesday"}, "since"),
    ("stats", {"since": "2026-11-02", "until": "2026-11-01"}, "until"),
    ("stats", {"time_range": "today", "since": "2026-11-01"}, "time_range"),
    ("usage", {"group_by": "planet"}, "group_by"), ("usage", {"group_by": "day,week"}, "group_by"),
    ("usage", {"format": "xml"}, "format"), ("usage", {"tz": "Mars/Olympus_Mons"}, "tz"),
])
def test_bad_parameters_get_400_naming_the_parameter(idle, path, params, named):
    message = assert_anthropic_error(get(idle, path, **params), 400, "invalid_request_error")
    assert named in message


@pytest.mark.parametrize("path,params", [("stats", {"client": "nobody"}), ("sessions", {"session": "nope"}),
                                         ("context", {"session": "nope"}), ("no-such-endpoint", {})])
def test_an_unknown_client_session_or_endpoint_gets_404(idle, path, params):
    assert_anthropic_error(get(idle, path, **params), 404, "not_found_error")
