"""A year of a 50-person team in one store, and how fast ``/api/usage`` answers over it.

The store is written through its own write path for figures over time
(``Transaction.add_usage``, which keeps the 6-hour summary as the recorder does), fed with the
buckets that two million exchanges would fill: every weekday of the last year, each person
works from about 9:00 to 18:00 in Los Angeles (a few also in the evening), in sessions of about
two hours, asking Sonnet (Opus for some) and Haiku for its side requests. Sending two million
exchanges through aspy would take hours; what the query reads is the same either way. Then
``aspy serve`` runs on that store and each question is asked a few times over HTTP.
"""
from __future__ import annotations

import http.client
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parents[1]
TEAM = 50
ZONE = "America/Los_Angeles"
SONNET, OPUS, HAIKU = "claude-sonnet-4-5-20250929", "claude-opus-4-5-20251101", "claude-haiku-4-5-20251001"
# Per exchange, about: input, output, cache read, cache write (5m).
TOKENS = (600, 450, 38_000, 2_400)
QUESTIONS = [
    ("group_by=day,client", f"group_by=day,client&tz={ZONE}"),
    ("the same in UTC", "group_by=day,client&tz=UTC"),
    ("the same in Asia/Kolkata", "group_by=day,client&tz=Asia/Kolkata"),
    ("group_by=month,model", f"group_by=month,model&tz={ZONE}"),
    ("group_by=week,tag", f"group_by=week,tag&tz={ZONE}"),
    ("group_by=day,client, last 30 days", f"group_by=day,client&tz={ZONE}&time_range=last_30_days"),
    ("group_by=session, one client", f"group_by=session&client=dev-07&tz={ZONE}"),
]
TIMES_ASKED = 5
CHUNK = 20_000


def clients_toml() -> str:
    """Return the team's [clients.*] tables, in three tagged teams."""
    return "".join(f'[clients.dev-{p:02d}]\nname = "Developer {p}"\nprovider = "anthropic"\n'
                   f'tags = ["team-{"abc"[p % 3]}"]\n' for p in range(TEAM))


def slots(end: datetime, rng: random.Random) -> list[tuple[int, int, int]]:
    """Return (person, session number, bucket start) of every 15 minutes someone of the team was at work."""
    tz = ZoneInfo(ZONE)
    found = []
    for back in range(365, 0, -1):
        day = (end - timedelta(days=back)).date()
        if day.weekday() >= 5:
            continue
        for person in range(TEAM):
            if rng.random() < 0.05:
                continue  # away
            start = datetime(day.year, day.month, day.day, 8, tzinfo=tz) + timedelta(minutes=15 * rng.randrange(8))
            spans = [(start, start + timedelta(hours=rng.uniform(8, 10)))]
            if rng.random() < 0.15:
                evening = datetime(day.year, day.month, day.day, 20, tzinfo=tz)
                spans.append((evening, evening + timedelta(hours=rng.uniform(0.5, 2))))
            for first, last in spans:
                at, session = first.timestamp() // 900 * 900, rng.randrange(10 ** 9)
                while at < last.timestamp():
                    if rng.random() < 0.85:
                        found.append((person, session, int(at)))
                    at += 900
                    if rng.random() < 1 / 8:  # a new session about every two hours
                        session = rng.randrange(10 ** 9)
    return found


def generate(store_url: str, exchanges: int) -> dict[str, float]:
    """Write a year of the team's figures to a new store; return how many exchanges, buckets and seconds."""
    sys.path.insert(0, str(ROOT))
    from aspy.models import load_models
    from aspy.records import Usage
    from aspy.store import ENDED, Session, UsageBucket, open_store

    table = load_models()
    rng = random.Random(2026)
    started = time.perf_counter()
    found = slots(datetime.now(ZoneInfo(ZONE)), rng)
    # Exactly the number of exchanges asked for, spread evenly over the quarter hours at work.
    base, extra = divmod(exchanges, len(found))
    lucky = set(rng.sample(range(len(found)), extra))
    store = open_store(store_url)
    sessions: dict[int, Session] = {}
    buckets: list[UsageBucket] = []
    written = 0

    def flush() -> None:
        with store.transaction() as tx:
            for s in sessions.values():
                s.status, s.ended, s.end_reason = ENDED, s.last_activity, "timeout"
                tx.insert_session(s)
            tx.add_usage(buckets)
        sessions.clear()
        buckets.clear()

    for n, (person, number, at) in enumerate(found):
        count = base + (n in lucky)
        main = OPUS if person % 10 == 0 else SONNET
        side = count // 5
        session = sessions.get(number)
        if session is None:
            session = sessions[number] = Session(
                id="s_" + uuid.UUID(int=rng.getrandbits(128)).hex[:20], claude_session_id=str(number),
                source="claude_code", client=f"dev-{person:02d}", client_name=f"Developer {person}",
                provider="anthropic", user=f"{person:016x}", started=at, last_activity=at)
        session.last_activity = at + 899
        for model, asked in ((main, count - side), (HAIKU, side)):
            if not asked:
                continue
            scale = asked * rng.uniform(0.5, 1.5)
            usage = Usage(*(int(t * scale) for t in TOKENS), 0, 0)
            cost = table.charge(table.find(model), "standard", usage)
            buckets.append(UsageBucket(at, session.id, session.client, session.user, model, "standard",
                                       requests=asked, failed=int(rng.random() < 0.01), usage=usage,
                                       cost_usd=cost.usd, savings_usd=cost.savings_usd))
            session.requests += asked
            session.usage = session.usage + usage
            session.cost_usd += cost.usd
        written += count
        if len(buckets) >= CHUNK:
            flush()
    flush()
    store.close()
    return {"exchanges": written, "buckets": len(found), "seconds": time.perf_counter() - started}


def ask(port: int, query: str) -> tuple[list[float], int]:
    """Ask /api/usage a question TIMES_ASKED times; return the times in ms and the number of rows."""
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    times, rows = [], 0
    for _ in range(TIMES_ASKED):
        started = time.perf_counter()
        conn.request("GET", f"/api/usage?{query}")
        response = conn.getresponse()
        body = response.read()
        times.append((time.perf_counter() - started) * 1000)
        if response.status != 200:
            sys.exit(f"/api/usage?{query} answered {response.status}: {body[:300]!r}")
        rows = len(json.loads(body)["rows"])
    conn.close()
    return times, rows


def measure(name: str, store_toml: str, store_url: str, tmp: Path, exchanges: int,
            wait_for, free_port) -> dict[str, object]:
    """Fill a store, serve it with aspy, and time each question; return the figures."""
    made = generate(store_url, exchanges)
    port = free_port()
    config = tmp / f"usage-{name}.toml"
    config.write_text(f"{store_toml}{clients_toml()}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "aspy", "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}"],
        stdout=(tmp / f"usage-{name}.log").open("w"), stderr=subprocess.STDOUT,
        env=os.environ | {"XDG_STATE_HOME": str(tmp / f"usage-{name}")}, cwd=ROOT, start_new_session=True)
    answers = {}
    try:
        wait_for(port, proc=proc)
        for label, query in QUESTIONS:
            answers[label] = ask(port, query)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"made": made, "answers": answers}


def report(results: dict[str, dict]) -> None:
    """Print the time of each question on each store: median of the last answers, and the first."""
    print(f"\n/api/usage on a store of a year of a {TEAM}-person team (asked {TIMES_ASKED} times over HTTP; "
          "median, then the first answer's time, in ms):")
    for name, found in results.items():
        made = found["made"]
        print(f"  {name}: {made['exchanges']:,} exchanges in {made['buckets']:,} quarter hours at work, "
              f"written in {made['seconds']:.0f} s")
    names = list(results)
    print(f"  {'question':<38}{'rows':>7}" + "".join(f"{n:>20}" for n in names))
    for label, _ in QUESTIONS:
        rows = results[names[0]]["answers"][label][1]
        cells = []
        for name in names:
            times = results[name]["answers"][label][0]
            cells.append(f"{statistics.median(times[1:]):.0f} (first {times[0]:.0f})")
        print(f"  {label:<38}{rows:>7}" + "".join(f"{c:>20}" for c in cells))

