"""Nothing lost: the journal gives back what a killed or stopped worker had not written."""
from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from aspy.journal import Journal
from aspy.records import Exchange, Request, Response
from helpers import API_KEY, MESSAGE, eventually, standard_config, workers_of

STREAMED = MESSAGE | {"stream": True}


def exchange(status: int | None = None, complete: bool = False) -> Exchange:
    return Exchange(started_at=time.time(), client="dev-1", provider="fake", user="anonymous",
                    request=Request("POST", "/v1/messages"),
                    response=None if status is None else Response(status, duration_ms=1.0, complete=complete))


def test_a_claimed_journal_gives_back_finished_exchanges_and_unfinished_ones_as_failed(tmp_path):
    dead = Journal(tmp_path)
    done, cut = exchange(status=200, complete=True), exchange()
    dead.opened(done)
    dead.opened(cut)
    dead.finished(done)
    # The dead worker's locks go with its file descriptors.
    for segment in dead.segments:
        os.close(segment.fd)
    heir = Journal(tmp_path)
    back = {e.id: e for e in heir.claim()}
    assert set(back) == {done.id, cut.id} and all(e.replayed for e in back.values())
    assert back[done.id].status == 200 and back[done.id].error is None
    assert back[cut.id].error == "aspy's worker stopped before the exchange ended"
    heir.stored(list(back))
    assert list(tmp_path.glob("*.log")) == []


def test_a_living_workers_journal_is_never_claimed(tmp_path):
    alive = Journal(tmp_path)
    alive.finished(exchange())
    assert Journal(tmp_path).claim() == []


def test_an_exchange_opened_in_one_segment_and_finished_in_the_next_is_given_back_once(tmp_path, monkeypatch):
    monkeypatch.setattr("aspy.journal.SEGMENT_RECORDS", 1)
    dead = Journal(tmp_path)
    long_stream = exchange(status=200, complete=True)
    dead.opened(long_stream)
    dead.finished(long_stream)
    assert len(list(tmp_path.glob("*.log"))) == 2
    for segment in dead.segments:
        os.close(segment.fd)
    [back] = Journal(tmp_path).claim()
    assert back.id == long_stream.id and back.error is None


def test_a_torn_record_is_skipped_and_the_rest_given_back(tmp_path):
    dead = Journal(tmp_path)
    first = exchange(status=200)
    dead.finished(first)
    [segment] = dead.segments
    os.write(segment.fd, b"\x00\x00\x10\x00torn")
    os.close(segment.fd)
    assert [e.id for e in Journal(tmp_path).claim()] == [first.id]


def test_a_segment_written_before_the_exchange_record_had_parts_is_given_back(tmp_path):
    # Written by aspy at 0d082fc: a finished exchange opened and finished, and one opened only.
    earlier = Path(__file__).parent / "fixtures" / "journal" / "earlier-aspy-segment.log"
    (tmp_path / "1-1.log").write_bytes(earlier.read_bytes())
    back = {e.id: e for e in Journal(tmp_path).claim()}
    done, cut = back["0" * 32], back["1" * 32]
    assert done.request.method == "POST" and done.request.headers == {"x-claude-code-session-id": "s-1"}
    assert done.request.body_bytes == 99 and done.request.facts.prompt == "hello"
    assert done.status == 200 and done.response.ttfb_ms == 12.5 and done.response.complete
    assert done.observation.tool_uses[0].name == "Read" and done.error is None and done.replayed
    assert cut.response is None and cut.error == "aspy's worker stopped before the exchange ended"


def test_segments_are_deleted_once_stored(tmp_path, monkeypatch):
    monkeypatch.setattr("aspy.journal.SEGMENT_RECORDS", 2)
    journal = Journal(tmp_path)
    records = [exchange() for _ in range(6)]
    for record in records:
        journal.finished(record)
    journal.stored([r.id for r in records])
    # Only the segment being written stays.
    assert len(list(tmp_path.glob("*.log"))) == 1


def test_sigkill_of_a_worker_under_load_loses_no_exchange(start_aspy, upstream):
    server = start_aspy(standard_config(upstream.url))
    session = str(uuid.uuid4())
    before = len(upstream.requests)
    stop = threading.Event()

    def turn(_):
        try:
            r = requests.post(f"{server.url}/dev-1/v1/messages", json=STREAMED, timeout=30, headers={
                "x-api-key": API_KEY, "x-claude-code-session-id": session, "x-fake-events": "10",
                "x-fake-delay": "20"})
            r.content
        except requests.RequestException:
            pass  # the killed worker's clients see their connection cut

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(turn, i) for i in range(160)]
        time.sleep(1.0)
        os.kill(workers_of(server)[0], signal.SIGKILL)
        for f in futures:
            f.result()
    stop.set()
    reached = sum(1 for r in upstream.requests[before:] if r.target.startswith("/v1/messages"))
    # Every exchange that reached the upstream is recorded: the killed worker's through its journal.
    # A request the journal noted but the kill stopped before it reached the upstream is recorded
    # too (as failed): at most one per client connection.
    stats = eventually(lambda: (s := requests.get(f"{server.url}/api/stats", params={"session": session}).json())
                       .get("requests", {}).get("total", 0) >= reached and s, timeout=30)
    assert stats["requests"]["total"] <= reached + 16, (stats["requests"], reached)
    assert stats["requests"]["failed"] >= 1  # the streams cut by the kill are recorded as failed
    assert "a stopped worker left in its journal" in server.log_text()


def test_a_restart_during_a_store_outage_loses_nothing(start_aspy, upstream, tmp_path):
    server = start_aspy(standard_config(upstream.url))
    session = str(uuid.uuid4())
    requests.post(f"{server.url}/dev-1/v1/messages", json=STREAMED, headers={"x-claude-code-session-id": session})
    eventually(lambda: requests.get(f"{server.url}/api/stats", params={"session": session}).ok)
    database = tmp_path / "state" / "aspy" / "aspy.db"
    # Another process holds the database: every write fails while the proxy keeps forwarding.
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    for _ in range(20):
        r = requests.post(f"{server.url}/dev-1/v1/messages", json=STREAMED,
                          headers={"x-claude-code-session-id": session})
        assert r.status_code == 200
        r.content
    time.sleep(1.5)
    server.stop()  # a stop while the store is down: the workers' memory goes, their journals stay
    holder.execute("ROLLBACK")
    holder.close()
    server.start()
    stats = eventually(lambda: (s := requests.get(f"{server.url}/api/stats", params={"session": session}).json())
                       ["requests"]["total"] == 21 and s, timeout=30)
    assert stats["requests"]["failed"] == 0
    time.sleep(0.5)
    assert requests.get(f"{server.url}/api/stats", params={"session": session}).json()["requests"]["total"] == 21


def test_health_speaks_for_the_whole_host_while_writes_fail_and_clears_after(start_aspy, upstream, tmp_path):
    server = start_aspy(standard_config(upstream.url))
    requests.post(f"{server.url}/dev-1/v1/messages", json=STREAMED).content
    eventually(lambda: requests.get(f"{server.url}/api/stats").json()["requests"]["total"] == 1)
    holder = sqlite3.connect(tmp_path / "state" / "aspy" / "aspy.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        for _ in range(6):
            requests.post(f"{server.url}/dev-1/v1/messages", json=STREAMED).content
        # Whichever worker answers (one of them may never have tried to write), the host is degraded.
        eventually(lambda: requests.get(f"{server.url}/health").json()["host"]["failing_workers"] >= 1, timeout=20)
        answers = [requests.get(f"{server.url}/health").json() for _ in range(12)]
        assert all(a["status"] == "degraded" and a["host"]["workers"] == 2 for a in answers)
        assert all(a["host"]["pending"] >= 1 and a["host"]["last_error"] for a in answers)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    healthy = eventually(lambda: (h := requests.get(f"{server.url}/health").json())["status"] == "ok" and h, timeout=40)
    assert healthy["host"] == {"workers": 2, "failing_workers": 0, "pending": 0, "last_error": None}
    assert eventually(lambda: requests.get(f"{server.url}/api/stats").json()["requests"]["total"] == 7)
