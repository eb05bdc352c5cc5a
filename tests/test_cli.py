"""The ``aspy`` command in-process (aspy.cli.main): check, models, report, migrate and token on a real store.

The store is the one the in-process app records into, and the config file is the app's own,
so each command reads what traffic through the proxy left. `aspy serve`, `top` and `mcp`, and
these commands run as processes, are the end-to-end tests'.
"""
from __future__ import annotations

import json
import re
import sqlite3

import pytest

from aspy.cli import main
from helpers import API_KEY, APP_TOKEN, FIXTURES, bearer, key_hash, usage

LEGACY_KEY = "sk-ant-an-old-laptop-key-0001"
LEGACY_LOGS = FIXTURES / "legacy-aspy-logs"


@pytest.fixture
def config(app, tmp_path) -> str:
    """The in-process app's config.toml (its store is a SQLite file beside it)."""
    return str(tmp_path / "config.toml")


def run(capsys, *args: str) -> tuple[int, str, str]:
    """Run `aspy <args>`; return its exit status, output and error output."""
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_check_reports_the_config_and_a_store_not_created_yet(capsys, config, tmp_path):
    status, out, _ = run(capsys, "check", "--config", config)
    assert status == 0 and out.endswith("ok\n")
    assert "clients: dev-1, dev-2, gone, tok" in out and "legacy requests: to fake" in out
    assert "not created yet; aspy creates it on first use" in out and not (tmp_path / "aspy.db").exists()


def test_check_reports_a_current_store_and_the_models_it_cannot_price(capsys, config, traffic):
    traffic.send(model="claude-unheard-of-9")
    status, out, err = run(capsys, "check", "--config", config)
    assert status == 0 and "(current)" in out
    assert "no price for claude-unheard-of-9" in err


def test_check_refuses_a_store_newer_than_aspy(capsys, tmp_path):
    with sqlite3.connect(tmp_path / "new.db") as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', '99')")
    (tmp_path / "config.toml").write_text(f'[store]\nurl = "sqlite:///{tmp_path / "new.db"}"\n')
    status, _, err = run(capsys, "check", "--config", str(tmp_path / "config.toml"))
    assert status == 3 and "newer than this aspy understands" in err


def test_check_reports_every_mistake_at_once(capsys, tmp_path):
    (tmp_path / "config.toml").write_text('[server]\nworkers = 0\n[clients.api]\nname = "x"\nprovider = "nope"\n')
    status, out, err = run(capsys, "check", "--config", str(tmp_path / "config.toml"))
    assert status == 2 and out == ""
    assert "[server] workers" in err and "[clients.api]" in err and "Traceback" not in err


def test_models_lists_the_table_and_the_models_seen_without_a_price(capsys, config, traffic):
    traffic.send(model="claude-unheard-of-9")
    status, out, _ = run(capsys, "models", "--json", "--config", config)
    table = json.loads(out)
    assert status == 0 and table["unpriced_models_seen"] == ["claude-unheard-of-9"]
    sonnet = next(m for m in table["models"] if m["id"] == "claude-sonnet-4-5")
    assert sonnet["rates"]["input"] == 3 and sonnet["rates"]["output"] == 15 and sonnet["source"]


def test_report_gives_the_apis_figures_from_the_store(capsys, client, config, traffic):
    traffic.send("dev-1", usage=usage(1_000, 100))
    traffic.send("dev-2", usage=usage(2_000, 200))
    status, out, _ = run(capsys, "report", "--json", "--config", config)
    assert status == 0
    assert json.loads(out) == client.get("/api/usage", query_string={"group_by": "day"},
                                         headers=bearer(APP_TOKEN)).json
    status, out, _ = run(capsys, "report", "sessions", "--client", "dev-2", "--config", config)
    assert status == 0 and max(len(line) for line in out.splitlines()) <= 80
    status, _, err = run(capsys, "report", "--client", "nobody", "--config", config)
    assert status == 2 and "unknown client 'nobody'" in err


def test_migrate_shows_the_plan_then_moves_a_legacy_hash_to_a_client(capsys, config, traffic, tmp_path):
    traffic.send("", session="old-1", headers={"x-api-key": LEGACY_KEY}, usage=usage(500, 50))
    traffic.send("", session="old-2", headers={"x-api-key": LEGACY_KEY}, usage=usage(500, 50))
    traffic.send("dev-1", headers={"x-api-key": API_KEY})
    before = (tmp_path / "config.toml").read_text()
    status, out, _ = run(capsys, "migrate", "--config", config)
    [planned] = [line for line in out.splitlines() if line.startswith(key_hash(LEGACY_KEY))]
    assert status == 0 and planned.split()[1:3] == ["2", "2"] and "(new client)" in planned
    assert "Nothing changed" in out and (tmp_path / "config.toml").read_text() == before
    status, out, _ = run(capsys, "migrate", "--apply", "--map", f"{key_hash(LEGACY_KEY)}=carol", "--config", config)
    assert status == 0 and "Re-attributed 2 sessions" in out
    assert f'legacy_user_hashes = ["{key_hash(LEGACY_KEY)}"]' in (tmp_path / "config.toml").read_text()
    status, out, _ = run(capsys, "report", "--json", "--client", "carol", "--config", config)
    assert json.loads(out)["total"]["tokens"]["input"] == 1_000
    status, _, err = run(capsys, "migrate", "--map", "not-a-hash=x", "--config", config)
    assert status == 2 and err.startswith("aspy migrate: ")


def test_token_new_makes_a_token_and_can_store_it_keeping_comments(capsys, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('# my proxy\n[clients.dev-1]\nname = "Dev"  # the laptop\nprovider = "anthropic"\n')
    status, out, _ = run(capsys, "token", "new", "dev-1", "--config", str(config))
    assert status == 0 and re.search(r'proxy_token = "pt_[A-Za-z0-9_-]{32}"', out)
    assert "ANTHROPIC_BASE_URL=http://127.0.0.1:8080/pt_" in out and "proxy_token" not in config.read_text()
    status, out, _ = run(capsys, "token", "new", "dev-1", "--write", "--config", str(config))
    text = config.read_text()
    assert status == 0 and text.startswith("# my proxy\n") and "# the laptop" in text
    assert re.search(r'proxy_token = "pt_[A-Za-z0-9_-]{32}"', text)
    status, _, err = run(capsys, "token", "new", "nobody", "--config", str(config))
    assert status == 2 and "unknown client 'nobody'" in err


def test_migrate_imports_old_logs_once_with_their_figures_at_their_time(capsys, tmp_path):
    config = tmp_path / "config.toml"
    # The logs are from December 2025: kept past the default 90 days' retention.
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path / "aspy.db"}"\nretention_days = 36500\n')
    status, out, _ = run(capsys, "migrate", "--import-logs", str(LEGACY_LOGS), "--config", str(config))
    assert status == 0 and "aspy-20251207-140322-a1b2.jsonl: 8 lines" in out and "Nothing changed" in out
    for said in ("imported", "already imported, skipped"):
        status, out, _ = run(capsys, "migrate", "--import-logs", str(LEGACY_LOGS), "--apply", "--config", str(config))
        assert status == 0 and out.strip().endswith(said)
    status, out, _ = run(capsys, "report", "--json", "--tz", "UTC", "--since", "2025-12-01", "--until", "2026-01-01",
                         "--config", str(config))
    [day] = json.loads(out)["rows"]
    assert day["day"] == "2025-12-07" and day["requests"] == 1
    assert day["tokens"] == {"input": 3, "output": 412, "cache_read": 88231, "cache_write_5m": 1204,
                             "cache_write_1h": 0, "web_search_requests": 0}
    # Opus 4.5 at list price: $5 in, $25 out, $6.25 per 5m cache write, $0.50 per cache read.
    assert day["cost_usd"] == pytest.approx((3 * 5 + 412 * 25 + 1204 * 6.25 + 88231 * 0.5) / 1e6)
