"""Measure what aspy costs: direct to a fast local upstream vs through aspy, in the same run.

    bench/run [--quick] [--postgres URL]

Starts the fake upstream (tests/upstream.py) and aspy under gunicorn with the default 2
gevent workers, on SQLite and (given a server) on PostgreSQL, then measures in the same
run, direct and through aspy: added latency at one connection (p50, p99), requests per
second at 50 connections (wrk), and time to first event of streams. Prints a table with
the difference or ratio to direct for each, then what recording one exchange costs.
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


def wrk_rps(url: str, seconds: int, connections: int = 50) -> float:
    """Return requests per second from wrk at the given concurrency."""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    headers = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in HEADERS.items())
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY.decode())}\n{headers}')
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    script.unlink()
    if "Non-2xx" in out:
        sys.exit(f"wrk saw errors:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def recording_cost(store_url: str, batch: int, count: int) -> float:
    """Return microseconds of store work per exchange, recording in batches of this size."""
    sys.path.insert(0, str(ROOT))
    from aspy.config import parse_config
    from aspy.models import load_models
    from aspy.observe import Exchange, SseObserver
    from aspy.sessions import Sessions
    from aspy.store import open_store

    config = parse_config({"store": {"url": store_url},
                           "clients": {"bench": {"name": "Bench", "provider": "anthropic"}}}, None)
    sessions = Sessions(config, open_store(config.store.url), load_models())
    stream = ROOT / "tests" / "fixtures" / "real" / "sse" / "sdkpy_snapshot_555fb399_0_tool_use_haiku45.sse"

    def exchange(n: int) -> Exchange:
        observer = SseObserver()
        observer.feed(stream.read_bytes())
        ex = Exchange(started_at=time.time(), method="POST", path="/bench/v1/messages", client="bench",
                      provider="anthropic", user="b0acf41e12907b7b",
                      headers={"x-claude-code-session-id": f"bench-{n % 10}"}, body=STREAM_BODY,
                      content_type="application/json", status=200, ttfb_ms=1.0, duration_ms=5.0)
        ex.observation = observer.finish()
        ex.read_body()
        return ex

    exchanges = [exchange(n) for n in range(count)]
    started = time.perf_counter()
    for start in range(0, count, batch):
        sessions.record(exchanges[start:start + batch])
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
    parser.add_argument("--postgres", metavar="URL", default=os.environ.get("ASPY_TEST_POSTGRES_URL"),
                        help="a PostgreSQL server to also bench aspy on (default: $ASPY_TEST_POSTGRES_URL)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed for the concurrency figures: apt-get install wrk")
    count, seconds = (500, 3) if args.quick else (3000, 10)
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
        results = {"direct": measure(up_port, "", count, seconds)}
        for name, store in stores.items():
            port = free_port()
            config = tmp / f"{name}.toml"
            config.write_text(f'{store}[providers.fake]\nbase_url = "http://127.0.0.1:{up_port}"\n'
                              f'[clients.bench]\nname = "Bench"\nprovider = "fake"\n')
            env = os.environ | {"XDG_STATE_HOME": str(tmp / name)}
            proc = subprocess.Popen(
                [sys.executable, "-m", "aspy", "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}"],
                stdout=(tmp / f"{name}.log").open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            try:
                wait_for(port, proc=proc)
                results[f"aspy, {name}"] = measure(port, "/bench", count, seconds)
            finally:
                proc.send_signal(signal.SIGINT)
                proc.wait(15)
        report(results)
        print("\nrecording cost per exchange (in-process, after the response, off the client's path):")
        for name, store in stores.items():
            url = f"sqlite:///{tmp / 'recording.db'}" if not store else store.split('"')[1]
            for batch in (1, 50):
                print(f"  {name:<10} batches of {batch:>3}: {recording_cost(url, batch, count // 3):8.1f} us")
    finally:
        upstream.send_signal(signal.SIGINT)
        upstream.wait(10)
        if args.postgres:
            postgres_database(args.postgres, scratch, False)


def report(results: dict[str, dict[str, float]]) -> None:
    """Print one row per measure, one column per server, with ratios to direct."""
    direct = results["direct"]
    names = list(results)
    print(f"\n{'measure':<34}" + "".join(f"{n:>20}" for n in names))
    rows = [("latency p50, 1 connection (ms)", "p50", "+"), ("latency p99, 1 connection (ms)", "p99", "+"),
            ("requests/s, 50 connections", "rps", "x"), ("time to first event, median (ms)", "ttfe", "+")]
    for label, key, kind in rows:
        cells = []
        for name in names:
            value = results[name][key]
            if name == "direct":
                cells.append(f"{value:>20.2f}")
            elif kind == "+":
                cells.append(f"{f'{value:.2f} (+{value - direct[key]:.2f})':>20}")
            else:
                cells.append(f"{f'{value:.0f} (x{value / direct[key]:.3f})':>20}")
        print(f"{label:<34}" + "".join(cells))


if __name__ == "__main__":
    main()
