"""What the workloads send: Claude Code's headers and the request bodies of W1, W2 and W3.

The bodies are those of ../shared/peer-bench/harness.py (w1_body, w2_template, code_text,
tools_array, w3_body), so that ``bench/`` and the side-by-side harness send the same
traffic: the same seed gives the same 400 KB turn byte for byte.
"""
from __future__ import annotations

import json
import random

SESSION_W1 = "5f0c6c2e-8d1a-4b7e-9a53-0b1e2f3a4c5d"
# Each W2 client's own session id takes its place in the body, as in the metadata Claude Code sends.
W2_SESSION_PLACEHOLDER = "00000000-0000-4000-8000-SESSIONBENCH"
MODEL = "claude-sonnet-4-5-20250929"


def headers_for(session_id: str) -> dict[str, str]:
    """Return headers like Claude Code's (those that matter to a proxy)."""
    return {"content-type": "application/json", "accept": "application/json",
            "anthropic-version": "2023-06-01",
            "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
            "x-api-key": "sk-ant-bench-0000000000000000", "user-agent": "claude-cli/2.0.0 (external, cli)",
            "x-app": "cli", "x-claude-code-session-id": session_id, "accept-encoding": "identity"}


def w1_body() -> bytes:
    """Return a ~300-byte streamed Messages request."""
    body = {"model": MODEL, "max_tokens": 1024, "stream": True,
            "messages": [{"role": "user", "content": "Say hello, then name three primes."}],
            "metadata": {"user_id": f"user_{'ab' * 32}_account__session_{SESSION_W1}"}}
    return json.dumps(body).encode()


def w3_body(events: int) -> bytes:
    """Return a small streamed request whose answer is ``events`` events one second apart."""
    body = {"model": MODEL, "max_tokens": 1024, "stream": True,
            "system": f"bench:w3:{events} You are a slow assistant.",
            "messages": [{"role": "user", "content": "Count slowly."}]}
    return json.dumps(body).encode()


def code_text(rng: random.Random, lines: int) -> str:
    """Return source-like text (quotes, indentation, newlines), as a Read tool result holds."""
    words = ["self", "record", "session", "exchange", "observer", "store", "batch", "events", "usage",
             "tokens", "context", "window", "client", "provider", "stream", "chunk", "parse", "config"]
    out = []
    for n in range(lines):
        indent = "    " * rng.randint(0, 3)
        a, b, c = rng.choice(words), rng.choice(words), rng.choice(words)
        kind = rng.randint(0, 4)
        if kind == 0:
            line = f'{indent}def {a}_{b}(self, {c}: dict[str, int]) -> "{b.title()}":'
        elif kind == 1:
            line = f'{indent}{a} = {b}.get("{c}", {rng.randint(0, 9999)})  # {c} of the {a}'
        elif kind == 2:
            line = f'{indent}if {a} is not None and {b}["{c}"] > {rng.randint(1, 99)}:'
        elif kind == 3:
            line = f'{indent}log.info("{a} %s {b} %d", {c}, len({a}))'
        else:
            line = f"{indent}return {{'{a}': {b}, '{c}': [{rng.randint(0, 9)}, {rng.randint(0, 9)}]}}"
        out.append(f"{n + 1:>6}\t{line}")
    return "\n".join(out)


def tools_array(rng: random.Random) -> list[dict]:
    """Return Claude Code's tools, with descriptions of a realistic length."""
    names = ["Task", "Bash", "Glob", "Grep", "ExitPlanMode", "Read", "Edit", "MultiEdit", "Write",
             "NotebookEdit", "WebFetch", "TodoWrite", "WebSearch", "BashOutput", "KillShell", "SlashCommand",
             "mcp__aspy__aspy_stats", "mcp__aspy__aspy_context"]
    tools = []
    for name in names:
        description = " ".join(
            f"Use the {name} tool to {rng.choice(['read', 'search', 'run', 'edit', 'list', 'fetch'])} "
            f"{rng.choice(['files', 'commands', 'patterns', 'pages', 'notebooks', 'todos'])} when the user asks; "
            f"never {rng.choice(['guess', 'assume', 'skip checks'])}."
            for _ in range(rng.randint(8, 30)))
        tools.append({"name": name, "description": description, "input_schema": {
            "type": "object", "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#",
            "required": ["command"] if name == "Bash" else ["file_path"],
            "properties": {
                "file_path": {"type": "string", "description": "The absolute path to the file to operate on"},
                "command": {"type": "string", "description": "The command to execute"},
                "timeout": {"type": "number", "description": "Optional timeout in milliseconds (max 600000)"},
                "description": {"type": "string", "description": "Clear, concise description in 5-10 words"},
                "limit": {"type": "number", "description": "The number of lines to read."},
                "offset": {"type": "number", "description": "The line number to start reading from."}}}})
    return tools


def w2_template(target_size: int = 400_000) -> bytes:
    """Return a Claude Code turn late in a session: ~400 KB of history, tool calls and results, tools."""
    rng = random.Random(42)
    system = [{"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
               "cache_control": {"type": "ephemeral"}},
              {"type": "text", "cache_control": {"type": "ephemeral"},
               "text": "bench:w2 You are an interactive CLI tool that helps users with software engineering tasks. "
                       + " ".join(f"Rule {i}: keep answers short, check the code before editing it, and "
                                  f"never invent file paths ({rng.randint(0, 1 << 30)})." for i in range(120))}]
    messages: list[dict] = [{"role": "user", "content": [
        {"type": "text", "text": "<system-reminder>Context: the repository is aspy.</system-reminder>"},
        {"type": "text", "text": "The recorder drops events under load; find out why and fix it."}]}]
    body = {"model": MODEL, "max_tokens": 32000, "stream": True, "system": system,
            "messages": messages, "tools": tools_array(rng), "temperature": 1,
            "metadata": {"user_id": f"user_{'cd' * 32}_account__session_{W2_SESSION_PLACEHOLDER}"}}
    turn = 0
    while len(json.dumps(body)) < target_size - 6000:
        turn += 1
        tool_id = f"toolu_01{turn:04d}{rng.getrandbits(64):016x}"
        path = f"/home/dev/aspy/aspy/{rng.choice(['recorder', 'sessions', 'observe', 'proxy', 'store/sqlite'])}.py"
        messages.append({"role": "assistant", "content": [
            {"type": "text", "text": f"Let me look at {path} around the batching code ({turn})."},
            {"type": "tool_use", "id": tool_id, "name": rng.choice(["Read", "Grep", "Bash"]),
             "input": {"file_path": path, "offset": rng.randint(1, 400), "limit": 120}}]})
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": tool_id, "content": code_text(rng, rng.randint(20, 110))}]})
    messages[-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}
    messages.append({"role": "assistant", "content": [{"type": "text", "text": "Now I see the problem."}]})
    messages.append({"role": "user", "content": [{"type": "text", "text": "Go on, and run the tests."}]})
    return json.dumps(body).encode()


def w2_body(template: bytes, session_id: str) -> bytes:
    """Return the W2 turn of one client's session."""
    return template.replace(W2_SESSION_PLACEHOLDER.encode(), session_id.encode())
