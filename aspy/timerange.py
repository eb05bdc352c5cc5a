"""The one parser of ``time_range`` values: named ranges, or explicit since/until."""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

NAMED = ("last_hour", "today", "yesterday", "last_24_hours", "last_7_days", "last_30_days", "all")


class TimeRangeError(ValueError):
    """A time_range that is not one of the documented forms."""


def parse_instant(value: Any, name: str) -> float:
    """Return epoch seconds for an ISO 8601 string; one without offset is in the server's time zone."""
    if not isinstance(value, str):
        raise TimeRangeError(f"{name} must be an ISO 8601 string")
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise TimeRangeError(f"{name} is not an ISO 8601 timestamp: {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.now().astimezone().tzinfo)
    return moment.timestamp()


def parse_time_range(value: Any, now: float) -> tuple[float | None, float | None]:
    """Return (since, until) epoch seconds for a time_range; days follow the server's time zone."""
    if value is None or value == "all":
        return None, None
    if isinstance(value, dict):
        unknown = set(value) - {"since", "until"}
        if unknown or not value:
            raise TimeRangeError('time_range object takes "since" and/or "until" (ISO 8601)')
        since = parse_instant(value["since"], "since") if "since" in value else None
        until = parse_instant(value["until"], "until") if "until" in value else None
        if since is not None and until is not None and until < since:
            raise TimeRangeError("time_range until is before since")
        return since, until
    midnight = datetime.fromtimestamp(now).astimezone().replace(hour=0, minute=0, second=0, microsecond=0)
    ranges = {
        "last_hour": (now - 3600, None),
        "last_24_hours": (now - 86400, None),
        "last_7_days": (now - 7 * 86400, None),
        "last_30_days": (now - 30 * 86400, None),
        "today": (midnight.timestamp(), None),
        "yesterday": ((midnight - timedelta(days=1)).timestamp(), midnight.timestamp()),
    }
    if not isinstance(value, str) or value not in ranges:
        raise TimeRangeError(f"time_range must be one of {', '.join(NAMED)} or {{\"since\", \"until\"}}")
    return ranges[value]
