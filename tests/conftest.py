"""Shared fixtures, for the two layers of tests.

In process (fast): ``app`` and ``client``, aspy made by create_app with a test config, its
upstream faked by ``responses`` (``upstream_answers``). End to end (``-m e2e``): a real fake
upstream on loopback, and aspy under real gunicorn with gevent workers. A test that uses the
end-to-end fixtures is marked ``e2e`` here; a module that starts processes of its own says so with
``pytestmark = pytest.mark.e2e``. ``python -m pytest -m "not e2e"`` runs the fast layer alone.
"""
from __future__ import annotations

import uuid

import pytest

# The helpers assert too: their failures then say what they found, as the tests' own do.
pytest.register_assert_rewrite("helpers")

from helpers import (  # noqa: E402 (imported once registered above)
    POSTGRES_URL,
    AspyProcess,
    PostgresDatabases,
    Traffic,
    make_app,
    postgres_database,
    standard_config,
)
from upstream import FakeUpstream  # noqa: E402

# The fixtures that start a server: a test using any of them (even through another fixture) is e2e.
E2E_FIXTURES = frozenset({"upstream", "aspy", "start_aspy"})


def pytest_collection_modifyitems(config, items) -> None:
    """Mark e2e every test that uses a real fake upstream or a served aspy."""
    for item in items:
        if E2E_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


# In process

@pytest.fixture
def upstream_answers():
    """``responses`` faking the provider for the test: add answers with ``.post(url, json=...)``."""
    import responses

    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def app_config_extra() -> str:
    """TOML appended to the in-process app's config (override in a module for more keys or clients)."""
    return ""


@pytest.fixture(scope="session")
def model_table():
    """aspy's own model table, read once: parsing models.yaml costs more than making an app."""
    from aspy.models import load_models

    return load_models()


@pytest.fixture
def app(tmp_path, monkeypatch, upstream_answers, app_config_extra, model_table):
    """aspy made by create_app with the test config and a SQLite store of the test's own."""
    # Whatever aspy would keep under $XDG_STATE_HOME stays in the test's folder.
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return make_app(tmp_path, app_config_extra, model_table)


@pytest.fixture
def client(app):
    """Flask's test client of the in-process app."""
    return app.test_client()


@pytest.fixture
def traffic(client, upstream_answers) -> Traffic:
    """Send requests through the in-process proxy; each returns once it is recorded."""
    return Traffic(client, upstream_answers)


# Stores, in process and end to end

@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store_kind(request) -> str:
    """Run a module's store and API tests on SQLite, then on PostgreSQL."""
    if request.param == "postgresql" and not POSTGRES_URL:
        pytest.skip("PostgreSQL tests need ASPY_TEST_POSTGRES_URL, e.g. postgresql://postgres@127.0.0.1:5432/test")
    return request.param


@pytest.fixture(scope="session")
def postgres_databases():
    """Empty PostgreSQL databases for in-process stores: take one, give it back when done."""
    databases = PostgresDatabases()
    yield databases
    databases.drop_all()


# End to end

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
