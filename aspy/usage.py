"""Figures over time: requests, tokens and cost by day, week, month, client, model, tag or session.

What ``GET /api/usage`` and ``aspy report`` answer, computed once here. The store keeps every
exchange's figures in the 15-minute UTC bucket of the instant it ended (its rollup) and sums
them by day of any zone, client, model and session; this module turns a question into that,
then days into ISO weeks and months, clients into their tags, orders the rows, adds the total,
and writes CSV. Every zone in use is a whole number of quarter hours from UTC, so its days are
exact, across DST changes too.
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from operator import attrgetter
from typing import Any

from .records import Usage
from .store import BUCKET_SECONDS, Scope, Store, UsageRow

GROUP_KEYS = ("day", "week", "month", "client", "model", "tag", "session")
TIME_KEYS = ("day", "week", "month")
FIGURES = ("requests", "failed", "input", "output", "cache_read", "cache_write_5m", "cache_write_1h",
           "web_search_requests", "cost_usd", "savings_usd")
# Enough digits to show one token of the cheapest model; rounding only hides float noise.
USD_DIGITS = 10
EPOCH = date(1970, 1, 1)
# How often the zone's offset is looked at when finding its changes: they are months apart.
OFFSET_PROBE = 6 * 3600


class UsageError(ValueError):
    """A usage question that is not one of the documented forms."""


@dataclass(frozen=True)
class Question:
    """What figures over time are asked for: grouping, zone, window and scope."""

    group_by: tuple[str, ...]
    tz_name: str
    tz: tzinfo
    since: float | None
    until: float | None
    scope: Scope


def parse_group_by(value: Any) -> tuple[str, ...]:
    """Return one or two grouping keys from ``day,client``-style text, or raise UsageError."""
    if not isinstance(value, str):
        raise UsageError("group_by must be one or two of " + ", ".join(GROUP_KEYS))
    keys = tuple(k.strip() for k in value.split(","))
    unknown = [k for k in keys if k not in GROUP_KEYS]
    if unknown or not 1 <= len(keys) <= 2:
        raise UsageError(f"group_by must be one or two of {', '.join(GROUP_KEYS)}, separated by a comma; "
                         f"got {value!r}")
    if len(set(keys)) < len(keys) or sum(k in TIME_KEYS for k in keys) > 1:
        raise UsageError("group_by takes two different keys, at most one of day, week and month")
    return keys


def tokens_json(usage: Usage) -> dict[str, int]:
    """Return token counts in the API's shape."""
    return {"input": usage.input_tokens, "output": usage.output_tokens, "cache_read": usage.cache_read,
            "cache_write_5m": usage.cache_write_5m, "cache_write_1h": usage.cache_write_1h,
            "web_search_requests": usage.web_search_requests}


def offset_at(tz: tzinfo, at: float) -> int:
    """Return a zone's UTC offset at an instant, in seconds."""
    # Never None with a tz given; `or timedelta()` tells mypy so, and keeps 0 as 0.
    return int((datetime.fromtimestamp(at, tz).utcoffset() or timedelta()).total_seconds())


def offsets(tz: tzinfo, since: float, until: float) -> list[tuple[float, float, int]]:
    """Return (start, end, offset) pieces of [since, until), each with one UTC offset of the zone.

    A change is found to the bucket: the first bucket starting at or after it takes the new offset.
    """
    first = math.ceil(since / BUCKET_SECONDS) * BUCKET_SECONDS
    pieces: list[tuple[float, float, int]] = []
    start, current = since, offset_at(tz, first)
    before = first
    while before < until:
        probe = min(before + OFFSET_PROBE, math.ceil(until / BUCKET_SECONDS) * BUCKET_SECONDS)
        if offset_at(tz, probe) != current:
            # The first bucket in (before, probe] with another offset: a binary search by bucket.
            low, high = before // BUCKET_SECONDS, probe // BUCKET_SECONDS
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (middle, high) if offset_at(tz, middle * BUCKET_SECONDS) == current else (low, middle)
            change = high * BUCKET_SECONDS
            pieces.append((start, change, current))
            start, current = change, offset_at(tz, change)
        before = probe
    pieces.append((start, until, current))
    return pieces


def answer(store: Store, question: Question, tags: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
    """Answer a usage question in the API's shape; ``tags`` gives each configured client's tags."""
    by = question.group_by
    time_key = next((k for k in by if k in TIME_KEYS), None)
    # A session's rows say its client too: it has one.
    asked = {"day": time_key is not None, "client": "client" in by or "tag" in by or "session" in by,
             "model": "model" in by, "session": "session" in by}
    store_by = tuple(k for k, wanted in asked.items() if wanted)
    since, until = question.since, question.until
    zone_offsets: list[tuple[float, float, int]] = []
    if time_key and (since is None or until is None):
        # Days need the zone's offsets over a bounded window: as far as there are figures.
        span = store.usage_span(question.scope) or (0, 0)
        since, until = span[0] if since is None else since, span[1] if until is None else until
    if time_key and since is not None and until is not None and since < until:
        zone_offsets = offsets(question.tz, since, until)
    rows = store.usage(question.scope, since, until, store_by, zone_offsets)
    # Keys as they appear in a row: the session's id, Claude session id and client go together.
    names = [n for k in by for n in (("session", "claude_session_id", "client") if k == "session" else (k,))]
    names = list(dict.fromkeys(names))
    keys_of = attrgetter(*["day" if n == time_key else "client" if n == "tag" else n for n in names])
    labels: dict[int, str] = {}
    tag_at = names.index("tag") if "tag" in names else None
    time_at = names.index(time_key) if time_key else None
    groups: dict[tuple, list] = {}
    for row in rows:
        figures = _figures(row)
        found_keys = keys_of(row)
        key: list[Any] = list(found_keys) if len(names) > 1 else [found_keys]
        if time_at is not None and time_key is not None:
            label = labels.get(key[time_at])
            if label is None:
                label = labels[key[time_at]] = _label(key[time_at], time_key)
            key[time_at] = label
        # A client with two tags counts under both; without a client or a tag, under none (null).
        for tag in (tags.get(key[tag_at] or "") or (None,)) if tag_at is not None else (None,):
            if tag_at is not None:
                key[tag_at] = tag
            group = groups.get(found := tuple(key))
            groups[found] = list(figures) if group is None else [a + b for a, b in zip(group, figures)]
    # Each exchange once in the total, whatever tags it counts under.
    counted = [_figures(row) for row in rows] if tag_at is not None else list(groups.values())
    total = [sum(column) for column in zip(*counted)] if counted else [0] * len(FIGURES)
    others = [i for i, n in enumerate(names) if n in by and n not in TIME_KEYS]
    ordered = sorted(groups.items(), key=lambda g: (
        g[0][time_at] if time_at is not None else "", -g[1][-2],
        tuple((g[0][i] is None, g[0][i] or "") for i in others)))
    return {"group_by": list(by), "tz": question.tz_name,
            "since": _iso(question.since, question.tz), "until": _iso(question.until, question.tz),
            "rows": [dict(zip(names, key)) | _shape(figures) for key, figures in ordered], "total": _shape(total),
            "unpriced_models": store.usage_unpriced(question.scope, question.since, question.until)}


def _figures(row: UsageRow) -> tuple:
    """Return a store row's figures in FIGURES order."""
    return (row.requests, row.failed, *row.usage.astuple(), row.cost_usd, row.savings_usd)


def _label(day: int, key: str) -> str:
    """Return the label of a day (days since 1970-01-01) for a time key: the day, its ISO week's Monday, its month."""
    date_ = EPOCH + timedelta(days=day)
    if key == "week":
        return (date_ - timedelta(days=date_.weekday())).isoformat()
    return date_.strftime("%Y-%m") if key == "month" else date_.isoformat()


def _shape(figures: list) -> dict[str, Any]:
    """Return a group's figures in the API's shape."""
    requests, failed, i, o, read, w5, w1, searches, cost, savings = figures
    return {"requests": requests, "failed": failed,
            "tokens": {"input": i, "output": o, "cache_read": read, "cache_write_5m": w5, "cache_write_1h": w1,
                       "web_search_requests": searches},
            "cost_usd": round(cost, USD_DIGITS), "savings_usd": round(savings, USD_DIGITS)}


def _iso(at: float | None, tz: tzinfo) -> str | None:
    """Return a window's bound as the bucket start it counts from, in the zone asked for."""
    if at is None:
        return None
    start = math.ceil(at / BUCKET_SECONDS) * BUCKET_SECONDS
    return datetime.fromtimestamp(start, tz).isoformat()


def to_csv(figures: dict[str, Any]) -> str:
    """Return the rows of a usage answer as CSV with a header row; numbers as in the JSON."""
    keys = list(figures["group_by"])
    if "session" in keys:
        keys[keys.index("session") + 1:keys.index("session") + 1] = ["claude_session_id"] + ["client"] * (
            "client" not in keys)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([*keys, *FIGURES])
    for row in figures["rows"]:
        tokens = row["tokens"]
        writer.writerow([*("" if row[k] is None else row[k] for k in keys), row["requests"], row["failed"],
                         *(tokens[k] for k in FIGURES[2:8]), _decimal(row["cost_usd"]),
                         _decimal(row["savings_usd"])])
    return out.getvalue()


def _decimal(value: float) -> str:
    """Write dollars in plain decimal notation (never 1e-05), as many digits as the JSON has."""
    return f"{value:.{USD_DIGITS}f}".rstrip("0").rstrip(".") or "0"
