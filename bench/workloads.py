"""W1, W2 and W3, direct, through the floor and through aspy in the same run: the figures of the speed issue (#14).

The workloads of ../shared/peer-bench (the harness that measures aspy beside nginx,
mitmproxy and LiteLLM), against the same fast upstream (fast_upstream.py) with the same
request bodies (traffic.py):

- W1 small: a ~300 B streamed request answered by a 3.3 KB stream written at once; wrk at
  1 connection (latency) and at 50 (requests/s, CPU per request).
- W2 a Claude Code turn: a 400 KB request (many turns, tool results, a tools array), the
  upstream waits 50 ms then sends 80 events 10 ms apart; 100 clients, each on its own
  keep-alive connection and session, for N seconds. Time to first byte, CPU per request.
- W3 open streams: 1,000 streams opened at once, one event a second; the memory of all
  the server's processes (peak RSS and PSS, summed), and the latency of an extra small
  request, on a new connection, while they are open.

The floor (floor.py) is the smallest proxy of aspy's shape, recording nothing: what the
shape itself costs, so that aspy's own cost is what it adds to the floor.

CPU per request is the server's process tree's utime + stime over the run (from /proc)
divided by the requests completed; aspy's threads beside each worker's hub (its writer)
are also shown on their own. After each workload through aspy, ``/api/stats`` must have
grown by exactly the requests the upstream served.
"""
from __future__ import annotations

import asyncio
import http.client
import resource
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fast_upstream
import procs
import servers
import traffic
import wrk
from client import Connection, Result

WORKLOADS = ("w1", "w2", "w3")
# How long after the upstream served its last stream aspy may take to show every exchange.
SETTLE = 10.0


@dataclass(frozen=True)
class Knobs:
    """How long and how wide each workload runs."""

    w1_seconds: float
    w2_seconds: float
    w2_clients: int
    w3_streams: int
    w3_events: int
    w3_extra: int


# peer-bench's full and smoke runs.
FULL = Knobs(w1_seconds=8, w2_seconds=20, w2_clients=100, w3_streams=1000, w3_events=21, w3_extra=5)
QUICK = Knobs(w1_seconds=2, w2_seconds=5, w2_clients=100, w3_streams=1000, w3_events=6, w3_extra=3)


@dataclass
class Target:
    """A server to measure: the upstream itself (direct) or aspy in front of it."""

    name: str
    port: int
    prefix: str
    pid: int  # the root of its process tree

    @property
    def path(self) -> str:
        """Return the path of its Messages endpoint."""
        return f"{self.prefix}/v1/messages"

    @property
    def url(self) -> str:
        """Return the URL of its Messages endpoint."""
        return f"http://127.0.0.1:{self.port}{self.path}"


def post_once(target: Target, body: bytes, headers: dict[str, str]) -> float | None:
    """Post on a new connection and read the whole stream; return milliseconds to its end, None if it failed."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=30)
    try:
        conn.request("POST", target.path, body, headers)
        response = conn.getresponse()
        data = response.read()
        ok = response.status == 200 and b"message_stop" in data[-128:]
        return (time.perf_counter() - started) * 1000 if ok else None
    except OSError:
        return None
    finally:
        conn.close()


def quantile(values: list[float], pct: int) -> float | None:
    """Return the pct-th percentile (interpolated), None without values."""
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


def w1(target: Target, knobs: Knobs) -> dict[str, Any]:
    """Run W1: latency at 1 connection, then requests/s and CPU per request at 50."""
    body, headers = traffic.w1_body(), traffic.headers_for(traffic.SESSION_W1)
    for _ in range(20):  # warm-up, not measured
        post_once(target, body, headers)
    one = wrk.run(target.url, body, headers, knobs.w1_seconds, 1, latency=True)
    meter, load = procs.CpuMeter(target.pid), procs.own_cpu(resource.RUSAGE_CHILDREN)
    fifty = wrk.run(target.url, body, headers, knobs.w1_seconds, 50)
    cpu, load = meter.read(), procs.own_cpu(resource.RUSAGE_CHILDREN) - load
    return {"rps": fifty.rps, "p50": one.p50_ms, "p99": one.p99_ms,
            "cpu_ms": 1000 * cpu.total / max(1, fifty.requests),
            "side_ms": 1000 * cpu.side_threads / max(1, fifty.requests),
            "client_ms": 1000 * load / max(1, fifty.requests), "errors": one.errors + fifty.errors}


async def w2_load(target: Target, bodies: list[bytes], sessions: list[str], seconds: float) -> list[Result]:
    """Have each client post its turn again and again on its own connection until the time is up."""
    results: list[Result] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def client(body: bytes, session: str) -> None:
        conn = Connection("127.0.0.1", target.port)
        while loop.time() < end:
            result = await conn.post(target.path, body, traffic.headers_for(session))
            results.append(result)
            if not result.ok:
                await asyncio.sleep(0.1)
        conn.close()

    await asyncio.gather(*(client(b, s) for b, s in zip(bodies, sessions)))
    return results


def w2(target: Target, knobs: Knobs, template: bytes) -> dict[str, Any]:
    """Run W2: turns completed, time to first byte and to the end, CPU per request."""
    sessions = [str(uuid.UUID(int=(7 << 64) + i)) for i in range(knobs.w2_clients)]
    bodies = [traffic.w2_body(template, s) for s in sessions]
    meter, load = procs.CpuMeter(target.pid), procs.own_cpu(resource.RUSAGE_SELF)
    results = asyncio.run(w2_load(target, bodies, sessions, knobs.w2_seconds))
    cpu, load = meter.read(), procs.own_cpu(resource.RUSAGE_SELF) - load
    ok = [r for r in results if r.ok]
    ttfb, duration = [r.ttfb * 1000 for r in ok], [r.duration * 1000 for r in ok]
    return {"completed": len(ok), "errors": len(results) - len(ok),
            "ttfb_p50": quantile(ttfb, 50), "ttfb_p99": quantile(ttfb, 99),
            "dur_p50": quantile(duration, 50), "dur_p99": quantile(duration, 99),
            "cpu_ms": 1000 * cpu.total / max(1, len(ok)), "side_ms": 1000 * cpu.side_threads / max(1, len(ok)),
            "client_ms": 1000 * load / max(1, len(ok)),
            "error_kinds": dict(Counter(r.error for r in results if not r.ok))}


async def w3_load(target: Target, knobs: Knobs) -> dict[str, Any]:
    """Open every stream at once; once all are open (or half their life has passed), time extra requests."""
    body, opened = traffic.w3_body(knobs.w3_events), list[float]()
    loop = asyncio.get_running_loop()
    started = loop.time()
    conns = [Connection("127.0.0.1", target.port) for _ in range(knobs.w3_streams)]
    tasks = [asyncio.create_task(conn.post(target.path, body, traffic.headers_for(str(uuid.UUID(int=i))),
                                           opened.append)) for i, conn in enumerate(conns)]
    wait_limit = max(1.5, (knobs.w3_events - 1) / 2)
    while len(opened) < knobs.w3_streams and loop.time() - started < wait_limit:
        await asyncio.sleep(0.05)
    all_open = loop.time() - started if len(opened) >= knobs.w3_streams else None
    open_then = len(opened)
    await asyncio.sleep(0.5)
    extra = []
    w1_body, w1_headers = traffic.w1_body(), traffic.headers_for(traffic.SESSION_W1)
    for _ in range(knobs.w3_extra):  # each on a new connection, from a thread, as a new client would
        extra.append(await asyncio.to_thread(post_once, target, w1_body, w1_headers))
        await asyncio.sleep(0.2)
    results = await asyncio.gather(*tasks)
    for conn in conns:
        conn.close()
    good = [x for x in extra if x is not None]
    return {"completed": sum(r.ok for r in results), "open_then": open_then, "all_open_s": all_open,
            "extra_p50": statistics.median(good) if good else None, "extra_max": max(good) if good else None,
            "extra_failed": len(extra) - len(good),
            "error_kinds": dict(Counter(r.error for r in results if not r.ok))}


def w3(target: Target, knobs: Knobs) -> dict[str, Any]:
    """Run W3: peak memory of all the server's processes, and an extra request's latency."""
    sampler = procs.MemorySampler(target.pid)
    sampler.start()
    result = asyncio.run(w3_load(target, knobs))
    peaks = sampler.finish()
    return result | {"rss": peaks.rss, "pss": peaks.pss, "fds": peaks.fds, "processes": peaks.processes,
                     "rss_per_process": peaks.rss_per_process}


class RecordCheck:
    """Whether aspy recorded exactly the exchanges the upstream served during one workload."""

    def __init__(self, aspy: Target, upstream_port: int):
        self.aspy, self.upstream_port = aspy, upstream_port
        self.before = self.recorded()
        self.upstream_before = servers.get_json(upstream_port, "/__stats")

    def recorded(self) -> dict[str, int]:
        """Return how many exchanges aspy's API counts, and how many of them failed."""
        return servers.get_json(self.aspy.port, "/api/stats")["requests"]

    def finish(self) -> dict[str, float]:
        """Wait for the upstream to end its streams and for aspy to show them; return what each counted."""
        wait_idle(self.upstream_port)
        started = time.monotonic()
        while True:
            # Both read again each time: requests still queued in aspy when the load ended reach
            # the upstream (and are served) after its streams ended.
            upstream = servers.get_json(self.upstream_port, "/__stats")
            now = self.recorded()
            served = upstream["served"] - self.upstream_before["served"]
            recorded = now["total"] - self.before["total"]
            if (recorded == served and not upstream["open"]) or time.monotonic() - started > SETTLE:
                break
            time.sleep(0.1)
        return {"served": served, "received": upstream["received"] - self.upstream_before["received"],
                "recorded": recorded, "failed": now["failed"] - self.before["failed"],
                "settled_s": time.monotonic() - started}


def wait_idle(upstream_port: int, limit: float = 90) -> None:
    """Wait until the upstream has no stream open, aspy's or the floor's."""
    deadline = time.monotonic() + limit
    while (stats := servers.get_json(upstream_port, "/__stats"))["open"] + stats["floor_open"] \
            and time.monotonic() < deadline:
        time.sleep(0.2)


def raise_descriptor_limit() -> None:
    """Allow this process and the servers it starts as many descriptors as the system does (W3 needs thousands)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def measure(names: list[str], knobs: Knobs, rounds: int, folder: Path) -> dict[str, dict[str, list[dict]]]:
    """Start the upstream and aspy, run each workload on both, the order turning round by round."""
    raise_descriptor_limit()
    up_port = servers.free_port()
    fake = servers.start_upstream(Path(fast_upstream.__file__), up_port)
    results: dict[str, dict[str, list[dict]]] = {name: {"direct": [], "floor": [], "aspy": []} for name in names}
    try:
        proc, port = servers.start_aspy(folder, "aspy", up_port)
        floor, floor_port = servers.start_floor(folder, up_port)
        try:
            targets = [Target("direct", up_port, "", fake.pid), Target("floor", floor_port, "/floor", floor.pid),
                       Target("aspy", port, "/bench", proc.pid)]
            template = traffic.w2_template()
            runs: dict[str, Callable[[Target], dict]] = {
                "w1": lambda t: w1(t, knobs), "w2": lambda t: w2(t, knobs, template), "w3": lambda t: w3(t, knobs)}
            started = time.monotonic()
            for round_ in range(rounds):
                order = targets[round_ % 3:] + targets[:round_ % 3]
                for name in names:
                    for target in order:
                        wait_idle(up_port)
                        check = RecordCheck(targets[2], up_port) if target.name == "aspy" else None
                        result = runs[name](target)
                        if check is not None:
                            result["check"] = check.finish()
                        results[name][target.name].append(result)
                        brief = {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()
                                 if k not in ("rss_per_process", "error_kinds")}
                        print(f"[{time.monotonic() - started:5.0f} s] round {round_ + 1} {name} {target.name}: {brief}",
                              flush=True)
        finally:
            servers.stop_aspy(floor, folder / "floor.log")
            servers.stop_aspy(proc, folder / "aspy.log")
    finally:
        servers.stop_upstream(fake)
    return results


def median(rounds: list[dict], key: str) -> float | None:
    """Return the median over rounds of one figure."""
    values = [r[key] for r in rounds if r.get(key) is not None]
    return statistics.median(values) if values else None


def number(value: float | None, digits: int) -> str:
    """Format a figure: thousands grouped, None as a dash."""
    return "-" if value is None else f"{value:,.{digits}f}"


# label, workload, figure(s), digits, how aspy compares ("x": ratio to direct, "+": added to direct, "": as is), goal
ROWS = [
    ("requests/s at 50 connections", "w1", ("rps",), 0, "x", ">= 1,500"),
    ("latency p50 / p99 at 1 connection (ms)", "w1", ("p50", "p99"), 2, "", "p50 <= 1.5"),
    ("CPU per request (ms)", "w1", ("cpu_ms",), 2, "", ""),
    ("  of which threads beside the hub: aspy's writer (ms)", "w1", ("side_ms",), 2, "", ""),
    ("  the load client's, wrk (ms)", "w1", ("client_ms",), 2, "", ""),
    ("turns completed", "w2", ("completed",), 0, "x", "as many as direct"),
    ("time to first byte p50 / p99 (ms; aspy: added)", "w2", ("ttfb_p50", "ttfb_p99"), 1, "+", "+10 / +50"),
    ("duration p50 / p99 (ms; aspy: added)", "w2", ("dur_p50", "dur_p99"), 1, "+", ""),
    ("CPU per request (ms)", "w2", ("cpu_ms",), 2, "", "<= 5"),
    ("  of which threads beside the hub: aspy's writer (ms)", "w2", ("side_ms",), 2, "", ""),
    ("  the load client's, this Python process (ms)", "w2", ("client_ms",), 2, "", ""),
    ("memory, all processes: peak RSS / PSS (MiB)", "w3", ("rss", "pss"), 0, "", "<= 120"),
    ("an extra request while they are open, median (ms)", "w3", ("extra_p50",), 1, "", "<= 3"),
    ("streams completed", "w3", ("completed",), 0, "", ""),
    ("seconds until all were open", "w3", ("all_open_s",), 2, "", ""),
]


def cell(figures: dict[str, list[dict]], name: str, keys: tuple[str, ...], digits: int, compare: str) -> str:
    """Format one target's figures on a row, the floor's and aspy's compared with direct's as the row says."""
    values = [median(figures[name], k) for k in keys]
    direct = [median(figures["direct"], k) for k in keys]
    if name == "direct" or compare == "":
        return " / ".join(number(v, digits) for v in values)
    if compare == "+":
        return " / ".join(f"{v - d:+,.{digits}f}" if v is not None and d is not None else number(v, digits)
                          for v, d in zip(values, direct))
    value, base = values[0], direct[0]
    return number(value, digits) + (f" (x{value / base:.2f})" if value is not None and base else "")


def report(results: dict[str, dict[str, list[dict]]], knobs: Knobs, rounds: int) -> None:
    """Print the workloads' figures, direct beside aspy, with the speed issue's goals; then what aspy recorded."""
    w1_kb = len(b"".join(fast_upstream.W1_EVENTS)) / 1000
    titles = {"w1": f"W1: a {len(traffic.w1_body())} B request, a {w1_kb:.1f} KB "
                    f"stream of {len(fast_upstream.W1_EVENTS)} events at once; wrk {knobs.w1_seconds:g} s at 1, then "
                    f"50 connections",
              "w2": f"W2: a Claude Code turn, a {len(traffic.w2_template()) // 1000} KB request, 50 ms then "
                    f"{len(fast_upstream.W2_EVENTS)} events 10 ms apart; {knobs.w2_clients} clients for "
                    f"{knobs.w2_seconds:g} s",
              "w3": f"W3: {knobs.w3_streams:,} streams opened at once, {knobs.w3_events} events 1 s apart; "
                    f"{knobs.w3_extra} extra requests"}
    print(f"\nmedians of {rounds} round(s); aspy: 2 gevent workers, SQLite, recording on; direct's CPU and memory "
          f"are the upstream's own;\nfloor: the smallest proxy of aspy's shape (Flask, requests, gunicorn's gevent "
          f"workers; floor.py), which records nothing")
    print(f"{'measure':<56}{'direct':>22}{'floor':>22}{'aspy':>22}   goal (#14)")
    for name in results:
        print(titles[name])
        for label, workload, keys, digits, compare, goal in ROWS:
            if workload == name:
                figures = results[name]
                print(f"  {label:<54}{cell(figures, 'direct', keys, digits, compare):>22}"
                      f"{cell(figures, 'floor', keys, digits, compare):>22}"
                      f"{cell(figures, 'aspy', keys, digits, compare):>22}   {goal}")
    print("\naspy recorded every exchange? /api/stats requests.total growth vs the streams the upstream served:")
    for name, figures in results.items():
        for i, result in enumerate(figures["aspy"]):
            check = result["check"]
            verdict = "exact" if check["served"] == check["recorded"] else \
                f"NOT exact: {check['served'] - check['recorded']:+} after {SETTLE:g} s"
            print(f"  {name.upper()} round {i + 1}: {check['recorded']:,} recorded of {check['served']:,} served, "
                  f"{verdict} (shown {check['settled_s']:.1f} s after the upstream's last stream ended; "
                  f"{check['failed']:,} recorded as failed)")
    if "w1" in results:
        print("  (W1's failed: wrk hangs up on the requests in flight when its time is up; aspy records them as "
              "failed, client went away)")
    for name, figures in results.items():
        for target, rounds_ in figures.items():
            for i, result in enumerate(rounds_):
                seen = {k: result[k] for k in ("errors", "error_kinds", "extra_failed") if result.get(k)}
                if seen:
                    print(f"  errors, {name.upper()} {target} round {i + 1}: {seen}")
    if "w3" in results:
        print("  W3 RSS per process at the peak (MiB): " + "; ".join(
            f"{t} {r['rss_per_process']}" for t, rounds_ in results["w3"].items() for r in rounds_))
