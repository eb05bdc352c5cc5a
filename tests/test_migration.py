"""`aspy migrate`: from an old hash-based setup to named clients, and old event logs imported."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib

import pytest
import requests

from helpers import FIXTURES, api_get, key_hash, stats_when

KEY_C = "sk-ant-api03-carol-key-0000000001"
KEY_D = "sk-ant-api03-dave-key-00000000002"
LOGS = FIXTURES / "legacy-aspy-logs"
SAMPLE_HASH = "b0acf41e12907b7b"


def old_setup(upstream_url: str) -> str:
    """An old hash-based config: no clients, everything through /v1/ to one provider."""
    return f"""# aspy on the team box -- keep this comment
[server]
listen = "127.0.0.1:8080"   # the usual port

[legacy]
enabled = true
provider = "fake"

# the only upstream
[providers.fake]
base_url = "{upstream_url}"
"""


def migrate(server, *args: str) -> subprocess.CompletedProcess:
    """Run `aspy migrate` against the server's config and store."""
    return subprocess.run([sys.executable, "-m", "aspy", "migrate", "--config", str(server.config), *args],
                          capture_output=True, text=True, env=server.env, timeout=60)


def stats(server, **params) -> dict:
    return api_get(server, "stats", **params).json()


def send(server, key: str, path: str = "/v1/messages") -> None:
    r = requests.post(f"{server.url}{path}", headers={"x-api-key": key},
                      json={"model": "claude-sonnet-4-5", "max_tokens": 8,
                            "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200


@pytest.fixture
def old(start_aspy, upstream, fresh_store):
    """An old setup that has seen legacy traffic from two keys (three requests)."""
    # The logs imported here are from December 2025: keep them past the default 90 days' retention.
    server = start_aspy(old_setup(upstream.url) + (fresh_store() or "\n[store]\n") + "retention_days = 36500\n")
    send(server, KEY_C)
    send(server, KEY_C)
    send(server, KEY_D)
    stats_when(server, 3)
    return server


def test_the_plan_lists_each_hash_and_changes_nothing(old):
    config_before = old.config.read_bytes()
    stats_before = stats(old)
    done = migrate(old, "--map", f"{key_hash(KEY_C)}=carol")
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines()
             if line[:16] in (key_hash(KEY_C), key_hash(KEY_D))}
    assert "carol (new client)" in lines[key_hash(KEY_C)] and " 2 " in lines[key_hash(KEY_C)]
    assert f"legacy-{key_hash(KEY_D)[:8]} (new client)" in lines[key_hash(KEY_D)]
    assert "Nothing changed" in done.stdout
    assert old.config.read_bytes() == config_before
    assert stats(old) == stats_before
    assert not list(old.config.parent.glob("config.toml.bak-*"))


def test_apply_twice_writes_clients_once_keeping_comments_and_re_attributes_history(old, start_aspy):
    original = old.config.read_text()
    first = migrate(old, "--apply", "--map", f"{key_hash(KEY_C)}=carol")
    assert first.returncode == 0, first.stderr
    assert "Re-attributed 2 sessions" in first.stdout
    migrated = old.config.read_text()
    for comment in ("# aspy on the team box -- keep this comment", "# the usual port", "# the only upstream"):
        assert comment in migrated
    config = tomllib.loads(migrated)
    assert config["clients"]["carol"]["legacy_user_hashes"] == [key_hash(KEY_C)]
    assert config["clients"][f"legacy-{key_hash(KEY_D)[:8]}"] == {
        "name": f"Legacy key {key_hash(KEY_D)[:8]}", "provider": "fake", "legacy_user_hashes": [key_hash(KEY_D)]}
    [backup] = old.config.parent.glob("config.toml.bak-*")
    assert backup.read_text() == original

    second = migrate(old, "--apply", "--map", f"{key_hash(KEY_C)}=carol")
    assert second.returncode == 0 and "Nothing to migrate" in second.stdout
    assert old.config.read_text() == migrated
    assert len(list(old.config.parent.glob("config.toml.bak-*"))) == 1

    # The history answers under the new client id and under the old hash; new traffic follows.
    old.stop()
    server = start_aspy(old.config.read_text())
    server.env = old.env
    carol = stats(server, client="carol")
    assert carol["requests"]["total"] == 2
    assert stats(server, user=key_hash(KEY_C)) == carol
    sessions = requests.get(f"{server.url}/api/sessions", params={"client": "carol"}).json()["sessions"]
    assert sessions[0]["user"] == key_hash(KEY_C)
    send(server, KEY_C)
    stats_when(server, 3, client="carol")
    assert stats(server, user=key_hash(KEY_C))["requests"]["total"] == 3


def test_migrating_into_an_existing_client_adds_the_hash(old):
    text = old.config.read_text() + '\n[clients.team]\nname = "The team"\nprovider = "fake"\n'
    old.config.write_text(text)
    done = migrate(old, "--apply", "--map", f"{key_hash(KEY_C)}=team", "--map", f"{key_hash(KEY_D)}=team")
    assert done.returncode == 0, done.stderr
    assert sorted(tomllib.loads(old.config.read_text())["clients"]["team"]["legacy_user_hashes"]) == \
        sorted([key_hash(KEY_C), key_hash(KEY_D)])


@pytest.mark.parametrize("args,message", [
    (["--map", "nothex=carol"], "16-character lowercase hex"),
    (["--map", f"{key_hash(KEY_C)}=api"], "reserved"),
    (["--map", "0123456789abcdef=carol"], "no legacy sessions"),
    (["--apply", "--provider", "nowhere"], "not a configured provider"),
])
def test_bad_migration_requests_are_refused_clearly(old, args, message):
    before = old.config.read_bytes()
    done = migrate(old, *args)
    assert done.returncode == 2 and message in done.stderr
    assert old.config.read_bytes() == before


def test_importing_old_logs_shows_a_plan_then_imports_once(old, tmp_path):
    plan = migrate(old, "--import-logs", str(LOGS))
    assert plan.returncode == 0, plan.stderr
    assert "aspy-20251207-140322-a1b2.jsonl: 8 lines" in plan.stdout and "Nothing changed" in plan.stdout
    assert stats(old, user=SAMPLE_HASH)["requests"]["total"] == 0

    for attempt in range(2):
        done = migrate(old, "--import-logs", str(LOGS), "--apply")
        assert done.returncode == 0, done.stderr
        assert ("imported" if attempt == 0 else "already imported, skipped") in done.stdout
        imported = stats(old, user=SAMPLE_HASH)
        assert imported["requests"] == {"total": 1, "failed": 0}
        assert imported["tokens"] == {"input": 3, "output": 412, "cache_read": 88231, "cache_write_5m": 1204,
                                      "cache_write_1h": 0, "web_search_requests": 0}
        # Opus 4.5 at list price: $5 in, $25 out, $6.25 per 5m cache write, $0.50 per cache read.
        assert imported["cost"]["total_usd"] == pytest.approx((3 * 5 + 412 * 25 + 1204 * 6.25 + 88231 * 0.5) / 1e6)
        assert imported["tools"] == {"total_calls": 1, "failed_calls": 0, "by_tool": {"Read": 1}}
        assert imported["sessions"]["ended"] == 1
    session = requests.get(f"{old.url}/api/sessions", params={"user": SAMPLE_HASH}).json()["sessions"][0]
    assert session["claude_session_id"] == "9f3c1a2e-5b7d-4c1e-8a2f-0d6b3e4f5a61"
    assert session["status"] == "ended" and session["started"].startswith("2025-12-07T14:03:22")
    events = requests.get(f"{old.url}/api/events", params={"user": SAMPLE_HASH}).json()["events"]
    assert {e["type"] for e in events} == {"request", "response", "tool_call", "tool_result"}
    # Figures over time at the instants the log gives, not at the import's.
    [day] = requests.get(f"{old.url}/api/usage", params={"user": SAMPLE_HASH, "tz": "UTC",
                                                         "group_by": "day"}).json()["rows"]
    assert day["day"] == "2025-12-07" and day["requests"] == 1 and day["tokens"] == imported["tokens"]
    assert day["cost_usd"] == pytest.approx(imported["cost"]["total_usd"], abs=1e-9)

    # The imported hash can then be migrated like any other.
    done = migrate(old, "--apply", "--map", f"{SAMPLE_HASH}=old-laptop")
    assert done.returncode == 0, done.stderr
    assert "Re-attributed 3 sessions" in done.stdout  # the two keys of the fixture, and the imported one
    assert stats(old, user=SAMPLE_HASH)["requests"]["total"] == 1
    moved = requests.get(f"{old.url}/api/usage", params={"group_by": "month,client", "tz": "UTC"}).json()["rows"]
    assert [(r["month"], r["client"], r["requests"]) for r in moved if r["month"] == "2025-12"] == \
        [("2025-12", "old-laptop", 1)]
    assert tomllib.loads(old.config.read_text())["clients"]["old-laptop"]["legacy_user_hashes"] == [SAMPLE_HASH]


def test_a_new_log_file_adds_to_sessions_of_an_earlier_import(old, tmp_path):
    folder = tmp_path / "logs"
    folder.mkdir()
    shutil.copy(LOGS / "aspy-20251207-140322-a1b2.jsonl", folder)
    assert migrate(old, "--import-logs", str(folder), "--apply").returncode == 0
    later = {"user_id": SAMPLE_HASH, "session_id": "9f3c1a2e-5b7d-4c1e-8a2f-0d6b3e4f5a61",
             "tracked_at": "2025-12-07T15:00:00.5Z", "type": "Request", "id": "1-1",
             "timestamp": "2025-12-07T15:00:00.4Z", "method": "POST", "path": "/v1/messages", "body_size": 2,
             "body": {}}
    (folder / "aspy-20251207-150000-beef.jsonl").write_text(json.dumps(later) + "\nnot json\n")
    done = migrate(old, "--import-logs", str(folder), "--apply")
    assert "1 unreadable (lines 2)" in done.stdout
    assert stats(old, user=SAMPLE_HASH)["requests"]["total"] == 2
    assert len(requests.get(f"{old.url}/api/sessions", params={"user": SAMPLE_HASH}).json()["sessions"]) == 1


def test_imported_cache_writes_take_the_lifetime_the_log_says(old, tmp_path):
    # The log has no 5m/1h split: the session's request asked for 1-hour caching, so its writes are 1h.
    folder = tmp_path / "logs"
    folder.mkdir()
    user, session = "00000000000000aa", "6a0c2d8e-0000-4000-8000-000000000001"
    lines = [
        {"user_id": user, "session_id": session, "tracked_at": "2025-12-08T10:00:00Z", "type": "Request",
         "id": "1-1", "timestamp": "2025-12-08T10:00:00Z", "method": "POST", "path": "/v1/messages", "body_size": 9,
         "body": {"model": "claude-opus-4-5-20251101", "system": [
             {"type": "text", "text": "rules", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
             "messages": [{"role": "user", "content": "hi"}]}},
        {"user_id": user, "session_id": session, "tracked_at": "2025-12-08T10:00:02Z", "type": "ApiUsage",
         "timestamp": "2025-12-08T10:00:02Z", "model": "claude-opus-4-5-20251101", "input_tokens": 10,
         "output_tokens": 20, "cache_creation_tokens": 3000, "cache_read_tokens": 0},
    ]
    (folder / "aspy-20251208-100000-cafe.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert migrate(old, "--import-logs", str(folder), "--apply").returncode == 0
    imported = stats(old, user=user)
    assert imported["tokens"]["cache_write_1h"] == 3000 and imported["tokens"]["cache_write_5m"] == 0
    # Opus 4.5: $5 in, $25 out, 1h writes at 2x input ($10).
    assert imported["cost"]["total_usd"] == pytest.approx((10 * 5 + 20 * 25 + 3000 * 10) / 1e6, abs=1e-9)
