"""Shared fixtures: a real fake upstream, and aspy under real gunicorn with gevent workers."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from upstream import FakeUpstream

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_URL = os.environ.get("ASPY_TEST_POSTGRES_URL")
FIXTURES = ROOT / "tests" / "fixtures"
API_KEY = "sk-ant-test-0123456789abcdef"


def free_port() -> int:
    """Return a loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def standard_config(upstream_url: str, extra: str = "") -> str:
    """Return a config with clients on the fake upstream, at its root and under a base path."""
    return f"""
[server]
upstream_timeout = "20s"

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


def postgres_database(name: str, create: bool) -> str:
    """Create (or drop) a database on the test PostgreSQL server; return its URL."""
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}" if create else f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    return urlsplit(POSTGRES_URL)._replace(path=f"/{name}").geturl()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store_kind(request) -> str:
    """Run a module's store and API tests on SQLite, then on PostgreSQL."""
    if request.param == "postgresql" and not POSTGRES_URL:
        pytest.skip("PostgreSQL tests need ASPY_TEST_POSTGRES_URL, e.g. postgresql://postgres@127.0.0.1:5432/test")
    return request.param


@pytest.fixture(scope="module")
def fresh_store(store_kind):
    """Return a function that makes a new, empty store and gives the [store] table that uses it."""
    made = []

    def make() -> str:
        if store_kind == "sqlite":
            return ""  # each AspyProcess has its own $XDG_STATE_HOME, hence its own SQLite file
        name = f"aspy_test_{uuid.uuid4().hex[:12]}"
        url = postgres_database(name, create=True)
        made.append(name)
        return f'\n[store]\nurl = "{url}"\n'

    yield make
    for name in made:
        postgres_database(name, create=False)


@pytest.fixture(scope="session")
def upstream() -> FakeUpstream:
    """A fake Anthropic API on loopback, shared by the session."""
    return FakeUpstream().start()


@pytest.fixture(scope="session")
def aspy(upstream, tmp_path_factory) -> AspyProcess:
    """aspy under gunicorn + gevent, configured with the standard clients."""
    server = AspyProcess(tmp_path_factory.mktemp("aspy"), standard_config(upstream.url),
                         env={"ASPY_LOG_LEVEL": "DEBUG"}).start()
    yield server
    server.stop()


@pytest.fixture
def start_aspy(tmp_path):
    """Start an aspy with a config of the test's own; stopped when the test ends."""
    started = []

    def start(config_text: str, **kwargs) -> AspyProcess:
        server = AspyProcess(tmp_path, config_text, **kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# The in-process layer: aspy's app under Flask's test client, its upstream faked with `responses`.
FAKE_UPSTREAM = "https://upstream.test"


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
