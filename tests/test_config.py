"""Configuration (SPEC 1): where it is found, defaults, and every mistake reported at once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from aspy.config import ConfigError, config_path, load_config, parse_duration

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


def test_aspy_check_exits_non_zero_with_the_message(tmp_path):
    path = write(tmp_path, "[clients.x]\nprovider = \"nope\"\n")
    done = subprocess.run([sys.executable, "-m", "aspy", "check", "--config", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "[clients.x] provider: unknown provider 'nope'" in done.stderr


def test_aspy_check_warns_when_a_provider_key_variable_is_unset(tmp_path):
    path = write(tmp_path, '[providers.central]\nbase_url = "https://example.invalid"\napi_key_env = "ASPY_NOT_SET_X"\n')
    env = {k: v for k, v in os.environ.items() if k != "ASPY_NOT_SET_X"} | {"XDG_STATE_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "aspy", "check", "--config", str(path)], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0 and "$ASPY_NOT_SET_X is not set" in done.stderr


def test_aspy_check_accepts_a_good_file(tmp_path):
    path = write(tmp_path, "[clients.x]\nname = \"X\"\nprovider = \"anthropic\"\n")
    done = subprocess.run([sys.executable, "-m", "aspy", "check", "--config", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok")


def test_aspy_serve_with_no_config_at_all_runs_in_legacy_mode(tmp_path):
    import requests
    from conftest import free_port, wait_for_health

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


def test_aspy_serve_refuses_a_bad_models_yaml_before_serving(tmp_path):
    path = write(tmp_path, "")
    (tmp_path / "models.yaml").write_text("models:\n  claude-x: {input: 1}\n")
    done = subprocess.run([sys.executable, "-m", "aspy", "serve", "--config", str(path)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "models.claude-x: output: expected a price" in done.stderr


def test_the_shipped_example_config_is_valid():
    from conftest import ROOT

    config = load_config(ROOT / "conf" / "config.example.toml")
    assert set(config.clients) == {"dev-1", "ci"} and config.clients["ci"].provider == "foundry"
