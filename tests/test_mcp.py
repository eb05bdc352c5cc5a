"""`aspy mcp`: run as a subprocess through the MCP SDK's stdio client, and by Claude Code itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import anyio
import pytest

from helpers import API_KEY, AspyProcess, claude_cli, eventually, free_port, send_message, standard_config, stats_when

CLIENTS = ('\n[clients.mcp-a]\nname = "MCP A"\nprovider = "fake"\n[clients.mcp-b]\nname = "MCP B"\nprovider = "fake"\n'
           # Claude Code's own test has a client of its own, so its sessions never change the others' answers.
           '[clients.mcp-c]\nname = "MCP C"\nprovider = "fake"\n')


def send(server, client: str, session: str, prompt: str = "hello", **headers) -> None:
    r = send_message(server, client, prompt, headers={"x-claude-code-session-id": session, **headers})
    assert r.status_code == 200


@pytest.fixture(scope="module")
def two_clients(upstream, tmp_path_factory):
    """aspy with traffic from two clients: mcp-a in two sessions, mcp-b in one."""
    server = AspyProcess(tmp_path_factory.mktemp("mcp"), standard_config(upstream.url, CLIENTS)).start()
    server.sessions = {"a-old": f"a-old-{uuid.uuid4()}", "a-new": f"a-new-{uuid.uuid4()}", "b": f"b-{uuid.uuid4()}"}
    send(server, "mcp-a", server.sessions["a-old"], "the quokka smiles", **{"x-fake-tool": "Read"})
    send(server, "mcp-b", server.sessions["b"], "the quokka frowns")
    send(server, "mcp-a", server.sessions["a-new"], "latest words", **{"x-fake-usage": json.dumps(
        {"input_tokens": 150_000, "output_tokens": 3})})
    stats_when(server, 3)
    yield server
    server.stop()


def call_tools(env: dict, calls: list[tuple[str, dict]]) -> tuple[list, list]:
    """Start `aspy mcp` with this environment, list its tools and make the calls."""
    # Imported here: the MCP SDK takes a second to import, which a run without these tests need not pay.
    from mcp import ClientSession, StdioServerParameters, stdio_client

    async def main():
        params = StdioServerParameters(command=sys.executable, args=["-m", "aspy", "mcp"],
                                       env={"PATH": os.environ["PATH"], **env})
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            listed = (await session.list_tools()).tools
            return listed, [await session.call_tool(name, args) for name, args in calls]
    return anyio.run(main)


def as_client(server, client: str = "mcp-a", **extra) -> dict:
    return {"ANTHROPIC_BASE_URL": f"{server.url}/{client}", **extra}


def test_the_five_tools_are_listed_with_descriptions_and_schemas(two_clients):
    tools, _ = call_tools(as_client(two_clients), [])
    assert [t.name for t in tools] == ["aspy_stats", "aspy_events", "aspy_context", "aspy_sessions", "aspy_search"]
    for tool in tools:
        assert len(tool.description) > 60 and tool.input_schema["type"] == "object"
    search = next(t for t in tools if t.name == "aspy_search")
    assert search.input_schema["required"] == ["keyword"]


def test_each_tool_answers_for_its_own_client_as_structured_content_and_text(two_clients):
    _, results = call_tools(as_client(two_clients), [
        ("aspy_stats", {}), ("aspy_stats", {"all_clients": True}), ("aspy_events", {"type": "tool_call"}),
        ("aspy_context", {}), ("aspy_sessions", {}), ("aspy_search", {"keyword": "quokka"}),
        ("aspy_search", {"keyword": "quokka", "all_clients": True}),
    ])
    for result in results:
        assert not result.is_error
        assert json.loads(result.content[0].text) == result.structured_content
    mine, everyone, events, context, sessions, search, search_all = (r.structured_content for r in results)
    assert mine["requests"]["total"] == 2 and everyone["requests"]["total"] == 3
    assert [e["tool"] for e in events["events"]] == ["Read"] and events["events"][0]["client"] == "mcp-a"
    assert context["client"] == "mcp-a" and context["current_tokens"] == 150_000
    assert context["warning_level"] == "warning"
    # aspy_sessions lists every client's sessions; is_me tells the caller's apart.
    assert {s["client"] for s in sessions["sessions"]} == {"mcp-a", "mcp-b"}
    assert [r["client"] for r in search["results"]] == ["mcp-a"]
    assert sorted(r["client"] for r in search_all["results"]) == ["mcp-a", "mcp-b"]


def test_is_me_marks_the_asking_sessions(two_clients):
    ids = two_clients.sessions
    # Without its session id, "me" is the client's most recently active live session.
    _, [plain, only_b] = call_tools(as_client(two_clients), [("aspy_sessions", {}),
                                                             ("aspy_sessions", {"client": "mcp-b"})])
    me = {s["claude_session_id"]: s["is_me"] for s in plain.structured_content["sessions"]}
    assert me == {ids["a-new"]: True, ids["a-old"]: False, ids["b"]: False}
    assert [s["claude_session_id"] for s in only_b.structured_content["sessions"]] == [ids["b"]]
    # With Claude Code's session id in the environment, that session is "me".
    _, [told, context] = call_tools(as_client(two_clients, CLAUDE_CODE_SESSION_ID=ids["a-old"]),
                                    [("aspy_sessions", {}), ("aspy_context", {})])
    me = {s["claude_session_id"]: s["is_me"] for s in told.structured_content["sessions"]}
    assert me == {ids["a-new"]: False, ids["a-old"]: True, ids["b"]: False}
    assert context.structured_content["claude_session_id"] == ids["a-old"]


def test_own_client_can_be_given_by_aspy_client_id(two_clients):
    _, [stats] = call_tools({"ASPY_URL": two_clients.url, "ASPY_CLIENT_ID": "mcp-b"}, [("aspy_stats", {})])
    assert stats.structured_content["requests"]["total"] == 1


def test_an_unreachable_api_is_a_tool_error_with_a_clear_message(two_clients):
    _, [result] = call_tools({"ASPY_URL": f"http://127.0.0.1:{free_port()}", "ASPY_CLIENT_ID": "mcp-a"},
                             [("aspy_stats", {})])
    assert result.is_error and "cannot reach aspy at http://127.0.0.1:" in result.content[0].text


def test_api_errors_become_tool_errors(two_clients):
    _, [result] = call_tools(as_client(two_clients), [("aspy_stats", {"session": "no-such-session"})])
    assert result.is_error and "404" in result.content[0].text and "no-such-session" in result.content[0].text


def test_the_proxy_token_in_the_base_url_is_the_bearer_token(start_aspy, upstream):
    token = "pt_" + "McpTokenForClientA_abcdefghijk"
    server = start_aspy(standard_config(upstream.url, CLIENTS.replace(
        'name = "MCP A"', f'name = "MCP A"\nproxy_token = "{token}"'), api_token="the-admin-token-0123456789"))
    r = send_message(server, token, "x")
    assert r.status_code == 200
    env = {"ANTHROPIC_BASE_URL": f"{server.url}/{token}"}
    _, [stats, everyone] = call_tools(env, [("aspy_stats", {}), ("aspy_stats", {"all_clients": True})])
    assert not stats.is_error
    _, [sessions] = eventually(lambda: (r := call_tools(env, [("aspy_sessions", {})]))[1][0]
                               .structured_content["sessions"] and r)
    assert [(s["client"], s["is_me"]) for s in sessions.structured_content["sessions"]] == [("mcp-a", True)]
    eventually(lambda: call_tools(env, [("aspy_stats", {})])[1][0].structured_content["requests"]["total"] == 1)
    # A proxy token sees its own client only: asking for everyone still answers for it alone.
    assert everyone.structured_content["requests"]["total"] <= 1
    _, [denied] = call_tools({"ASPY_URL": server.url, "ASPY_CLIENT_ID": "mcp-a"}, [("aspy_stats", {})])
    assert denied.is_error and "refused the API token" in denied.content[0].text


def test_claude_code_calls_aspy_context_through_mcp_and_sends_the_answer_upstream(two_clients, upstream, tmp_path):
    cli = claude_cli()
    mcp_config = {"mcpServers": {"aspy": {"command": sys.executable, "args": ["-m", "aspy", "mcp"],
                                          "env": {"ASPY_URL": two_clients.url, "ASPY_CLIENT_ID": "mcp-c"}}}}
    env = {
        "PATH": os.environ["PATH"], "HOME": str(tmp_path), "ANTHROPIC_BASE_URL": f"{two_clients.url}/mcp-c",
        "ANTHROPIC_API_KEY": API_KEY, "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
        "ANTHROPIC_CUSTOM_HEADERS": "x-fake-tool-once: mcp__aspy__aspy_context",
    }
    before = len(upstream.requests)
    done = subprocess.run([cli, "-p", "How full is my context window?", "--mcp-config", json.dumps(mcp_config),
                           "--allowedTools", "mcp__aspy__aspy_context,Bash(sleep:*)"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    sent = [r.json() for r in upstream.requests[before:] if r.target.startswith("/v1/messages") and r.body]
    results = [block for body in sent for message in body.get("messages", [])
               if isinstance(message.get("content"), list)
               for block in message["content"] if block.get("type") == "tool_result"
               and block["tool_use_id"].startswith("toolu_fake_")]
    assert results, "Claude Code sent no tool result upstream"
    text = json.dumps(results[-1]["content"])
    assert "current_tokens" in text and "warning_level" in text and not results[-1].get("is_error")
