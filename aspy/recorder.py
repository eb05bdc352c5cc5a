"""Record exchanges off the request's path, in batches, in each worker process.

The proxy hands each finished exchange to :class:`Recorder`, which only queues it. A
background writer takes whatever has queued up and applies it in one store transaction at
once, so an idle proxy shows a turn within milliseconds, a busy worker writes many
exchanges per transaction (those that queued during the last one), and the client never
waits for the store. For SQLite under gevent the writer is a real OS thread: SQLite blocks in C, and
there it leaves the gevent hub free to serve requests. For PostgreSQL, whose driver waits
cooperatively, it is a greenlet. A failing store is logged and counted; its records are
kept for the next try, up to ``MAX_PENDING``, and the proxy never notices.
"""
from __future__ import annotations

import atexit
import logging
import os
import queue
import threading

from .native import gevent_patched, native
from .observe import Exchange
from .sessions import Sessions
from .store import StoreError

log = logging.getLogger(__name__)

BATCH = 500
MAX_PENDING = 10_000
# Seconds between two upkeeps of the store (ending stale sessions, trimming, retention).
UPKEEP_EVERY = 5.0
# Retries of a failing store back off from 1 s to 30 s.
RETRY_AFTER = 1.0
MAX_RETRY_AFTER = 30.0


class Recorder:
    """Queue exchanges and write them in batches from a background thread."""

    def __init__(self, sessions: Sessions):
        self.sessions = sessions
        self.in_os_thread = gevent_patched() and getattr(sessions.store, "kind", "") == "sqlite"
        # What the writer waits with: the standard library's own in an OS thread, else gevent's.
        tools = native if self.in_os_thread else lambda module, name: getattr(__import__(module), name)
        self.queue: queue.SimpleQueue[Exchange] = tools("queue", "SimpleQueue")()
        # gevent patches what threading.Thread starts with, so an OS thread starts from _thread.
        self._start_thread = tools("_thread", "start_new_thread")
        self.pending: list[Exchange] = []
        self.failures = 0
        self.dropped = 0
        self.last_error: str | None = None
        self.retry_after = RETRY_AFTER
        # The first upkeep runs as soon as the writer starts: it prices history the table has learned.
        self.next_upkeep = 0.0
        self._now = tools("time", "monotonic")
        self._pid: int | None = None
        self._lock = threading.Lock()
        # The writer and the exit hook must never apply the same batch twice.
        self._flushing = tools("threading", "Lock")()

    def __call__(self, exchange: Exchange) -> None:
        """Queue an exchange; start the writer in this process if it is not running."""
        if self._pid != os.getpid():
            self.start()
        self.queue.put(exchange)

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

    def _flush(self) -> None:
        while True:
            try:
                while len(self.pending) < BATCH:
                    self.pending.append(self.queue.get_nowait())
            except queue.Empty:
                pass
            if not self.pending:
                return
            batch = self.pending[:BATCH]
            try:
                self.sessions.record(batch)
            except StoreError as exc:
                self._failed(exc)
                self.retry_after = min(self.retry_after * 2, MAX_RETRY_AFTER)
                return
            except Exception:  # a record the sessions code cannot apply must not block the rest
                log.exception("recording a batch failed; recording its exchanges one by one")
                self._record_each(batch)
            self.retry_after = RETRY_AFTER
            del self.pending[:len(batch)]

    def _record_each(self, batch: list[Exchange]) -> None:
        """Record exchanges one at a time, dropping (and logging) any that cannot be applied."""
        for exchange in batch:
            try:
                self.sessions.record([exchange])
            except Exception:
                self.dropped += 1
                log.exception("dropped an exchange that could not be recorded: %s", exchange.summary())

    def _failed(self, exc: StoreError) -> None:
        self.failures += 1
        self.last_error = str(exc)
        log.error("recording %d exchanges failed (kept for retry): %s", len(self.pending), exc)
        if len(self.pending) > MAX_PENDING:
            lost = len(self.pending) - MAX_PENDING
            del self.pending[:lost]
            self.dropped += lost
            log.error("store unavailable: dropped the %d oldest unrecorded exchanges", lost)
