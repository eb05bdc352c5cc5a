"""``aspy mcp``: an MCP server over stdio that lets Claude Code ask aspy about itself.

Each tool calls aspy's JSON API and answers its JSON as structured content and as text.
Tools are scoped to the caller's own client (see :mod:`aspy.apiclient`) unless asked for
``all_clients``, except ``aspy_sessions``, which lists every session the token may see with
``is_me`` marking the caller's; an API failure becomes a tool error with a plain message.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import anyio
import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

from . import __version__
from .apiclient import ApiClient, ApiError, Target
from .store import EVENT_TYPES
from .timerange import NAMED

ALL_CLIENTS = {"type": "boolean", "default": False,
               "description": "Answer for every client instead of only this Claude Code's own client."}


def schema(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    """Return a JSON schema for a tool's arguments."""
    return {"type": "object", "properties": properties, "required": required or [], "additionalProperties": False}


TOOLS = [
    types.Tool(
        name="aspy_stats",
        description="Token use, cost in USD (by model, with cache savings), request and tool-call counts, and "
                    "session counts, as recorded by the aspy proxy. Use it to answer 'what have I spent', "
                    "'how many tokens so far', 'which tools failed'.",
        input_schema=schema({"session": {"type": "string", "description": "Only this session (aspy id or "
                                         "Claude Code session id)."}, "all_clients": ALL_CLIENTS})),
    types.Tool(
        name="aspy_events",
        description="Recent events, newest first: requests, responses (model, usage, cost), tool calls and "
                    "results (with failures), thinking, errors, rate limits, context compactions, session "
                    "start and end.",
        input_schema=schema({
            "type": {"type": "string", "description": "Only these event types, comma-separated: "
                     + ", ".join(EVENT_TYPES)},
            "limit": {"type": "integer", "minimum": 1, "maximum": 500, "default": 20},
            "since": {"type": "string", "description": "ISO 8601 timestamp; only events from then on."},
            "session": {"type": "string"}, "all_clients": ALL_CLIENTS})),
    types.Tool(
        name="aspy_context",
        description="How full the context window is: current tokens, the model's limit, percent used, a "
                    "warning level (normal, warning >= 70%, high >= 85%, critical >= 95%) and how many "
                    "compactions happened. Use it to decide whether to compact or start afresh.",
        input_schema=schema({"session": {"type": "string", "description": "A session id; default: this "
                                         "Claude Code's own current session."}, "all_clients": ALL_CLIENTS})),
    types.Tool(
        name="aspy_sessions",
        description="Every session aspy may show this Claude Code, of every client, with their statistics "
                    "(tokens, cost, tools, context), most recent first. is_me marks the session of the "
                    "Claude Code asking.",
        input_schema=schema({
            "status": {"type": "string", "enum": ["active", "idle", "ended"]},
            "limit": {"type": "integer", "minimum": 1, "maximum": 500, "default": 20},
            "client": {"type": "string", "description": "Only this client's sessions."}})),
    types.Tool(
        name="aspy_search",
        description="Search past prompts and answers recorded by aspy (every word must match); returns ranked "
                    "snippets with their session, time and role. Use it to recall 'when did we discuss X'.",
        input_schema=schema({
            "keyword": {"type": "string", "description": "Words to find."},
            "time_range": {"type": "string", "enum": list(NAMED), "default": "all"},
            "role": {"type": "string", "enum": ["user", "assistant"]},
            "limit": {"type": "integer", "minimum": 1, "maximum": 100, "default": 10},
            "all_clients": ALL_CLIENTS}, required=["keyword"])),
]


class AspyTools:
    """The tools' behaviour: API calls scoped to the caller's own client."""

    def __init__(self, api: ApiClient):
        self.api = api
        self.target: Target = api.target
        self._client = api.target.client

    def own_client(self) -> str | None:
        """Return this Claude Code's client id; behind a proxy token, the one client the API shows."""
        if self._client is None and (self.target.token or "").startswith("pt_"):
            clients = self.api.get("clients")["clients"]
            if len(clients) == 1:
                self._client = clients[0]["id"]
        return self._client

    def scope(self, args: dict) -> dict[str, Any]:
        """Return the client filter: this Claude Code's own client unless all clients were asked for."""
        return {} if args.get("all_clients") else {"client": self.own_client()}

    def aspy_stats(self, args: dict) -> dict:
        if args.get("session"):
            return self.api.get("stats", session=args["session"])
        return self.api.get("stats", **self.scope(args))

    def aspy_events(self, args: dict) -> dict:
        return self.api.get("events", type=args.get("type"), limit=args.get("limit", 20), since=args.get("since"),
                            session=args.get("session"), **self.scope(args))

    def aspy_context(self, args: dict) -> dict:
        if args.get("session"):
            return self.api.get("context", session=args["session"])
        if self.target.claude_session_id and not args.get("all_clients"):
            try:
                return self.api.get("context", session=self.target.claude_session_id)
            except ApiError as exc:
                if exc.status != 404:
                    raise
        if args.get("all_clients") or not self.own_client():
            return self.api.get("context")
        return self.api.get("context", client=self.own_client())

    def aspy_sessions(self, args: dict) -> dict:
        # Unlike the other tools, every session the token may see: is_me tells this one apart.
        answer = self.api.get("sessions", status=args.get("status"), limit=args.get("limit", 20),
                              client=args.get("client"))
        mine = self._my_session(answer["sessions"])
        for session in answer["sessions"]:
            session["is_me"] = session["id"] == mine
        return answer

    def _my_session(self, sessions: list[dict]) -> str | None:
        """Return the id of the asking Claude Code's session: by its session id, else its client's newest live one."""
        if self.target.claude_session_id:
            for s in sessions:
                if s["claude_session_id"] == self.target.claude_session_id:
                    return s["id"]
        live = [s for s in sessions if s["client"] == self.own_client() and s["client"] is not None
                and s["status"] != "ended"]
        return max(live, key=lambda s: s["last_activity"])["id"] if live else None

    def aspy_search(self, args: dict) -> dict:
        return self.api.post("search", {"keyword": args.get("keyword"), "time_range": args.get("time_range"),
                                        "role": args.get("role"), "limit": args.get("limit", 10),
                                        **self.scope(args)})


def build_server(api: ApiClient) -> Server:
    """Return the MCP server with aspy's tools."""
    tools = AspyTools(api)
    calls: dict[str, Callable[[dict], dict]] = {t.name: getattr(tools, t.name) for t in TOOLS}

    async def list_tools(_ctx, _params) -> types.ListToolsResult:
        return types.ListToolsResult(tools=TOOLS)

    async def call_tool(_ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
        call = calls.get(params.name)
        if call is None:
            return error_result(f"unknown tool {params.name!r}")
        try:
            answer = await anyio.to_thread.run_sync(call, dict(params.arguments or {}))
        except ApiError as exc:
            return error_result(str(exc))
        return types.CallToolResult(content=[types.TextContent(type="text", text=json.dumps(answer, indent=1))],
                                    structured_content=answer)

    return Server("aspy", version=__version__, on_list_tools=list_tools, on_call_tool=call_tool,
                  instructions="aspy records this Claude Code's traffic through its proxy: ask it about tokens, "
                               "cost, context-window use, tool calls and past conversations.")


def error_result(message: str) -> types.CallToolResult:
    """Return a tool error with a plain message."""
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)], is_error=True)


def run(api: ApiClient) -> None:
    """Serve MCP over stdio until the client closes it."""
    server = build_server(api)

    async def main() -> None:
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())

    anyio.run(main)
