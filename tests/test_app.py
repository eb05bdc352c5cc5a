"""The whole app in-process: the proxy on whole (non-streamed) answers, /health, /metrics and /dashboard.

The upstream is faked by ``responses``; streams, hang-ups, workers and nginx are the end-to-end
tests' (tests/test_proxy.py and the others marked e2e).
"""
from __future__ import annotations

import json
import re

import pytest
import requests

from helpers import (
    API_KEY,
    APP_PROXY_TOKEN,
    APP_TOKEN,
    FAKE_UPSTREAM,
    MODEL,
    assert_anthropic_error,
    bearer,
    eventually,
    key_hash,
)

CENTRAL_KEY = "sk-ant-central-provider-key-0123"


@pytest.fixture
def app_config_extra() -> str:
    """A provider whose key aspy sends in place of the client's, and a client on it."""
    return f"""
[providers.central]
base_url = "{FAKE_UPSTREAM}/central"
api_key_env = "ASPY_TEST_CENTRAL_KEY"

[clients.team]
name = "Team on the central key"
provider = "central"
"""


def upstream_request(upstream_answers) -> requests.PreparedRequest:
    """Return the one request the fake upstream received."""
    [call] = upstream_answers.calls
    return call.request


# Forwarding

def test_a_clients_request_reaches_its_provider_as_sent_and_the_answer_comes_back(traffic, upstream_answers):
    r = traffic.send("dev-2", prompt="héllo \u2603", headers={"anthropic-beta": "tools-2024", "x-custom": "kept"})
    assert r.status_code == 200 and r.json["content"][0]["text"] == "Hi."
    assert r.headers["request-id"] == "req_test" and r.headers["content-type"] == "application/json"
    sent = upstream_request(upstream_answers)
    assert sent.url == f"{FAKE_UPSTREAM}/base/path/v1/messages"
    assert json.loads(sent.body)["messages"] == [{"role": "user", "content": "héllo \u2603"}]
    assert sent.headers["x-api-key"] == API_KEY and sent.headers["anthropic-beta"] == "tools-2024"
    assert sent.headers["x-custom"] == "kept" and sent.headers["accept-encoding"] == "identity"


def test_the_body_goes_upstream_as_the_same_bytes(client, upstream_answers):
    upstream_answers.post(f"{FAKE_UPSTREAM}/v1/files", json={"id": "file_1"})
    body = bytes(range(256)) * 40 + b'{"not": json'
    r = client.post("/dev-1/v1/files", data=body, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200 and r.json == {"id": "file_1"}
    assert upstream_request(upstream_answers).body == body


def test_hop_by_hop_headers_stay_with_the_connection(client, upstream_answers):
    upstream_answers.get(f"{FAKE_UPSTREAM}/v1/models", json={"data": []})
    client.get("/dev-1/v1/models", headers={"Connection": "x-private", "x-private": "1", "Keep-Alive": "5",
                                            "TE": "trailers", "x-public": "1"})
    sent = upstream_request(upstream_answers).headers
    assert sent["x-public"] == "1"
    assert not {"connection", "x-private", "keep-alive", "te"} & {h.lower() for h in sent}


def test_the_query_string_is_kept_as_it_is(client, upstream_answers):
    upstream_answers.get(re.compile(re.escape(FAKE_UPSTREAM) + r"/v1/models.*"), json={"data": []})
    query = "beta=true&a=1&a=2&b=%20x%2Fy&empty="
    assert client.get(f"/dev-1/v1/models?{query}").status_code == 200
    assert upstream_request(upstream_answers).url == f"{FAKE_UPSTREAM}/v1/models?{query}"


def test_an_upstream_error_comes_back_as_sent_and_counts_as_failed(client, traffic):
    error = {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: too many"}}
    r = traffic.send(status=400, answer=error)
    assert r.status_code == 400 and r.json == error
    assert client.get("/api/stats", headers=bearer(APP_TOKEN)).json["requests"] == {"total": 1, "failed": 1}


def test_a_legacy_request_goes_to_the_legacy_provider_under_its_key_hash(client, traffic, upstream_answers):
    traffic.send("", session="legacy", headers={"x-api-key": "sk-ant-someone-else"})
    assert upstream_request(upstream_answers).url == f"{FAKE_UPSTREAM}/v1/messages"
    [session] = client.get("/api/sessions", headers=bearer(APP_TOKEN)).json["sessions"]
    assert session["client"] is None and session["user"] == key_hash("sk-ant-someone-else")


def test_a_provider_key_replaces_the_clients_own(traffic, upstream_answers, monkeypatch):
    monkeypatch.setenv("ASPY_TEST_CENTRAL_KEY", CENTRAL_KEY)
    traffic.send("team", headers={"authorization": "Bearer sk-ant-the-clients-own"})
    sent = upstream_request(upstream_answers)
    assert sent.url == f"{FAKE_UPSTREAM}/central/v1/messages"
    assert sent.headers["x-api-key"] == CENTRAL_KEY and "authorization" not in {h.lower() for h in sent.headers}


def test_a_proxy_token_routes_to_its_client(client, traffic):
    traffic.send(APP_PROXY_TOKEN, session="by-token")
    [session] = client.get("/api/sessions", headers=bearer(APP_TOKEN)).json["sessions"]
    assert session["client"] == "tok" and session["claude_session_id"] == "by-token"


@pytest.mark.parametrize("segment,status,kind,named", [
    ("nobody", 404, "not_found_error", "nobody"),
    ("pt_NoSuchTokenAnywhere0123456789ab", 401, "authentication_error", None),
    # A client with a proxy token is reached by its token only.
    ("tok", 401, "authentication_error", None),
])
def test_a_request_aspy_cannot_route_is_refused_and_never_forwarded(client, traffic, upstream_answers, segment,
                                                                    status, kind, named):
    r = traffic.send(segment, recorded=False)
    message = assert_anthropic_error(r, status, kind)
    assert named is None or named in message
    assert APP_PROXY_TOKEN not in message and len(upstream_answers.calls) == 0


@pytest.mark.parametrize("failure,status,kind,said", [
    (requests.exceptions.ConnectionError("refused"), 502, "upstream_error", "Upstream unreachable"),
    (requests.exceptions.ConnectTimeout("slow"), 502, "upstream_error", "Upstream unreachable"),
    (requests.exceptions.ReadTimeout("silent"), 504, "timeout_error", "Upstream sent no response headers within"),
])
def test_an_upstream_that_fails_gets_an_answer_in_anthropic_shape_and_counts_as_failed(client, traffic,
                                                                                      upstream_answers, failure,
                                                                                      status, kind, said):
    upstream_answers.post(f"{FAKE_UPSTREAM}/v1/messages", body=failure)
    r = client.post("/dev-1/v1/messages", json={"model": MODEL, "max_tokens": 8, "messages": []},
                    headers={"x-claude-code-session-id": "failing"}, buffered=True)
    assert said in assert_anthropic_error(r, status, kind)
    traffic.recorded += 1
    traffic.wait()
    stats = client.get("/api/stats", headers=bearer(APP_TOKEN)).json
    assert stats["requests"] == {"total": 1, "failed": 1}


def test_a_declared_body_over_32_mib_gets_413_and_nothing_is_forwarded(client, traffic, upstream_answers):
    r = client.post("/dev-1/v1/messages", data=b"{}", buffered=True,
                    environ_overrides={"CONTENT_LENGTH": str(32 * 1024 * 1024 + 1)})
    assert "32 MiB" in assert_anthropic_error(r, 413, "request_too_large")
    assert len(upstream_answers.calls) == 0
    traffic.recorded += 1
    traffic.wait()


def test_a_body_shorter_than_its_content_length_gets_400_and_nothing_is_forwarded(client, upstream_answers):
    r = client.post("/dev-1/v1/messages", data=b'{"model": "x"}', buffered=True,
                    environ_overrides={"CONTENT_LENGTH": "1000"})
    assert "ended after 14 of its declared 1000 bytes" in assert_anthropic_error(r, 400, "invalid_request_error")
    assert len(upstream_answers.calls) == 0


# /health

def test_health_answers_without_a_token_with_the_store_and_the_recording(client, traffic):
    traffic.send()
    # The store has the exchange; the writer lets go of it a moment later.
    health = eventually(lambda: (h := client.get("/health").json)["recording"]["pending"] == 0 and h,
                        timeout=5, interval=0.01)
    assert health["status"] == "ok" and health["version"]
    assert health["store"]["reachable"] is True and health["store"]["kind"] == "sqlite"
    assert health["recording"] == {"failures": 0, "dropped": 0, "pending": 0, "last_error": None}


# /metrics

def test_metrics_need_the_api_token_and_refuse_proxy_tokens(client):
    assert_anthropic_error(client.get("/metrics"), 401, "authentication_error")
    assert_anthropic_error(client.get("/metrics", headers=bearer("not-the-token-at-all")), 401,
                           "authentication_error")
    assert_anthropic_error(client.get("/metrics", headers=bearer(APP_PROXY_TOKEN)), 403, "permission_error")
    r = client.get("/metrics", headers=bearer(APP_TOKEN))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")


def test_metrics_count_what_the_store_took(client, traffic):
    traffic.send(usage={"input_tokens": 120, "output_tokens": 7})
    traffic.send("dev-2", status=529)

    def scraped():
        text = client.get("/metrics", headers=bearer(APP_TOKEN)).get_data(as_text=True)
        return 'aspy_requests_total{client="dev-2",status_class="5xx"} 1.0' in text and text
    text = eventually(scraped, timeout=5, interval=0.01)
    assert 'aspy_requests_total{client="dev-1",status_class="2xx"} 1.0' in text
    assert f'aspy_tokens_total{{client="dev-1",kind="input",model="{MODEL}"}} 120.0' in text


# /dashboard

def test_the_dashboard_is_served_without_a_token_with_a_strict_policy_and_files_of_its_own(client):
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.mimetype == "text/html"
    policy = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
    assert all(policy[d] == "'self'" for d in ("script-src", "style-src", "connect-src", "img-src"))
    assert page.headers["x-content-type-options"] == "nosniff"
    links = re.findall(r'(?:src|href)="([^"]+)"', page.get_data(as_text=True))
    assert links and not [link for link in links if "//" in link or ":" in link]
    for link in links:
        asset = client.get(f"/{link}")
        assert asset.status_code == 200 and asset.data, link
    assert client.get("/dashboard/").headers["location"] == "/dashboard"
    assert_anthropic_error(client.get("/dashboard/nothing-here"), 404, "not_found_error")
