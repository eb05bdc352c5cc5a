"""`aspy check`: the configuration, the model table, and whether the store is reachable and current."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import uuid

import pytest

from aspy.store import open_store
from aspy.store.schema import SCHEMA_VERSION
from conftest import POSTGRES_URL, free_port, postgres_database


def check(tmp_path, store_url: str | None = None) -> subprocess.CompletedProcess:
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\nurl = "{store_url}"\n' if store_url else "")
    return subprocess.run([sys.executable, "-m", "aspy", "check", "--config", str(config)], capture_output=True,
                          text=True, env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")})


def test_a_store_not_yet_created_is_fine_and_left_alone(tmp_path):
    done = check(tmp_path)
    assert done.returncode == 0 and "not created yet" in done.stdout
    assert not (tmp_path / "state" / "aspy" / "aspy.db").exists()


def test_a_current_sqlite_store_is_reported_current(tmp_path):
    url = f"sqlite:///{tmp_path / 'aspy.db'}"
    open_store(url).check()
    done = check(tmp_path, url)
    assert done.returncode == 0 and f"reachable, schema version {SCHEMA_VERSION} (current)" in done.stdout


def test_a_store_newer_than_aspy_fails_the_check(tmp_path):
    db = tmp_path / "aspy.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', '99')")
    done = check(tmp_path, f"sqlite:///{db}")
    assert done.returncode == 3 and "newer than this aspy understands" in done.stderr


def test_an_unreachable_postgresql_store_fails_the_check(tmp_path):
    done = check(tmp_path, f"postgresql://aspy:s3cret-pw@127.0.0.1:{free_port()}/aspy")
    assert done.returncode == 3 and "cannot reach the PostgreSQL store" in done.stderr
    assert "s3cret-pw" not in done.stderr + done.stdout


@pytest.mark.skipif(not POSTGRES_URL, reason="PostgreSQL tests need ASPY_TEST_POSTGRES_URL")
def test_a_postgresql_store_is_checked_then_current(tmp_path):
    name = f"aspy_test_{uuid.uuid4().hex[:12]}"
    url = postgres_database(name, create=True)
    try:
        assert "not created yet" in check(tmp_path, url).stdout
        open_store(url).check()
        done = check(tmp_path, url)
        assert done.returncode == 0 and f"schema version {SCHEMA_VERSION} (current)" in done.stdout
    finally:
        postgres_database(name, create=False)
