"""``aspy mcp``: an MCP server over stdio that lets Claude Code ask aspy about itself.

Each tool calls aspy's JSON API and answers its JSON as structured content and as text.
Tools are scoped to the caller's own client (see :mod:`aspy.apiclient`) unless asked for
``all_clients``, except ``aspy_sessions``, which lists every session the token may see with
``is_me`` marking the caller's; an API failure becomes a tool error with a plain message.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from . import __version__
from .apiclient import ApiClient, ApiError, Target
from .records import EVENT_TYPES
from .timerange import NAMED

INSTRUCTIONS = ("aspy records this Claude Code's traffic through its proxy: ask it about tokens, cost, "
                "context-window use, tool calls and past conversations.")
AllClients = Annotated[bool, Field(
    description="Answer for every client instead of only this Claude Code's own client.")]
Session = Annotated[str | None, Field(description="Only this session (aspy id or Claude Code session id).")]
Limit = Annotated[int, Field(ge=1, le=500)]
TimeRange = Literal["last_hour", "today", "yesterday", "last_24_hours", "last_7_days", "last_30_days", "all"]
assert get_args(TimeRange) == NAMED, "aspy_search offers the time ranges the API takes"


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


def build_server(api: ApiClient) -> MCPServer:
    """Return the MCP server with aspy's tools; each answers the API's JSON, as structured content and as text."""
    tools = AspyTools(api)
    server = MCPServer("aspy", version=__version__, instructions=INSTRUCTIONS)

    async def answer(call: Any, args: dict[str, Any]) -> dict[str, Any]:
        # The API client blocks: it runs in a thread, so the server keeps reading stdio meanwhile.
        try:
            return await anyio.to_thread.run_sync(call, args)
        except ApiError as exc:
            raise ToolError(str(exc)) from None

    @server.tool(description=(
        "Token use, cost in USD (by model, with cache savings), request and tool-call counts, and "
        "session counts, as recorded by the aspy proxy. Use it to answer 'what have I spent', 'how many "
        "tokens so far', 'which tools failed'."))
    async def aspy_stats(session: Session = None, all_clients: AllClients = False) -> dict[str, Any]:
        """Answer the API's /api/stats."""
        return await answer(tools.aspy_stats, {"session": session, "all_clients": all_clients})

    @server.tool(description=(
        "Recent events, newest first: requests, responses (model, usage, cost), tool calls and results "
        "(with failures), thinking, errors, rate limits, context compactions, session start and end."))
    async def aspy_events(
        type: Annotated[str | None, Field(description="Only these event types, comma-separated: "
                                          + ", ".join(EVENT_TYPES))] = None,
        limit: Limit = 20,
        since: Annotated[str | None, Field(description="ISO 8601 timestamp; only events from then on.")] = None,
        session: Session = None, all_clients: AllClients = False,
    ) -> dict[str, Any]:
        """Answer the API's /api/events."""
        return await answer(tools.aspy_events, {"type": type, "limit": limit, "since": since, "session": session,
                                                "all_clients": all_clients})

    @server.tool(description=(
        "How full the context window is: current tokens, the model's limit, percent used, a warning "
        "level (normal, warning >= 70%, high >= 85%, critical >= 95%) and how many compactions happened. "
        "Use it to decide whether to compact or start afresh."))
    async def aspy_context(
        session: Annotated[str | None, Field(description="A session id; default: this Claude Code's own "
                                             "current session.")] = None,
        all_clients: AllClients = False,
    ) -> dict[str, Any]:
        """Answer the API's /api/context."""
        return await answer(tools.aspy_context, {"session": session, "all_clients": all_clients})

    @server.tool(description=(
        "Every session aspy may show this Claude Code, of every client, with their statistics (tokens, "
        "cost, tools, context), most recent first. is_me marks the session of the Claude Code asking."))
    async def aspy_sessions(
        status: Literal["active", "idle", "ended"] | None = None, limit: Limit = 20,
        client: Annotated[str | None, Field(description="Only this client's sessions.")] = None,
    ) -> dict[str, Any]:
        """Answer the API's /api/sessions, with is_me."""
        return await answer(tools.aspy_sessions, {"status": status, "limit": limit, "client": client})

    @server.tool(description=(
        "Search past prompts and answers recorded by aspy (every word must match); returns ranked "
        "snippets with their session, time and role. Use it to recall 'when did we discuss X'."))
    async def aspy_search(
        keyword: Annotated[str, Field(description="Words to find.")],
        time_range: TimeRange = "all",
        role: Literal["user", "assistant"] | None = None,
        limit: Annotated[int, Field(ge=1, le=100)] = 10, all_clients: AllClients = False,
    ) -> dict[str, Any]:
        """Answer the API's /api/search."""
        return await answer(tools.aspy_search, {"keyword": keyword, "time_range": time_range, "role": role,
                                                "limit": limit, "all_clients": all_clients})

    return server


def run(api: ApiClient) -> None:
    """Serve MCP over stdio until the client closes it."""
    anyio.run(build_server(api).run_stdio_async)
