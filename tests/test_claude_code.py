"""Claude Code as it is: its real requests (pinned fixtures) and the live CLI through aspy."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

from aspy.prompts import is_messages_call, read_request
from aspy.records import Exchange, Observation, Request, Response
from aspy.store import Horizon, Scope
from helpers import API_KEY, book, claude_cli, eventually, standard_config

CAPTURES = Path(__file__).resolve().parent / "fixtures" / "claude_code"
CLIENT = '\n[clients.cc]\nname = "Claude Code"\nprovider = "fake"\n'

# fixture: (a Messages call, thread, the user's own words)
EXPECTED = {
    "head_probe.json": (False, None, ""),
    "count_tokens.json": (False, None, None),
    "count_tokens_tools.json": (False, None, None),
    "main_turn_first_prompt.json": (True, "main", "say zanzibarquokka"),
    "main_turn_first_prompt_interactive.json": (True, "main", "hello from tmux, say interactivequokka"),
    "main_turn_after_local_command.json": (True, "main", "second prompt: tell me more"),
    "main_turn_after_context_command.json": (True, "main", "after context: say ctxquokka"),
    "main_turn_tool_result.json": (True, "main", ""),
    "main_turn_agent_result.json": (True, "main", ""),
    "at_mention_turn.json": (True, "main", "what did that print? also see @made_by_fake.txt"),
    "bash_mode_turn.json": (True, "main", "!echo bangquokka"),
    "slash_command_turn.json": (True, "main", "/init focus on tests please"),
    "queued_message_turn.json": (True, "main", "queuedquokka typed while busy"),
    "continue_turn.json": (True, "main", "now say continuedquokka"),
    "resume_turn.json": (True, "main", "third: say resumedquokka"),
    "resume_fork_turn.json": (True, "main", "fourth: say forkedquokka"),
    "resume_interactive_turn.json": (True, "main", "resumed interactively: say resumequokka"),
    "compact_request.json": (True, "main", ""),
    "compact_request_with_instructions.json": (True, "main", ""),
    "post_compact_turn.json": (True, "main", "after compact: say postcompactquokka"),
    "session_title.json": (True, "side", ""),
    "session_title_interactive.json": (True, "side", ""),
    "explain_command.json": (True, "side", ""),
    "subagent_turn.json": (True, "subagent", None),
    "subagent_turn_tool_result.json": (True, "subagent", ""),
}


def capture(name: str) -> dict:
    """Return one captured request: method, path, headers (lower-case), body."""
    request = json.loads((CAPTURES / name).read_text())
    request["headers"] = {k.lower(): v for k, v in request["headers"].items()}
    return request


def facts_of(request: dict):
    body = json.dumps(request["body"]).encode() if request["body"] is not None else b""
    return read_request(body, "application/json", claude_code="x-claude-code-session-id" in request["headers"])


def test_every_capture_is_pinned():
    assert sorted(p.name for p in CAPTURES.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_real_request_is_classified_and_its_prompt_is_the_users_own_words(name):
    messages_call, thread, words = EXPECTED[name]
    request = capture(name)
    facts = facts_of(request)
    assert is_messages_call(request["method"], request["path"]) is messages_call
    if thread == "side":
        assert facts.side
    elif thread is not None:
        assert not facts.side and ("x-claude-code-agent-id" in request["headers"]) is (thread == "subagent")
    if words is not None:
        assert facts.prompt == words


def test_the_user_turn_is_found_before_trailing_system_messages():
    body = capture("main_turn_first_prompt.json")["body"]
    assert body["messages"][-1]["role"] == "system"
    # Without Claude Code's rules (another client), the last user message is still the prompt.
    plain = read_request(json.dumps(body).encode(), "application/json")
    assert "zanzibarquokka" in plain.prompt and "<system-reminder>" not in plain.prompt


def exchange_of(name: str, usage: dict, at: float) -> Exchange:
    """Return a recorded exchange for a captured request, answered with this usage."""
    request = capture(name)
    headers = {k: v for k, v in request["headers"].items()
               if k in ("x-claude-code-session-id", "x-claude-code-agent-id", "anthropic-beta")}
    body = json.dumps(request["body"]).encode()
    facts = read_request(body, "application/json", claude_code="x-claude-code-session-id" in headers)
    return Exchange(started_at=at, client="dev", provider="anthropic", user="0123456789abcdef",
                    request=Request(request["method"], request["path"], headers, "application/json", len(body), facts),
                    response=Response(200, duration_ms=2.0, ttfb_ms=1.0, observation=Observation(
                        model=request["body"]["model"], usage=usage, text="an answer")))


def test_the_session_title_counts_but_leaves_the_gauge_and_is_not_a_compaction(tmp_path):
    sessions = book(tmp_path)
    main = exchange_of("main_turn_first_prompt.json", {"input_tokens": 1_425, "cache_read_input_tokens": 20_000,
                                                       "output_tokens": 30}, 1000.0)
    title = exchange_of("session_title.json", {"input_tokens": 554, "output_tokens": 9}, 1001.0)
    title.request.headers["x-claude-code-session-id"] = main.request.headers["x-claude-code-session-id"]
    sessions.record([main])
    sessions.record([title])
    [session] = sessions.store.sessions(sessions_scope(), None, Horizon(0, 0), 5)
    assert session.requests == 2 and session.usage.input_tokens == 1_425 + 554
    assert session.context_tokens == 21_425 and session.compactions == 0
    prompts = list(search_all(sessions, "title"))
    assert prompts == []


def sessions_scope():
    return Scope()


def search_all(sessions, word: str):
    return sessions.store.search([word], None, None, sessions_scope(), None, 50)[1]


def test_side_requests_text_is_not_searchable_and_prompts_are_the_users_words(tmp_path):
    sessions = book(tmp_path)
    sessions.record([exchange_of("main_turn_first_prompt.json", {"input_tokens": 10}, 1000.0),
                     exchange_of("session_title.json", {"input_tokens": 5}, 1001.0),
                     exchange_of("subagent_turn.json", {"input_tokens": 5}, 1002.0)])
    hits = search_all(sessions, "zanzibarquokka")
    assert [h.role for h in hits] == ["user"]
    assert search_all(sessions, "reminder") == [] and search_all(sessions, "USE_TOOL") == []


# The live CLI ---------------------------------------------------------------------------


def cli_env(home: Path, base_url: str, **extra: str) -> dict:
    return {"PATH": os.environ["PATH"], "HOME": str(home), "ANTHROPIC_BASE_URL": base_url,
            "ANTHROPIC_API_KEY": API_KEY, "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1", **extra}


def run_cli(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([claude_cli(), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=180,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture
def cc_aspy(start_aspy, upstream):
    return start_aspy(standard_config(upstream.url, CLIENT))


def test_live_cli_prompt_is_searchable_title_leaves_the_gauge_and_the_probe_is_no_failure(cc_aspy, upstream,
                                                                                          tmp_path):
    word = "zanzibar" + uuid.uuid4().hex[:8]
    usage = {"input_tokens": 1_425, "cache_read_input_tokens": 20_000, "output_tokens": 30}
    before = len(upstream.requests)
    # Nonessential traffic on: the CLI then asks for a session title beside the first turn.
    run_cli(["-p", f"say {word}"], cli_env(tmp_path, f"{cc_aspy.url}/cc",
                                           ANTHROPIC_CUSTOM_HEADERS=f"x-fake-usage: {json.dumps(usage)}"), tmp_path)
    seen = upstream.requests[before:]
    assert any(r.method == "HEAD" for r in seen), "the CLI sent no start-up probe"
    assert any(r.body and b'"output_config"' in r.body for r in seen), "the CLI asked for no session title"
    stats = eventually(lambda: (s := requests.get(f"{cc_aspy.url}/api/stats", params={"client": "cc"}).json())
                       ["requests"]["total"] == len(seen) and s)
    assert stats["requests"]["failed"] == 0
    [session] = requests.get(f"{cc_aspy.url}/api/sessions", params={"client": "cc"}).json()["sessions"]
    assert session["claude_session_id"] and session["user"] != "anonymous"
    context = requests.get(f"{cc_aspy.url}/api/context", params={"session": session["id"]}).json()
    assert context["current_tokens"] == 21_425 and context["compactions"] == 0
    found = requests.post(f"{cc_aspy.url}/api/search", json={"keyword": word}).json()
    assert [r["role"] for r in found["results"] if r["role"] == "user"] == ["user"]
    for keyword in ("title", "reminder", "session"):
        for hit in requests.post(f"{cc_aspy.url}/api/search", json={"keyword": keyword}).json()["results"]:
            assert "system-reminder" not in hit["snippet"] and "Write the title" not in hit["snippet"]


def test_an_mcp_tool_called_right_after_a_turn_sees_that_turn_and_its_own_session(cc_aspy, upstream, tmp_path):
    usage = {"input_tokens": 3_210, "cache_read_input_tokens": 40_000, "output_tokens": 12}
    mcp = {"mcpServers": {"aspy": {"command": sys.executable, "args": ["-m", "aspy", "mcp"],
                                   "env": {"ASPY_URL": cc_aspy.url, "ASPY_CLIENT_ID": "cc"}}}}
    headers = f"x-fake-usage: {json.dumps(usage)}\nx-fake-tool-once: mcp__aspy__aspy_context,mcp__aspy__aspy_sessions"
    before = len(upstream.requests)
    run_cli(["-p", "How full is my context window, and which session is mine?", "--mcp-config", json.dumps(mcp),
             "--allowedTools", "mcp__aspy__aspy_context,mcp__aspy__aspy_sessions,Bash(sleep:*)"],
            cli_env(tmp_path, f"{cc_aspy.url}/cc", CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
                    ANTHROPIC_CUSTOM_HEADERS=headers), tmp_path)
    sent = [r for r in upstream.requests[before:] if r.target.startswith("/v1/messages") and r.body]
    claude_session = sent[0].headers["x-claude-code-session-id"]
    results = {}
    for request in sent:
        for message in request.json()["messages"]:
            for block in message["content"] if isinstance(message["content"], list) else []:
                if block.get("type") == "tool_result" and block["tool_use_id"].startswith("toolu_fake_"):
                    content = block["content"]
                    results[block["tool_use_id"]] = json.loads(content if isinstance(content, str)
                                                               else content[0]["text"])
    offered = [[t["name"] for t in r.json().get("tools", []) if t["name"].startswith("mcp__")] for r in sent]
    assert "toolu_fake_1" in results and "toolu_fake_2" in results, f"tools offered per request: {offered}"
    context, sessions = results["toolu_fake_1"], results["toolu_fake_2"]
    # The turn that asked for the tool ended some milliseconds before: its tokens are already there.
    assert context["current_tokens"] == 43_210 and context["claude_session_id"] == claude_session
    mine = [s["claude_session_id"] for s in sessions["sessions"] if s["is_me"]]
    assert mine == [claude_session]
