"""The measures bench/ made before the workloads: small requests, freshness, /api/usage on a large store.

Against tests/upstream.py (whose answers the request's headers choose), direct and through
aspy (2 gevent workers) on SQLite and, given a server, on PostgreSQL, in the same run:
added latency at one connection (p50, p99) and requests per second at 50 connections (wrk)
of non-streaming requests with tiny bodies, and time to first event of short streams.
Then freshness, the contract "an exchange's figures are in every API answer within 50 ms of
its response's last byte": the delay from a stream's last byte to the first
``/api/stats?session=`` poll that shows it (p50, p99, max), idle and while wrk drives 50
connections. Last, on each store, how fast ``/api/usage`` answers over a year of a
50-person team (two million exchanges; see usage_store.py for how that store is made).
"""
from __future__ import annotations

import http.client
import json
import math
import os
import re
import signal
import statistics
import sys
import time
from pathlib import Path

import recording
import servers
import wrk

BODY = json.dumps({"model": "claude-sonnet-4-6", "max_tokens": 16,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()
STREAM_BODY = json.dumps({"model": "claude-sonnet-4-6", "max_tokens": 16, "stream": True,
                          "messages": [{"role": "user", "content": "hi"}]}).encode()
HEADERS = {"content-type": "application/json", "x-api-key": "sk-ant-bench-key", "anthropic-version": "2023-06-01"}
# A Claude Code-like turn for freshness: a short stream, so its last byte comes well after its first.
FRESH_STREAM = {"x-fake-events": "5", "x-fake-delay": "2"}
# Milliseconds the poller sleeps after an answer that does not show the exchange yet. Each poll is
# a request to the same workers that record, so polling back to back would crowd what it measures;
# 1 ms keeps the resolution at about one poll's round trip.
POLL_MS = 1.0
# Seconds after which an exchange that never shows is counted as missing (an infinite delay).
FRESH_GIVE_UP = 10.0
UPSTREAM = servers.ROOT / "tests" / "upstream.py"
def percentile(values: list[float], pct: float) -> float:
    """Return the pct-th percentile of the values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def latencies(port: int, prefix: str, count: int) -> list[float]:
    """Time sequential non-streaming requests on one keep-alive connection, in ms."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    times = []
    for i in range(count + count // 10):
        started = time.perf_counter()
        conn.request("POST", prefix + "/v1/messages", BODY, HEADERS)
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            sys.exit(f"unexpected status {response.status}")
        if i >= count // 10:  # the first tenth warms up
            times.append((time.perf_counter() - started) * 1000)
    conn.close()
    return times


def first_events(port: int, prefix: str, count: int) -> list[float]:
    """Time to the first event of streamed answers (5 events, 20 ms apart), in ms."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        conn.request("POST", prefix + "/v1/messages", STREAM_BODY,
                     HEADERS | {"x-fake-events": "3", "x-fake-delay": "20"})
        response = conn.getresponse()
        first = response.read1(65536)
        times.append((time.perf_counter() - started) * 1000)
        assert first.startswith(b"event:"), first[:80]
        response.read()
    conn.close()
    return times


def fresh_delays(port: int, prefix: str, count: int, tag: str) -> dict[str, list[float]]:
    """Time from streams' last byte to the first API poll that shows them (its answer, its sending), in ms."""
    # Two keep-alive connections: the turn's, and the poller's, which is ready the moment the turn ends.
    proxy = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    api = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    delays: dict[str, list[float]] = {"answer": [], "sent": [], "trip": []}
    for i in range(count):
        # A new session key each time: the first poll answering requests.total == 1 is this exchange.
        key = f"bench-fresh-{tag}-{os.getpid()}-{i}"
        proxy.request("POST", prefix + "/v1/messages", STREAM_BODY,
                      HEADERS | FRESH_STREAM | {"x-claude-code-session-id": key})
        response = proxy.getresponse()
        response.read()
        ended = time.perf_counter()
        if response.status != 200:
            sys.exit(f"unexpected status {response.status}")
        while True:
            sent = time.perf_counter()
            api.request("GET", f"/api/stats?session={key}")
            answer = api.getresponse()
            body = answer.read()
            answered = time.perf_counter()
            delays["trip"].append((answered - sent) * 1000)
            if answer.status == 200:
                total = json.loads(body)["requests"]["total"]
                if total != 1:
                    sys.exit(f"session {key} shows {total} requests, expected 1")
                # Both ends of the poll: the store may have written the exchange while the poll waited
                # for a worker, so to the answer is when a client sees it, and to the sending bounds
                # how soon after the last byte an API request shows it.
                delays["answer"].append((answered - ended) * 1000)
                delays["sent"].append((sent - ended) * 1000)
                break
            if answer.status != 404:  # an unknown session is a 404 until its first exchange is written
                sys.exit(f"/api/stats answered {answer.status}: {body[:200]!r}")
            if answered - ended > FRESH_GIVE_UP:
                delays["answer"].append(float("inf"))
                delays["sent"].append(float("inf"))
                break
            time.sleep(POLL_MS / 1000)
        if delays["sent"][-1] == float("inf"):
            break  # a store this far behind stays behind: more samples would only take minutes
    proxy.close()
    api.close()
    return delays


def store_lag(port: int) -> dict[float, float]:
    """Return aspy's histogram of store lag (last byte to the store having it): exchanges per upper bound, in s."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    found = re.findall(r'^aspy_store_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M)
    if not found:
        sys.exit("/metrics has no aspy_store_lag_seconds")
    return {float(le): float(n) for le, n in found}


def lag_figures(before: dict[float, float], after: dict[float, float], name: str) -> dict[str, float]:
    """Return the share of exchanges the store had within 50 ms, and the buckets of p50 and p99, between two scrapes."""
    counts = {le: after[le] - before.get(le, 0) for le in after}
    total = counts[math.inf]
    figures = {f"lag_{name}_count": total, f"lag_{name}_within": counts[0.05] / total * 100 if total else math.nan}
    for pct in (50, 99):
        figures[f"lag_{name}_p{pct}"] = min((le for le, n in counts.items() if n >= total * pct / 100),
                                            default=math.nan)
    return figures


def freshness(port: int, prefix: str, count: int) -> dict[str, float]:
    """Measure freshness idle, then under wrk's load at 50 connections; return percentiles in ms."""
    figures: dict[str, float] = {}
    lag = [store_lag(port)]
    idle = fresh_delays(port, prefix, count, "idle")
    lag.append(store_lag(port))
    proc, script = wrk.start(f"http://127.0.0.1:{port}{prefix}/v1/messages", BODY, HEADERS, 3600, 50)
    try:
        time.sleep(1)  # let wrk open its connections and the workers settle into the load
        lag.append(store_lag(port))
        loaded = fresh_delays(port, prefix, count, "load")
        lag.append(store_lag(port))
    finally:
        proc.send_signal(signal.SIGINT)
    figures["load_rps"] = checked(wrk.result(proc, script))
    figures |= lag_figures(lag[0], lag[1], "idle") | lag_figures(lag[2], lag[3], "load")
    for name, delays in (("idle", idle), ("load", loaded)):
        figures[f"fresh_{name}_trip"] = statistics.median(delays["trip"])
        figures[f"fresh_{name}_count"] = len(delays["answer"])
        for end in ("answer", "sent"):
            figures |= {f"fresh_{name}_{end}_p50": percentile(delays[end], 50),
                        f"fresh_{name}_{end}_p99": percentile(delays[end], 99),
                        f"fresh_{name}_{end}_max": max(delays[end])}
    return figures


def checked(run: wrk.WrkRun) -> float:
    """Return a wrk run's requests per second; stop the bench if any answer was not a success."""
    if "Non-2xx" in run.output:
        sys.exit(f"wrk saw errors:\n{run.output}")
    return run.rps


def measure(port: int, prefix: str, count: int, seconds: int) -> dict[str, float]:
    """Measure one server: latency percentiles, throughput, time to first event."""
    times = latencies(port, prefix, count)
    return {"p50": percentile(times, 50), "p99": percentile(times, 99),
            "rps": checked(wrk.run(f"http://127.0.0.1:{port}{prefix}/v1/messages", BODY, HEADERS, seconds, 50)),
            "ttfe": statistics.median(first_events(port, prefix, count // 10))}


def run(only_fresh: bool, only_usage: bool, quick: bool, postgres: str | None, usage_exchanges: int,
        tmp: Path) -> None:
    """Measure direct and through aspy on each store, print the table, then recording cost and /api/usage."""
    if not wrk.available() and not only_usage:
        sys.exit("wrk is needed for the concurrency figures: apt-get install wrk")
    count, seconds = (500, 3) if quick else (3000, 10)
    fresh_count = 40 if quick else 200
    up_port = servers.free_port()
    upstream = servers.start_upstream(UPSTREAM, up_port)
    scratch = f"aspy_bench_{os.getpid()}"
    stores = {"SQLite": ""}
    try:
        if postgres:
            stores["PostgreSQL"] = f'[store]\nurl = "{servers.postgres_database(postgres, scratch, True)}"\n'
        if only_usage:
            return usage_figures(stores, tmp, usage_exchanges)
        results = {"direct": {} if only_fresh else measure(up_port, "", count, seconds)}
        for name, store in stores.items():
            proc, port = servers.start_aspy(tmp, name, up_port, store)
            try:
                results[f"aspy, {name}"] = {} if only_fresh else measure(port, "/bench", count, seconds)
                results[f"aspy, {name}"] |= freshness(port, "/bench", fresh_count)
            finally:
                servers.stop_aspy(proc, tmp / f"{name}.log")
        report(results, fresh_count)
        if only_fresh:
            return
        for name, store in stores.items():
            url = f"sqlite:///{tmp / 'recording.db'}" if not store else store.split('"')[1]
            recording.report(name, recording.run(url, tmp / f"journal-{name}", count // 3), count // 3)
        usage_figures(stores, tmp, usage_exchanges)
    finally:
        servers.stop_upstream(upstream)
        if postgres:
            servers.postgres_database(postgres, scratch, False)


def usage_figures(stores: dict[str, str], tmp: Path, exchanges: int) -> None:
    """Time /api/usage on a large store of each kind (a database of its own on PostgreSQL)."""
    import usage_store

    results = {}
    scratch = f"aspy_bench_usage_{os.getpid()}"
    for name, store in stores.items():
        # The other bench's scratch database is where PostgreSQL is reached to make this one.
        server = store.split('"')[1] if store else None
        url = servers.postgres_database(server, scratch, True) if server else f"sqlite:///{tmp / 'usage.db'}"
        try:
            results[name] = usage_store.measure(name, f'[store]\nurl = "{url}"\n', url, tmp, exchanges,
                                                servers.wait_for, servers.free_port)
        finally:
            if server:
                servers.postgres_database(server, scratch, False)
    usage_store.report(results)


def report(results: dict[str, dict[str, float]], fresh_count: int) -> None:
    """Print one row per measure, one column per server, with ratios to direct."""
    direct = results["direct"]
    names = list(results)
    print(f"\n{'measure':<46}" + "".join(f"{n:>24}" for n in names))
    rows = [("latency p50, 1 connection (ms)", "p50", "+"), ("latency p99, 1 connection (ms)", "p99", "+"),
            ("requests/s, 50 connections", "rps", "x"), ("time to first event, median (ms)", "ttfe", "+")]
    for label, key, kind in rows:
        if key not in direct:  # --only-fresh
            continue
        cells = []
        for name in names:
            value = results[name][key]
            if name == "direct":
                cells.append(f"{value:>24.2f}")
            elif kind == "+":
                cells.append(f"{f'{value:.2f} (+{value - direct[key]:.2f})':>24}")
            else:
                cells.append(f"{f'{value:.0f} (x{value / direct[key]:.3f})':>24}")
        print(f"{label:<46}" + "".join(cells))
    # Freshness is aspy's alone: the direct column has nothing to show.
    for label, key in (("fresh in API after last byte, idle (ms)", "idle"),
                       ("fresh in API after last byte, under load (ms)", "load")):
        cells = [f"{'-':>24}" if name == "direct" else f"{fresh_cell(results[name], key, 'answer'):>24}"
                 for name in names]
        print(f"{label:<46}" + "".join(cells))
    print(f"\nfresh in API: p50 / p99 / max over {fresh_count} streamed turns ({FRESH_STREAM['x-fake-events']} "
          f"events {FRESH_STREAM['x-fake-delay']} ms apart), each with a new session key, from the client's\n"
          f"read of the last byte to the answer of the first GET /api/stats?session= that shows it (contract: "
          f"50 ms). Polled on its own\nkeep-alive connection through the same workers, {POLL_MS:g} ms after "
          f"each answer that does not; under load, wrk drives 50 connections of\nnon-streaming requests "
          f"through aspy meanwhile. A poll's round trip is part of each figure; timed to that poll's sending, "
          f"they are:")
    for name in names[1:]:
        figures = results[name]
        print(f"  {name:<18} idle {fresh_cell(figures, 'idle', 'sent')} (a poll's round trip, median: "
              f"{figures['fresh_idle_trip']:.1f}), under load {fresh_cell(figures, 'load', 'sent')} "
              f"({figures['fresh_load_trip']:.1f}; wrk: {figures['load_rps']:.0f} requests/s)")
        print(f"  {'':<18} the store's own lag, from aspy's /metrics (aspy_store_lag_seconds): "
              + ", ".join(f"{state} {figures[f'lag_{state}_within']:.1f} % of {figures[f'lag_{state}_count']:.0f} "
                          f"exchanges within 50 ms, p50 <= {bound(figures[f'lag_{state}_p50'])}, "
                          f"p99 <= {bound(figures[f'lag_{state}_p99'])}" for state in ("idle", "load")))
        for state in ("idle", "load"):
            if figures[f"fresh_{state}_count"] < fresh_count:
                print(f"  {'':<18} {state}: stopped after {figures[f'fresh_{state}_count']:.0f} samples, "
                      f"the last never showed within {FRESH_GIVE_UP:g} s")


def bound(seconds: float) -> str:
    """Format a histogram bucket's upper bound in ms."""
    return "inf" if math.isinf(seconds) else f"{seconds * 1000:g} ms"


def fresh_cell(figures: dict[str, float], state: str, end: str) -> str:
    """Format one freshness figure as p50 / p99 / max."""
    return " / ".join(f"{figures[f'fresh_{state}_{end}_{p}']:.1f}" for p in ("p50", "p99", "max"))


