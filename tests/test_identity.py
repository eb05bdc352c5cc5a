"""Identity (SPEC 3, 4 and the access rules of 6): key hashes, the migration shim, proxy
tokens, central provider keys, the API token, and secrets kept out of the store and logs."""
from __future__ import annotations

import hashlib
import logging
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

from aspy.config import ServerSettings
from aspy.routing import user_hash
from aspy.serving import warn_if_exposed
from test_sessions_api import eventually

KEY_A = "sk-ant-api03-AAAA-first-key-0001"
KEY_B = "sk-ant-api03-BBBB-owned-key-0002"
BEARER = "sk-ant-oat01-bearer-token-0003"
CENTRAL = "sk-ant-central-provider-key-0004"
TOKEN = "pt_" + "T0kenForTheTokClient_abcdefghij"
OTHER_TOKEN = "pt_" + "0therClientsToken_abcdefghijklm"
API_TOKEN = "admin-api-token-0123456789abcdef"
MESSAGE = {"model": "claude-sonnet-4-5-20250929", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


def h(key: str) -> str:
    """Return the legacy user hash of a key, computed the documented way."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def identity_config(upstream_url: str) -> str:
    return f"""
# Team proxy
[server]
api_token = "{API_TOKEN}"

[legacy]
provider = "fake"

[providers.fake]
base_url = "{upstream_url}"

[providers.central]
base_url = "{upstream_url}/central"
api_key_env = "ASPY_TEST_CENTRAL_KEY"

[clients.dev-1]
name = "Dev Laptop"
provider = "fake"

[clients.tok]
name = "Token client"
provider = "fake"
proxy_token = "{TOKEN}"

[clients.other]
name = "Other team"
provider = "central"
proxy_token = "{OTHER_TOKEN}"

[clients.owner]
name = "Owner of key B"
provider = "fake"
legacy_user_hashes = ["{h(KEY_B)}"]
"""


@pytest.fixture(scope="module")
def team(upstream, tmp_path_factory, fresh_store):
    from conftest import AspyProcess

    server = AspyProcess(tmp_path_factory.mktemp("team"), identity_config(upstream.url) + fresh_store(),
                         env={"ASPY_TEST_CENTRAL_KEY": CENTRAL, "ASPY_LOG_LEVEL": "DEBUG"}).start()
    yield server
    server.stop()


def api(server, path: str, token: str | None = API_TOKEN, **params) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(f"{server.url}/api/{path}", params=params, headers=headers)


def stats(server, token: str = API_TOKEN, **params) -> dict:
    r = api(server, "stats", token, **params)
    assert r.status_code == 200, r.text
    return r.json()


def post(server, path: str, headers: dict | None = None) -> requests.Response:
    r = requests.post(f"{server.url}{path}", json=MESSAGE, headers=headers or {})
    r.content
    return r


@pytest.mark.parametrize("api_key,authorization,expected", [
    (KEY_A, None, h(KEY_A)), (None, f"Bearer {BEARER}", h(BEARER)), (KEY_A, f"Bearer {BEARER}", h(KEY_A)),
    (None, None, "anonymous"), (None, "Basic abc", "anonymous"),
])
def test_user_hash_is_sha256_of_the_key_16_hex(api_key, authorization, expected):
    assert user_hash(api_key, authorization) == expected


def test_legacy_request_is_known_by_its_key_hash(team, upstream):
    sid = str(uuid.uuid4())
    assert post(team, "/v1/messages", {"x-api-key": KEY_A, "x-claude-code-session-id": sid}).status_code == 200
    assert upstream.last().target == "/v1/messages"
    session = eventually(lambda: api(team, "sessions", session=sid).json().get("sessions"))[0]
    assert session["client"] is None and session["user"] == h(KEY_A)


def test_user_query_answers_for_a_legacy_user_and_a_named_client_with_the_same_key(team):
    before = stats(team, user=h(KEY_A))["requests"]["total"]
    post(team, "/v1/messages", {"x-api-key": KEY_A})
    post(team, "/dev-1/v1/messages", {"x-api-key": KEY_A})
    answer = eventually(lambda: (s := stats(team, user=h(KEY_A)))["requests"]["total"] == before + 2 and s)
    assert answer["requests"]["failed"] == 0
    users = {(s["client"], s["user"]) for s in api(team, "sessions", user=h(KEY_A)).json()["sessions"]}
    assert {(None, h(KEY_A)), ("dev-1", h(KEY_A))} <= users
    for endpoint in ("events", "sessions", "context"):
        assert api(team, endpoint, user=h(KEY_A)).status_code == 200


def test_bearer_token_is_hashed_when_there_is_no_api_key(team):
    post(team, "/v1/messages", {"Authorization": f"Bearer {BEARER}"})
    found = eventually(lambda: api(team, "sessions", user=h(BEARER)).json()["sessions"])
    assert found[0]["user"] == h(BEARER)


def test_a_client_takes_over_its_legacy_hash_for_new_traffic_and_queries(team):
    post(team, "/v1/messages", {"x-api-key": KEY_B})
    by_client = eventually(lambda: (s := stats(team, client="owner"))["requests"]["total"] >= 1 and s)
    assert stats(team, user=h(KEY_B)) == by_client
    session = api(team, "sessions", client="owner").json()["sessions"][0]
    assert session["client"] == "owner" and session["user"] == h(KEY_B) and session["provider"] == "fake"


def test_proxy_token_routes_to_its_client(team, upstream):
    sid = str(uuid.uuid4())
    assert post(team, f"/{TOKEN}/v1/messages?beta=true", {"x-claude-code-session-id": sid}).status_code == 200
    assert upstream.last().target == "/v1/messages?beta=true"
    session = eventually(lambda: api(team, "sessions", session=sid).json().get("sessions"))[0]
    assert session["client"] == "tok"


def test_unknown_proxy_token_gets_401(team):
    r = post(team, "/pt_not-a-real-token-at-all/v1/messages")
    assert r.status_code == 401
    assert r.json() == {"type": "error", "error": {"type": "authentication_error", "message": "Unknown proxy token"}}


def test_a_token_client_reached_by_its_id_gets_401(team, upstream):
    before = len(upstream.requests)
    r = post(team, "/tok/v1/messages")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert "proxy token" in r.json()["error"]["message"]
    assert len(upstream.requests) == before


def test_provider_key_replaces_the_clients_key(team, upstream):
    post(team, f"/{OTHER_TOKEN}/v1/messages", {"x-api-key": KEY_A, "Authorization": f"Bearer {BEARER}"})
    seen = upstream.last()
    assert seen.target == "/central/v1/messages"
    assert seen.headers["x-api-key"] == CENTRAL
    assert "authorization" not in seen.headers


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789", KEY_A])
def test_the_api_needs_the_api_token(team, token):
    r = api(team, "stats", token)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_a_proxy_token_reads_only_its_own_clients_data(team):
    before = stats(team, client="tok")["requests"]["total"]
    post(team, f"/{TOKEN}/v1/messages")
    mine = eventually(lambda: (s := stats(team, TOKEN))["requests"]["total"] == before + 1 and s)
    assert mine == stats(team, client="tok")
    assert api(team, "stats", TOKEN, client="dev-1").status_code == 403
    assert [c["id"] for c in api(team, "clients", TOKEN).json()["clients"]] == ["tok"]
    assert {s["client"] for s in api(team, "sessions", TOKEN).json()["sessions"]} == {"tok"}
    post(team, "/dev-1/v1/messages", {"x-api-key": KEY_A})
    foreign = eventually(lambda: api(team, "sessions", client="dev-1").json()["sessions"])[0]["id"]
    assert api(team, "stats", TOKEN, session=foreign).status_code == 404
    assert api(team, "events", TOKEN).status_code == 200


def test_health_stays_open_behind_the_api_token(team):
    assert requests.get(f"{team.url}/health").json()["status"] == "ok"


def test_no_secret_reaches_the_store_or_the_logs(team, upstream):
    # Use every secret once more: keys both ways, both tokens, the admin token and the central key.
    before = stats(team)["requests"]["total"]
    post(team, "/v1/messages", {"x-api-key": KEY_A})
    post(team, "/v1/messages", {"Authorization": f"Bearer {BEARER}"})
    post(team, f"/{TOKEN}/v1/messages", {"x-api-key": KEY_B})
    post(team, f"/{OTHER_TOKEN}/v1/messages", {"x-api-key": KEY_A})
    post(team, "/pt_unknownTokenValue_0123456789/v1/messages")
    api(team, "stats")
    api(team, "stats", TOKEN)
    requests.post(f"{team.url}/api/search", json={"keyword": "hi"}, headers={"Authorization": f"Bearer {API_TOKEN}"})
    eventually(lambda: stats(team)["requests"]["total"] >= before + 4)
    # Everything aspy keeps on this host (the SQLite store, the journal), and the PostgreSQL store.
    state = Path(team.env["XDG_STATE_HOME"]) / "aspy"
    stored = b"".join(p.read_bytes() for p in state.rglob("*") if p.is_file())
    if team.store_url():
        dump = subprocess.run(["pg_dump", "--data-only", team.store_url()], capture_output=True, check=True).stdout
        assert b"COPY public.sessions" in dump
        stored += dump
    else:
        assert b"SQLite format 3" in stored
    logged = team.log_text().encode()
    assert b"aspy.exchange" in logged  # the per-exchange lines were written, and are checked too
    for secret in (KEY_A, KEY_B, BEARER, CENTRAL, TOKEN, OTHER_TOKEN, API_TOKEN, "pt_unknownTokenValue_0123456789"):
        assert secret.encode() not in stored, f"{secret} is in the store"
        assert secret.encode() not in logged, f"{secret} is in the log"


def test_listening_beyond_loopback_without_api_token_is_announced(caplog):
    with caplog.at_level(logging.WARNING, logger="gunicorn.error"):
        warn_if_exposed(ServerSettings(listen="0.0.0.0:8080"))
        warn_if_exposed(ServerSettings(listen="127.0.0.1:8080"))
        warn_if_exposed(ServerSettings(listen="0.0.0.0:8080", api_token="x" * 20))
    assert len(caplog.records) == 1
    assert "anyone who can reach this address can read every recorded conversation" in caplog.text


def test_token_new_makes_a_pt_token_and_can_store_it_keeping_comments(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('# my proxy\n[clients.dev-1]\nname = "Dev"  # the laptop\nprovider = "anthropic"\n')
    shown = subprocess.run([sys.executable, "-m", "aspy", "token", "new", "dev-1", "--config", str(config)],
                           capture_output=True, text=True, check=True).stdout
    assert re.search(r'proxy_token = "pt_[A-Za-z0-9_-]{32}"', shown)
    assert "proxy_token" not in config.read_text()
    subprocess.run([sys.executable, "-m", "aspy", "token", "new", "dev-1", "--write", "--config", str(config)],
                   capture_output=True, text=True, check=True)
    text = config.read_text()
    assert text.startswith("# my proxy\n") and "# the laptop" in text
    assert re.search(r'proxy_token = "pt_[A-Za-z0-9_-]{32}"', text)
    bad = subprocess.run([sys.executable, "-m", "aspy", "token", "new", "nobody", "--config", str(config)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown client 'nobody'" in bad.stderr
