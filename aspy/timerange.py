"""The one parser of time filters: named ranges or explicit since/until, in a time zone.

Days (``today``, ``yesterday``) and timestamps without an offset follow a zone: the one
asked for, else the server's own (``$TZ``, else ``/etc/localtime``).
"""
from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

NAMED = ("last_hour", "today", "yesterday", "last_24_hours", "last_7_days", "last_30_days", "all")


class TimeRangeError(ValueError):
    """A time_range, timestamp or time zone that is not one of the documented forms."""


def zone(name: str) -> ZoneInfo:
    """Return the IANA time zone of that name, or raise TimeRangeError."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise TimeRangeError("tz must be an IANA time zone name, such as Europe/Paris")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise TimeRangeError(f"tz is not a known IANA time zone: {name[:64]!r}") from None


def server_zone() -> tuple[str, tzinfo]:
    """Return the server's own time zone and its name: $TZ, else what /etc/localtime links to, else a fixed offset."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    try:
        link = os.readlink("/etc/localtime")
        candidates.append(link.split("zoneinfo/", 1)[1] if "zoneinfo/" in link else "")
    except OSError:
        pass
    try:
        candidates.append(Path("/etc/timezone").read_text().strip())
    except OSError:
        pass
    for name in candidates:
        try:
            return name, zone(name)
        except TimeRangeError:
            continue
    # No name for it: the offset in force now, as the C library sees it.
    local = datetime.now().astimezone().tzinfo
    return str(local), local if local is not None else UTC


def parse_instant(value: Any, name: str, tz: tzinfo | None = None) -> float:
    """Return epoch seconds for an ISO 8601 string (or date); one without offset is in ``tz`` (else the server's)."""
    if not isinstance(value, str):
        raise TimeRangeError(f"{name} must be an ISO 8601 string")
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise TimeRangeError(f"{name} is not an ISO 8601 timestamp: {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz) if tz is not None else moment.astimezone()
    return moment.timestamp()


def parse_time_range(value: Any, now: float, tz: tzinfo | None = None) -> tuple[float | None, float | None]:
    """Return (since, until) epoch seconds for a time_range; days follow ``tz`` (default: the server's)."""
    if value is None or value == "all":
        return None, None
    if isinstance(value, dict):
        unknown = set(value) - {"since", "until"}
        if unknown or not value:
            raise TimeRangeError('time_range object takes "since" and/or "until" (ISO 8601)')
        since = parse_instant(value["since"], "since", tz) if "since" in value else None
        until = parse_instant(value["until"], "until", tz) if "until" in value else None
        if since is not None and until is not None and until < since:
            raise TimeRangeError("time_range until is before since")
        return since, until
    local = datetime.fromtimestamp(now, tz) if tz is not None else datetime.fromtimestamp(now).astimezone()
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    # Aware arithmetic is wall-clock arithmetic: across a DST change, yesterday was 23 or 25 hours.
    yesterday = midnight - timedelta(days=1)
    ranges = {
        "last_hour": (now - 3600, None),
        "last_24_hours": (now - 86400, None),
        "last_7_days": (now - 7 * 86400, None),
        "last_30_days": (now - 30 * 86400, None),
        "today": (midnight.timestamp(), None),
        "yesterday": (yesterday.timestamp(), midnight.timestamp()),
    }
    if not isinstance(value, str) or value not in ranges:
        raise TimeRangeError(f"time_range must be one of {', '.join(NAMED)} or {{\"since\", \"until\"}}")
    return ranges[value]


def parse_window(time_range: Any, since: Any, until: Any, now: float,
                 tz: tzinfo | None = None) -> tuple[float | None, float | None]:
    """Return (since, until) from a GET's ``time_range``, or its ``since`` and ``until``; not both kinds."""
    if time_range is not None and (since is not None or until is not None):
        raise TimeRangeError("give time_range, or since and until, not both")
    if time_range is not None:
        if not isinstance(time_range, str) or time_range not in NAMED:
            raise TimeRangeError(f"time_range must be one of {', '.join(NAMED)}")
        return parse_time_range(time_range, now, tz)
    window = {k: v for k, v in (("since", since), ("until", until)) if v is not None}
    return parse_time_range(window, now, tz) if window else (None, None)
