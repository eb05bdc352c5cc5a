"""A durable local journal of the exchanges a worker has not yet written to the store.

Each worker appends a short record when an exchange opens and the whole exchange when it is
finished, to segment files under ``$XDG_STATE_HOME/aspy/journal/``, and holds an exclusive
lock on its segments while it lives. A segment is deleted once every exchange with a record
in it is in the store. A worker that starts claims the segments no living worker holds (its
predecessor's after a SIGKILL, a crash, or a stop during a store outage) and gives their
exchanges back to be recorded: a finished one as it was, an opened one that never finished
as failed. The store skips what it already has, so each exchange is recorded exactly once.

Appends are plain writes to the page cache (no fsync): they survive the death of the
process, which is what the journal is for, not the loss of the machine. Records are pickled
:class:`~aspy.records.Exchange` objects; a segment written by aspy before the exchange record
had its request, response and error parts is read too (:class:`_Unpickler`).
"""
from __future__ import annotations

import fcntl
import io
import logging
import os
import pickle
import struct
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import records
from .config import state_dir
from .native import native
from .records import WORKER_STOPPED, Exchange, Request, Response

log = logging.getLogger(__name__)

# A new segment after this many records or bytes, so that finished segments can be deleted.
SEGMENT_RECORDS = 5_000
SEGMENT_BYTES = 64 * 1024 * 1024
LENGTH = struct.Struct(">I")
OPENED, FINISHED = "opened", "finished"


def default_folder() -> Path:
    """Return the journal's folder under ``$XDG_STATE_HOME``."""
    return state_dir() / "journal"


class Segment:
    """One locked, append-only journal file and the exchanges with records in it not yet stored."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self.fd = fd
        self.records = 0
        self.size = 0
        self.unstored: set[str] = set()

    def close(self, delete: bool) -> None:
        """Let the file go (and its lock); delete it when everything in it is stored."""
        if delete:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)


class Journal:
    """This worker's journal: append, mark stored, and claim what dead workers left behind."""

    def __init__(self, folder: Path):
        self.folder = folder
        # This worker's own segments, the last one being written; and those claimed from stopped workers.
        self.segments: list[Segment] = []
        self.claimed: list[Segment] = []
        self.broken: str | None = None
        # Appends come from the proxy's greenlets, deletions from the writer's OS thread.
        self._lock = native("_thread", "allocate_lock")()
        self._pid = 0

    def opened(self, exchange: Exchange) -> None:
        """Note that an exchange began, as its record stood then (so a worker killed mid-stream still has it
        recorded, as failed)."""
        self._append(exchange.id, (OPENED, exchange.id, exchange))

    def finished(self, exchange: Exchange) -> None:
        """Keep a finished exchange until the store has it."""
        self._append(exchange.id, (FINISHED, exchange.id, exchange))

    def stored(self, ids: list[str]) -> None:
        """Forget exchanges now in the store; delete the segments left with nothing to keep."""
        with self._lock:
            done = set(ids)
            for segment in self.segments + self.claimed:
                segment.unstored -= done
            finished = [s for s in self.segments[:-1] + self.claimed if not s.unstored]
            for segment in finished:
                segment.close(delete=True)
            self.segments = [s for s in self.segments if s not in finished]
            self.claimed = [s for s in self.claimed if s not in finished]

    def unstored(self) -> list[Exchange]:
        """Read back this worker's finished exchanges the store does not have yet (after a spill)."""
        with self._lock:
            own = self.segments + self.claimed
            wanted = set().union(*(s.unstored for s in own)) if own else set()
            paths = [s.path for s in own]
        found = [exchange for path in paths for exchange in _read(path).finished if exchange.id in wanted]
        return list({e.id: e for e in found}.values())

    def claim(self) -> list[Exchange]:
        """Take over the segments of workers that are gone; return their exchanges to record."""
        taken: list[tuple[Segment, Contents]] = []
        for path in sorted(self.folder.glob("*.log")) if self.folder.is_dir() else []:
            if any(s.path == path for s in self.segments + self.claimed):
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)  # a living worker's
                continue
            taken.append((Segment(path, fd), _read(path)))
        # An exchange may have opened in one segment and finished in the next: read them all first.
        finished = {e.id: e for _, contents in taken for e in contents.finished}
        opened = {eid: e for _, contents in taken for eid, e in contents.opened.items()}
        exchanges = [replace(e, replayed=True) for e in finished.values()] + [
            replace(e, error=WORKER_STOPPED, replayed=True) for eid, e in opened.items() if eid not in finished]
        for segment, contents in taken:
            segment.unstored = set(contents.opened) | contents.finished_ids
            if contents.damaged:
                log.warning("journal %s: %d damaged records skipped", segment.path.name, contents.damaged)
        with self._lock:
            # Deleted once what they hold is stored, like this worker's own.
            self.claimed += [s for s, _ in taken]
        if exchanges:
            log.warning("recording %d exchanges a stopped worker left in its journal", len(exchanges))
        return exchanges

    def _append(self, exchange_id: str, record: Any) -> None:
        """Write one record; a journal that cannot be written is logged once and the proxy goes on."""
        if self.broken:
            return
        try:
            data = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
            with self._lock:
                segment = self._current()
                os.write(segment.fd, LENGTH.pack(len(data)) + data)
                segment.records += 1
                segment.size += LENGTH.size + len(data)
                segment.unstored.add(exchange_id)
        except Exception as exc:  # a full disk, a read-only folder: record from memory only
            self.broken = f"{type(exc).__name__}: {exc}"
            log.error("the journal cannot be written (%s); exchanges are kept in memory only until the store "
                      "has them", self.broken)

    def _current(self) -> Segment:
        """Return the segment to append to, opening (and locking) a new one when due."""
        if self._pid != os.getpid():
            # A forked child must not write into its parent's segments.
            self.segments, self._pid = [], os.getpid()
        last = self.segments[-1] if self.segments else None
        if last is None or last.records >= SEGMENT_RECORDS or last.size >= SEGMENT_BYTES:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{os.getpid()}-{time.time_ns()}.log"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.segments.append(Segment(path, fd))
            if last is not None and not last.unstored:
                last.close(delete=True)
                self.segments.remove(last)
        return self.segments[-1]


class Contents:
    """What one segment holds."""

    def __init__(self) -> None:
        self.opened: dict[str, Exchange] = {}
        self.finished: list[Exchange] = []
        self.finished_ids: set[str] = set()
        self.damaged = 0


def _read(path: Path) -> Contents:
    """Read a segment; a record cut short or not readable (a newer aspy's, a torn write) is counted and skipped."""
    contents = Contents()
    try:
        data = path.read_bytes()
    except OSError:
        return contents
    at = 0
    while at + LENGTH.size <= len(data):
        (size,) = LENGTH.unpack_from(data, at)
        at += LENGTH.size
        if at + size > len(data):
            contents.damaged += 1
            break
        try:
            kind, exchange_id, payload = _Unpickler(data[at:at + size]).load()
            payload = _from_earlier(payload)
        except Exception:
            contents.damaged += 1
            at += size
            continue
        at += size
        if kind == OPENED:
            contents.opened[exchange_id] = payload
        elif kind == FINISHED and exchange_id not in contents.finished_ids:
            contents.finished.append(payload)
            contents.finished_ids.add(exchange_id)
    return contents


class _Unpickler(pickle.Unpickler):
    """Read records, including those of aspy before the exchange record moved to aspy.records."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))

    def find_class(self, module: str, name: str) -> Any:
        if module == "aspy.observe":
            # Its exchange is converted by _from_earlier; its other records moved as they were.
            return _EarlierExchange if name == "Exchange" else getattr(records, name)
        return super().find_class(module, name)


class _EarlierExchange:
    """An exchange as aspy pickled it before its record had request, response and error parts."""


def _from_earlier(payload: Any) -> Exchange:
    """Return a journal record's exchange: as it is, or converted from an earlier aspy's record."""
    if isinstance(payload, Exchange):
        return payload
    old = payload if isinstance(payload, dict) else vars(payload)
    request = Request(old["method"], old["path"], old["headers"], old["content_type"], old.get("body_bytes", 0),
                      old.get("request") or records.RequestFacts())
    # An opened record was a dict of what was known then: no answer yet.
    response = None if isinstance(payload, dict) else Response(
        old["status"], old["duration_ms"], old["ttfb_ms"], old["response_type"], old["request_id"],
        old["rate_limits"], old["response_bytes"], old["complete"], old["observation"])
    return Exchange(old["started_at"], old["client"], old["provider"], old["user"], request, response,
                    old.get("failure"), old["id"])
