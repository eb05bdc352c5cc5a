"""aspy's clients of its own API in-process: where they find it, what they make of its answers and failures,
and what `aspy report --url`, `aspy top` and `aspy mcp`'s tools read through them.

The API is the in-process app's, reached at ASPY_URL through ``responses``. The commands run as
processes, in a terminal and under Claude Code, are the end-to-end tests' (test_top, test_mcp).
"""
from __future__ import annotations

import json
import re

import anyio
import pytest
from rich.console import Console

from aspy.apiclient import ApiClient, ApiError, Target, find_target
from aspy.cli import main
from helpers import APP_PROXY_TOKEN, APP_TOKEN, ASPY_URL, bearer, serve_api, usage


@pytest.fixture
def api(client, upstream_answers) -> ApiClient:
    """aspy's API client, with the API token, on the in-process app."""
    serve_api(upstream_answers, client)
    return ApiClient(Target(ASPY_URL, APP_TOKEN, None, None))


@pytest.mark.parametrize("url,client,env,expected", [
    (None, None, {}, Target("http://127.0.0.1:8080", None, None, None)),
    (None, None, {"ANTHROPIC_BASE_URL": "https://team.example:8443/dev-1"},
     Target("https://team.example:8443", None, "dev-1", None)),
    (None, None, {"ANTHROPIC_BASE_URL": f"http://10.0.0.5:8080/{APP_PROXY_TOKEN}/",
                  "CLAUDE_CODE_SESSION_ID": "s-1"}, Target("http://10.0.0.5:8080", APP_PROXY_TOKEN, None, "s-1")),
    (None, None, {"ANTHROPIC_BASE_URL": "http://127.0.0.1:8080/v1"}, Target("http://127.0.0.1:8080", None, None, None)),
    (None, None, {"ANTHROPIC_BASE_URL": "http://a:1/dev-1", "ASPY_URL": "http://b:2/", "ASPY_CLIENT_ID": "ci",
                  "ASPY_API_TOKEN": "t"}, Target("http://b:2", "t", "ci", None)),
    ("http://flag:3", "mine", {"ASPY_URL": "http://b:2", "ASPY_CLIENT_ID": "ci"}, Target("http://flag:3", None, "mine",
                                                                                         None)),
])
def test_the_api_is_found_from_the_flags_then_the_environment(url, client, env, expected):
    assert find_target(url, client, env) == expected


def test_answers_come_back_as_json_and_empty_parameters_are_left_out(api, traffic):
    traffic.send(session="read-me", prompt="a quokka smiles", usage=usage(40, 2))
    assert api.get("stats", client=None, session="read-me")["tokens"]["input"] == 40
    assert api.post("search", {"keyword": "quokka", "role": None})["total_matches"] == 1


@pytest.mark.parametrize("token,path,said", [
    ("not-the-token-0123456789", "stats", "refused the API token: set ASPY_API_TOKEN"),
    (APP_TOKEN, "sessions?session=nope", "aspy answered 404: Unknown session 'nope'"),
    (APP_TOKEN, "sessions?limit=0", "aspy answered 400: limit must be between 1 and 500"),
])
def test_a_refusal_is_an_error_saying_why(api, token, path, said):
    with pytest.raises(ApiError, match=re.escape(said)):
        ApiClient(Target(ASPY_URL, token, None, None)).get(path)


def test_an_address_that_is_not_aspy_is_an_error_saying_so(upstream_answers):
    upstream_answers.get("http://elsewhere.test/api/stats", body="<html>hello</html>")
    with pytest.raises(ApiError, match="answered 200 with no JSON: is it aspy"):
        ApiClient(Target("http://elsewhere.test", None, None, None)).get("stats")
    with pytest.raises(ApiError, match=r"cannot reach aspy at http://nobody\.test \(is `aspy serve` running"):
        ApiClient(Target("http://nobody.test", None, None, None)).get("stats")


def test_report_reads_the_same_figures_from_the_api(api, client, traffic, capsys, monkeypatch):
    traffic.send("dev-1", usage=usage(1_000, 100))
    traffic.send("dev-2", usage=usage(2_000, 200))
    monkeypatch.setenv("ASPY_API_TOKEN", APP_TOKEN)
    assert main(["report", "--url", ASPY_URL, "--json", "--client", "dev-2"]) == 0
    figures = client.get("/api/usage", query_string={"group_by": "day", "client": "dev-2"},
                         headers=bearer(APP_TOKEN)).json
    assert json.loads(capsys.readouterr().out) == figures and figures["total"]["tokens"]["input"] == 2_000


def test_top_shows_what_it_reads(api, traffic):
    from aspy.top import read, render

    traffic.send("dev-1", session="top-session", tool="Grep", usage=usage(150_000, 10))
    snapshot = read(api, "dev-1")
    assert [s["claude_session_id"] for s in snapshot.sessions] == ["top-session"]
    assert snapshot.stats["tools"]["by_tool"] == {"Grep": 1} and snapshot.in_flight == []
    console = Console(record=True, width=120, height=40)
    console.print(render(snapshot, ASPY_URL, "dev-1", None, console))
    screen = console.export_text()
    assert "Dev Laptop" in screen and "top-session"[:8] in screen and "Grep" in screen


def test_the_mcp_tools_answer_for_the_callers_own_client(client, upstream_answers, traffic):
    # Imported here: the MCP SDK takes a second to import, which the other tests need not pay.
    from mcp.server.mcpserver.exceptions import ToolError

    from aspy.mcp_server import build_server

    serve_api(upstream_answers, client)
    traffic.send("dev-1", session="not-mine", usage=usage(500, 5))
    traffic.send(APP_PROXY_TOKEN, session="mine", usage=usage(70, 7), prompt="where is the quokka")
    # Claude Code behind a proxy token: the token is its bearer token, its one client its own.
    server = build_server(ApiClient(find_target(env={"ANTHROPIC_BASE_URL": f"{ASPY_URL}/{APP_PROXY_TOKEN}",
                                                     "CLAUDE_CODE_SESSION_ID": "mine"})))
    names = {tool.name for tool in anyio.run(server.list_tools)}
    assert names == {"aspy_stats", "aspy_events", "aspy_context", "aspy_sessions", "aspy_search"}

    def call(name: str, **args) -> dict:
        result = anyio.run(server.call_tool, name, args)
        assert not result.is_error, result.content
        return result.structured_content

    assert call("aspy_stats")["tokens"]["input"] == 70
    [session] = call("aspy_sessions")["sessions"]
    assert session["claude_session_id"] == "mine" and session["is_me"] is True
    assert call("aspy_search", keyword="quokka")["total_matches"] == 1
    # An API failure is a tool error (which the SDK sends as one) saying what aspy answered.
    with pytest.raises(ToolError, match="aspy answered 404: Unknown session 'no-such-session'"):
        anyio.run(server.call_tool, "aspy_stats", {"session": "no-such-session"})
