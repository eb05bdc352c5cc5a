"""What the test modules share: configs, a served aspy, requests through it, waiting for its figures.

Fixtures live in conftest.py; everything here is a plain function or constant, imported by name
(``from helpers import eventually``), so that no test module imports another.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
POSTGRES_URL = os.environ.get("ASPY_TEST_POSTGRES_URL")
API_KEY = "sk-ant-test-0123456789abcdef"
MODEL = "claude-sonnet-4-5-20250929"
# Sonnet 4.5 list prices per million tokens: input, output, 5m write, 1h write, cache read.
RATES = (3, 15, 3.75, 6, 0.30)
# The in-process app's API token, its token client's proxy token, and its providers' URL (faked by responses).
APP_TOKEN = "api-token-for-the-tests-0123456789"
APP_PROXY_TOKEN = "pt_InProcessTestToken0123456789abcd"
FAKE_UPSTREAM = "http://upstream.test"
# Where aspy's own API clients (report --url, top, mcp) find the in-process app's API.
ASPY_URL = "http://aspy.test"
# A small non-streamed Messages request.
MESSAGE = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hello"}]}


# Configs

def free_port() -> int:
    """Return a loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def standard_config(upstream_url: str, extra: str = "", api_token: str | None = None) -> str:
    """Return a config with clients on the fake upstream, at its root and under a base path."""
    token = f'api_token = "{api_token}"\n' if api_token else ""
    return f"""
[server]
{token}upstream_timeout = "20s"

[legacy]
provider = "fake"

[providers.fake]
base_url = "{upstream_url}"
name = "Fake upstream"

[providers.fakebase]
base_url = "{upstream_url}/base/path"

[providers.dead]
base_url = "http://127.0.0.1:{free_port()}"

[clients.dev-1]
name = "Dev Laptop"
provider = "fake"
tags = ["dev"]

[clients.dev-2]
name = "CI runner"
provider = "fakebase"

[clients.gone]
name = "Nobody listens"
provider = "dead"
{extra}
"""


# A served aspy

def wait_for_health(url: str, proc: subprocess.Popen | None = None, timeout: float = 30) -> dict:
    """Wait until a server answers /health; return the answer. Fail early if its process died."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited early with status {proc.returncode}")
        try:
            # The first /health of a worker opens the store (and may create its schema).
            response = requests.get(url + "/health", timeout=10)
            if response.ok:
                return response.json()
        except requests.ConnectionError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer /health within {timeout:g} s")


class AspyProcess:
    """``aspy serve`` running in a subprocess with its own config and log."""

    def __init__(self, tmp: Path, config_text: str, workers: int = 2, env: dict | None = None,
                 port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp / "config.toml"
        self.config.write_text(config_text)
        self.log = tmp / "aspy.log"
        self.env = {**os.environ, "XDG_STATE_HOME": str(tmp / "state"), **(env or {})}
        self.workers = workers
        self.proc: subprocess.Popen | None = None

    def start(self) -> AspyProcess:
        """Start the server and wait until /health answers."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aspy", "serve", "--config", str(self.config),
             "--listen", f"127.0.0.1:{self.port}", "--workers", str(self.workers)],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        try:
            wait_for_health(self.url, self.proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; aspy's log:\n{self.log.read_text()}") from None
        return self

    def stop(self) -> None:
        """Stop the server at once (gunicorn's quick shutdown)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def store_url(self) -> str | None:
        """Return the [store] url of this server's config, if it names one."""
        import tomllib

        return tomllib.loads(self.config.read_text()).get("store", {}).get("url")

    def log_text(self) -> str:
        """Return everything the server logged."""
        return self.log.read_text(errors="replace")


def workers_of(server: AspyProcess) -> list[int]:
    """Return the pids of a served aspy's gunicorn workers (the children of its master)."""
    master = server.proc.pid
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name is in parentheses and may hold spaces: the fields follow the last ")".
            if int(stat.rsplit(")", 1)[1].split()[1]) == master:
                children.append(int(entry.name))
    return sorted(children)


def claude_cli() -> str:
    """Return the Claude Code CLI, failing in CI (which installs it) and skipping elsewhere."""
    import pytest

    path = shutil.which("claude")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("the Claude Code CLI is not installed; .ci/run installs @anthropic-ai/claude-code")
        pytest.skip("Claude Code CLI not installed (npm install -g @anthropic-ai/claude-code)")
    return path


# Stores and figures

def postgres_database(name: str, create: bool) -> str:
    """Create (or drop) a database on the test PostgreSQL server; return its URL."""
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}" if create else f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    return urlsplit(POSTGRES_URL)._replace(path=f"/{name}").geturl()


class PostgresDatabases:
    """Empty databases on the test PostgreSQL server, each made once and emptied for its next user.

    Dropping a database makes the server write a checkpoint (a second or more on a busy machine);
    emptying one is dropping its one schema and making it again.
    """

    def __init__(self):
        self.made: list[str] = []
        self.free: list[str] = []

    def take(self) -> str:
        """Return the URL of an empty database nobody else uses."""
        import uuid

        import psycopg

        if not self.free:
            name = f"aspy_test_{uuid.uuid4().hex[:12]}"
            self.made.append(name)
            return postgres_database(name, create=True)
        url = self.free.pop()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = current_database() AND pid <> pg_backend_pid()")
            conn.execute("DROP SCHEMA public CASCADE")
            conn.execute("CREATE SCHEMA public")
        return url

    def give_back(self, url: str) -> None:
        """Let the next user have this database (emptied first); its user must have closed its connections."""
        self.free.append(url)

    def drop_all(self) -> None:
        """Drop every database made."""
        for name in self.made:
            postgres_database(name, create=False)


def key_hash(key: str) -> str:
    """Return the legacy user hash of a key, computed the documented way."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def usage(i: int, o: int, read: int = 0, w5: int = 0, w1: int = 0) -> dict:
    """Return an API usage object."""
    return {"input_tokens": i, "output_tokens": o, "cache_read_input_tokens": read,
            "cache_creation_input_tokens": w5 + w1,
            "cache_creation": {"ephemeral_5m_input_tokens": w5, "ephemeral_1h_input_tokens": w1}}


def price(i: int, o: int, read: int = 0, w5: int = 0, w1: int = 0) -> float:
    """Price tokens at Sonnet 4.5 list price."""
    return (i * RATES[0] + o * RATES[1] + w5 * RATES[2] + w1 * RATES[3] + read * RATES[4]) / 1e6


def book(tmp_path: Path, **sessions: Any):
    """Return aspy's sessions book on a SQLite store in tmp_path, with one client "dev" (retention: 1 day)."""
    from aspy.config import parse_config
    from aspy.models import load_models
    from aspy.sessions import Sessions
    from aspy.store import open_store

    config = parse_config({"store": {"url": f"sqlite:///{tmp_path / 'aspy.db'}", "retention_days": 1},
                           "sessions": sessions, "clients": {"dev": {"name": "Dev", "provider": "anthropic"}}}, None)
    return Sessions(config, open_store(config.store.url), load_models())


def exchange(key: str | None = "s1", input_tokens: int = 10, agent: str | None = None, at: float | None = None,
             metadata: str | None = None, **headers):
    """Return a finished Messages exchange of client "dev" on a session key, with this many input tokens."""
    from aspy.records import Exchange, Observation, Request, RequestFacts, Response

    h = {"x-claude-code-session-id": key} if key else {}
    if agent:
        h["x-claude-code-agent-id"] = agent
    return Exchange(started_at=at or time.time(), client="dev", provider="anthropic", user="0123456789abcdef",
                    request=Request("POST", "/v1/messages", h | headers,
                                    facts=RequestFacts(model="claude-sonnet-4-5", metadata_user_id=metadata)),
                    response=Response(200, duration_ms=2.0, ttfb_ms=1.0, observation=Observation(
                        model="claude-sonnet-4-5", usage={"input_tokens": input_tokens, "output_tokens": 1})))


# The real captures

SSE = FIXTURES / "real" / "sse"


def parse(data: bytes, pieces: list[int] | None = None):
    """Feed a stream whole, or cut at the given offsets; return the observation."""
    from aspy.observe import SseObserver

    observer = SseObserver()
    cuts = [0, *sorted(set(pieces or [])), len(data)]
    for start, end in zip(cuts, cuts[1:]):
        observer.feed(data[start:end])
    return observer.finish()


def billed(obs):
    """Return the tokens an observed response is billed for, all samplings together."""
    from aspy.billing import samplings, total

    return total(samplings(obs.usage or {}, obs.model))


def vercel_stream() -> bytes:
    """Turn the vercel capture (one event JSON a line) back into an event stream."""
    lines = (SSE / "vercel-ai_code_execution_prompt_cache.chunks.txt").read_bytes().splitlines()
    return b"".join(b"data: " + line + b"\n\n" for line in lines if line.strip())


# Each SSE capture's name: (model, stop_reason, (input, output, cache_read, write_5m, write_1h, web_searches),
#        tool names, thinking blocks)
EXPECTED = {
    "sdkpy_basic_response.sse": ("claude-3-opus-latest", "end_turn", (11, 6, 0, 0, 0, 0), [], 0),
    "sdkpy_tool_use_response.sse": ("claude-sonnet-4-20250514", "tool_use", (377, 65, 0, 0, 0, 0),
                                    ["get_weather"], 0),
    "sdkpy_incomplete_partial_json_max_tokens.sse": ("claude-3-7-sonnet-20250219", "max_tokens",
                                                     (450, 124, 0, 0, 0, 0), ["make_file"], 0),
    "sdkpy_snapshot_555fb399_0_tool_use_haiku45.sse": ("claude-haiku-4-5-20251001", "tool_use",
                                                       (656, 74, 0, 0, 0, 0), ["get_weather"], 0),
    "sdkpy_snapshot_555fb399_1_text_haiku45.sse": ("claude-haiku-4-5-20251001", "end_turn",
                                                   (770, 38, 0, 0, 0, 0), [], 0),
    "sdkpy_snapshot_a8b7dbb8_2_structured_output_sonnet45.sse": ("claude-sonnet-4-5-20250929", "end_turn",
                                                                 (135, 10, 0, 0, 0, 0), [], 0),
    "llm-anthropic_plain_text_sonnet45.sse": ("claude-sonnet-4-5-20250929", "end_turn", (17, 10, 0, 0, 0, 0), [], 0),
    "llm-anthropic_thinking_prompt_sonnet45.sse": ("claude-sonnet-4-5-20250929", "end_turn",
                                                   (46, 84, 0, 0, 0, 0), [], 1),
    "llm-anthropic_adaptive_thinking_opus46.sse": ("claude-opus-4-6", "end_turn", (34, 44, 0, 0, 0, 0), [], 1),
    "llm-anthropic_thinking_then_tool_use_haiku45.sse": ("claude-haiku-4-5-20251001", "tool_use",
                                                         (598, 92, 0, 0, 0, 0), ["fixed_version"], 1),
    "llm-anthropic_tool_use_gzip_body_haiku45.sse": ("claude-haiku-4-5-20251001", "tool_use",
                                                     (543, 40, 0, 0, 0, 0), ["pelican_name_generator"], 0),
    # message_delta's input_tokens (10423) replaces message_start's (2039); one search billed.
    "llm-anthropic_web_search_server_tool_opus41.sse": ("claude-opus-4-1-20250805", "end_turn",
                                                        (10423, 341, 0, 0, 0, 1), ["web_search"], 0),
    # Billed usage is the sum of the two iterations: compaction + message.
    "pydantic-ai_compaction_cache_read_sonnet46.sse": ("claude-sonnet-4-6", "end_turn",
                                                       (281, 91, 55096, 0, 0, 0), [], 0),
}


# Requests to a served aspy

def bearer(token: str | None) -> dict[str, str]:
    """Return the Authorization header of a bearer token (none without one)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def api_get(server: AspyProcess, path: str, token: str | None = None, **params: Any) -> requests.Response:
    """GET an API path (``stats``, ``sessions``...), with a bearer token if given."""
    return requests.get(f"{server.url}/api/{path}", params=params, headers=bearer(token))


def api_json(server: AspyProcess, path: str, token: str | None = None, **params: Any) -> dict:
    """GET an API path and return its JSON, which must come with 200."""
    r = api_get(server, path, token, **params)
    assert r.status_code == 200, r.text
    return r.json()


def send_message(server: AspyProcess, segment: str, prompt: str = "hello", model: str = MODEL, stream: bool = False,
                 headers: dict | None = None, body: dict | None = None, max_tokens: int = 8) -> requests.Response:
    """POST one Messages request to ``/<segment>/v1/messages`` with the test API key; read the whole answer."""
    payload = {"model": model, "max_tokens": max_tokens, "stream": stream,
               "messages": [{"role": "user", "content": prompt}]} | (body or {})
    r = requests.post(f"{server.url}/{segment}/v1/messages", json=payload,
                      headers={"x-api-key": API_KEY, **(headers or {})})
    r.content
    return r


def assert_anthropic_error(response, status: int, kind: str) -> str:
    """Check an aspy-made error: status, JSON content type, Anthropic's shape; return the message."""
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    # requests' answers have a json() method, Flask's test client's a json property.
    body = response.json() if callable(response.json) else response.json
    assert body["type"] == "error" and body["error"]["type"] == kind
    return body["error"]["message"]


# An in-process aspy

def app_config(store_url: str, extra: str = "") -> str:
    """Return the in-process app's config: the standard clients on the fake URL, a proxy-token client, an API token."""
    token_client = f'\n[clients.tok]\nname = "Token client"\nprovider = "fake"\ntags = ["dev", "solo"]\n' \
                   f'proxy_token = "{APP_PROXY_TOKEN}"\n'
    return standard_config(FAKE_UPSTREAM, f'{token_client}\n[store]\nurl = "{store_url}"\n{extra}', APP_TOKEN)


def in_process_app(tmp_path: Path, tables: dict | None = None):
    """Return aspy's app in test mode on a SQLite store in tmp_path, its providers on FAKE_UPSTREAM.

    The config has providers ``fake`` (the legacy one) and ``fakebase`` (under a base path) and
    clients ``dev-1`` and ``dev-2`` on them; ``tables`` adds to it, table by table.
    """
    from aspy import create_app
    from aspy.config import parse_config

    data: dict = {
        "store": {"url": f"sqlite:///{tmp_path / 'aspy.db'}"},
        "legacy": {"provider": "fake"},
        "providers": {"fake": {"base_url": FAKE_UPSTREAM}, "fakebase": {"base_url": FAKE_UPSTREAM + "/base/path"}},
        "clients": {"dev-1": {"name": "Dev Laptop", "provider": "fake"},
                    "dev-2": {"name": "CI runner", "provider": "fakebase"}},
    }
    for name, table in (tables or {}).items():
        data[name] = {**data.get(name, {}), **table}
    return create_app(parse_config(data, None), {"TESTING": True})


def make_app(folder: Path, extra: str = "", models=None):
    """Return aspy made in-process by create_app (testing) with app_config, its SQLite store in folder."""
    from aspy import create_app
    from aspy.config import load_config

    path = folder / "config.toml"
    path.write_text(app_config(f"sqlite:///{folder / 'aspy.db'}", extra))
    return create_app(load_config(path), {"TESTING": True}, models=models)


class Traffic:
    """Requests through an in-process aspy (Flask's test client), each answered by ``responses`` as asked.

    ``send`` returns once the exchange is in the store: the recorder writes from a thread of its
    own, so it waits until /api/stats counts every exchange sent so far (within milliseconds).
    """

    UPSTREAM = re.compile(re.escape(FAKE_UPSTREAM) + r"/.*")

    def __init__(self, client, answers):
        self.client = client
        self.answers = answers
        self.recorded = 0

    def send(self, segment: str = "dev-1", prompt: str = "hello", session: str | None = None,
             usage: dict | None = None, model: str = MODEL, text: str = "Hi.", tool: str | None = None,
             status: int = 200, answer: dict | None = None, headers: dict | None = None, body: dict | None = None,
             method: str = "POST", path: str = "/v1/messages", recorded: bool = True):
        """Send one request to ``/<segment><path>`` (a Messages call by default) with the test API key."""
        from upstream import DEFAULT_USAGE, message

        if answer is None:
            answer = message(model, text, usage or DEFAULT_USAGE, tool=tool) if status < 400 else \
                {"type": "error", "error": {"type": "overloaded_error" if status == 529 else "api_error",
                                            "message": "the upstream says no"}}
        self.answers.upsert(method, self.UPSTREAM, json=answer, status=status, headers={"request-id": "req_test"})
        payload = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": prompt}]} | (body or {})
        sent = {"x-api-key": API_KEY} | ({"x-claude-code-session-id": session} if session else {}) | (headers or {})
        # Buffered: the whole answer is read and the response closed, which records the exchange.
        r = self.client.open(f"/{segment}{path}" if segment else path, method=method, headers=sent, buffered=True,
                             json=payload if method == "POST" else None)
        if recorded:
            self.recorded += 1
            self.wait()
        return r

    def wait(self) -> None:
        """Wait until the store has every exchange sent so far."""
        def counted():
            return self.client.get("/api/stats", headers=bearer(APP_TOKEN)).json["requests"]["total"] == self.recorded
        eventually(counted, timeout=10, interval=0.002)


def serve_api(answers, client, url: str = ASPY_URL) -> None:
    """Answer requests to ``url`` with the in-process app, as if it were served there (for aspy's API clients)."""
    from urllib.parse import urlsplit

    def answer(request):
        parts = urlsplit(request.url)
        r = client.open(parts.path, method=request.method, query_string=parts.query, data=request.body,
                        headers={k: v for k, v in request.headers.items() if k.lower() != "content-length"})
        return r.status_code, {"Content-Type": r.headers["Content-Type"]}, r.data

    for method in ("GET", "POST"):
        answers.add_callback(method, re.compile(re.escape(url) + r"/.*"), callback=answer)


# Waiting

def eventually(check, timeout: float = 15.0, interval: float = 0.05):
    """Poll until check() returns something truthy; return it."""
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def stats_when(server: AspyProcess, total: int, token: str | None = None, **scope: Any) -> dict:
    """Return /api/stats (of a scope) once it counts this many requests."""
    def counted():
        r = api_get(server, "stats", token, **scope)
        return r.status_code == 200 and r.json()["requests"]["total"] == total and r.json()
    return eventually(counted)
