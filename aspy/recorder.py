"""Record exchanges off the request's path, in batches, in each worker process.

The proxy hands each finished exchange to :class:`Recorder`, which only queues it. A
background writer takes whatever has queued up and applies it in one store transaction at
once, so an idle proxy shows a turn within milliseconds, a busy worker writes many
exchanges per transaction (those that queued during the last one), and the client never
waits for the store. Under gevent the writer is a real OS thread, for both stores: SQLite
blocks in C, and there it leaves the gevent hub free to serve requests; and a writer
greenlet would wait behind every busy request of its worker (PostgreSQL's, measured, then
fell behind for good under load). A failing store is logged and counted; its records are
kept for the next try, in memory up to ``MAX_PENDING`` and beyond that in the journal
(:mod:`aspy.journal`), which also gives back what a worker killed or stopped left unwritten.
A record the store refuses as it is (a data error, not an outage) is written again with only
its figures, so one poisoned exchange never holds back the others.
"""
from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
from dataclasses import replace
from typing import Protocol

from .accounting import Accounted
from .journal import Journal
from .native import gevent_patched, native
from .records import Exchange, Observation, RequestFacts, clean_text
from .sessions import Sessions
from .status import WorkerStatus
from .store import StoreError

log = logging.getLogger(__name__)

BATCH = 500
MAX_PENDING = 10_000
# Seconds between two upkeeps of the store (ending stale sessions, trimming, retention).
UPKEEP_EVERY = 5.0
# Retries of a failing store back off from 1 s to 30 s.
RETRY_AFTER = 1.0
MAX_RETRY_AFTER = 30.0


class Counter(Protocol):
    """Where exchanges are counted once the store has them: the host's Prometheus figures (aspy.metrics)."""

    def accounted(self, records: list[Accounted]) -> None:
        """Count exchanges the store has just taken."""

    def write_failed(self) -> None:
        """Count a failed write to the store."""


class Recorder:
    """Queue exchanges and write them in batches from a background thread."""

    def __init__(self, sessions: Sessions, journal: Journal | None = None, status: WorkerStatus | None = None,
                 metrics: Counter | None = None):
        self.sessions, self.journal = sessions, journal
        # This worker's recording status, for the /health of whichever worker is asked; and the
        # host's Prometheus figures, where each exchange is counted once the store has it.
        self.status, self.metrics = status, metrics
        # How the store fares: failing now, failed tries, exchanges dropped, the last error.
        self.failing, self.failures, self.dropped = False, 0, 0
        self.last_error: str | None = None
        # Exchanges let go from memory during a long outage, still in the journal (and how many).
        self.spilled, self.journal_only = False, 0
        # Under gevent the writer is an OS thread: SQLite blocks in C, and a writer greenlet would
        # wait behind every busy request of the worker (measured: PostgreSQL then fell behind for good).
        self.in_os_thread = gevent_patched() and hasattr(sessions.store, "kind")
        # What the writer waits with: the standard library's own in an OS thread, else gevent's.
        tools = native if self.in_os_thread else lambda module, name: getattr(__import__(module), name)
        self.queue: queue.SimpleQueue[Exchange] = tools("queue", "SimpleQueue")()
        # gevent patches what threading.Thread starts with, so an OS thread starts from _thread.
        self._start_thread = tools("_thread", "start_new_thread")
        self.pending: list[Exchange] = []
        self.retry_after = RETRY_AFTER
        # The first upkeep runs as soon as the writer starts: it prices history the table has learned.
        self.next_upkeep = 0.0
        self._now = tools("time", "monotonic")
        self._pid: int | None = None
        self._lock = threading.Lock()
        # The writer and the exit hook must never apply the same batch twice.
        self._flushing = tools("threading", "Lock")()

    def __call__(self, exchange: Exchange) -> None:
        """Keep a finished exchange in the journal and queue it; start the writer in this process if need be."""
        if self._pid != os.getpid():
            self.start()
        if self.journal is not None:
            self.journal.finished(exchange)
        self.queue.put(exchange)

    def opened(self, exchange: Exchange) -> None:
        """Note in the journal that a stream began, so a worker killed during it still has it recorded."""
        if self.journal is not None:
            self.journal.opened(exchange)

    def start(self) -> None:
        """Start this process's writer (once): it records, and keeps the store up to date even when idle."""
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._start_thread(self._run, ())
            atexit.register(self.flush)

    def _run(self) -> None:
        if self.in_os_thread and hasattr(self.sessions.store, "writer_thread"):
            self.sessions.store.writer_thread()
        # First what stopped workers left in their journals: recorded before anything newer.
        if self.journal is not None:
            self.pending.extend(self.journal.claim())
        while True:
            # Wake for traffic, to retry what a failed try kept, and for the upkeep, traffic or not.
            wake = self.next_upkeep - self._now()
            if self.pending:
                wake = min(wake, self.retry_after)
            try:
                self.pending.append(self.queue.get(timeout=max(wake, 0.001)))
            except queue.Empty:
                pass
            # Write at once: an API answer must show a turn within 50 ms of its end. Under load,
            # what queues while a transaction runs forms the next batch by itself.
            self.flush()
            if self._now() >= self.next_upkeep:
                self.upkeep()

    def upkeep(self) -> None:
        """Run the store's upkeep now (expiry, trimming, retention, pricing history); a failure waits for the next."""
        self.next_upkeep = self._now() + UPKEEP_EVERY
        try:
            self.sessions.upkeep()
        except StoreError as exc:
            log.warning("store upkeep failed, tried again in %g s: %s", UPKEEP_EVERY, exc)
        except Exception:
            log.exception("store upkeep failed, tried again in %g s", UPKEEP_EVERY)

    def flush(self) -> None:
        """Write everything queued now; on failure keep it for the next try."""
        with self._flushing:
            self._flush()
        if self.status is not None:
            self.status.note(self.failing, self.waiting(), self.failures, self.dropped, self.last_error)

    def waiting(self) -> int:
        """Return how many exchanges wait for the store: queued, kept for a retry, or in the journal only."""
        return len(self.pending) + self.queue.qsize() + self.journal_only

    def _flush(self) -> None:
        while True:
            if self.spilled and not self.pending:
                # The store is back: what was let go from memory during the outage is in the journal.
                self.pending.extend(self.journal.unstored() if self.journal else [])
                self.spilled, self.journal_only = False, 0
            try:
                while len(self.pending) < BATCH:
                    self.pending.append(self.queue.get_nowait())
            except queue.Empty:
                pass
            if not self.pending:
                return
            batch = self.pending[:BATCH]
            try:
                accounted = self.sessions.record(batch)
                written = len(batch)
            except Exception:
                written, accounted, failure = record_each(self.sessions, batch)
                if failure is not None:
                    self._failed(failure)
            if accounted and self.metrics is not None:
                self.metrics.accounted(accounted)
            if written:
                del self.pending[:written]
                if self.journal is not None:
                    self.journal.stored([e.id for e in batch[:written]])
            if written < len(batch):
                self.retry_after = min(self.retry_after * 2, MAX_RETRY_AFTER)
                return
            self.retry_after = RETRY_AFTER
            self.failing, self.last_error = False, None

    def _failed(self, exc: Exception) -> None:
        self.failing = True
        self.failures += 1
        if self.metrics is not None:
            self.metrics.write_failed()
        self.last_error = str(exc) if isinstance(exc, StoreError) else f"{type(exc).__name__}: {exc}"
        log.error("recording %d exchanges failed (kept for retry): %s", len(self.pending), self.last_error)
        if len(self.pending) > MAX_PENDING:
            lost = len(self.pending) - MAX_PENDING
            del self.pending[:lost]
            if self.journal is not None and not self.journal.broken:
                # Still in the journal: read back once the store answers again.
                self.spilled = True
                self.journal_only += lost
                log.warning("store unavailable: %d exchanges wait in the journal only", lost)
            else:
                self.dropped += lost
                log.error("store unavailable: dropped the %d oldest unrecorded exchanges", lost)


def record_each(sessions: Sessions, batch: list[Exchange]) -> tuple[int, list[Accounted], Exception | None]:
    """Record a failed batch one exchange at a time; return how many were written, and the store's failure.

    Tells data errors from outages: an exchange the store refuses as it is (an odd type, a
    value out of range) is recorded again with only what can be read of it. Only when even
    that fails is the store itself failing: the rest is kept, in order, for the next try.
    """
    accounted: list[Accounted] = []
    for done, exchange in enumerate(batch):
        try:
            accounted += sessions.record([exchange])
            continue
        except Exception as exc:
            error: Exception = exc
        try:
            accounted += sessions.record([unreadable(exchange, error)])
            log.error("recorded an exchange without its content, which the store refused (%s): %s",
                      error, exchange.summary())
        except Exception as exc:
            return done, accounted, exc
    return len(batch), accounted, None


def unreadable(exchange: Exchange, error: Exception) -> Exchange:
    """Return an exchange the store refused, with only what is sure to be storable: figures, no content."""
    request = exchange.request
    kept = replace(request, headers={k: clean_text(v) for k, v in request.headers.items()},
                   facts=RequestFacts(model=request.facts.model, stream=request.facts.stream))
    response = exchange.response
    if response is not None:
        obs = response.observation
        response = replace(response, rate_limits={}, observation=Observation(
            model=obs.model, stop_reason=obs.stop_reason, usage=obs.usage, start_usage=obs.start_usage,
            produced_output=obs.produced_output,
            parse_error=f"the store refused its content: {type(error).__name__}"))
    return replace(exchange, request=kept, response=response)
