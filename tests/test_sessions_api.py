"""Sessions, accounting and the JSON API (SPEC 5 and 6), end to end.

Real traffic goes through aspy under gunicorn with three gevent workers to the fake
upstream, then the API is read back. Figures must equal exactly what the upstream sent.
"""
from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from helpers import (
    API_KEY,
    MODEL,
    AspyProcess,
    api_json,
    eventually,
    price,
    send_message,
    standard_config,
    stats_when,
    usage,
)

EXTRA_CLIENTS = "".join(f'\n[clients.{c}]\nname = "{c.title()}"\nprovider = "fake"\n'
                        for c in ("team-a", "team-b", "solo", "reg", "keys", "tools", "ctx", "finder", "other",
                                  "probe"))


def send(server, client: str, prompt: str = "hello", stream: bool = False, headers: dict | None = None,
         body: dict | None = None, model: str = MODEL, **tokens) -> requests.Response:
    """Send one Messages request through aspy; tokens set the usage the upstream answers with."""
    h = {"x-fake-usage": json.dumps(usage(**tokens))} if tokens else {}
    return send_message(server, client, prompt, model, stream, h | (headers or {}), body, max_tokens=64)


def session_of(server, key: str) -> dict:
    """Return the newest session with this id or Claude session id, waiting for it to be recorded."""
    def found():
        r = requests.get(f"{server.url}/api/sessions", params={"session": key})
        return r.status_code == 200 and r.json()["sessions"]
    return eventually(found)[0]


def key() -> str:
    """Return a fresh session key."""
    return str(uuid.uuid4())


@pytest.fixture(scope="module")
def tracked(upstream, tmp_path_factory, fresh_store):
    """aspy with three workers, recording to SQLite or PostgreSQL."""
    server = AspyProcess(tmp_path_factory.mktemp("tracked"),
                         standard_config(upstream.url, EXTRA_CLIENTS) + fresh_store(), workers=3).start()
    yield server
    server.stop()


def test_parallel_traffic_totals_are_exact_per_client_and_session(tracked):
    jobs = []
    for n in range(60):
        client = "team-a" if n % 2 == 0 else "team-b"
        jobs.append(dict(client=client, key=f"{client}-{n % 3}", stream=n % 4 < 2,
                         tokens=dict(i=10 + n, o=5 + n, read=100 * n, w5=n, w1=2 * n)))
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda j: send(tracked, j["client"], stream=j["stream"],
                                     headers={"x-claude-code-session-id": j["key"]}, **j["tokens"]), jobs))
    for scope_name, scope in [("client", "team-a"), ("client", "team-b"), ("session", "team-a-0"),
                              ("session", "team-b-2")]:
        mine = [j for j in jobs if (j["client"] if scope_name == "client" else j["key"]) == scope]
        stats = stats_when(tracked, len(mine), **{scope_name: scope})
        expect = {k: sum(j["tokens"][k] for j in mine) for k in ("i", "o", "read", "w5", "w1")}
        assert stats["tokens"] == {"input": expect["i"], "output": expect["o"], "cache_read": expect["read"],
                                   "cache_write_5m": expect["w5"], "cache_write_1h": expect["w1"],
                                   "web_search_requests": 0}
        cost = sum(price(**j["tokens"]) for j in mine)
        assert stats["cost"]["total_usd"] == pytest.approx(cost, abs=1e-6)
        assert stats["cost"]["by_model"][MODEL] == pytest.approx(cost, abs=1e-6)
        assert stats["cost"]["savings_usd"] == pytest.approx(expect["read"] * (3 - 0.3) / 1e6, abs=1e-6)
        assert stats["requests"] == {"total": len(mine), "failed": 0}
    sessions = api_json(tracked, "sessions", client="team-a")["sessions"]
    assert sorted(s["claude_session_id"] for s in sessions) == ["team-a-0", "team-a-1", "team-a-2"]


def test_stats_answer_the_fixed_keys(tracked):
    send(tracked, "dev-1")
    stats = api_json(tracked, "stats")
    assert set(stats) >= {"requests", "tokens", "cost", "tools", "sessions"}
    assert set(stats["requests"]) >= {"total", "failed"}
    assert set(stats["tokens"]) >= {"input", "output", "cache_read", "cache_write_5m", "cache_write_1h"}
    assert set(stats["cost"]) >= {"total_usd", "savings_usd", "by_model", "unpriced_models"}
    assert set(stats["tools"]) >= {"total_calls", "failed_calls", "by_tool"}
    assert set(stats["sessions"]) >= {"active", "idle", "ended"}


@pytest.mark.parametrize("how,source", [
    ("claude", "claude_code"), ("x-session-id", "header"), ("metadata-json", "metadata"),
    ("metadata-old", "metadata"),
])
def test_session_is_identified_by_each_key_source(tracked, how, source):
    sid = key()
    body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    headers = {}
    if how == "claude":
        headers["x-claude-code-session-id"] = sid
    elif how == "x-session-id":
        headers["x-session-id"] = sid
    elif how == "metadata-json":
        body["metadata"] = {"user_id": json.dumps({"device_id": "d1", "account_uuid": "", "session_id": sid})}
    else:
        body["metadata"] = {"user_id": f"user_{'ab' * 32}_account__session_{sid}"}
    send(tracked, "keys", body=body, headers=headers)
    send(tracked, "keys", body=body, headers=headers)
    session = session_of(tracked, sid)
    assert session["claude_session_id"] == sid and session["source"] == source
    assert eventually(lambda: session_of(tracked, sid)["stats"]["requests"]["total"] == 2)


def test_claude_code_header_wins_over_other_keys(tracked):
    header_key, other = key(), key()
    body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
            "metadata": {"user_id": json.dumps({"session_id": other})}}
    send(tracked, "keys", body=body, headers={"x-claude-code-session-id": header_key, "x-session-id": other})
    assert session_of(tracked, header_key)["source"] == "claude_code"
    assert api_json(tracked, "sessions", client="keys", limit=500)["sessions"][0]["claude_session_id"] == header_key


def test_keyless_requests_share_the_implicit_session(tracked):
    send(tracked, "solo")
    send(tracked, "solo", stream=True)
    found = eventually(lambda: (s := api_json(tracked, "sessions", client="solo")["sessions"])
                       and s[0]["stats"]["requests"]["total"] == 2 and s)
    assert len(found) == 1 and found[0]["source"] == "implicit" and found[0]["claude_session_id"] is None


def test_a_registered_session_takes_keyless_traffic(tracked):
    r = requests.post(f"{tracked.url}/api/session/start",
                      json={"client": "reg", "session_id": "reg-1", "source": "hook"})
    assert r.status_code == 201 and r.json()["created"] is True
    again = requests.post(f"{tracked.url}/api/session/start", json={"client": "reg", "session_id": "reg-1"})
    assert again.status_code == 200 and again.json()["session"]["id"] == r.json()["session"]["id"]
    send(tracked, "reg")
    session = eventually(lambda: (s := session_of(tracked, "reg-1"))["stats"]["requests"]["total"] == 1 and s)
    assert session["client"] == "reg" and session["source"] == "registered"
    start = api_json(tracked, "events", session="reg-1", type="session_start")["events"]
    assert start[0]["source"] == "hook"


def test_ending_a_session_archives_it_with_its_final_stats(tracked):
    sid = key()
    send(tracked, "dev-1", headers={"x-claude-code-session-id": sid}, i=100, o=50)
    eventually(lambda: session_of(tracked, sid)["stats"]["requests"]["total"] == 1)
    r = requests.post(f"{tracked.url}/api/session/end", json={"session_id": sid, "reason": "user_exit"})
    assert r.status_code == 200
    final = r.json()["session"]
    assert final["status"] == "ended" and final["end_reason"] == "user_exit" and final["ended"]
    assert final["stats"]["tokens"]["input"] == 100
    assert final["stats"]["cost"]["total_usd"] == pytest.approx(price(100, 50))
    ended = api_json(tracked, "sessions", status="ended", client="dev-1", limit=500)["sessions"]
    assert sid in [s["claude_session_id"] for s in ended]
    assert api_json(tracked, "events", session=sid, type="session_end")["events"][0]["reason"] == "user_exit"
    # The same key afterwards opens a new session; the archived one keeps its figures.
    send(tracked, "dev-1", headers={"x-claude-code-session-id": sid}, i=1, o=1)
    newest = eventually(lambda: (s := session_of(tracked, sid))["id"] != final["id"] and s)
    assert newest["status"] == "active"
    archived = [s for s in api_json(tracked, "sessions", client="dev-1", limit=500)["sessions"]
                if s["id"] == final["id"]]
    assert archived[0]["stats"]["tokens"]["input"] == 100


def test_tool_results_are_correlated_with_their_calls_and_errors(tracked):
    sid, tool_id = key(), "toolu_" + uuid.uuid4().hex[:16]
    headers = {"x-claude-code-session-id": sid}
    send(tracked, "tools", stream=True, headers=headers | {"x-fake-tool": "Bash", "x-fake-tool-id": tool_id})
    session_of(tracked, sid)
    call = eventually(lambda: api_json(tracked, "events", session=sid, type="tool_call")["events"])[0]
    assert call["tool"] == "Bash" and call["tool_use_id"] == tool_id and call["input"] == {"command": "ls"}
    body = {"model": MODEL, "max_tokens": 8, "messages": [
        {"role": "user", "content": "run ls"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": tool_id, "name": "Bash", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "is_error": True,
                                      "content": "ls: permission denied"}]}]}
    send(tracked, "tools", body=body, headers=headers)
    result = eventually(lambda: api_json(tracked, "events", session=sid, type="tool_result")["events"])[0]
    assert result["tool"] == "Bash" and result["tool_use_id"] == tool_id and result["is_error"] is True
    assert result["duration_ms"] >= 0
    tools = session_of(tracked, sid)["stats"]["tools"]
    assert tools["total_calls"] == 1 and tools["failed_calls"] == 1 and tools["by_tool"] == {"Bash": 1}
    assert api_json(tracked, "stats", session=sid)["tools"]["failed_calls"] == 1


def test_context_gauge_follows_the_main_thread_and_detects_compaction(tracked):
    sid = key()
    headers = {"x-claude-code-session-id": sid}
    send(tracked, "ctx", headers=headers, i=100_000, o=10, read=40_000, w5=10_000)
    session_of(tracked, sid)
    ctx = eventually(lambda: (c := api_json(tracked, "context", session=sid))["current_tokens"] == 150_000 and c)
    assert ctx["limit_tokens"] == 200_000 and ctx["usage_pct"] == 75.0 and ctx["warning_level"] == "warning"
    assert ctx["model"] == MODEL
    # A subagent's request counts toward the session but leaves the gauge alone.
    send(tracked, "ctx", headers=headers | {"x-claude-code-agent-id": "agent-1"}, i=1000, o=10)
    eventually(lambda: session_of(tracked, sid)["stats"]["requests"]["total"] == 2)
    assert api_json(tracked, "context", session=sid)["current_tokens"] == 150_000
    send(tracked, "ctx", stream=True, headers=headers, i=20_000, o=10)
    ctx = eventually(lambda: (c := api_json(tracked, "context", session=sid))["compactions"] == 1 and c)
    assert ctx["current_tokens"] == 20_000 and ctx["warning_level"] == "normal"
    compact = api_json(tracked, "events", session=sid, type="context_compact")["events"][0]
    assert compact["before_tokens"] == 150_000 and compact["after_tokens"] == 20_000
    # The context-1m beta no longer widens Sonnet 4.5's window; a 1M model's window is 1M.
    send(tracked, "ctx", headers=headers | {"anthropic-beta": "context-1m-2025-08-07"}, i=180_000, o=1)
    ctx = eventually(lambda: (c := api_json(tracked, "context", session=sid))["current_tokens"] == 180_000 and c)
    assert ctx["limit_tokens"] == 200_000 and ctx["warning_level"] == "high"
    send(tracked, "ctx", headers=headers, model="claude-opus-4-6", i=900_000, o=1)
    ctx = eventually(lambda: (c := api_json(tracked, "context", session=sid))["current_tokens"] == 900_000 and c)
    assert ctx["limit_tokens"] == 1_000_000 and ctx["warning_level"] == "high"
    assert api_json(tracked, "context", client="ctx")["session"] == session_of(tracked, sid)["id"]
    assert any(c["session"] == ctx["session"] for c in api_json(tracked, "context")["contexts"])


def test_search_finds_prompts_and_answers_with_snippets_and_time_ranges(tracked):
    word = "zebra" + uuid.uuid4().hex[:6]
    send(tracked, "finder", prompt=f"where does the {word} sleep at night", stream=True,
         headers={"x-fake-text": f"The {word} sleeps standing up in quiet meadows."})

    def search(**kw):
        return requests.post(f"{tracked.url}/api/search", json={"keyword": word, **kw}).json()

    found = eventually(lambda: (r := search())["total_matches"] == 2 and r)
    assert {h["role"] for h in found["results"]} == {"user", "assistant"}
    for hit in found["results"]:
        assert f"**{word}**" in hit["snippet"] and hit["client"] == "finder" and hit["session"]
        assert hit["timestamp"].endswith("+00:00")
    assert search(role="assistant")["total_matches"] == 1
    assert search(time_range="last_hour")["total_matches"] == 2
    assert search(time_range="today")["total_matches"] == 2
    assert search(time_range="yesterday")["total_matches"] == 0
    assert search(time_range={"since": "2999-01-01T00:00:00Z"})["total_matches"] == 0
    everything = {"since": "2000-01-01T00:00:00+00:00", "until": "2999-01-01T00:00:00Z"}
    assert search(time_range=everything)["total_matches"] == 2
    assert search(client="other")["total_matches"] == 0
    assert search(client="finder", keyword=f"{word} meadows")["total_matches"] == 1


def test_unknown_models_cost_nothing_and_are_listed(tracked):
    sid = key()
    send(tracked, "dev-1", model="claude-future-9", headers={"x-claude-code-session-id": sid}, i=1000, o=1000)
    stats = stats_when(tracked, 1, session=sid)
    assert stats["cost"]["total_usd"] == 0
    assert stats["cost"]["unpriced_models"] == ["claude-future-9"]
    assert stats["tokens"]["input"] == 1000


def test_requests_that_are_not_messages_calls_count_but_open_no_session(tracked):
    # Claude Code's start-up probe, a model list and count_tokens: the client's traffic, no session.
    assert requests.head(f"{tracked.url}/probe/", headers={"x-claude-code-session-id": key()}).status_code == 200
    assert requests.get(f"{tracked.url}/probe/v1/models", headers={"x-api-key": API_KEY}).status_code == 200
    assert requests.post(f"{tracked.url}/probe/v1/messages/count_tokens", headers={"x-api-key": API_KEY},
                         json={"model": MODEL, "messages": []}).status_code == 200
    failing = requests.get(f"{tracked.url}/probe/v1/models", headers={"x-fake-status": "500"})
    assert failing.status_code == 500
    stats = stats_when(tracked, 4, client="probe")
    assert stats["requests"] == {"total": 4, "failed": 1}
    assert stats["sessions"] == {"active": 0, "idle": 0, "ended": 0}
    assert api_json(tracked, "sessions", client="probe")["sessions"] == []
    [probe] = [c for c in api_json(tracked, "clients")["clients"] if c["id"] == "probe"]
    assert probe["active_sessions"] == 0 and probe["last_seen"] is not None


def test_failed_requests_are_counted_with_an_error_event(tracked):
    sid = key()
    send(tracked, "dev-1", headers={"x-claude-code-session-id": sid, "x-fake-status": "529"})
    stats = stats_when(tracked, 1, session=sid)
    assert stats["requests"]["failed"] == 1
    error = api_json(tracked, "events", session=sid, type="error")["events"][0]
    assert error["status"] == 529 and error["error_type"] == "overloaded_error"
    send(tracked, "dev-1", headers={"x-claude-code-session-id": sid, "x-fake-status": "429", "x-fake-body":
                                    '{"type":"error","error":{"type":"rate_limit_error","message":"slow"}}'})
    limited = eventually(lambda: api_json(tracked, "events", session=sid, type="rate_limit")["events"])
    assert limited[0]["status"] == 429


def test_events_come_newest_first_and_filter(tracked):
    sid = key()
    send(tracked, "dev-1", headers={"x-claude-code-session-id": sid, "x-fake-tool": "Read"})
    session_of(tracked, sid)
    events = eventually(lambda: (e := api_json(tracked, "events", session=sid)["events"]) and len(e) >= 4 and e)
    assert [e["type"] for e in events] == ["tool_call", "response", "request", "session_start"]
    assert [e["id"] for e in events] == sorted((e["id"] for e in events), reverse=True)
    response = events[1]
    assert {"status", "model", "stop_reason", "usage", "cost_usd", "ttfb_ms"} <= set(response)
    for e in events:
        assert {"id", "type", "timestamp", "session", "client"} <= set(e) and e["client"] == "dev-1"
    assert len(api_json(tracked, "events", session=sid, limit=2)["events"]) == 2
    assert [e["type"] for e in api_json(tracked, "events", session=sid, type="request,response")["events"]] == \
        ["response", "request"]
    assert api_json(tracked, "events", session=sid, since="2999-01-01T00:00:00Z")["events"] == []


def test_clients_lists_configured_clients_with_live_sessions(tracked):
    send(tracked, "other")
    found = eventually(lambda: next((c for c in api_json(tracked, "clients")["clients"]
                                     if c["id"] == "other" and c["last_seen"]), None))
    assert found == {"id": "other", "name": "Other", "provider": "fake", "tags": [], "active_sessions": 1,
                     "last_seen": found["last_seen"]}
    dev = next(c for c in api_json(tracked, "clients")["clients"] if c["id"] == "dev-1")
    assert dev["tags"] == ["dev"] and dev["name"] == "Dev Laptop"


@pytest.mark.parametrize("path,params", [
    ("events", {"limit": "501"}), ("events", {"limit": "x"}), ("events", {"type": "nope"}),
    ("events", {"since": "yesterday-ish"}), ("sessions", {"status": "sleeping"}), ("stats", {"user": "XYZ"}),
    ("stats", {"time_range": "forever"}), ("sessions", {"until": "soon"}), ("usage", {"group_by": "year"}),
    ("usage", {"tz": "Nowhere/Land"}),
])
def test_bad_parameters_get_400_in_anthropic_shape(tracked, path, params):
    r = requests.get(f"{tracked.url}/api/{path}", params=params)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("path,params", [("stats", {"session": "no-such"}), ("stats", {"client": "nobody"}),
                                         ("nope", {})])
def test_unknown_session_client_or_endpoint_get_404(tracked, path, params):
    r = requests.get(f"{tracked.url}/api/{path}", params=params)
    assert r.status_code == 404 and r.json()["type"] == "error"


@pytest.mark.parametrize("path,body", [
    ("search", {}), ("search", {"keyword": "x", "time_range": "last_year"}), ("search", {"keyword": "x", "limit": 0}),
    ("search", {"keyword": "x", "role": "system"}), ("session/start", {"session_id": "x"}),
    ("session/start", {"client": "reg", "user": "anonymous", "session_id": "x"}), ("session/end", {}),
])
def test_bad_bodies_get_400(tracked, path, body):
    r = requests.post(f"{tracked.url}/api/{path}", json=body)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_malformed_json_body_gets_400(tracked):
    r = requests.post(f"{tracked.url}/api/search", data=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400


def test_ending_an_unknown_session_gets_404(tracked):
    r = requests.post(f"{tracked.url}/api/session/end", json={"session_id": "never-was"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_idle_and_ended_transitions(start_aspy, upstream, fresh_store):
    server = start_aspy(standard_config(upstream.url, '\n[sessions]\nidle_after = "1s"\nend_after = "2500ms"\n')
                        + fresh_store())
    sid = key()
    send(server, "dev-1", headers={"x-claude-code-session-id": sid})
    assert session_of(server, sid)["status"] == "active"
    assert eventually(lambda: session_of(server, sid)["status"] == "idle", timeout=5)
    assert api_json(server, "stats")["sessions"]["idle"] == 1
    ended = eventually(lambda: (s := session_of(server, sid))["status"] == "ended" and s, timeout=6)
    assert ended["end_reason"] == "timeout" and ended["stats"]["requests"]["total"] == 1
    assert api_json(server, "stats")["sessions"] == {"active": 0, "idle": 0, "ended": 1}
    # Reads derive the status at once; the writer's upkeep (every 5 s) marks the end and writes its event.
    [end] = eventually(lambda: api_json(server, "events", session=sid, type="session_end")["events"], timeout=12)
    assert end["reason"] == "timeout"


def test_figures_are_intact_after_a_restart(start_aspy, upstream, fresh_store):
    config = standard_config(upstream.url) + fresh_store()
    server = start_aspy(config)
    for n in range(5):
        send(server, "dev-1", stream=n % 2 == 0, headers={"x-claude-code-session-id": "restart"}, i=n + 1, o=2)
    before = stats_when(server, 5)
    sessions_before = api_json(server, "sessions")
    server.stop()
    again = start_aspy(config)
    assert api_json(again, "stats") == before
    assert api_json(again, "sessions")["sessions"][0]["stats"] == sessions_before["sessions"][0]["stats"]


def test_a_read_only_store_leaves_proxying_working(start_aspy, upstream, tmp_path):
    db = tmp_path / "ro.db"
    sqlite3.connect(db).close()
    if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here, so a read-only file cannot be made for root")
    try:
        server = start_aspy(standard_config(upstream.url, f'\n[store]\nurl = "sqlite:///{db}"\n'))
        for stream in (False, True):
            r = send(server, "dev-1", stream=stream)
            assert r.status_code == 200 and (b"fake upstream" in r.content or b"part 0" in r.content)
        assert eventually(lambda: re.search(r"recording \d+ exchanges failed", server.log_text()))
        assert "readonly database" in server.log_text()
        health = requests.get(f"{server.url}/health").json()
        assert health["status"] == "degraded" and health["store"]["reachable"] is False
        assert requests.get(f"{server.url}/api/stats").status_code == 503
    finally:
        subprocess.run(["chattr", "-i", str(db)])


def test_a_locked_store_leaves_proxying_working_and_loses_nothing(start_aspy, upstream, tmp_path):
    db = tmp_path / "locked.db"
    server = start_aspy(standard_config(upstream.url, f'\n[store]\nurl = "sqlite:///{db}"\n'))
    send(server, "dev-1", headers={"x-claude-code-session-id": "locked"})
    stats_when(server, 1)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    released = threading.Event()
    try:
        started = time.time()
        for n in range(4):
            r = send(server, "dev-1", stream=n % 2 == 0, headers={"x-claude-code-session-id": "locked"})
            assert r.status_code == 200
        assert time.time() - started < 3, "proxying waited on the locked store"
        eventually(lambda: "recording" in server.log_text() and "failed" in server.log_text(), timeout=10)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        released.set()
    assert stats_when(server, 5)["requests"]["failed"] == 0


def test_every_answer_has_the_documented_keys(tracked):
    sid = key()
    send(tracked, "dev-1", headers={"x-claude-code-session-id": sid, "x-fake-tool": "Grep",
                                    "x-fake-tool-id": "toolu_" + uuid.uuid4().hex[:12]}, prompt="shape check")
    session = session_of(tracked, sid)
    assert set(session) >= {"id", "claude_session_id", "client", "user", "provider", "status", "started",
                            "last_activity", "ended", "end_reason", "stats"}
    assert set(session["stats"]) >= {"requests", "tokens", "cost", "tools"}
    for stamp in ("started", "last_activity"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", session[stamp])
    context = api_json(tracked, "context", session=sid)
    assert set(context) >= {"session", "client", "model", "current_tokens", "limit_tokens", "usage_pct",
                            "warning_level", "compactions"}
    assert set(api_json(tracked, "context")) == {"contexts"}
    client = api_json(tracked, "clients")["clients"][0]
    assert set(client) >= {"id", "name", "provider", "tags", "active_sessions", "last_seen"}
    events = eventually(lambda: (e := api_json(tracked, "events", session=sid)["events"]) and len(e) >= 4 and e)
    by_type = {e["type"]: e for e in events}
    assert {"tool", "tool_use_id"} <= set(by_type["tool_call"])
    assert {"status", "model", "stop_reason", "usage", "cost_usd", "ttfb_ms"} <= set(by_type["response"])
    found = eventually(lambda: (r := requests.post(f"{tracked.url}/api/search", json={"keyword": "shape check"}).json())
                       ["total_matches"] and r)
    assert set(found) >= {"total_matches", "results"}
    assert set(found["results"][0]) >= {"session", "client", "timestamp", "role", "snippet"}
    over_time = api_json(tracked, "usage", group_by="day,client", tz="Europe/Paris")
    assert set(over_time) >= {"group_by", "tz", "since", "until", "rows", "total", "unpriced_models"}
    assert over_time["group_by"] == ["day", "client"] and over_time["tz"] == "Europe/Paris"
    row = over_time["rows"][0]
    assert set(row) >= {"day", "client", "requests", "failed", "tokens", "cost_usd", "savings_usd"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", row["day"])
    assert set(row["tokens"]) >= {"input", "output", "cache_read", "cache_write_5m", "cache_write_1h"}
    assert set(over_time["total"]) >= {"requests", "failed", "tokens", "cost_usd", "savings_usd"}
    [session_row] = api_json(tracked, "usage", group_by="session", session=sid)["rows"]
    assert session_row["session"] == session["id"] and session_row["claude_session_id"] == sid
