"""Configuration (SPEC 1): where it is found, defaults, and every mistake reported at once."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from aspy.config import ConfigError, config_path, load_config, parse_config, parse_duration
from helpers import MESSAGE

TOKEN = "pt_" + "a" * 32


def write(tmp_path, text: str):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def problems(tmp_path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return caught.value.problems


def test_no_file_at_all_is_legacy_mode_to_anthropic(tmp_path, monkeypatch):
    monkeypatch.delenv("ASPY_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    config = load_config()
    assert config.path is None
    assert config.server.listen == "127.0.0.1:8080"
    assert config.legacy.enabled and config.legacy.provider == "anthropic"
    assert config.providers["anthropic"].base_url == "https://api.anthropic.com"
    assert config.store.url == f"sqlite:///{tmp_path / 'state' / 'aspy' / 'aspy.db'}"


def test_path_order_is_flag_then_env_then_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("ASPY_CONFIG", raising=False)
    assert config_path() == tmp_path / "xdg" / "aspy" / "config.toml"
    monkeypatch.setenv("ASPY_CONFIG", str(tmp_path / "env.toml"))
    assert config_path() == tmp_path / "env.toml"
    assert config_path(tmp_path / "flag.toml") == tmp_path / "flag.toml"


def test_a_named_file_that_is_missing_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def test_full_example_config_loads(tmp_path):
    config = load_config(write(tmp_path, f"""
[server]
listen = "0.0.0.0:9000"
workers = 3
[store]
retention_days = 30
[sessions]
idle_after = "2m"
end_after = "1h"
[providers.foundry]
base_url = "https://example.services.ai.azure.com/anthropic/"
api_key_env = "FOUNDRY_KEY"
[clients.dev-1]
name = "Dev Laptop"
provider = "foundry"
tags = ["dev"]
proxy_token = "{TOKEN}"
legacy_user_hashes = ["b0acf41e12907b7b"]
"""))
    assert config.server.host == "0.0.0.0" and config.server.port == 9000 and config.server.workers == 3
    assert config.sessions.idle_after == 120 and config.sessions.end_after == 3600
    assert config.providers["foundry"].base_url == "https://example.services.ai.azure.com/anthropic"
    assert "anthropic" in config.providers
    client = config.clients["dev-1"]
    assert client.provider == "foundry" and client.tags == ("dev",)
    assert client.legacy_user_hashes == ("b0acf41e12907b7b",)
    assert TOKEN not in repr(config)


def test_malformed_toml_names_the_file(tmp_path):
    [problem] = problems(tmp_path, "[server\nlisten = 1")
    assert str(tmp_path / "config.toml") in problem and "not valid TOML" in problem


def test_every_mistake_is_reported_in_one_message_naming_file_table_and_key(tmp_path):
    found = problems(tmp_path, """
[server]
workers = "two"
listen = "nowhere"
[clients.dev-1]
provider = "nope"
[clients.api]
name = "x"
provider = "anthropic"
[providers.bad]
base_url = "ftp://x"
""")
    text = "\n".join(found)
    where = str(tmp_path / "config.toml")
    assert all(line.startswith(where) for line in found)
    assert "[server] workers: expected a whole number" in text
    assert "[server] listen: expected \"host:port\"" in text
    assert "[clients.dev-1] provider: unknown provider 'nope'" in text
    assert "[clients.dev-1] name: missing required field" in text
    assert "[clients.api]: client id 'api' is reserved" in text
    assert "[providers.bad] base_url: expected an http:// or https:// URL" in text


@pytest.mark.parametrize("client_id", ["v1", "health", "metrics", "dashboard", "pt_abc", "has space", "x" * 65])
def test_reserved_or_malformed_client_ids_are_refused(tmp_path, client_id):
    found = problems(tmp_path, f'[clients."{client_id}"]\nname = "x"\nprovider = "anthropic"\n')
    assert f"[clients.{client_id}]" in found[0]


def test_duplicate_proxy_tokens_are_refused_without_printing_them(tmp_path):
    found = problems(tmp_path, f"""
[clients.a]
name = "A"
provider = "anthropic"
proxy_token = "{TOKEN}"
[clients.b]
name = "B"
provider = "anthropic"
proxy_token = "{TOKEN}"
""")
    assert "[clients.b] proxy_token: duplicate proxy token" in found[0]
    assert TOKEN not in "\n".join(found)


def test_missing_base_url_and_unknown_keys(tmp_path):
    found = "\n".join(problems(tmp_path, "[providers.p]\nname = \"x\"\n[server]\nlisten_on = 1\n"))
    assert "[providers.p] base_url: missing required field" in found
    assert "[server] listen_on: unknown key" in found


def test_legacy_provider_must_exist(tmp_path):
    assert "[legacy] provider: unknown provider 'gone'" in problems(tmp_path, '[legacy]\nprovider = "gone"\n')[0]


@pytest.mark.parametrize("text,seconds", [("5m", 300), ("30s", 30), ("1h", 3600), ("250ms", 0.25), (90, 90)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.e2e
def test_aspy_check_exits_non_zero_with_the_message(tmp_path):
    path = write(tmp_path, "[clients.x]\nprovider = \"nope\"\n")
    done = subprocess.run([sys.executable, "-m", "aspy", "check", "--config", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "[clients.x] provider: unknown provider 'nope'" in done.stderr


@pytest.mark.e2e
def test_aspy_check_warns_when_a_provider_key_variable_is_unset(tmp_path):
    path = write(tmp_path,
                 '[providers.central]\nbase_url = "https://example.invalid"\napi_key_env = "ASPY_NOT_SET_X"\n')
    env = {k: v for k, v in os.environ.items() if k != "ASPY_NOT_SET_X"} | {"XDG_STATE_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "aspy", "check", "--config", str(path)], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0 and "$ASPY_NOT_SET_X is not set" in done.stderr


@pytest.mark.e2e
def test_aspy_check_accepts_a_good_file(tmp_path):
    path = write(tmp_path, "[clients.x]\nname = \"X\"\nprovider = \"anthropic\"\n")
    done = subprocess.run([sys.executable, "-m", "aspy", "check", "--config", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok")


@pytest.mark.e2e
def test_aspy_serve_with_no_config_at_all_runs_in_legacy_mode(tmp_path):
    import requests

    from helpers import free_port, wait_for_health

    port = free_port()
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("ASPY_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "aspy", "serve", "--listen", f"127.0.0.1:{port}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        health = wait_for_health(f"http://127.0.0.1:{port}", proc)
        assert health["status"] == "ok" and health["store"]["path"] == str(tmp_path / "state" / "aspy" / "aspy.db")
        assert requests.get(f"http://127.0.0.1:{port}/api/clients").json() == {"clients": []}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(15)


@pytest.mark.e2e
def test_aspy_serve_refuses_a_bad_models_yaml_before_serving(tmp_path):
    path = write(tmp_path, "")
    (tmp_path / "models.yaml").write_text("models:\n  claude-x: {input: 1}\n")
    done = subprocess.run([sys.executable, "-m", "aspy", "serve", "--config", str(path)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "models.claude-x: output: expected a price" in done.stderr


def test_the_shipped_example_config_is_valid():
    from helpers import ROOT

    config = load_config(ROOT / "conf" / "config.example.toml")
    assert set(config.clients) == {"dev-1", "ci"} and config.clients["ci"].provider == "foundry"


def declared_tables() -> dict[str, type]:
    """Return each table heading as the docs write it, with the class its keys are declared in."""
    from dataclasses import fields
    from typing import get_type_hints

    from aspy.config import Config

    hints = get_type_hints(Config)
    return {f"[{f.name}.<id>]" if "entry" in f.metadata else f"[{f.name}]": f.metadata.get("entry", hints[f.name])
            for f in fields(Config) if f.metadata}


def documented_default(spec) -> str:
    """Write a key's default as the README's table does."""
    from aspy.config import TABLE_NAME

    if spec.required or spec.shown:
        return "required" if spec.required else spec.shown
    if spec.written is None or spec.written is TABLE_NAME:
        return "none" if spec.written is None else "the table name"
    return "`" + ("true" if spec.written is True else "[]" if spec.written == [] else json.dumps(spec.written)) + "`"


def readme_rows() -> list[str]:
    """Write the README's table of keys from the declarations."""
    from aspy.config import keys

    rows = []
    for heading, declared in declared_tables().items():
        for i, (name, spec) in enumerate(keys(declared).items()):
            table = f" `{heading}` " if i == 0 else " "
            rows.append(f"|{table}| `{name}` | {documented_default(spec)} | {spec.meaning} |")
    return rows


def test_the_readme_table_of_keys_is_the_declarations():
    from helpers import ROOT

    table = (ROOT / "README.md").read_text().split("| table | key | default | meaning |\n|---|---|---|---|\n")[1]
    assert table.split("\n\n")[0].splitlines() == readme_rows()


def test_the_example_config_shows_every_declared_key():
    from aspy.config import keys
    from helpers import ROOT

    shown, heading = set(), None
    for line in (ROOT / "conf" / "config.example.toml").read_text().splitlines():
        if line.startswith("["):
            table = line.strip("[]").split(".")
            heading = f"[{table[0]}.<id>]" if len(table) > 1 else f"[{table[0]}]"
        elif heading and (match := re.match(r"#?\s*(\w+)\s*=", line)):
            shown.add((heading, match.group(1)))
    assert shown == {(heading, name) for heading, declared in declared_tables().items() for name in keys(declared)}


# Mistakes that the checker once let through, to fail at run time (a 500 on every request, a
# crashed /health, a gunicorn master that died on reload). One case per kind of mistake.
needs_psycopg = pytest.mark.skipif(importlib.util.find_spec("psycopg") is None,
                                   reason="checking PostgreSQL URLs needs psycopg (pip install -e '.[postgres]')")
MISTAKES = [
    pytest.param('[providers.p]\nbase_url = "http://[::1"\n',
                 "[providers.p] base_url: expected a valid URL", id="base_url-unbalanced-ipv6-bracket"),
    pytest.param('[providers.p]\nbase_url = "http://exa mple.com"\n',
                 "[providers.p] base_url: expected a URL without spaces", id="base_url-space-in-host"),
    pytest.param('[providers.p]\nbase_url = "https://example.com/anthropic\\r\\nX-Evil: 1"\n',
                 "[providers.p] base_url: expected a URL without spaces or control characters", id="base_url-crlf"),
    pytest.param('[providers.p]\nbase_url = "https://example.com:0"\n',
                 "[providers.p] base_url: expected a port from 1 to 65535", id="base_url-port-0"),
    pytest.param('[providers.p]\nbase_url = "https://example.com:65536"\n',
                 "[providers.p] base_url: expected a port from 1 to 65535", id="base_url-port-too-big"),
    pytest.param('[providers.p]\nbase_url = "https://example.com/anthropic?"\n',
                 "[providers.p] base_url: expected a plain base URL", id="base_url-empty-query"),
    pytest.param('[providers.p]\nbase_url = "http://300.1.2.3"\n',
                 "[providers.p] base_url: expected a valid IPv4 address", id="base_url-bad-ipv4"),
    pytest.param('[server]\nlisten = "127.0.0.1:0"\n', "[server] listen: expected a port from 1 to 65535",
                 id="listen-port-0"),
    pytest.param('[server]\nlisten = "::1:8080"\n', "[server] listen: expected an IPv6 address in brackets",
                 id="listen-ipv6-without-brackets"),
    pytest.param('[server]\nlisten = "[::1:8080"\n', "[server] listen: expected an IPv6 address in brackets",
                 id="listen-unbalanced-bracket"),
    pytest.param('[server]\nlisten = "my host:8080"\n', "[server] listen: expected a host name or an IP address",
                 id="listen-space-in-host"),
    pytest.param('[server]\nlisten = 8080\n', "[server] listen: expected a string", id="listen-wrong-type"),
    pytest.param("[server]\nconnect_timeout = 0\n", "[server] connect_timeout: expected a duration above zero",
                 id="connect_timeout-zero"),
    pytest.param('[server]\nupstream_timeout = "0s"\n', "[server] upstream_timeout: expected a duration above zero",
                 id="upstream_timeout-zero"),
    pytest.param("[server]\nconnect_timeout = -5\n", "[server] connect_timeout: expected a duration above zero",
                 id="connect_timeout-negative"),
    pytest.param("[server]\nupstream_timeout = inf\n", "[server] upstream_timeout: expected a duration above zero "
                 "and up to 365 days", id="upstream_timeout-infinite"),
    pytest.param('[sessions]\nend_after = "100000d"\n', "[sessions] end_after: expected a duration above zero and "
                 "up to 365 days", id="end_after-huge"),
    pytest.param('[sessions]\nidle_after = "0m"\n', "[sessions] idle_after: expected a duration above zero",
                 id="idle_after-zero"),
    pytest.param("[server]\nworkers = 0\n", "[server] workers: expected a whole number of worker processes from 1",
                 id="workers-zero"),
    pytest.param("[server]\nworkers = 100000\n", "[server] workers: expected a whole number of worker processes "
                 "from 1 to 256", id="workers-huge"),
    pytest.param("[server]\nworker_connections = 0\n", "[server] worker_connections: expected a whole number of "
                 "connections per worker from 1 to 65,536", id="worker_connections-zero"),
    pytest.param("[server]\nworker_connections = 1000.0\n", "[server] worker_connections: expected a whole number",
                 id="worker_connections-float"),
    pytest.param("[store]\nretention_days = 0\n", "[store] retention_days: expected a whole number of days from 1",
                 id="retention_days-zero"),
    pytest.param("[store]\nretention_days = 9223372036854775807\n", "[store] retention_days: expected a whole "
                 "number of days from 1 to 36,500", id="retention_days-huge"),
    pytest.param("[sessions]\nevents_per_session = -1\n", "[sessions] events_per_session: expected a whole number "
                 "of events from 1", id="events_per_session-negative"),
    pytest.param('[server]\napi_token = ""\n', "[server] api_token: expected at least 16 characters",
                 id="api_token-empty"),
    pytest.param('[server]\napi_token = "0123456789abcdef "\n', "[server] api_token: expected printable ASCII "
                 "characters, without spaces at either end", id="api_token-trailing-space"),
    pytest.param('[server]\napi_token = "0123456789abcdefé"\n', "[server] api_token: expected printable ASCII",
                 id="api_token-not-ascii"),
    pytest.param(f'[server]\napi_token = "{TOKEN}"\n[clients.a]\nname = "A"\nprovider = "anthropic"\n'
                 f'proxy_token = "{TOKEN}"\n', "[server] api_token: expected a token of its own, not clients.a's "
                 "proxy_token", id="api_token-is-a-proxy-token"),
    pytest.param('[clients.a]\nname = "A"\nprovider = "anthropic"\nproxy_token = "pt_short"\n',
                 '[clients.a] proxy_token: expected "pt_" followed by at least 16', id="proxy_token-too-short"),
    pytest.param('[clients.a]\nname = "A"\nprovider = "anthropic"\nproxy_token = "' + "x" * 35 + '"\n',
                 '[clients.a] proxy_token: expected "pt_"', id="proxy_token-no-prefix"),
    pytest.param('[clients.a]\nname = "A"\nprovider = "anthropic"\nlegacy_user_hashes = ["b0acf41e12907b7b"]\n'
                 '[clients.b]\nname = "B"\nprovider = "anthropic"\nlegacy_user_hashes = ["b0acf41e12907b7b"]\n',
                 "[clients.b] legacy_user_hashes: b0acf41e12907b7b is taken over by clients.a already",
                 id="legacy_user_hash-in-two-clients"),
    pytest.param('[store]\nurl = "sqlite:///"\n', "[store] url: expected a file path after sqlite:///",
                 id="store-sqlite-empty-path"),
    pytest.param('[store]\nurl = "sqlite:///aspy.db"\n', "[store] url: expected an absolute path",
                 id="store-sqlite-relative-path"),
    pytest.param('[store]\nurl = "sqlite:////tmp/"\n', "[store] url: expected the path of a file, not of a directory",
                 id="store-sqlite-directory"),
    pytest.param('[store]\nurl = "sqlite:////tmp/aspy\\u0000.db"\n', "[store] url: expected a path without control "
                 "characters", id="store-sqlite-nul"),
    pytest.param('[store]\nurl = "mysql://u@h/aspy"\n', '[store] url: expected "sqlite:////absolute/path.db"',
                 id="store-unknown-scheme"),
    pytest.param('[store]\nurl = "postgresql://u@h/db?sslmod=require"\n', '[store] url: libpq cannot read this '
                 'URL: invalid URI query parameter: "sslmod"', id="store-postgresql-unknown-option",
                 marks=needs_psycopg),
    pytest.param('[store]\nurl = "postgresql://u@h/db?sslmode=requir"\n', "[store] url: expected sslmode to be one "
                 "of: disable, allow, prefer, require", id="store-postgresql-bad-sslmode", marks=needs_psycopg),
    pytest.param('[store]\nurl = "postgresql://u@h:0/db"\n', "[store] url: expected a port from 1 to 65535",
                 id="store-postgresql-port-0", marks=needs_psycopg),
    pytest.param('[store]\nurl = "postgresql://u@db host/aspy"\n', "[store] url: expected a URL without spaces",
                 id="store-postgresql-space-in-host"),
    pytest.param('[store]\nurl = "postgresql://u@h/aspy\\r\\n"\n', "[store] url: expected a URL without spaces or "
                 "control characters", id="store-postgresql-crlf"),
]


@pytest.mark.parametrize("text,expected", MISTAKES)
def test_a_value_that_would_break_at_run_time_is_refused_naming_table_and_key(tmp_path, text, expected):
    found = problems(tmp_path, text)
    assert any(line.startswith(f"{tmp_path / 'config.toml'}: ") and expected in line for line in found), found


def test_every_run_time_mistake_is_reported_at_once(tmp_path):
    found = problems(tmp_path, '[server]\nconnect_timeout = 0\nworkers = 0\n[store]\nurl = "sqlite:///"\n'
                               '[providers.p]\nbase_url = "http://[::1"\n')
    assert [line.split(": ")[1] for line in found] == [
        "[server] workers", "[server] connect_timeout", "[store] url", "[providers.p] base_url"]


def test_values_at_their_limits_are_accepted(tmp_path):
    config = load_config(write(tmp_path, f"""
[server]
listen = "[::1]:65535"
workers = 256
worker_connections = 65536
connect_timeout = "1ms"
upstream_timeout = "365d"
api_token = "{'x' * 16}"
[store]
url = "sqlite:///~/aspy/aspy.db"
retention_days = 36500
[sessions]
events_per_session = 1000000
[providers.local]
base_url = "http://[::1]:1/anthropic"
[providers.named]
base_url = "https://my_service.internal.:443"
"""))
    assert config.server.host == "::1" and config.server.listen == "[::1]:65535"
    assert config.server.connect_timeout == 0.001 and config.server.worker_connections == 65536
    assert config.store.url == "sqlite:///~/aspy/aspy.db"


@needs_psycopg
def test_a_postgresql_url_mistake_never_shows_its_password(tmp_path):
    [problem] = problems(tmp_path, '[store]\nurl = "postgresql://aspy:s3cret%zz@db/aspy"\n')
    assert "[store] url: libpq cannot read this URL: invalid percent-encoded token" in problem
    assert "s3cret" not in problem


def test_a_postgresql_store_without_psycopg_is_a_mistake_not_a_crash(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name.startswith("psycopg") else real(name, *args))
    [problem] = problems(tmp_path, '[store]\nurl = "postgresql://aspy@db/aspy"\n')
    assert "[store] url: a PostgreSQL store needs psycopg and psycopg_pool: pip install 'aspy[postgres]'" in problem


@pytest.mark.e2e
def test_the_checker_never_imports_psycopg_into_this_process(tmp_path):
    # In gunicorn's master an import would come before the gevent workers patch the standard library.
    path = write(tmp_path, '[store]\nurl = "postgresql://u@h/db"\n')
    probe = (f"import sys; from aspy.config import load_config; load_config({str(path)!r}); "
             "print('psycopg' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), "9" * 400 + "s", 10 ** 400],
                         ids=["inf", "-inf", "huge-string", "huge-int"])
def test_an_infinite_or_overflowing_duration_is_none(value):
    assert parse_duration(value) is None


DOCUMENT_VALUES = st.recursive(
    st.one_of(st.text(max_size=24), st.integers(min_value=-2**63, max_value=2**63 - 1), st.floats(), st.booleans(),
              st.datetimes(), st.sampled_from(["http://[::1", "http://[::1]:0", "sqlite:///", "sqlite:///x", "5m",
                                               "0s", "::1:80", "[::1]:80", "host:0", "pt_" + "a" * 20, "anthropic"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6)
TABLE_KEYS = {"server": ["listen", "workers", "worker_connections", "api_token", "upstream_timeout",
                         "connect_timeout"],
              "store": ["url", "retention_days"], "sessions": ["idle_after", "end_after", "events_per_session"],
              "capture": ["content"], "legacy": ["enabled", "provider"]}
NAMED_KEYS = ["base_url", "name", "api_key_env", "provider", "tags", "proxy_token", "legacy_user_hashes"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example({"providers": {"p": {"base_url": "http://[::1"}}})
@example({"server": {"connect_timeout": 1e300, "upstream_timeout": "9999999999999999d"}})
@given(st.fixed_dictionaries({}, optional={
    **{table: st.one_of(st.dictionaries(st.sampled_from(keys), DOCUMENT_VALUES, max_size=4), DOCUMENT_VALUES)
       for table, keys in TABLE_KEYS.items()},
    **{table: st.dictionaries(st.text(max_size=6), st.one_of(
        st.dictionaries(st.sampled_from(NAMED_KEYS), DOCUMENT_VALUES, max_size=4), DOCUMENT_VALUES), max_size=3)
       for table in ("providers", "clients")}}))
def test_any_document_gives_a_usable_config_or_a_config_error(document):
    try:
        config = parse_config(document, Path("config.toml"))
    except ConfigError:
        return
    import socket

    import urllib3
    from gunicorn.config import Config as GunicornConfig

    from aspy.serving import gunicorn_settings

    server = config.server
    urllib3.Timeout(connect=server.connect_timeout, read=server.upstream_timeout)
    with socket.socket() as probe:
        probe.settimeout(server.connect_timeout)
        probe.settimeout(server.upstream_timeout)
    settings_ = GunicornConfig()
    for key, value in gunicorn_settings(server).items():
        if key in settings_.settings:
            settings_.set(key, value)
    assert 0 < server.port < 65536 and server.workers >= 1 and server.worker_connections >= 1
    assert 0 < config.sessions.idle_after <= config.sessions.end_after
    assert config.sessions.events_per_session >= 1 and config.store.retention_days >= 1


# `aspy check` and `aspy serve` on a config (or model table) with a mistake: the message, a
# non-zero exit, and never a traceback.
DEEP = "a = " + "[" * 5000 + "]" * 5000 + "\n"
BAD_FILES = [
    pytest.param({"config.toml": '[providers.p]\nbase_url = "http://[::1"\n'},
                 "[providers.p] base_url: expected a valid URL", id="unbalanced-ipv6-base_url"),
    pytest.param({"config.toml": "[server\nlisten = 1\n"}, "not valid TOML", id="invalid-toml"),
    pytest.param({"config.toml": DEEP}, "not valid TOML: arrays or tables nested too deeply", id="toml-too-deep"),
    pytest.param({"config.toml": "[server]\nconnect_timeout = 0\n"},
                 "[server] connect_timeout: expected a duration above zero", id="connect_timeout-zero"),
    pytest.param({"config.toml": '[store]\nurl = "postgresql://u@h/db?sslmod=require"\n'},
                 'invalid URI query parameter: "sslmod"', id="postgresql-unknown-option", marks=needs_psycopg),
    pytest.param({"config.toml": "", "models.yaml": "models:\n  claude-x: {input: 1, output: 1, cache_write_5m: 1, "
                  "cache_write_1h: 1, cache_read: 1, context_window: 9, aliases: 5}\n"},
                 "models.claude-x: aliases: expected a list of model ids", id="models.yaml-aliases-not-a-list"),
    pytest.param({"config.toml": "", "models.yaml": b"models:\n  \xff\n"}, "models.yaml: cannot read",
                 id="models.yaml-not-utf-8"),
]


def write_files(folder, files: dict) -> None:
    for name, content in files.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["check", "serve"])
@pytest.mark.parametrize("files,expected", BAD_FILES)
def test_aspy_check_and_serve_report_a_bad_config_without_a_traceback(tmp_path, command, files, expected):
    from helpers import free_port

    write_files(tmp_path, files)
    extra = ["--listen", f"127.0.0.1:{free_port()}"] if command == "serve" else []
    done = subprocess.run([sys.executable, "-m", "aspy", command, "--config", str(tmp_path / "config.toml"), *extra],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")})
    assert done.returncode == 2 and expected in done.stderr, done.stderr
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("flags,expected", [
    (["--listen", "::1:8080"], "--listen: expected an IPv6 address in brackets"),
    (["--listen", "127.0.0.1:0"], "--listen: expected a port from 1 to 65535"),
    (["--workers", "0"], "--workers: expected a whole number of worker processes from 1 to 256, got 0"),
])
def test_aspy_serve_refuses_a_bad_listen_or_workers_flag(tmp_path, flags, expected):
    done = subprocess.run([sys.executable, "-m", "aspy", "serve", "--config", str(write(tmp_path, "")), *flags],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")})
    assert done.returncode == 2 and expected in done.stderr and "Traceback" not in done.stderr


def test_worker_connections_is_a_server_key_that_reaches_gunicorn(tmp_path):
    from aspy.models import load_models
    from aspy.serving import AspyServer

    assert load_config(write(tmp_path, "")).server.worker_connections == 1000
    config = load_config(write(tmp_path, "[server]\nworker_connections = 250\n"))
    assert AspyServer(config, load_models()).cfg.worker_connections == 250


@pytest.mark.e2e
def test_the_shipped_gunicorn_conf_takes_worker_connections(tmp_path):
    from helpers import ROOT

    config = write(tmp_path, "[server]\nworker_connections = 321\n")
    probe = f"import runpy; print(runpy.run_path({str(ROOT / 'conf' / 'gunicorn.conf.py')!r})['worker_connections'])"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          env={**os.environ, "ASPY_CONFIG": str(config)})
    assert done.stdout.strip() == "321"


# A reload (HUP) with any bad config keeps gunicorn's master alive on the configuration it runs.
NOT_RELOADED = "config.toml and models.yaml were not reloaded, the running configuration stays"


def hup(proc: subprocess.Popen, log, workers: int, expected: str) -> str:
    """Send HUP; wait until the master said `expected` and forked new workers; stop the old ones; return the log."""
    import re
    import time

    def read() -> str:
        return log.read_text(errors="replace")

    old = re.findall(r"Booting worker with pid: (\d+)", read())
    proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 30
    while time.time() < deadline and proc.poll() is None:
        text = read()
        if expected in text and len(re.findall(r"Booting worker with pid: (\d+)", text)) >= len(old) + workers:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the master {'exited' if proc.poll() is not None else 'did not say'} {expected!r}; "
                             f"its log:\n{read()}")
    # The old workers finish gracefully, which may take a while; stopped now, they leave only
    # workers forked after the reload to answer.
    for pid in map(int, old):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    while time.time() < deadline and any(alive(int(pid)) for pid in old):
        time.sleep(0.1)
    return read()


def alive(pid: int) -> bool:
    """Tell whether a process (not yet reaped by its parent) exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def answers(url: str) -> int:
    """Return the status of a Messages call through client dev-1 (provider fake)."""
    import requests

    return requests.post(f"{url}/dev-1/v1/messages", json=MESSAGE, timeout=30).status_code


def with_base_url(text: str, upstream_url: str, base_url: str) -> str:
    """Return the standard config with provider fake (dev-1's) at another base URL."""
    old = f'[providers.fake]\nbase_url = "{upstream_url}"'
    assert old in text
    return text.replace(old, f'[providers.fake]\nbase_url = "{base_url}"')


def break_base_url(folder, text, upstream_url):
    (folder / "config.toml").write_text(with_base_url(text, upstream_url, "http://[::1"))


def break_toml(folder, text, upstream_url):
    (folder / "config.toml").write_text("[server\n" + text)


def zero_connect_timeout(folder, text, upstream_url):
    (folder / "config.toml").write_text(text.replace("[server]\n", "[server]\nconnect_timeout = 0\n"))


def unreadable_file(folder, text, upstream_url):
    (folder / "config.toml").unlink()
    (folder / "config.toml").mkdir()


def bad_models_yaml(folder, text, upstream_url):
    # The config alone is sound, and would send dev-1 nowhere: it must not be taken without its model table.
    (folder / "config.toml").write_text(with_base_url(text, upstream_url, "http://127.0.0.1:9"))
    (folder / "models.yaml").write_text("models:\n  claude-x: {input: 1, output: 1, cache_write_5m: 1, "
                                        "cache_write_1h: 1, cache_read: 1, context_window: 9, aliases: 5}\n")


def mistyped_postgresql_option(folder, text, upstream_url):
    (folder / "config.toml").write_text(text + '\n[store]\nurl = "postgresql://u@127.0.0.1/db?sslmod=require"\n')


@pytest.mark.parametrize("spoil,expected", [
    pytest.param(break_base_url, "[providers.fake] base_url: expected a valid URL", id="unbalanced-ipv6-base_url"),
    pytest.param(break_toml, "not valid TOML", id="invalid-toml"),
    pytest.param(zero_connect_timeout, "[server] connect_timeout: expected a duration above zero",
                 id="connect_timeout-zero"),
    pytest.param(unreadable_file, "cannot read", id="unreadable-file"),
    pytest.param(bad_models_yaml, "models.claude-x: aliases: expected a list", id="bad-models.yaml"),
    pytest.param(mistyped_postgresql_option, 'invalid URI query parameter: "sslmod"', id="postgresql-unknown-option",
                 marks=needs_psycopg),
])
def test_a_reload_with_a_bad_config_keeps_the_master_and_the_running_config(upstream, start_aspy, tmp_path,
                                                                             spoil, expected):
    import requests

    from helpers import standard_config

    text = standard_config(upstream.url)
    server = start_aspy(text)
    assert answers(server.url) == 200
    spoil(tmp_path, text, upstream.url)
    log = hup(server.proc, server.log, server.workers, NOT_RELOADED)
    assert expected in log and "Traceback" not in log
    assert server.proc.poll() is None
    assert requests.get(server.url + "/health", timeout=10).json()["status"] == "ok"
    assert answers(server.url) == 200
    # The master still takes a sound file: here one that sends dev-1 to a port nobody listens on.
    if (tmp_path / "config.toml").is_dir():
        (tmp_path / "config.toml").rmdir()
    (tmp_path / "models.yaml").unlink(missing_ok=True)
    (tmp_path / "config.toml").write_text(with_base_url(text, upstream.url, "http://127.0.0.1:9"))
    hup(server.proc, server.log, server.workers, "configuration reloaded from")
    assert answers(server.url) == 502


def serve_in_background(command: list[str], folder, env: dict) -> tuple[subprocess.Popen, Path]:
    """Start a server with its output in folder/server.log."""
    log = folder / "server.log"
    proc = subprocess.Popen(command, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            env={**os.environ, "XDG_STATE_HOME": str(folder / "state"), **env},
                            cwd=Path(__file__).resolve().parents[1])
    return proc, log


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_reload_onto_an_address_in_use_keeps_serving_where_it_was(upstream, tmp_path):
    import socket

    from helpers import free_port, standard_config, wait_for_health

    port, taken = free_port(), socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    text = standard_config(upstream.url).replace("[server]\n", f'[server]\nlisten = "127.0.0.1:{port}"\n')
    config = write(tmp_path, text)
    proc, log = serve_in_background([sys.executable, "-m", "aspy", "serve", "--config", str(config)], tmp_path, {})
    try:
        wait_for_health(f"http://127.0.0.1:{port}", proc)
        config.write_text(text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{taken.getsockname()[1]}"))
        text = hup(proc, log, 2, NOT_RELOADED)
        assert f"[server] listen: cannot listen on 127.0.0.1:{taken.getsockname()[1]}" in text
        assert proc.poll() is None and answers(f"http://127.0.0.1:{port}") == 200
    finally:
        stop(proc)
        taken.close()


def test_the_shipped_gunicorn_conf_keeps_the_running_config_on_a_bad_reload(upstream, tmp_path):
    from helpers import free_port, standard_config, wait_for_health

    port = free_port()
    text = standard_config(upstream.url).replace("[server]\n", f'[server]\nlisten = "127.0.0.1:{port}"\n')
    config = write(tmp_path, text)
    proc, log = serve_in_background([sys.executable, "-m", "gunicorn", "-c", "conf/gunicorn.conf.py"], tmp_path,
                                    {"ASPY_CONFIG": str(config)})
    try:
        wait_for_health(f"http://127.0.0.1:{port}", proc)
        break_base_url(tmp_path, text, upstream.url)
        logged = hup(proc, log, 2, NOT_RELOADED)
        assert "[providers.fake] base_url: expected a valid URL" in logged and "Traceback" not in logged
        # The new workers serve what the master accepted, not the file they would read now.
        assert proc.poll() is None and answers(f"http://127.0.0.1:{port}") == 200
    finally:
        stop(proc)


@pytest.mark.e2e
def test_the_shipped_gunicorn_conf_refuses_to_start_on_a_bad_config_with_the_message(tmp_path):
    config = write(tmp_path, '[providers.p]\nbase_url = "http://[::1"\n')
    done = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "conf/gunicorn.conf.py"], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "ASPY_CONFIG": str(config), "XDG_STATE_HOME": str(tmp_path)})
    assert done.returncode != 0 and "[providers.p] base_url: expected a valid URL" in done.stderr
    assert "Traceback" not in done.stderr
