"""Several aspy hosts on one PostgreSQL database behave as one."""
from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from helpers import API_KEY, POSTGRES_URL, RATES, AspyProcess, eventually, postgres_database, standard_config

pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="PostgreSQL tests need ASPY_TEST_POSTGRES_URL, "
                                "e.g. postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def shared_database():
    name = f"aspy_test_{uuid.uuid4().hex[:12]}"
    yield postgres_database(name, create=True)
    postgres_database(name, create=False)


def test_two_hosts_on_one_database_share_one_session_with_exact_totals(upstream, shared_database, tmp_path):
    config = standard_config(upstream.url) + f'\n[store]\nurl = "{shared_database}"\n'
    hosts = []
    try:
        for name in ("host-a", "host-b"):
            (tmp_path / name).mkdir()
            hosts.append(AspyProcess(tmp_path / name, config).start())
        session = f"shared-{uuid.uuid4()}"
        jobs = [(hosts[n % 2], n) for n in range(40)]

        def send(job):
            host, n = job
            usage = {"input_tokens": 100 + n, "output_tokens": 10 + n, "cache_read_input_tokens": 1000 * n}
            r = requests.post(f"{host.url}/dev-1/v1/messages", json={
                "model": "claude-sonnet-4-5-20250929", "max_tokens": 8, "stream": n % 3 == 0,
                "messages": [{"role": "user", "content": "hi"}]},
                headers={"x-api-key": API_KEY, "x-claude-code-session-id": session, "x-fake-usage": json.dumps(usage)})
            assert r.status_code == 200
            r.content

        with ThreadPoolExecutor(10) as pool:
            list(pool.map(send, jobs))
        expect_in = sum(100 + n for n in range(40))
        expect_out = sum(10 + n for n in range(40))
        expect_read = sum(1000 * n for n in range(40))
        cost = (expect_in * RATES[0] + expect_out * RATES[1] + expect_read * RATES[4]) / 1e6
        for host in hosts:
            stats = eventually(lambda host=host: (s := requests.get(f"{host.url}/api/stats",
                                                                    params={"session": session}))
                               .status_code == 200 and s.json()["requests"]["total"] == 40 and s.json())
            assert stats["tokens"]["input"] == expect_in and stats["tokens"]["output"] == expect_out
            assert stats["tokens"]["cache_read"] == expect_read
            assert stats["cost"]["total_usd"] == pytest.approx(cost, abs=1e-9)
            sessions = requests.get(f"{host.url}/api/sessions", params={"client": "dev-1"}).json()["sessions"]
            assert [s["claude_session_id"] for s in sessions] == [session]
    finally:
        for host in hosts:
            host.stop()


def test_api_reads_in_gevents_threads_answer_from_a_new_database_and_see_each_exchange(upstream, shared_database,
                                                                                    tmp_path):
    """In a worker the API's reads run in gevent's OS threads, on connections of their own, not the hub's pool."""
    host = AspyProcess(tmp_path, standard_config(upstream.url) + f'\n[store]\nurl = "{shared_database}"\n').start()
    try:
        # The database is empty: the first read finds no schema and makes it.
        first = requests.get(f"{host.url}/api/stats")
        assert first.status_code == 200 and first.json()["requests"]["total"] == 0
        for n in range(6):
            r = requests.post(f"{host.url}/dev-1/v1/messages", headers={"x-api-key": API_KEY},
                              json={"model": "claude-sonnet-4-5-20250929", "max_tokens": 8,
                                    "messages": [{"role": "user", "content": f"read {n}"}]})
            assert r.status_code == 200
            # Each worker's reads see every exchange, whichever worker wrote it.
            assert eventually(lambda n=n: all(requests.get(f"{host.url}/api/stats").json()["requests"]["total"]
                                              == n + 1 for _ in range(4)))
    finally:
        host.stop()


