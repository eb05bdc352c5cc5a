"""``GET /metrics`` and requests in flight, read by a real Prometheus from aspy under gunicorn.

aspy runs with two gevent workers; a real ``/usr/bin/prometheus`` scrapes it every second
with the API token, and its HTTP API answers PromQL, which must give exactly the figures
the store has, whichever worker served each request, and through a worker's SIGKILL.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from aspy.accounting import Accounted, failed_exchange
from aspy.config import parse_config
from aspy.metrics import Metrics, failure_kind, status_class
from aspy.models import load_models
from aspy.records import CLIENT_WENT_AWAY, Exchange, Observation, Request, Response
from helpers import API_KEY, MODEL, eventually, free_port, send_message, standard_config, workers_of

PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
API_TOKEN = "metrics-admin-token-0123456789"
PROXY_TOKEN = "pt_metricsmetricsmetricsmetrics0123"
ADMIN = {"Authorization": f"Bearer {API_TOKEN}"}
TOKENED = f'\n[clients.tok]\nname = "Token client"\nprovider = "fake"\nproxy_token = "{PROXY_TOKEN}"\n'


def config(upstream_url: str) -> str:
    """The standard clients, a proxy-token client, and an API token."""
    return standard_config(upstream_url, TOKENED, api_token=API_TOKEN)


def send(server, client: str = "dev-1", **headers: str) -> int:
    """Send one streamed Messages request (``x_fake_events="3"`` is the header x-fake-events); return its status."""
    headers = {name.replace("_", "-"): value for name, value in headers.items()}
    return send_message(server, client, stream=True, headers=headers).status_code


def scrape(server) -> str:
    """Return /metrics as the API token reads it."""
    r = requests.get(f"{server.url}/metrics", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return r.text


def samples(text: str, name: str) -> dict[str, float]:
    """Return one metric's samples from the text format, by their label set."""
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, _, value = line.rpartition(" ")
            found[series] = float(value)
    return found


def stats(server) -> dict:
    """Return /api/stats."""
    return requests.get(f"{server.url}/api/stats", headers=ADMIN).json()


def workers_counting(server) -> int:
    """Return how many worker processes (living or not) have counted requests in their own files."""
    from prometheus_client.multiprocess import MultiProcessCollector

    counting = 0
    for path in (server.config.parent / "state" / "aspy" / "metrics").glob("*/counter_*.db"):
        families = MultiProcessCollector.merge([str(path)])
        counting += any(s.value for f in families if f.name == "aspy_requests" for s in f.samples)
    return counting


def streaming_worker(server) -> int | None:
    """Return the pid of a worker with requests in flight, from the list it shares with the others."""
    for path in (server.config.parent / "state" / "aspy" / "in_flight").glob("*.json"):
        try:
            if json.loads(path.read_text())["in_flight"] and int(path.stem) in workers_of(server):
                return int(path.stem)
        except (OSError, ValueError):
            continue
    return None


class Prometheus:
    """A real Prometheus server scraping one aspy every second, with the API token."""

    def __init__(self, tmp: Path, target: str, token: str | None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        auth = f"    authorization:\n      type: Bearer\n      credentials: {token}\n" if token else ""
        (tmp / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: aspy\n    scrape_interval: 1s\n    scrape_timeout: 1s\n"
            f"{auth}    static_configs:\n      - targets: ['{target}']\n")
        self.log = (tmp / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        eventually(self._ready, timeout=30)

    def _ready(self) -> bool:
        assert self.proc.poll() is None, "prometheus exited"
        try:
            return requests.get(f"{self.url}/-/ready", timeout=1).ok
        except requests.ConnectionError:
            return False

    def query(self, promql: str) -> list[dict]:
        """Return the result vector of an instant PromQL query."""
        answer = requests.get(f"{self.url}/api/v1/query", params={"query": promql}).json()
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def value(self, promql: str) -> float | None:
        """Return the single value a query answers, or None when it has no result."""
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def by(self, label: str, promql: str) -> dict[str, float]:
        """Return a query's values by one label."""
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(promql)}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def prometheus(tmp_path):
    """Start a Prometheus that scrapes a given aspy; skipped where Prometheus is not installed."""
    if not PROMETHEUS.exists():
        if os.environ.get("CI"):
            pytest.fail("/usr/bin/prometheus is not installed; .ci/run installs it")
        pytest.skip("/usr/bin/prometheus is not installed (apt-get install prometheus)")
    started = []

    def start(server, token: str | None = API_TOKEN) -> Prometheus:
        folder = tmp_path / f"prometheus-{len(started)}"
        folder.mkdir()
        started.append(Prometheus(folder, server.url.removeprefix("http://"), token))
        return started[-1]

    yield start
    for p in started:
        p.stop()


def test_prometheus_counts_every_request_once_across_two_workers_with_the_stores_figures(
        start_aspy, upstream, prometheus):
    server = start_aspy(config(upstream.url), workers=2)
    sent = []

    def turn(i: int) -> None:
        # Streams slow enough to overlap, so that both workers serve some; a few fail upstream.
        headers = {"x-fake-events": "4", "x-fake-delay": "40", "x-claude-code-session-id": f"metrics-{i % 3}"}
        if i % 7 == 0:
            headers["x-fake-status"] = "529"
        sent.append(send(server, "dev-2" if i % 4 == 0 else "dev-1", **headers))

    with ThreadPoolExecutor(12) as pool:
        while len(sent) < 36 or workers_counting(server) < 2:
            list(pool.map(turn, range(len(sent), len(sent) + 12)))
            time.sleep(0.7)  # each worker hands its counts over as its writer stores them
            assert len(sent) < 120, "one worker served everything"
    n = len(sent)
    failed = sent.count(529)
    assert failed and n - failed > 0
    store = eventually(lambda: (s := stats(server))["requests"]["total"] == n and s)

    prom = prometheus(server)
    assert eventually(lambda: prom.value("sum(aspy_requests_total)") == n, timeout=30)
    assert prom.value("up") == 1
    assert prom.by("status_class", "sum by (status_class) (aspy_requests_total)") == {"2xx": n - failed,
                                                                                     "5xx": failed}
    assert prom.by("client", "sum by (client) (aspy_requests_total)") == {
        "dev-1": sum(1 for i in range(n) if i % 4), "dev-2": sum(1 for i in range(n) if i % 4 == 0)}
    assert prom.value("sum(aspy_request_failures_total)") == store["requests"]["failed"] == failed
    assert prom.by("error_type", "sum by (error_type) (aspy_request_failures_total)") == {"overloaded_error": failed}
    # Tokens and cost: the store's figures, by kind and by model.
    tokens = prom.by("kind", "sum by (kind) (aspy_tokens_total)")
    assert tokens == {kind: store["tokens"][kind] for kind in
                      ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h") if store["tokens"][kind]}
    assert prom.value("sum(aspy_cost_usd_total)") == pytest.approx(store["cost"]["total_usd"], abs=1e-9)
    assert prom.by("model", "sum by (model) (aspy_cost_usd_total)") == pytest.approx(store["cost"]["by_model"],
                                                                                     abs=1e-9)
    assert prom.value("sum(aspy_time_to_first_byte_seconds_count)") == n
    assert prom.value("sum(aspy_request_duration_seconds_count)") == n
    assert prom.value('sum(aspy_request_duration_seconds_bucket{le="+Inf"})') == n
    assert prom.value("aspy_store_lag_seconds_count") == n
    assert prom.value("aspy_store_up") == 1 and prom.value("aspy_workers") == 2
    assert prom.value("sum(aspy_requests_in_flight)") == 0 and prom.value("aspy_records_waiting") == 0
    # Whichever worker answers the scrape, the figures are the host's.
    texts = [scrape(server) for _ in range(6)]
    assert all(samples(t, "aspy_requests_total") == samples(texts[0], "aspy_requests_total") for t in texts)


def test_the_scraped_text_passes_promtool(start_aspy, upstream):
    if not PROMTOOL.exists():
        if os.environ.get("CI"):
            pytest.fail("/usr/bin/promtool is not installed; .ci/run installs it (apt-get install prometheus)")
        pytest.skip("/usr/bin/promtool is not installed (apt-get install prometheus)")
    server = start_aspy(config(upstream.url), workers=2)
    send(server)
    send(server, x_fake_status="529")
    send(server, PROXY_TOKEN)
    send(server, "gone")
    eventually(lambda: stats(server)["requests"]["total"] == 4)
    text = eventually(lambda: (t := scrape(server)) and "aspy_tokens_total{" in t and t)
    checked = subprocess.run([str(PROMTOOL), "check", "metrics"], input=text, capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stdout + checked.stderr == "", checked.stdout + checked.stderr
    assert 'aspy_requests_total{client="tok",status_class="2xx"} 1.0' in text
    assert 'aspy_request_failures_total{client="gone",error_type="upstream_error"} 1.0' in text


def test_metrics_need_the_api_token_and_refuse_proxy_tokens(start_aspy, upstream):
    server = start_aspy(config(upstream.url), workers=1)
    anonymous = requests.get(f"{server.url}/metrics")
    assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "authentication_error"
    wrong = requests.get(f"{server.url}/metrics", headers={"Authorization": "Bearer not-the-token-at-all"})
    assert wrong.status_code == 401
    # A proxy token reads its own client's data under /api/, never every client's metrics.
    proxy = requests.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {PROXY_TOKEN}"})
    assert proxy.status_code == 403 and proxy.json()["error"]["type"] == "permission_error"
    assert requests.get(f"{server.url}/metrics", headers=ADMIN).status_code == 200


def test_without_an_api_token_metrics_are_open_like_the_api(aspy):
    r = requests.get(f"{aspy.url}/metrics")
    assert r.status_code == 200 and "aspy_store_up 1.0" in r.text


def test_a_worker_killed_with_sigkill_never_takes_a_counter_back(start_aspy, upstream, prometheus):
    server = start_aspy(config(upstream.url), workers=2)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: send(server, x_fake_events="3", x_fake_delay="30"), range(16)))
    prom = prometheus(server)
    assert eventually(lambda: prom.value("sum(aspy_requests_total)") == 16, timeout=30)

    seen: list[dict[str, float]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                text = scrape(server)
            except (requests.ConnectionError, AssertionError):
                continue  # the killed worker's connection
            seen.append(samples(text, "aspy_requests_total") | samples(text, "aspy_tokens_total")
                        | samples(text, "aspy_time_to_first_byte_seconds_count"))
            time.sleep(0.1)

    def long_turn(_) -> None:
        try:
            send(server, x_fake_events="60", x_fake_delay="100")
        except requests.RequestException:
            pass  # cut by the kill

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(6) as pool:
        turns = [pool.submit(long_turn, i) for i in range(6)]
        eventually(lambda: len(requests.get(f"{server.url}/api/in_flight", headers=ADMIN).json()["in_flight"]) == 6)
        time.sleep(1.5)
        os.kill(eventually(lambda: streaming_worker(server)), signal.SIGKILL)
        for turn in turns:
            turn.result()
    # Each exchange is counted once the store has it, the killed worker's through its journal.
    total = eventually(lambda: (s := stats(server))["requests"]["total"] == 22 and s)["requests"]
    assert total["failed"] >= 1
    eventually(lambda: sum(samples(scrape(server), "aspy_requests_total").values()) == 22)
    time.sleep(0.5)
    stop.set()
    watcher.join()
    # Scrapes every 0.1 s through at least 2 s: enough of them on both sides of the kill, even on a busy machine.
    assert len(seen) > 8
    for before, after in zip(seen, seen[1:]):
        for series, value in before.items():
            assert after.get(series, 0) >= value, f"{series} went back from {value} to {after.get(series)}"
    # Prometheus, scraping throughout, saw no counter reset, and ends with the store's figures.
    assert eventually(lambda: prom.value("sum(aspy_requests_total)") == 22, timeout=30)
    assert prom.value("sum(resets(aspy_requests_total[5m]))") == 0
    assert prom.value("sum(resets(aspy_tokens_total[5m]))") == 0
    assert prom.value("sum(aspy_request_failures_total)") == total["failed"]
    assert prom.value('sum(aspy_request_failures_total{error_type="worker_stopped"})') >= 1
    assert prom.value("aspy_workers") == 2


def test_a_streaming_request_is_in_flight_while_it_streams_and_gone_after(start_aspy, upstream):
    server = start_aspy(config(upstream.url), workers=2)
    done = threading.Event()

    def turn() -> None:
        send(server, x_fake_events="30", x_fake_delay="100", x_claude_code_session_id="in-flight-session")
        done.set()

    threading.Thread(target=turn).start()
    # In flight from the moment it goes upstream; streaming once the answer's headers came.
    entry = eventually(lambda: next((e for e in requests.get(f"{server.url}/api/in_flight", headers=ADMIN)
                                     .json()["in_flight"] if e["streaming"]), None))
    assert entry["client"] == "dev-1" and entry["session"] == "in-flight-session" and entry["model"] == MODEL
    assert entry["streaming"] is True and entry["path"] == "/v1/messages" and entry["user"] != "anonymous"
    assert entry["ttfb_ms"] is not None and entry["elapsed_ms"] >= 0 and entry["started"].endswith("+00:00")
    # Every worker answers the same, whichever serves the stream, once its list is written (in ~50 ms).
    time.sleep(0.3)
    for _ in range(6):
        assert requests.get(f"{server.url}/api/in_flight", headers=ADMIN).json()["in_flight"][0]["session"] \
            == "in-flight-session"
    assert samples(scrape(server), "aspy_requests_in_flight")['aspy_requests_in_flight{client="dev-1"}'] == 1
    assert samples(scrape(server), "aspy_streams_open")['aspy_streams_open{client="dev-1"}'] == 1
    # Filters, and a proxy token sees its own client's only.
    assert requests.get(f"{server.url}/api/in_flight", params={"client": "dev-2"}, headers=ADMIN) \
        .json()["in_flight"] == []
    assert requests.get(f"{server.url}/api/in_flight", params={"session": "in-flight-session"},
                        headers=ADMIN).json()["in_flight"][0]["client"] == "dev-1"
    mine = requests.get(f"{server.url}/api/in_flight", headers={"Authorization": f"Bearer {PROXY_TOKEN}"})
    assert mine.status_code == 200 and mine.json()["in_flight"] == []
    assert done.wait(30)
    eventually(lambda: requests.get(f"{server.url}/api/in_flight", headers=ADMIN).json()["in_flight"] == [])
    time.sleep(0.3)
    for _ in range(6):
        assert requests.get(f"{server.url}/api/in_flight", headers=ADMIN).json()["in_flight"] == []
        assert samples(scrape(server), "aspy_requests_in_flight")['aspy_requests_in_flight{client="dev-1"}'] == 0


def test_a_model_the_table_does_not_know_is_counted_as_other(start_aspy, upstream):
    server = start_aspy(config(upstream.url), workers=1)
    r = requests.post(f"{server.url}/dev-1/v1/messages", headers={"x-api-key": API_KEY},
                      json={"model": "claude-made-up-9", "max_tokens": 8,
                            "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200
    text = eventually(lambda: (t := scrape(server)) and "aspy_tokens_total{" in t and t)
    assert 'aspy_tokens_total{client="dev-1",kind="input",model="other"} 12.0' in text
    assert 'aspy_cost_usd_total{client="dev-1",model="other"} 0.0' in text
    assert "claude-made-up-9" not in text


@pytest.mark.parametrize("status, failure, errors, unfinished, kind", [
    (529, None, [{"type": "overloaded_error"}], False, "overloaded_error"),
    (200, None, [{"type": "overloaded_error"}], False, "overloaded_error"),  # an error event in the stream
    (400, None, [{"type": "some_new_error"}], False, "invalid_request_error"),
    (200, None, [{"type": "some_new_error"}], False, "api_error"),
    (502, "Upstream unreachable", [], False, "upstream_error"),
    (504, "Upstream sent no response headers within 20 seconds", [], False, "timeout_error"),
    (413, "Request body is larger than the proxy's limit", [], False, "request_too_large"),
    (0, "aspy's worker stopped before the exchange ended", [], False, "worker_stopped"),
    (200, CLIENT_WENT_AWAY, [], True, "client_gone"),
    (200, "upstream stream broke off: ChunkedEncodingError", [], True, "stream_broken"),
    (200, None, [], True, "stream_incomplete"),
])
def test_a_failure_is_labelled_with_a_bounded_error_type(status, failure, errors, unfinished, kind):
    # No answer came (status 0) when the worker stopped first.
    answer = Response(status, duration_ms=1.0, observation=Observation(errors=errors, unfinished=unfinished)) \
        if status else None
    exchange = Exchange(started_at=0.0, client="dev-1", provider="fake", user="anonymous",
                        request=Request("POST", "/v1/messages"), response=answer, error=failure)
    assert failed_exchange(exchange) and failure_kind(exchange) == kind


@pytest.mark.parametrize("status, label", [(200, "2xx"), (101, "1xx"), (304, "3xx"), (429, "4xx"), (529, "5xx"),
                                           (0, "none")])
def test_requests_are_labelled_with_their_status_class(status, label):
    assert status_class(status) == label


def test_each_server_counts_in_a_folder_of_its_own_and_stopped_servers_folders_go(tmp_path, monkeypatch):
    from aspy.serving import fresh_metrics_folder

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "unset by the test")
    root = tmp_path / "aspy" / "metrics"
    gone = subprocess.Popen(["true"])
    gone.wait()
    running, stopped, mine = root / str(os.getppid()), root / str(gone.pid), root / str(os.getpid())
    for folder in (running, stopped, mine):
        folder.mkdir(parents=True)
        (folder / "counter_1.db").write_bytes(b"old")
    fresh_metrics_folder()
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(mine) and list(mine.iterdir()) == []
    assert (running / "counter_1.db").exists() and not stopped.exists()


def test_the_store_lag_is_the_time_from_the_last_byte_until_the_store_took_it_and_skips_replays(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = Metrics(parse_config({}, None), load_models())
    now = time.time()

    def ended(ago: float, replayed: bool = False) -> Accounted:
        # An answer of 2 s that ended `ago` seconds before the store took it.
        return Accounted(Exchange(started_at=now - 2 - ago, client="dev-1", provider="fake", user="anonymous",
                                  request=Request("POST", "/v1/messages"), response=Response(200, duration_ms=2000.0),
                                  replayed=replayed), "dev-1")

    metrics.accounted([ended(0.03), ended(0.2), ended(600, replayed=True)])
    metrics.drain()

    def bucket(le: str) -> float:
        return metrics.registry.get_sample_value("aspy_store_lag_seconds_bucket", {"le": le})

    # What a journal gave back after a restart waited for the restart, not for the store.
    assert metrics.registry.get_sample_value("aspy_store_lag_seconds_count") == 2
    assert (bucket("0.025"), bucket("0.05"), bucket("0.25"), bucket("+Inf")) == (0, 1, 2, 2)
