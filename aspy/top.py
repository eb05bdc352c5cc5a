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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .apiclient import ApiClient, ApiError

REFRESH = 1.0
LEVEL_STYLE = {"normal": "green", "warning": "yellow", "high": "dark_orange", "critical": "bold red"}
FEED_TYPES = "tool_call,tool_result,error,context_compact,rate_limit,session_start,session_end"
# On a small screen (80x24) the event feed and the live sessions keep at least this many lines, clients and
# requests in flight take at most these.
FEED_LINES = 5
SESSION_LINES = 3
MOST_CLIENTS = 4
MOST_IN_FLIGHT = 4
# From this many columns the sessions table shows every figure.
WIDE = 120


@dataclass
class Snapshot:
    """What one refresh read from the API."""

    clients: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    sessions: list[dict] = field(default_factory=list)
    in_flight: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    at: float = 0.0


def read(api: ApiClient, client: str | None) -> Snapshot:
    """Read everything the view shows, for one client or all."""
    clients = api.get("clients")["clients"]
    return Snapshot(clients=clients, stats=api.get("stats", client=client),
                    sessions=[s for s in api.get("sessions", client=client, limit=50)["sessions"]
                              if s["status"] != "ended"],
                    in_flight=in_flight(api, client),
                    events=api.get("events", client=client, type=FEED_TYPES, limit=15)["events"], at=time.time())


def in_flight(api: ApiClient, client: str | None) -> list[dict]:
    """Read the requests in flight; an aspy older than GET /api/in_flight has none to show."""
    try:
        return api.get("in_flight", client=client)["in_flight"]
    except ApiError as exc:
        if exc.status == 404:
            return []
        raise


def money(usd: float) -> str:
    """Format dollars for the view."""
    return f"${usd:,.4f}" if usd < 1 else f"${usd:,.2f}"


def clock(stamp: str | None) -> str:
    """Show an API timestamp as local wall-clock time."""
    return datetime.fromisoformat(stamp).astimezone().strftime("%H:%M:%S") if stamp else "-"


def seconds(ms: float | None) -> str:
    """Show a duration in milliseconds as a short text."""
    if ms is None:
        return "-"
    return f"{ms:,.0f} ms" if ms < 1000 else f"{ms / 1000:,.1f} s"


def gauge(context: dict, width: int = 12) -> Text:
    """Draw a context-window bar coloured by warning level."""
    pct = context.get("usage_pct") or 0.0
    filled = min(width, round(width * pct / 100))
    style = LEVEL_STYLE.get(context.get("warning_level", "normal"), "green")
    return Text("█" * filled + "░" * (width - filled) + f" {pct:5.1f}%", style=style)


def table(*columns: str) -> Table:
    """Return a compact table: one header line (its first column names the table), then one line a row."""
    made = Table(box=None, expand=True, pad_edge=False, header_style="bold reverse")
    for column in columns:
        made.add_column(column, no_wrap=True, overflow="ellipsis")
    made.columns[0].min_width = len(columns[0])
    return made


class Lines:
    """The screen's lines left for the tables; None when its height is unknown, and every row shows."""

    def __init__(self, left: int | None):
        self.left = left

    def take(self, rows: int, total: int | None = None, most: int | None = None) -> int:
        """Return how many of a table's rows fit (of ``total`` in all), keeping a line for "+N more"."""
        total = rows if total is None else total
        if self.left is None:
            return rows
        # A table with a cap takes at most a quarter of the lines left, or its cap on a small screen.
        room = self.left - 1 if most is None else min(self.left - 1, max(most, self.left // 4))
        room = max(room, 0)
        shown = min(rows, room if total <= room else max(room - 1, 0))
        self.left -= 1 + shown + (shown < total)
        return shown


def more(shown: Table, hidden: int) -> None:
    """Say under a table how many rows did not fit."""
    if hidden > 0:
        shown.caption, shown.caption_justify, shown.caption_style = f"+{hidden} more", "left", "dim"


def render(snapshot: Snapshot, api_url: str, client: str | None, problem: str | None,
           console: Console | None = None) -> Group:
    """Lay out the whole screen; on a console of known height, rows are cut so the event feed stays in view."""
    updated = clock(datetime.fromtimestamp(snapshot.at).astimezone().isoformat()) if snapshot.at else "-"
    head = Text.assemble(("aspy top ", "bold"), (api_url, "cyan"), "  client: ", (client or "all", "bold magenta"),
                         f"  {updated}", ("  c client · a all · q quit", "dim"))
    parts: list = [head]
    if problem:
        parts.append(Panel(Text(problem + "\nRetrying every second.", style="bold red"), title="aspy unreachable",
                           border_style="red"))
    stats = snapshot.stats
    live = len(snapshot.sessions)
    if stats:
        tokens, cost, req, tools = stats["tokens"], stats["cost"], stats["requests"], stats["tools"]
        # The view reads at most 50 sessions; the stats count them all.
        live = max(live, stats["sessions"]["active"] + stats["sessions"]["idle"])
        parts.append(Text.assemble(
            ("Requests ", "bold"), f"{req['total']} ({req['failed']} failed)   ",
            ("Tokens ", "bold"), f"in {tokens['input']:,}  out {tokens['output']:,}"
            f"  cache read {tokens['cache_read']:,}"
            f"  cache write {tokens['cache_write_5m'] + tokens['cache_write_1h']:,}   ",
            ("Cost ", "bold"), f"{money(cost['total_usd'])} (saved {money(cost['savings_usd'])})   ",
            ("Tools ", "bold"), f"{tools['total_calls']} ({tools['failed_calls']} failed)   ",
            ("Sessions ", "bold"), f"{stats['sessions']['active']} active, {stats['sessions']['idle']} idle, "
                                   f"{stats['sessions']['ended']} ended"))
        if cost["unpriced_models"]:
            parts.append(Text(f"No price for {', '.join(cost['unpriced_models'])}: their cost counts as 0 "
                              "(add them to models.yaml; aspy models lists the table)", style="bold yellow"))
    lines = Lines(console.height - sum(len(console.render_lines(p, pad=False)) for p in parts)
                  if console is not None and console.height else None)
    # The feed's lines are set aside first (a third of the screen, at least FEED_LINES): many sessions never
    # push it off the screen.
    feed_kept, session_floor = len(snapshot.events), 0
    if lines.left is not None:
        feed_kept = min(feed_kept, max(FEED_LINES, lines.left // 3))
        # Live sessions keep a few rows too, however many clients and requests in flight there are.
        session_floor = 1 + min(live, SESSION_LINES) + (live > SESSION_LINES)
        lines.left -= 1 + feed_kept + session_floor

    mine = [c for c in snapshot.clients if client in (None, c["id"])]
    clients = table("Clients", "name", "provider", "live sessions", "last seen")
    shown = lines.take(len(mine), most=MOST_CLIENTS)
    for c in mine[:shown]:
        clients.add_row(c["id"], c["name"], c["provider"], str(c["active_sessions"]), clock(c["last_seen"]))
    more(clients, len(mine) - shown)

    flight: Table | Text
    if snapshot.in_flight:
        flight = table("In flight", "session", "model", "for", "first byte")
        shown = lines.take(len(snapshot.in_flight), most=MOST_IN_FLIGHT)
        # Ages go on between two reads of the API.
        since = 1000 * (time.time() - snapshot.at) if snapshot.at else 0
        for f in snapshot.in_flight[:shown]:
            age = f["elapsed_ms"] + since
            flight.add_row(f["client"] or f"key {f['user']}", (f["session"] or "-")[:13], f["model"] or "-",
                           Text(seconds(age), style="bold yellow" if age > 60_000 else ""),
                           seconds(f["ttfb_ms"]) if f["ttfb_ms"] is not None else Text("waiting", style="dim"))
        more(flight, len(snapshot.in_flight) - shown)
    else:
        flight = Text("In flight: nothing right now", style="dim")
        if lines.left is not None:
            lines.left -= 1

    if lines.left is not None:
        lines.left += session_floor
    # 80 columns hold the figures that matter; a wide screen shows them all.
    wide = console is None or console.width >= WIDE
    sessions = table("Live sessions", "session", "status", "model", "requests", "tokens in/out", "cost", "context") \
        if wide else table("Live sessions", "session", "model", "req", "cost", "context")
    sessions.columns[-1].min_width = 19 if wide else 13
    if not wide:
        sessions.columns[2].max_width = 18
    shown = lines.take(len(snapshot.sessions), total=live)
    for s in snapshot.sessions[:shown]:
        st = s["stats"]
        name = s["client_name"] or s["client"] or f"key {s['user']}"
        session = Text((s["claude_session_id"] or s["id"])[:13], style="" if s["status"] == "active" else "dim")
        cost = money(st["cost"]["total_usd"]) + ("+?" if st["cost"]["unpriced_models"] else "")
        if wide:
            sessions.add_row(name, session, Text(s["status"], style="green" if s["status"] == "active" else "yellow"),
                             s["context"]["model"] or "-", str(st["requests"]["total"]),
                             f"{st['tokens']['input']:,}/{st['tokens']['output']:,}", cost, gauge(s["context"]))
        else:
            sessions.add_row(name, session, s["context"]["model"] or "-", str(st["requests"]["total"]), cost,
                             gauge(s["context"], width=6))
    more(sessions, live - shown)

    feed = table("Recent events", "client", "event", "detail")
    events = snapshot.events if lines.left is None else snapshot.events[:feed_kept + max(lines.left, 0)]
    for e in events:
        feed.add_row(clock(e["timestamp"]), e["client"] or e["user"] or "-", *describe(e))
    return Group(*parts, clients, flight, sessions, feed)


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
        return (Text("compaction", style="magenta"),
                f"{event.get('before_tokens'):,} → {event.get('after_tokens'):,} tokens")
    if kind == "rate_limit":
        return Text("rate limit", style="yellow"), f"status {event.get('status')}"
    return Text(kind.replace("_", " "), style="dim"), event.get("reason") or event.get("source") or ""


@contextmanager
def keys() -> Iterator[Callable[[float], str | None]]:
    """Read single key presses without echo; yield a function that returns one or None."""
    if not sys.stdin.isatty():
        def no_key(timeout: float) -> None:
            time.sleep(timeout)
        yield no_key
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
                live.update(render(snapshot, api.target.url, client, problem, live.console), refresh=True)
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
