"""``aspy report``: the figures of ``/api/usage`` as a table for an 80-column terminal, or as JSON or CSV.

The figures come from the store named in config.toml, or from an aspy's API (``--url``);
:mod:`aspy.usage` computes them either way. Periods are days, ISO weeks (shown by their
Monday) or months of a zone; ``--breakdown`` adds one row per model under each period.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

from . import usage
from .config import Config
from .timerange import TimeRangeError, parse_window, server_zone, zone

PERIODS = {"daily": "day", "weekly": "week", "monthly": "month", "sessions": "session"}
# Compact suffixes for counts too wide for their column.
SCALES = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))
# Widths with the space before each column: a line is at most 79 characters.
FIGURE_COLUMNS = (("requests", 9), ("input", 11), ("output", 10), ("cache read", 11), ("cache write", 12),
                  ("cost", 11))
# Sessions need a second label column: their figures get narrower ones.
SESSION_COLUMNS = (("requests", 9), ("input", 10), ("output", 9), ("cache read", 11), ("cache write", 12),
                   ("cost", 10))
# An API answer over a year of sessions can take a while.
API_TIMEOUT = 120.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of `aspy report`."""
    parser.add_argument("period", nargs="?", choices=tuple(PERIODS), default="daily",
                        help="one row per day (default), ISO week, month, or session")
    parser.add_argument("--client", help="only this client")
    parser.add_argument("--tag", help="only the clients carrying this tag")
    parser.add_argument("--since", metavar="WHEN",
                        help="from this day or ISO 8601 time (in --tz unless it has an offset)")
    parser.add_argument("--until", metavar="WHEN", help="up to (not including) this day or time")
    parser.add_argument("--tz", metavar="ZONE", help="IANA time zone of the days (default: this machine's)")
    parser.add_argument("--breakdown", action="store_true", help="one row per model under each period")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print the JSON of /api/usage")
    shown.add_argument("--csv", action="store_true", help="print CSV with a header row")
    parser.add_argument("--url", nargs="?", const="", metavar="URL",
                        help="read aspy's API instead of the store: at URL, or without one at $ASPY_URL, else "
                             "the host of $ANTHROPIC_BASE_URL, else http://127.0.0.1:8080")


class ReportError(Exception):
    """The report cannot be made; the message says why, in plain words."""


def run(args: argparse.Namespace, config: Config | None) -> int:
    """Print the report; return the exit status."""
    key = PERIODS[args.period]
    group_by = (key, "model") if args.breakdown else (key,)
    try:
        figures = _from_api(args, group_by) if config is None else _from_store(args, config, group_by)
    except ReportError as exc:
        print(f"aspy report: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(figures, indent=1))
    elif args.csv:
        sys.stdout.write(usage.to_csv(figures))
    else:
        print(table(figures, args.period))
    return 0


def _from_store(args: argparse.Namespace, config: Config, group_by: tuple[str, ...]) -> dict[str, Any]:
    """Compute the figures from the store named in the configuration."""
    from .store import Scope, StoreError, open_store

    try:
        tz_name, tz = (args.tz, zone(args.tz)) if args.tz else server_zone()
        since, until = parse_window(None, args.since, args.until, time.time(), tz)
    except TimeRangeError as exc:
        raise ReportError(str(exc)) from None
    if args.client is not None and args.client not in config.clients:
        raise ReportError(f"unknown client {args.client!r}; expected one of: {', '.join(config.clients) or '(none)'}")
    tagged = None if args.tag is None else tuple(c.id for c in config.clients.values() if args.tag in c.tags)
    store = open_store(config.store.url)
    try:
        info = store.inspect()
        if info["schema_version"] is None:
            raise ReportError(f"no store yet at {info.get('path') or info.get('database')}: nothing recorded")
        if info["schema_version"] != info["expected_version"]:
            # Migrating here could stop an older aspy still serving on this store.
            raise ReportError(f"the store has schema version {info['schema_version']} and this aspy reads "
                              f"{info['expected_version']}: start this aspy's `aspy serve` once (it migrates "
                              "the store), or use --url to ask the running aspy")
        question = usage.Question(group_by, tz_name, tz, since, until, Scope(client=args.client, clients=tagged))
        return usage.answer(store, question, {c.id: c.tags for c in config.clients.values()})
    except StoreError as exc:
        raise ReportError(f"store: {exc}") from None
    finally:
        store.close()


def _from_api(args: argparse.Namespace, group_by: tuple[str, ...]) -> dict[str, Any]:
    """Ask an aspy's API for the figures."""
    from .apiclient import ApiClient, ApiError, find_target

    api = ApiClient(find_target(args.url or None, None), timeout=API_TIMEOUT)
    try:
        return api.get("usage", group_by=",".join(group_by), tz=args.tz, since=args.since, until=args.until,
                       client=args.client, tag=args.tag)
    except ApiError as exc:
        raise ReportError(str(exc)) from None


def table(figures: dict[str, Any], period: str) -> str:
    """Return the figures as a table at most 80 columns wide, a total line under it."""
    key = PERIODS[period]
    sessions = key == "session"
    labels = (("session", 10), ("client", 8)) if sessions else ((key if key != "week" else "week of", 15),)
    columns = SESSION_COLUMNS if sessions else FIGURE_COLUMNS
    lines: list[tuple[tuple[str, ...], dict[str, Any]]] = []
    current = object()
    breakdown = "model" in figures["group_by"]
    for row in figures["rows"]:
        if breakdown and row[key] != current:
            # The period's own line, then one per model under it.
            current = row[key]
            lines.append((_label(row, key, sessions), _sum([r for r in figures["rows"] if r[key] == current])))
        if breakdown:
            lines.append((("  - " + short_model(row["model"]),) + ("",) * (len(labels) - 1), row))
        else:
            lines.append((_label(row, key, sessions), row))
    total = (("total",) + ("",) * (len(labels) - 1), figures["total"])
    values = [_values(row) for _, row in [*lines, total]]
    # A column shows every figure in full when they all fit, else every one compactly (12.3M).
    compact = [any(len(_cell(v[i], i, width, False)) >= width for v in values)
               for i, (_, width) in enumerate(columns)]
    rule = "-" * sum(w for _, w in (*labels, *columns))
    text = [_heading(figures, period),
            ("".join(f"{t:<{w}}" for t, w in labels) + "".join(f"{t:>{w}}" for t, w in columns)).rstrip(), rule]
    for (label, _), row in zip([*lines, total], values):
        if label is total[0]:
            text += ["(no figures)"] * (not lines) + [rule]
        text.append("".join(f"{cell[:w - 1]:<{w}}" for cell, (_, w) in zip(label, labels))
                    + "".join(f"{_cell(row[i], i, w, compact[i]):>{w}}" for i, (_, w) in enumerate(columns)))
    if figures["unpriced_models"]:
        text.append(f"no price for {', '.join(figures['unpriced_models'])}: their cost counts as 0 (aspy models)")
    return "\n".join(text)


def _values(row: dict[str, Any]) -> tuple:
    """Return a row's figures in column order: requests, input, output, cache read, cache write, cost."""
    tokens = row["tokens"]
    return (row["requests"], tokens["input"], tokens["output"], tokens["cache_read"],
            tokens["cache_write_5m"] + tokens["cache_write_1h"], row["cost_usd"])


def _cell(value: float, column: int, width: int, compact: bool) -> str:
    """Write one figure: dollars for the last column, a count otherwise; in full, or compactly."""
    last = column == len(FIGURE_COLUMNS) - 1
    if not compact:
        return f"${value:,.2f}" if last else f"{value:,}"
    return ("$" if last else "") + short_number(value)


def _heading(figures: dict[str, Any], period: str) -> str:
    """Return the line above the table: what it shows, in which zone, over which window."""
    when = "all time" if not figures["since"] and not figures["until"] else \
        f"{(figures['since'] or '...')[:16]} to {(figures['until'] or 'now')[:16]}"
    return f"aspy usage, {period}, {figures['tz']}, {when}"[:80]


def _label(row: dict[str, Any], key: str, sessions: bool) -> tuple[str, ...]:
    """Return a row's label cells: its period, or its session and client."""
    if not sessions:
        return (str(row[key]),)
    name = row.get("claude_session_id") or row["session"] or "(none)"
    return name, row.get("client") or "-"


def _sum(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Add rows up (a period's models, for its own line)."""
    total: dict[str, Any] = {"requests": 0, "cost_usd": 0.0, "tokens": dict.fromkeys(rows[0]["tokens"], 0)}
    for row in rows:
        total["requests"] += row["requests"]
        total["cost_usd"] += row["cost_usd"]
        for k, v in row["tokens"].items():
            total["tokens"][k] += v
    return total


def short_number(value: float) -> str:
    """Write a number compactly: 845, 12.3K, 4.5M, 1.2B."""
    for scale, suffix in SCALES:
        if abs(value) >= scale:
            return f"{value / scale:.1f}{suffix}"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:.2f}"


def short_model(model: str | None) -> str:
    """Return a model's name without the vendor prefix and date: sonnet-4-5."""
    if model is None:
        return "(no model)"
    return re.sub(r"-\d{8}$", "", model.removeprefix("claude-"))
