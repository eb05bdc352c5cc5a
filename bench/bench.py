"""Measure what aspy costs: direct to a fast local upstream vs through aspy, in the same run.

    bench/run [--quick] [--only-fresh] [--only-usage] [--usage-exchanges N] [--postgres URL]

Starts the fake upstream (tests/upstream.py) and aspy under gunicorn with the default 2
gevent workers, on SQLite and (given a server) on PostgreSQL, then measures in the same
run, direct and through aspy: added latency at one connection (p50, p99), requests per
second at 50 connections (wrk), and time to first event of streams. Prints a table with
the difference or ratio to direct for each, then what recording one exchange costs.
For each store it also measures freshness, the contract "an exchange's figures are in every API
answer within 50 ms of its response's last byte": the delay from a stream's last byte to the first
``/api/stats?session=`` poll that shows it (p50, p99, max), idle and while wrk drives 50 connections.
Last, on each store, how fast ``/api/usage`` answers over a year of a 50-person team (two million
exchanges; see usage_store.py for how that store is made).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
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


def free_port() -> int:
    """Return a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int, path: str = "/health", proc: subprocess.Popen | None = None) -> None:
    """Wait until a server on the port answers."""
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            sys.exit(f"server exited early with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            conn.getresponse().read()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing answered on port {port}")


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


def wrk_start(url: str, seconds: int, connections: int = 50) -> tuple[subprocess.Popen, Path]:
    """Start wrk posting non-streaming requests at the given concurrency; return it and its script."""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    headers = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in HEADERS.items())
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY.decode())}\n{headers}')
    proc = subprocess.Popen(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
                            stdout=subprocess.PIPE, text=True)
    return proc, script


def wrk_result(proc: subprocess.Popen, script: Path) -> float:
    """Wait for wrk (it reports on SIGINT as at its end) and return its requests per second."""
    out = proc.communicate()[0]
    script.unlink()
    if proc.returncode != 0 or "Non-2xx" in out:
        sys.exit(f"wrk failed or saw errors:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def wrk_rps(url: str, seconds: int, connections: int = 50) -> float:
    """Return requests per second from wrk at the given concurrency."""
    return wrk_result(*wrk_start(url, seconds, connections))


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


def freshness(port: int, prefix: str, count: int) -> dict[str, float]:
    """Measure freshness idle, then under wrk's load at 50 connections; return percentiles in ms."""
    figures: dict[str, float] = {}
    idle = fresh_delays(port, prefix, count, "idle")
    proc, script = wrk_start(f"http://127.0.0.1:{port}{prefix}/v1/messages", 3600)
    try:
        time.sleep(1)  # let wrk open its connections and the workers settle into the load
        loaded = fresh_delays(port, prefix, count, "load")
    finally:
        proc.send_signal(signal.SIGINT)
    figures["load_rps"] = wrk_result(proc, script)
    for name, delays in (("idle", idle), ("load", loaded)):
        figures[f"fresh_{name}_trip"] = statistics.median(delays["trip"])
        figures[f"fresh_{name}_count"] = len(delays["answer"])
        for end in ("answer", "sent"):
            figures |= {f"fresh_{name}_{end}_p50": percentile(delays[end], 50),
                        f"fresh_{name}_{end}_p99": percentile(delays[end], 99),
                        f"fresh_{name}_{end}_max": max(delays[end])}
    return figures


def bench_exchanges(count: int) -> list:
    """Return recorded-like exchanges of a real tool-use stream, in ten sessions."""
    sys.path.insert(0, str(ROOT))
    from aspy.observe import SseObserver
    from aspy.prompts import read_request
    from aspy.records import Exchange, Request, Response

    stream = ROOT / "tests" / "fixtures" / "real" / "sse" / "sdkpy_snapshot_555fb399_0_tool_use_haiku45.sse"

    def exchange(n: int) -> Exchange:
        observer = SseObserver()
        observer.feed(stream.read_bytes())
        facts = read_request(STREAM_BODY, "application/json", claude_code=True)
        return Exchange(started_at=time.time(), client="bench", provider="anthropic", user="b0acf41e12907b7b",
                        request=Request("POST", "/bench/v1/messages", {"x-claude-code-session-id": f"bench-{n % 10}"},
                                        "application/json", len(STREAM_BODY), facts),
                        response=Response(200, duration_ms=5.0, ttfb_ms=1.0, observation=observer.finish()))

    return [exchange(n) for n in range(count)]


def recording_cost(store_url: str, batch: int, count: int) -> float:
    """Return microseconds of store work per exchange, recording in batches of this size."""
    from aspy.config import parse_config
    from aspy.models import load_models
    from aspy.sessions import Sessions
    from aspy.store import open_store

    config = parse_config({"store": {"url": store_url},
                           "clients": {"bench": {"name": "Bench", "provider": "anthropic"}}}, None)
    sessions = Sessions(config, open_store(config.store.url), load_models())
    exchanges = bench_exchanges(count)
    started = time.perf_counter()
    for start in range(0, count, batch):
        sessions.record(exchanges[start:start + batch])
    return (time.perf_counter() - started) / count * 1e6


def journal_cost(folder: Path, count: int) -> float:
    """Return microseconds per exchange of keeping it in the journal: its opened and finished records, then stored."""
    from aspy.journal import Journal

    journal = Journal(folder)
    exchanges = bench_exchanges(count)
    started = time.perf_counter()
    for exchange in exchanges:
        journal.opened(exchange)
        journal.finished(exchange)
    journal.stored([e.id for e in exchanges])
    return (time.perf_counter() - started) / count * 1e6


def measure(port: int, prefix: str, count: int, seconds: int) -> dict[str, float]:
    """Measure one server: latency percentiles, throughput, time to first event."""
    times = latencies(port, prefix, count)
    return {"p50": percentile(times, 50), "p99": percentile(times, 99),
            "rps": wrk_rps(f"http://127.0.0.1:{port}{prefix}/v1/messages", seconds),
            "ttfe": statistics.median(first_events(port, prefix, count // 10))}


def postgres_database(url: str, name: str, create: bool) -> str:
    """Create (or drop) a scratch database for the bench; return its URL."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}" if create else f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    return urlsplit(url)._replace(path=f"/{name}").geturl()


def main() -> None:
    """Run the whole bench and print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer requests, shorter wrk runs")
    parser.add_argument("--only-fresh", action="store_true", help="only the freshness figures (quicker)")
    parser.add_argument("--only-usage", action="store_true", help="only /api/usage on a large store")
    parser.add_argument("--usage-exchanges", type=int, default=2_000_000, metavar="N",
                        help="exchanges in the large store (default: two million)")
    parser.add_argument("--postgres", metavar="URL", default=os.environ.get("ASPY_TEST_POSTGRES_URL"),
                        help="a PostgreSQL server to also bench aspy on (default: $ASPY_TEST_POSTGRES_URL)")
    args = parser.parse_args()
    if not shutil.which("wrk") and not args.only_usage:
        sys.exit("wrk is needed for the concurrency figures: apt-get install wrk")
    count, seconds = (500, 3) if args.quick else (3000, 10)
    fresh_count = 40 if args.quick else 200
    tmp = Path(tempfile.mkdtemp(prefix="aspy-bench-"))
    up_port = free_port()
    upstream = subprocess.Popen([sys.executable, str(ROOT / "tests" / "upstream.py"), str(up_port)],
                                stdout=subprocess.DEVNULL)
    scratch = f"aspy_bench_{os.getpid()}"
    stores = {"SQLite": ""}
    try:
        wait_for(up_port, "/ping")
        if args.postgres:
            stores["PostgreSQL"] = f'[store]\nurl = "{postgres_database(args.postgres, scratch, True)}"\n'
        if args.only_usage:
            return usage_figures(stores, tmp, args.usage_exchanges)
        results = {"direct": {} if args.only_fresh else measure(up_port, "", count, seconds)}
        for name, store in stores.items():
            port = free_port()
            config = tmp / f"{name}.toml"
            config.write_text(f'{store}[providers.fake]\nbase_url = "http://127.0.0.1:{up_port}"\n'
                              f'[clients.bench]\nname = "Bench"\nprovider = "fake"\n')
            env = os.environ | {"XDG_STATE_HOME": str(tmp / name)}
            proc = subprocess.Popen(
                [sys.executable, "-m", "aspy", "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}"],
                stdout=(tmp / f"{name}.log").open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                start_new_session=True)
            try:
                wait_for(port, proc=proc)
                results[f"aspy, {name}"] = {} if args.only_fresh else measure(port, "/bench", count, seconds)
                results[f"aspy, {name}"] |= freshness(port, "/bench", fresh_count)
            finally:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    # A worker still writing a backlog at exit would outlive the scratch database: stop
                    # its whole process group, which it started in, before that database is dropped.
                    print(f"aspy on {name} did not stop within 15 s, killed (see {tmp / f'{name}.log'})",
                          file=sys.stderr)
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        report(results, fresh_count)
        if args.only_fresh:
            return
        print("\nrecording cost per exchange (in-process, after the response, off the client's path):")
        for name, store in stores.items():
            url = f"sqlite:///{tmp / 'recording.db'}" if not store else store.split('"')[1]
            for batch in (1, 50):
                print(f"  {name:<10} batches of {batch:>3}: {recording_cost(url, batch, count // 3):8.1f} us")
        print(f"  journal (both stores; on the worker, before and after the exchange): "
              f"{journal_cost(tmp / 'journal', count // 3):.1f} us")
        usage_figures(stores, tmp, args.usage_exchanges)
    finally:
        upstream.send_signal(signal.SIGINT)
        upstream.wait(10)
        if args.postgres:
            postgres_database(args.postgres, scratch, False)


def usage_figures(stores: dict[str, str], tmp: Path, exchanges: int) -> None:
    """Time /api/usage on a large store of each kind (a database of its own on PostgreSQL)."""
    import usage_store

    results = {}
    scratch = f"aspy_bench_usage_{os.getpid()}"
    for name, store in stores.items():
        # The other bench's scratch database is where PostgreSQL is reached to make this one.
        server = store.split('"')[1] if store else None
        url = postgres_database(server, scratch, True) if server else f"sqlite:///{tmp / 'usage.db'}"
        try:
            results[name] = usage_store.measure(name, f'[store]\nurl = "{url}"\n', url, tmp, exchanges,
                                                wait_for, free_port)
        finally:
            if server:
                postgres_database(server, scratch, False)
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
        for state in ("idle", "load"):
            if figures[f"fresh_{state}_count"] < fresh_count:
                print(f"  {'':<18} {state}: stopped after {figures[f'fresh_{state}_count']:.0f} samples, "
                      f"the last never showed within {FRESH_GIVE_UP:g} s")


def fresh_cell(figures: dict[str, float], state: str, end: str) -> str:
    """Format one freshness figure as p50 / p99 / max."""
    return " / ".join(f"{figures[f'fresh_{state}_{end}_{p}']:.1f}" for p in ("p50", "p99", "max"))


if __name__ == "__main__":
    main()
