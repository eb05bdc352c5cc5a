"""What a request asks: whether it is a Messages call to bill, and what its body says.

The proxy hands the body over once the answer is out (so a large body costs the client
nothing), and :func:`read_request` reads its facts: the model, streaming, sizes, the session
hint in ``metadata.user_id``, the user's prompt and the tool results of the last user turn,
and the lifetime cache writes take. Requests from Claude Code are read with its rules
(:mod:`aspy.claude_code`). An unreadable body gives empty facts, never an error.
"""
from __future__ import annotations

import json
import re
from typing import Any

import orjson

from . import claude_code as claude_code_rules
from .records import FIVE_MINUTES, ONE_HOUR, RequestFacts, clean_text

# The paths of a Messages call on each provider: Anthropic and Azure Foundry, Vertex, Bedrock.
MESSAGES_PATH = re.compile(r"(?:/v1/messages|/publishers/anthropic/models/[^/]+:(?:stream)?rawPredict"
                           r"|/model/[^/]+/invoke(?:-with-response-stream)?)$", re.IGNORECASE)
# Downloading a Message Batch's results: where the batch's messages, and their bill, arrive.
BATCH_RESULTS_PATH = re.compile(r"/v1/messages/batches/[^/]+/results$")


def is_messages_call(method: str, path: str) -> bool:
    """Tell whether a request brings back messages to bill (not a probe, a model list or count_tokens)."""
    path = path.split("?", 1)[0]
    if method == "GET":
        return BATCH_RESULTS_PATH.search(path) is not None
    return method == "POST" and MESSAGES_PATH.search(path) is not None


def _text(value: Any) -> str | None:
    """Return a string field as clean text, or None when it is not a string."""
    return clean_text(value) if isinstance(value, str) else None


def parse_json(data: bytes | str) -> Any:
    """Parse JSON as the standard library does, with orjson's speed where the two agree.

    orjson refuses what json accepts (lone surrogate escapes, NaN, 1e400), and makes a float of
    an integer past 64 bits; those few documents are read again by json, the others read alike
    for what aspy looks at (strings, lists, objects and counts up to 10**12).
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def read_request(body: bytes, content_type: str, claude_code: bool = False) -> RequestFacts:
    """Read the facts of a Messages API request body; an unreadable body gives empty facts.

    ``claude_code``: the request came from Claude Code, whose side requests and prompt
    wrappers :mod:`aspy.claude_code` knows.
    """
    facts = RequestFacts()
    if not body or "json" not in content_type.lower():
        return facts
    try:
        data = parse_json(body)
    except (ValueError, RecursionError):
        return facts
    if not isinstance(data, dict):
        return facts
    facts.model = _text(data.get("model"))
    facts.stream = data.get("stream") is True
    messages = data["messages"] if isinstance(data.get("messages"), list) else []
    facts.message_count = len(messages)
    facts.tool_count = len(data["tools"]) if isinstance(data.get("tools"), list) else 0
    metadata = data.get("metadata")
    if isinstance(metadata, dict):
        facts.metadata_user_id = _text(metadata.get("user_id"))
    # The user's turn is the last user message, even with system messages after it.
    last_user = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") != "system"), None)
    if isinstance(last_user, dict) and last_user.get("role") == "user":
        _read_user_turn(last_user.get("content"), facts)
    if claude_code:
        facts.side = claude_code_rules.is_side_request(data)
        facts.prompt = "" if facts.side else claude_code_rules.user_words(messages)
    facts.prompt = clean_text(facts.prompt)
    facts.cache_ttl = _cache_ttl(data)
    return facts


def _cache_ttl(request: dict) -> str:
    """Return the lifetime of the request's last cache breakpoint (tools, then system, then messages)."""
    last = FIVE_MINUTES
    blocks: list[Any] = []
    for key in ("tools", "system"):
        if isinstance(request.get(key), list):
            blocks += request[key]
    for message in request["messages"] if isinstance(request.get("messages"), list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            blocks += content
    for block in blocks:
        control = block.get("cache_control") if isinstance(block, dict) else None
        if isinstance(control, dict):
            last = ONE_HOUR if control.get("ttl") == ONE_HOUR else FIVE_MINUTES
    return last


def _read_user_turn(content: Any, facts: RequestFacts) -> None:
    """Collect the text and tool results of the user's last message."""
    if isinstance(content, str):
        facts.prompt = claude_code_rules.REMINDER.sub("", content).strip()
        return
    texts = []
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif block.get("type") == "tool_result":
            # An id is a string ("toolu_..."); anything else matches no call.
            facts.tool_results.append((_text(block.get("tool_use_id")) or "", block.get("is_error") is True))
    facts.prompt = claude_code_rules.REMINDER.sub("", "\n".join(texts)).strip()
