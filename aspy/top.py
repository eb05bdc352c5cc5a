"""``aspy top``: a live full-screen view of clients, sessions, tokens, cost, context and events.

It is a client of the JSON API, so it watches a remote aspy as well as a local one. It
refreshes every second; ``c`` steps through the clients, ``a`` shows all again, ``q``
quits. When the API cannot be reached, or refuses the token, it says so and keeps trying.
"""
from __future__ import annotations

import select
import sys
import termios
import time
import tty
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterator

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .apiclient import ApiClient, ApiError

REFRESH = 1.0
LEVEL_STYLE = {"normal": "green", "warning": "yellow", "high": "dark_orange", "critical": "bold red"}
FEED_TYPES = "tool_call,tool_result,error,context_compact,rate_limit,session_start,session_end"


@dataclass
class Snapshot:
    """What one refresh read from the API."""

    clients: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    sessions: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    at: float = 0.0


def read(api: ApiClient, client: str | None) -> Snapshot:
    """Read everything the view shows, for one client or all."""
    clients = api.get("clients")["clients"]
    return Snapshot(clients=clients, stats=api.get("stats", client=client),
                    sessions=[s for s in api.get("sessions", client=client, limit=50)["sessions"]
                              if s["status"] != "ended"],
                    events=api.get("events", client=client, type=FEED_TYPES, limit=15)["events"], at=time.time())


def money(usd: float) -> str:
    """Format dollars for the view."""
    return f"${usd:,.4f}" if usd < 1 else f"${usd:,.2f}"


def clock(stamp: str | None) -> str:
    """Show an API timestamp as local wall-clock time."""
    return datetime.fromisoformat(stamp).astimezone().strftime("%H:%M:%S") if stamp else "-"


def gauge(context: dict, width: int = 12) -> Text:
    """Draw a context-window bar coloured by warning level."""
    pct = context.get("usage_pct") or 0.0
    filled = min(width, round(width * pct / 100))
    style = LEVEL_STYLE.get(context.get("warning_level", "normal"), "green")
    return Text("█" * filled + "░" * (width - filled) + f" {pct:5.1f}%", style=style)


def render(snapshot: Snapshot, api_url: str, client: str | None, problem: str | None) -> Group:
    """Lay out the whole screen."""
    head = Text.assemble(("aspy top ", "bold"), (api_url, "cyan"), "  client: ", (client or "all", "bold magenta"),
                         f"  updated {clock(datetime.fromtimestamp(snapshot.at).astimezone().isoformat()) if snapshot.at else '-'}",
                         ("   c next client · a all · q quit", "dim"))
    parts: list = [head]
    if problem:
        parts.append(Panel(Text(problem + "\nRetrying every second.", style="bold red"), title="aspy unreachable",
                           border_style="red"))
    stats = snapshot.stats
    if stats:
        tokens, cost, req, tools = stats["tokens"], stats["cost"], stats["requests"], stats["tools"]
        parts.append(Text.assemble(
            ("Requests ", "bold"), f"{req['total']} ({req['failed']} failed)   ",
            ("Tokens ", "bold"), f"in {tokens['input']:,}  out {tokens['output']:,}  cache read {tokens['cache_read']:,}"
            f"  cache write {tokens['cache_write_5m'] + tokens['cache_write_1h']:,}   ",
            ("Cost ", "bold"), f"{money(cost['total_usd'])} (saved {money(cost['savings_usd'])})   ",
            ("Tools ", "bold"), f"{tools['total_calls']} ({tools['failed_calls']} failed)   ",
            ("Sessions ", "bold"), f"{stats['sessions']['active']} active, {stats['sessions']['idle']} idle, "
                                   f"{stats['sessions']['ended']} ended"))
        if cost["unpriced_models"]:
            parts.append(Text(f"No price for {', '.join(cost['unpriced_models'])}: their cost counts as 0 "
                              "(add them to models.yaml; aspy models lists the table)", style="bold yellow"))
    clients = Table(title="Clients", expand=True, title_justify="left")
    for column in ("client", "name", "provider", "live sessions", "last seen"):
        clients.add_column(column)
    for c in snapshot.clients:
        if client in (None, c["id"]):
            clients.add_row(c["id"], c["name"], c["provider"], str(c["active_sessions"]), clock(c["last_seen"]))
    sessions = Table(title="Live sessions", expand=True, title_justify="left")
    for column in ("client", "session", "status", "model", "requests", "tokens in/out", "cost", "context"):
        sessions.add_column(column)
    for s in snapshot.sessions:
        st = s["stats"]
        sessions.add_row(s["client_name"] or s["client"] or f"key {s['user']}", (s["claude_session_id"] or s["id"])[:13],
                         Text(s["status"], style="green" if s["status"] == "active" else "yellow"),
                         s["context"]["model"] or "-", str(st["requests"]["total"]), f"{st['tokens']['input']:,}/{st['tokens']['output']:,}",
                         money(st["cost"]["total_usd"]) + ("+?" if st["cost"]["unpriced_models"] else ""),
                         gauge(s["context"]))
    feed = Table(title="Recent events", expand=True, title_justify="left")
    for column in ("time", "client", "event", "detail"):
        feed.add_column(column)
    for e in snapshot.events:
        feed.add_row(clock(e["timestamp"]), e["client"] or e["user"] or "-", *describe(e))
    return Group(*parts, clients, sessions, feed)


def describe(event: dict) -> tuple[Text, str]:
    """Return an event's label and one line of detail."""
    kind = event["type"]
    if kind == "tool_call":
        return Text("tool call", style="cyan"), event.get("tool") or ""
    if kind == "tool_result":
        failed = event.get("is_error")
        return Text("tool failed" if failed else "tool result", style="red" if failed else "green"), \
            f"{event.get('tool')} ({event.get('duration_ms') or 0:.0f} ms)"
    if kind == "error":
        return Text("error", style="bold red"), f"{event.get('error_type')}: {event.get('message')}"
    if kind == "context_compact":
        return Text("compaction", style="magenta"), f"{event.get('before_tokens'):,} → {event.get('after_tokens'):,} tokens"
    if kind == "rate_limit":
        return Text("rate limit", style="yellow"), f"status {event.get('status')}"
    return Text(kind.replace("_", " "), style="dim"), event.get("reason") or event.get("source") or ""


@contextmanager
def keys() -> Iterator[callable]:
    """Read single key presses without echo; yield a function that returns one or None."""
    if not sys.stdin.isatty():
        yield lambda timeout: (time.sleep(timeout), None)[1]
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        def key(timeout: float) -> str | None:
            ready, _, _ = select.select([sys.stdin], [], [], timeout)
            return sys.stdin.read(1) if ready else None
        yield key
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run(api: ApiClient, client: str | None = None, console: Console | None = None) -> int:
    """Show the live view until q is pressed."""
    snapshot, problem = Snapshot(), None
    next_read = 0.0
    with keys() as key, Live(console=console or Console(), screen=True, auto_refresh=False) as live:
        while True:
            if time.time() >= next_read:
                try:
                    snapshot, problem = read(api, client), None
                except ApiError as exc:
                    problem = str(exc)
                next_read = time.time() + REFRESH
                live.update(render(snapshot, api.target.url, client, problem), refresh=True)
            pressed = key(0.1)
            if pressed in ("q", "Q"):
                return 0
            if pressed in ("c", "a"):
                ids = [c["id"] for c in snapshot.clients]
                if pressed == "a" or not ids:
                    client = None
                else:
                    client = ids[(ids.index(client) + 1) % len(ids)] if client in ids else ids[0]
                next_read = 0.0
