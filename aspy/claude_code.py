"""What Claude Code's requests mean: which are side requests, and what the user typed.

Learned from the real CLI (2.1.197; the requests are pinned in tests/fixtures/claude_code/
and the rules written out in docs/behaviour.md). Claude Code marks every Messages call with
``X-Claude-Code-Session-Id`` and a subagent's with ``X-Claude-Code-Agent-Id``; what it
sends beside the conversation (the session title, explaining a command) is told apart by
its body. In the conversation itself, the user's words are one text block of the last
``user`` message: Claude Code puts its own blocks (``<system-reminder>``, local command
output, reports) before it, and ``system`` messages after it.
"""
from __future__ import annotations

import re
from typing import Any

# Blocks Claude Code writes itself around the user's words.
WRAPPERS = ("<system-reminder>", "<local-command-caveat>", "<local-command-stdout>", "<local-command-stderr>",
            "<bash-stdout>", "<bash-stderr>", "<command-name>")
# The instruction /compact appends: a summary request, not the user's words.
COMPACT_MARK = "Your task is to create a detailed summary of the conversation so far"
# A prompt typed while a tool ran arrives as a system message after the user's turn.
QUEUED = "The user sent a new message while you were working:\n"
QUEUED_END = "\n\nIMPORTANT: After completing your current task"
REMINDER = re.compile(r"<system-reminder>.*?</system-reminder>", re.DOTALL)
BASH_INPUT = re.compile(r"<bash-input>(.*?)</bash-input>", re.DOTALL)
COMMAND_NAME = re.compile(r"<command-name>(.*?)</command-name>", re.DOTALL)
COMMAND_ARGS = re.compile(r"<command-args>(.*?)</command-args>", re.DOTALL)


def is_side_request(body: dict) -> bool:
    """Tell whether a Claude Code Messages call runs beside the conversation (session title, explain command)."""
    output = body["output_config"] if isinstance(body.get("output_config"), dict) else {}
    if output.get("format") or body.get("output_format"):
        return True
    # A forced tool (explain command). A missing tools list alone is not enough: `claude --tools ""`
    # runs its conversation without any.
    choice = body["tool_choice"] if isinstance(body.get("tool_choice"), dict) else {}
    return choice.get("type") == "tool"


def user_words(messages: list) -> str:
    """Return what the user typed for this request ("" for a tool round trip, /compact or a side request)."""
    queued: list[str] = []
    i = len(messages) - 1
    while i >= 0 and _role(messages[i]) == "system":
        text = "".join(_texts(messages[i]))
        if text.startswith(QUEUED):
            queued.insert(0, text[len(QUEUED):].split(QUEUED_END, 1)[0])
        i -= 1
    if i < 0 or _role(messages[i]) != "user":
        return "\n".join(queued)
    content = messages[i].get("content")
    if isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content):
        return "\n".join(queued)
    texts = _texts(messages[i])
    if not texts or COMPACT_MARK in texts[-1]:
        return "\n".join(queued)
    words = _typed(texts)
    return "\n".join([words, *queued] if words else queued)


def _typed(texts: list[str]) -> str:
    """Return the typed words among a user message's text blocks."""
    for text in texts:
        bash = BASH_INPUT.match(text)
        if bash:
            return "!" + bash.group(1)
        if text.startswith("<command-message>"):
            # A slash command that expands to a prompt: the user typed its name and arguments.
            name, args = COMMAND_NAME.search(text), COMMAND_ARGS.search(text)
            return " ".join(part for part in ((name.group(1) if name else ""), (args.group(1) if args else ""))
                            if part)
    last = texts[-1]
    if last.startswith(WRAPPERS):
        return ""
    return REMINDER.sub("", last).strip()


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def _texts(message: dict) -> list[str]:
    """Return the text blocks of a message (a plain string is one block)."""
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    return [b["text"] for b in content if isinstance(b, dict) and b.get("type") == "text"
            and isinstance(b.get("text"), str)] if isinstance(content, list) else []
