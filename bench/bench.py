"""Measure what aspy costs: direct to a fast local upstream vs through aspy, in the same run.

    bench/run [--workloads w1,w2,w3] [--quick] [--rounds N] [--postgres URL]
    bench/run --classic [--quick] [--only-fresh] [--only-usage] [--usage-exchanges N] [--postgres URL]

By default, the three workloads of the speed issue (#14) as ../shared/peer-bench defines
them (workloads.py), direct, through the floor (floor.py: the smallest Flask + requests
proxy under gunicorn's gevent workers, recording nothing) and through aspy (2 gevent
workers, SQLite, recording on):
W1, a 3.3 KB stream, at 1 and 50 connections (latency, requests/s, CPU per request); W2,
a Claude Code turn with a 400 KB request and 80 events 10 ms apart, 100 clients at once
(turns completed, added time to first byte, CPU per request); W3, 1,000 streams open at
once (memory of all aspy's processes, latency of an extra request). After each workload,
that aspy recorded exactly the exchanges the upstream served. Then what recording one
exchange costs in CPU, stage by stage, on W1's and W2's exchanges (recording.py), on
SQLite and, given a server, on PostgreSQL. ``--quick`` runs in about a minute.

``--classic``: the measures made before the workloads (classic.py): small non-streaming
requests, how soon a finished turn is in the API, /api/usage over a year's store.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import classic
import recording
import servers
import workloads
import wrk


def yardstick() -> float:
    """Return the CPU milliseconds a fixed pure-Python loop takes here now (the best of five).

    A virtual machine's speed drifts, by half at times, from one hour to the next: runs are
    compared by their figures beside this one, or better, by aspy beside the floor in one run.
    """
    best = float("inf")
    for _ in range(5):
        started = time.thread_time()
        total = 0
        for i in range(1_000_000):
            total += i
        best = min(best, time.thread_time() - started)
    return best * 1000


def machine() -> str:
    """Describe the run: when, on what machine, how busy it was, how fast now, and which aspy."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    memory = int(Path("/proc/meminfo").read_text().split()[1]) / 2 ** 20
    commit = subprocess.run(["git", "-C", str(servers.ROOT), "log", "-1", "--format=%h %s"],
                            capture_output=True, text=True).stdout.strip()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores ({model}), "
            f"{memory:.0f} GiB; load average before the start {load}; Python {platform.python_version()}; "
            f"yardstick {yardstick():.1f} ms (a million additions in Python: smaller is faster)\n"
            f"aspy at {commit[:100]}")


def main() -> None:
    """Run the workloads and the recording cost (or the classic measures) and print the figures."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="shorter runs (about a minute in all)")
    parser.add_argument("--workloads", default=",".join(workloads.WORKLOADS), metavar="w1,w2,w3",
                        help="which workloads to run (default: all three)")
    parser.add_argument("--rounds", type=int, default=1, metavar="N",
                        help="run the workloads N times, direct and aspy in turn; figures are medians")
    parser.add_argument("--classic", action="store_true",
                        help="the earlier measures instead: small requests, freshness, /api/usage")
    parser.add_argument("--only-fresh", action="store_true", help="classic: only the freshness figures")
    parser.add_argument("--only-usage", action="store_true", help="classic: only /api/usage on a large store")
    parser.add_argument("--usage-exchanges", type=int, default=2_000_000, metavar="N",
                        help="classic: exchanges in the large store (default: two million)")
    parser.add_argument("--postgres", metavar="URL", default=os.environ.get("ASPY_TEST_POSTGRES_URL"),
                        help="a PostgreSQL server to also measure on (default: $ASPY_TEST_POSTGRES_URL)")
    args = parser.parse_args()
    names = [n.strip().lower() for n in args.workloads.split(",") if n.strip()]
    if unknown := set(names) - set(workloads.WORKLOADS):
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))} (known: {', '.join(workloads.WORKLOADS)})")
    tmp = Path(tempfile.mkdtemp(prefix="aspy-bench-"))
    print(machine(), flush=True)
    try:
        if args.classic or args.only_fresh or args.only_usage:
            return classic.run(args.only_fresh, args.only_usage, args.quick, args.postgres, args.usage_exchanges,
                               tmp)
        if not wrk.available() and "w1" in names:
            sys.exit("wrk is needed for W1: apt-get install wrk")
        knobs = workloads.QUICK if args.quick else workloads.FULL
        started = time.monotonic()
        if names:
            workloads.report(workloads.measure(names, knobs, args.rounds, tmp), knobs, args.rounds)
        count = 100 if args.quick else 500
        stores = {"SQLite": f"sqlite:///{tmp / 'recording.db'}"}
        scratch = f"aspy_bench_recording_{os.getpid()}"
        if args.postgres:
            stores["PostgreSQL"] = servers.postgres_database(args.postgres, scratch, True)
        try:
            for name, url in stores.items():
                recording.report(f"in-process, {name}", recording.run(url, tmp / f"journal-{name}", count), count)
        finally:
            if args.postgres:
                servers.postgres_database(args.postgres, scratch, False)
        print(f"\nmeasured in {time.monotonic() - started:.0f} s")
    except BaseException:
        print(f"the servers' logs are in {tmp}", file=sys.stderr)
        raise
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
