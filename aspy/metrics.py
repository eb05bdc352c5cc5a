"""``GET /metrics``: the host's figures in Prometheus' text format, the same whichever worker answers.

Counters and histograms count each exchange once, when the store takes it, so they hold the
store's figures (what a stopped worker's journal gives back is counted by the worker that
records it): requests by client and status class, failures by error type, tokens and cost
by client and model, time to first byte and duration by client. They live in
prometheus_client's multiprocess files, one set per worker in the server's folder under
``$XDG_STATE_HOME/aspy/metrics/``, and every scrape sums them all: a worker that dies or is
replaced keeps its counts, so no counter goes backwards. Each start of the server has a new,
empty folder (aspy/serving.py), which Prometheus reads as an ordinary counter reset. Gauges are
read at each scrape from what the workers share already: requests in flight
(aspy/inflight.py), exchanges waiting for the store and whether it takes them (aspy/status.py).

Nothing is counted on the request's path. The writer, an OS thread, adds to a tally under a
plain lock; the worker's hub moves the tally into prometheus_client at once (whose locks are
gevent's in a worker, not to be shared with an OS thread), before it answers a scrape, and at
exit after the writer's last batch.
"""
from __future__ import annotations

import atexit
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, request
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from . import __version__
from .accounting import Accounted, failed_exchange
from .config import Config
from .errors import ERROR_TYPES, AspyError, error_type
from .models import ModelTable
from .native import gevent_patched, native
from .records import CLIENT_WENT_AWAY, Exchange
from .routing import api_caller
from .status import host_status
from .store import StoreError

log = logging.getLogger(__name__)
bp = Blueprint("metrics", __name__)

# The classic text format, which every Prometheus reads (generate_latest writes it).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# prometheus_client's multiprocess mode: the server names the folder before it forks the workers.
FOLDER_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# Disk space taken for each of a worker's files when it starts (room for thousands of series):
# prometheus_client writes them through mmap, where a full disk would kill the worker (SIGBUS)
# instead of failing a write.
PREALLOCATE = 1 << 20
# The client of legacy traffic; parentheses keep it apart from every client id.
LEGACY = "(legacy)"
# The model of a sampling the model table does not know: labels stay bounded by the table.
OTHER_MODEL = "other"
TOKEN_KINDS = ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h")
# Error types a failure is labelled with; any other type an answer names counts by its status.
ERROR_KINDS = frozenset(ERROR_TYPES.values()) | {"billing_error"}
TTFB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
# The contract's freshness (SPEC 5: in every API answer within 50 ms of the last byte) is one of them.
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def status_class(status: int) -> str:
    """Return the class of an HTTP status (``2xx``), or ``none`` when no answer came (the worker stopped)."""
    return f"{status // 100}xx" if 100 <= status < 600 else "none"


def failure_kind(exchange: Exchange) -> str:
    """Say why an exchange failed, in a bounded set of words: Anthropic's error types, then what aspy saw."""
    errors = exchange.observation.errors
    named = errors[0].get("type") if errors else None
    if named in ERROR_KINDS:
        return named
    if exchange.status >= 400:
        return error_type(exchange.status)
    if errors:
        return "api_error"
    if not exchange.status:
        return "worker_stopped"
    if exchange.error == CLIENT_WENT_AWAY:
        return "client_gone"
    if exchange.error:
        return "stream_broken"
    return "stream_incomplete"


class Metrics:
    """This worker's counters: tallied as the store takes exchanges, moved into prometheus_client on its hub."""

    def __init__(self, config: Config, models: ModelTable):
        self.config = config
        self.models = models
        folder = os.environ.get(FOLDER_VARIABLE)
        self.folder = Path(folder) if folder else None
        if self.folder is not None:
            _preallocate(self.folder)
        # Served alone (tests, a single process), the counters live in this registry.
        self.registry = None if self.folder else CollectorRegistry()
        labels = ("client",)
        self.requests = self._counter("aspy_requests", "Requests forwarded, by client and status class",
                                      ("client", "status_class"))
        self.failures = self._counter("aspy_request_failures", "Failed requests, by client and error type",
                                      ("client", "error_type"))
        self.tokens = self._counter("aspy_tokens", "Tokens billed, by client, model and kind",
                                    ("client", "model", "kind"))
        self.web_searches = self._counter("aspy_web_search_requests", "Server-side web searches billed",
                                          ("client", "model"))
        self.cost = self._counter("aspy_cost_usd", "Cost in USD at list price, by client and model",
                                  ("client", "model"))
        self.write_failures = self._counter("aspy_store_write_failures",
                                            "Failed attempts to write to the store", ())
        self.ttfb = Histogram("aspy_time_to_first_byte_seconds", "Time until the upstream's response headers",
                              labels, buckets=TTFB_BUCKETS, registry=self.registry)
        self.duration = Histogram("aspy_request_duration_seconds", "Time until the response's last byte",
                                  labels, buckets=DURATION_BUCKETS, registry=self.registry)
        self.lag = Histogram("aspy_store_lag_seconds", "Time from a response's last byte until the store has it",
                             buckets=LAG_BUCKETS, registry=self.registry)
        self._tally: dict[tuple[Any, tuple[str, ...]], float] = defaultdict(float)
        self._observed: list[tuple[Histogram, tuple[str, ...], float]] = []
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        # Taken by the writer's OS thread and the hub alike, so a real lock, never gevent's.
        self._lock = native("_thread", "allocate_lock")()
        self._scheduled = False
        self._thread_id = native("_thread", "get_ident")
        self._hub_thread = self._thread_id()
        self._hub = None
        if gevent_patched():
            import gevent

            self._hub = gevent.get_hub()
        if self.folder is not None:
            # Registered before the recorder's last flush, so it runs after it: a stop counts the last batch.
            atexit.register(self.drain)

    def _counter(self, name: str, text: str, labels: tuple[str, ...]) -> Counter:
        return Counter(name, text, labels, registry=self.registry)

    def accounted(self, records: list[Accounted]) -> None:
        """Count exchanges the store has just taken; called by the writer, in any thread; never raises."""
        try:
            self._add(*self._counts(records))
        except Exception:
            log.exception("counting exchanges for /metrics failed; the proxy and the store go on")

    def _counts(self, records: list[Accounted]) -> tuple[list[tuple[Any, tuple[str, ...], float]],
                                                          list[tuple[Histogram, tuple[str, ...], float]]]:
        """Return the counts and observations of a batch of exchanges, which the store has just taken."""
        counts: list[tuple[Any, tuple[str, ...], float]] = []
        observed: list[tuple[Histogram, tuple[str, ...], float]] = []
        taken_at = time.time()
        for record in records:
            exchange = record.exchange
            client = record.client or LEGACY
            if not exchange.replayed:
                # What a journal gave back waited for a restart, not for the store.
                observed.append((self.lag, (), taken_at - exchange.ended_at))
            counts.append((self.requests, (client, status_class(exchange.status)), 1))
            if failed_exchange(exchange):
                counts.append((self.failures, (client, failure_kind(exchange)), 1))
            response = exchange.response
            if response is not None and response.ttfb_ms is not None:
                observed.append((self.ttfb, (client,), response.ttfb_ms / 1000))
            if response is not None and response.status:
                observed.append((self.duration, (client,), response.duration_ms / 1000))
            for model, usage, usd in record.samplings:
                model = model if self.models.find(model) else OTHER_MODEL
                for kind, tokens in zip(TOKEN_KINDS, usage.astuple()):
                    if tokens:
                        counts.append((self.tokens, (client, model, kind), tokens))
                if usage.web_search_requests:
                    counts.append((self.web_searches, (client, model), usage.web_search_requests))
                counts.append((self.cost, (client, model), usd))
        return counts, observed

    def write_failed(self) -> None:
        """Count a failed write to the store; called by the writer, in any thread; never raises."""
        try:
            self._add([(self.write_failures, (), 1)], [])
        except Exception:
            log.exception("counting a failed write for /metrics failed")

    def _add(self, counts: list[tuple[Any, tuple[str, ...], float]],
             observed: list[tuple[Histogram, tuple[str, ...], float]]) -> None:
        with self._lock:
            for metric, labels, amount in counts:
                self._tally[(metric, labels)] += amount
            self._observed += observed
            scheduled, self._scheduled = self._scheduled, True
        if scheduled:
            return
        if self._hub is None or self._thread_id() == self._hub_thread:
            self.drain()
        else:
            # Wakes the worker's hub, which runs it between two greenlets' turns.
            self._hub.loop.run_callback_threadsafe(self.drain)

    def drain(self) -> None:
        """Move the tally into prometheus_client: only in the hub's thread (or where there is no gevent)."""
        with self._lock:
            tally, self._tally = self._tally, defaultdict(float)
            observed, self._observed = self._observed, []
            self._scheduled = False
        try:
            for key, amount in tally.items():
                self._child(*key).inc(amount)
            for histogram, labels, seconds in observed:
                self._child(histogram, labels).observe(seconds)
        except Exception:
            log.exception("counting exchanges for /metrics failed; the proxy goes on")

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        """Return a metric's series for these label values (kept: labels() costs more than the count)."""
        child = self._children.get((metric, labels))
        if child is None:
            child = self._children[(metric, labels)] = metric.labels(*labels) if labels else metric
        return child

    def exposition(self, gauges: HostGauges) -> bytes:
        """Return the host's metrics in Prometheus' text format: every worker's counts, and the gauges."""
        self.drain()
        registry = CollectorRegistry()
        if self.registry is None:
            MultiProcessCollector(registry, str(self.folder))
        else:
            registry.register(self.registry)
        registry.register(gauges)
        return generate_latest(registry)


class HostGauges:
    """The host's gauges at one scrape, from what the workers share."""

    def __init__(self, clients: list[str], in_flight: list[dict[str, Any]], waiting: int, store_up: bool,
                 workers: int):
        self.clients = clients
        self.in_flight = in_flight
        self.waiting = waiting
        self.store_up = store_up
        self.workers = workers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the gauges, in flight for every client (0 included)."""
        open_requests = dict.fromkeys(self.clients, 0)
        open_streams = dict.fromkeys(self.clients, 0)
        for entry in self.in_flight:
            client = entry["client"] or LEGACY
            open_requests[client] = open_requests.get(client, 0) + 1
            open_streams[client] = open_streams.get(client, 0) + bool(entry["streaming"])
        for name, text, values in (
                ("aspy_requests_in_flight", "Requests forwarded and not yet answered to their end", open_requests),
                ("aspy_streams_open", "Responses streaming back right now", open_streams)):
            family = GaugeMetricFamily(name, text, labels=["client"])
            for client, value in sorted(values.items()):
                family.add_metric([client], value)
            yield family
        yield GaugeMetricFamily("aspy_records_waiting",
                                "Exchanges waiting to be written to the store (queued, retried, or in the journal)",
                                value=self.waiting)
        yield GaugeMetricFamily("aspy_store_up", "1 while the store answers and every worker's writes succeed",
                                value=int(self.store_up))
        yield GaugeMetricFamily("aspy_workers", "Worker processes serving on this host", value=self.workers)
        info = GaugeMetricFamily("aspy_build_info", "aspy's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info


def open_metrics(config: Config, models: ModelTable) -> Metrics | None:
    """Return this worker's metrics, or None (logged) when they cannot be kept: the proxy serves all the same."""
    try:
        return Metrics(config, models)
    except Exception as exc:
        log.error("/metrics is off in worker %d, which cannot keep its counters in %s: %s", os.getpid(),
                  os.environ.get(FOLDER_VARIABLE), exc)
        return None


def _preallocate(folder: Path) -> None:
    """Take the disk space of this worker's counter and histogram files now (prometheus_client's names)."""
    for kind in ("counter", "histogram"):
        fd = os.open(folder / f"{kind}_{os.getpid()}.db", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < PREALLOCATE:
                os.posix_fallocate(fd, 0, PREALLOCATE)
        finally:
            os.close(fd)


def _authorize() -> None:
    """Let the api_token through when one is set; refuse a client's proxy token (403) and anything else (401)."""
    caller = api_caller(current_app.config["ASPY"], request.headers.get("Authorization"))
    if caller is None:
        raise AspyError(401, "/metrics needs Authorization: Bearer <api_token>")
    if caller.client is not None:
        # Metrics speak for every client and the whole host: they are the operator's.
        raise AspyError(403, "/metrics needs the api_token; a client's proxy token "
                             "reads only its own client's data, under /api/")


def host_gauges() -> HostGauges:
    """Read the host's gauges: requests in flight, exchanges waiting, the store's health, the workers."""
    config: Config = current_app.config["ASPY"]
    recorder = current_app.extensions["aspy.recorder"]
    notes = [n for n in (host_status(recorder.status.folder) if recorder.status is not None else [])
             if n["pid"] != os.getpid()]
    store_up = not recorder.failing and not any(n["failing"] for n in notes)
    try:
        current_app.extensions["aspy.store"].check()
    except StoreError:
        store_up = False
    clients = list(config.clients) + ([LEGACY] if config.legacy.enabled else [])
    return HostGauges(clients, current_app.extensions["aspy.in_flight"].host(),
                      recorder.waiting() + sum(n["pending"] for n in notes), store_up, len(notes) + 1)


@bp.get("/metrics")
def metrics() -> Response:
    """Answer the host's metrics in Prometheus' text format."""
    _authorize()
    meter: Metrics | None = current_app.extensions["aspy.metrics"]
    if meter is None:
        raise AspyError(503, "This worker cannot keep its metrics (see aspy's log)")
    return Response(meter.exposition(host_gauges()), content_type=CONTENT_TYPE)
