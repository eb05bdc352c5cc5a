"""What recording one exchange costs in CPU, stage by stage, on W1's and W2's exchanges.

In this process, with aspy's own parts as a worker runs them: the observer fed the
stream's events as they arrive, the request's facts read from its body, the journal, and
the :class:`~aspy.recorder.Recorder` writing to a store (its ``flush``, which the writer
thread runs: the store transaction and the journal's bookkeeping). Each stage is timed
with ``time.thread_time`` (CPU of this thread alone, so waiting on the disk is not in it,
nor, on PostgreSQL, the database server's own work).
The writer is timed in batches of 1 (each exchange its own transaction, as when traffic
is light) and of 50 (as under load, when exchanges queue during a transaction).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import fast_upstream
import traffic

from aspy.config import parse_config
from aspy.journal import Journal
from aspy.models import load_models
from aspy.observe import observer_for
from aspy.proxy import OBSERVED_HEADERS, Flight
from aspy.recorder import Recorder
from aspy.records import Exchange, Request
from aspy.routing import user_hash
from aspy.sessions import Sessions
from aspy.store import open_store

BATCHES = (1, 50)
STAGES = {"observe": "on the worker, while it relays: observing the events",
          "read": "on the worker, after the last byte: reading the request body",
          "journal": "on the worker: the journal (opened, finished)",
          **{f"writer{b}": f"the writer: store and journal, in batches of {b}" for b in BATCHES}}
RESPONSE_TYPE = "text/event-stream; charset=utf-8"
# The speed issue's goal (#14): recording an exchange costs at most this many µs of CPU.
GOAL_US = 150


@dataclass
class Kind:
    """An exchange as one workload makes it: its request bodies (one per session) and its answer's chunks."""

    name: str
    bodies: list[bytes]
    sessions: list[str]
    chunks: list[bytes]
    cost: dict[str, float] = field(default_factory=dict)  # CPU µs per exchange, by stage


def kinds() -> list[Kind]:
    """Return W1's exchange (one session, the whole answer in one read) and W2's (100 sessions, event by event)."""
    template = traffic.w2_template()
    w2_sessions = [f"00000000-0000-4000-8000-{i:012d}" for i in range(100)]
    return [Kind("W1", [traffic.w1_body()], [traffic.SESSION_W1], [b"".join(fast_upstream.W1_EVENTS)]),
            Kind("W2", [traffic.w2_body(template, s) for s in w2_sessions], w2_sessions, list(fast_upstream.W2_EVENTS))]


def new_flight(kind: Kind, n: int, user: str) -> Flight:
    """Return the n-th exchange of a kind as the proxy holds it before the answer: its body still whole."""
    session = kind.sessions[n % len(kind.sessions)]
    sent = {k.lower(): v for k, v in traffic.headers_for(session).items()}
    body = kind.bodies[n % len(kind.bodies)]
    opened = Exchange(started_at=time.time(), client="bench", provider="anthropic", user=user,
                      request=Request("POST", "/v1/messages", {h: sent[h] for h in OBSERVED_HEADERS if h in sent},
                                      "application/json", len(body)))
    flight = Flight(opened, body)
    flight.status, flight.ttfb_ms, flight.content_type = 200, 50.0, RESPONSE_TYPE
    flight.request_id, flight.rate_limits = "req_bench", {"anthropic-ratelimit-requests-remaining": "99"}
    return flight


def measure(kind: Kind, recorder: Recorder, count: int, batch: int, user: str) -> None:
    """Make, observe and record count exchanges of a kind, adding each stage's CPU to the kind's costs."""
    spent = dict.fromkeys(["observe", "read", "journal", f"writer{batch}"], 0.0)
    journal = recorder.journal
    assert journal is not None
    queued = 0
    for n in range(count):
        flight = new_flight(kind, n, user)
        started = time.thread_time()
        journal.opened(flight.opened)
        spent["journal"] += time.thread_time() - started

        started = time.thread_time()
        flight.observer = observer = observer_for(RESPONSE_TYPE, flight.opened.request.path)
        for chunk in kind.chunks:
            observer.feed(chunk)
            flight.bytes += len(chunk)
        flight.complete = True
        spent["observe"] += time.thread_time() - started

        # Flight.ended finishes the observer (a few µs) and reads the body: timed as reading.
        started = time.thread_time()
        exchange = flight.ended()
        spent["read"] += time.thread_time() - started

        # What Recorder.__call__ does on the worker, without starting its writer thread: the
        # writer's work is timed below, in this thread, through the recorder's own flush.
        started = time.thread_time()
        journal.finished(exchange)
        spent["journal"] += time.thread_time() - started
        recorder.queue.put(exchange)
        queued += 1
        if queued == batch or n == count - 1:
            started = time.thread_time()
            recorder.flush()
            spent[f"writer{batch}"] += time.thread_time() - started
            queued = 0
            if recorder.failing:
                raise RuntimeError(f"the store failed: {recorder.last_error}")
    for stage, seconds in spent.items():
        # Observing, reading and the journal are the same whatever the batch: the last run's figure stands.
        kind.cost[stage] = seconds / count * 1e6


def run(store_url: str, folder: Path, count: int) -> list[Kind]:
    """Measure every stage on W1's and W2's exchanges, recording into the store at the URL."""
    config = parse_config({"store": {"url": store_url},
                           "clients": {"bench": {"name": "Bench", "provider": "anthropic"}}}, None)
    user = user_hash(traffic.headers_for("")["x-api-key"], None)
    measured = kinds()
    for kind in measured:
        recorder = Recorder(Sessions(config, open_store(store_url), load_models()), Journal(folder / kind.name))
        # Each session's first exchange opens it, which happens once a session: not timed.
        measure(kind, recorder, len(kind.sessions), len(kind.sessions), user)
        for batch in BATCHES:
            measure(kind, recorder, count, batch, user)
    return measured


def report(title: str, measured: list[Kind], count: int) -> None:
    """Print each stage's CPU per exchange, one column per kind, and the recording total against the goal."""
    print(f"\nrecording one exchange, CPU µs per exchange ({title}; {count} exchanges of each kind and batch size;\n"
          f"W1: a {len(measured[0].bodies[0])} B request, {len(fast_upstream.W1_EVENTS)} events in one read; "
          f"W2: a {len(measured[1].bodies[0]) // 1000} KB request, {len(fast_upstream.W2_EVENTS)} events one by one, "
          f"a tool call, {len(measured[1].sessions)} sessions):")
    print(f"  {'stage':<62}" + "".join(f"{k.name:>10}" for k in measured))
    for stage, label in STAGES.items():
        print(f"  {label:<62}" + "".join(f"{k.cost[stage]:>10.1f}" for k in measured))
    for batch in BATCHES:
        label = f"recording (journal + writer, batches of {batch}); goal <= {GOAL_US:g}"
        print(f"  {label:<62}" + "".join(f"{k.cost['journal'] + k.cost[f'writer{batch}']:>10.1f}" for k in measured))
