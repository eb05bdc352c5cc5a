"""How a question about figures over time is split into pieces, each summed from one table in one statement.

Figures are kept per 15-minute bucket, and summed per client in 6-hour blocks. A window reads
its whole blocks from the summary and its ragged ends from the buckets; grouped by day in a
zone whose midnight falls inside a block, that block counts whole in one day and the buckets
of its smaller side move to the other. This module plans; ``rollup`` writes the SQL.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import BUCKET_SECONDS, Scope

DAY = 86400
# The rollup's summary adds up each client's buckets in blocks of six hours: a day in any zone is
# its whole blocks, read there, and the one block around its midnight, read bucket by bucket.
BLOCK_SECONDS = 6 * 3600


@dataclass(frozen=True)
class Piece:
    """Part of a usage question read from one table: a time range, and how its rows find their day.

    A row's day is its start plus ``shift`` (the zone's offset), divided by a day. ``times``
    keeps only rows starting at a UTC time of day in [from, to). ``midnight`` names the block
    that holds local midnight and the shift that puts it whole in the day of its larger side;
    ``moved`` is the shift of that day for buckets counted there, to be taken back out of it.
    """

    fine: bool
    start: int
    end: int
    shift: int = 0
    times: tuple[int, int] | None = None
    midnight: tuple[int, int] | None = None
    moved: int | None = None


def needs_buckets(scope: Scope, by: tuple[str, ...]) -> bool:
    """Tell whether a usage question needs the buckets themselves: the summary has no session nor key hash."""
    return "session" in by or scope.user is not None or scope.session is not None


def bucket_window(since: float | None, until: float | None) -> tuple[int | None, int | None]:
    """Return a window as bucket starts: a bucket counts when it starts in [since, until)."""
    return (None if since is None else bucket_start(since)), (None if until is None else bucket_start(until))


def bucket_start(t: float) -> int:
    """Return the start of the first bucket at or after an instant."""
    return math.ceil(t / BUCKET_SECONDS) * BUCKET_SECONDS


def plan(since: int, until: int, by_day: bool, offsets: list[tuple[float, float, int]], fine_only: bool) -> list[Piece]:
    """Split a usage question into pieces whose rows each fall whole in one day of the zone."""
    segments = [(since, until, 0)]
    if by_day and offsets:
        # A bucket takes the offset in force at its start. The offsets cover the window; whatever
        # lies beyond them (written meanwhile) takes the nearest one.
        starts = [since] + [bucket_start(start) for start, _, _ in offsets[1:]]
        ends = starts[1:] + [until]
        segments = [(max(a, since), min(b, until), offset) for a, b, (_, _, offset) in zip(starts, ends, offsets)]
    pieces = []
    for start, end, offset in segments:
        if start >= end:
            continue
        first = -(-start // BLOCK_SECONDS) * BLOCK_SECONDS
        last = end // BLOCK_SECONDS * BLOCK_SECONDS
        if fine_only or first >= last:
            pieces.append(Piece(True, start, end, offset))
            continue
        pieces += ([Piece(True, start, first, offset)] * (start < first)
                   + [Piece(True, last, end, offset)] * (last < end))
        # Local midnight, as a UTC time of day, and how far into its block it falls.
        midnight = -offset % DAY
        into = midnight % BLOCK_SECONDS
        if not by_day or not into:
            pieces.append(Piece(False, first, last, offset))
            continue
        # That block spans two days: it counts whole in the day of its larger side, and the
        # buckets of its smaller side move from that day to their own.
        block = midnight - into
        after = into <= BLOCK_SECONDS - into
        larger = offset + BLOCK_SECONDS if after else offset
        smaller = (block, midnight) if after else (midnight, block + BLOCK_SECONDS)
        pieces += [Piece(False, first, last, offset, midnight=(block, larger)),
                   Piece(True, first, last, offset, times=smaller,
                         moved=offset + BLOCK_SECONDS if after else offset - BLOCK_SECONDS)]
    return pieces
