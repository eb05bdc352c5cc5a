"""Errors (SPEC 2 and 6), in-process: every refusal of every blueprint, and every error Werkzeug
raises, answers in Anthropic's shape with its status and type, and no message carries a secret."""
from __future__ import annotations

import json
import logging
import socket

import pytest
import requests
import responses
from flask import abort, request
from gunicorn.http.errors import NoMoreData

import aspy.proxy
from aspy.errors import ERROR_TYPES, error_type, without_secrets
from aspy.store import StoreError
from conftest import FAKE_UPSTREAM, in_process_app

API_TOKEN = "api-token-for-error-tests-0123"
TOKEN = "pt_" + "T0kenForTheTokClient_abcdefghij"
KEY = "sk-ant-api03-secret-key-for-errors-0001"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
TABLES = {"server": {"api_token": API_TOKEN},
          "clients": {"tok": {"name": "Token client", "provider": "fake", "proxy_token": TOKEN}}}


def assert_error(r, status: int, kind: str | None = None, message: str | None = None) -> str:
    """Check an answer is an error in Anthropic's shape with this status; return its message."""
    assert r.status_code == status, r.data[:300]
    assert r.content_type == "application/json", r.data[:300]
    body = json.loads(r.data)
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == (kind or error_type(status)), body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    if message is not None:
        assert body["error"]["message"] == message
    return body["error"]["message"]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app, with a few routes of the test's own that raise what Werkzeug and bugs raise."""
    app = in_process_app(tmp_path_factory.mktemp("errors"), TABLES)
    app.config["MAX_CONTENT_LENGTH"] = 1000

    @app.post("/_probe/json")
    def probe_json():
        return request.get_json()

    @app.post("/_probe/data")
    def probe_data():
        return {"size": len(request.get_data())}

    @app.get("/_probe/abort/<int:status>")
    def probe_abort(status):
        abort(status)

    @app.get("/_probe/boom/<path:rest>")
    def probe_boom(rest):
        raise RuntimeError(f"planted fault with {KEY}")

    @app.get("/_probe/broken/<kind>")
    def probe_broken(kind):
        raise NoMoreData(b"") if kind == "gunicorn" else ConnectionResetError("reset")

    return app


@pytest.fixture(scope="module")
def client(app):
    return app.test_client()


@pytest.fixture
def upstream():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as fake:
        yield fake


@pytest.fixture
def aspy_log(caplog):
    """Capture aspy's log lines (aspy's logger does not propagate to the root)."""
    logger = logging.getLogger("aspy")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


# The proxy (aspy/proxy.py, aspy/routing.py).

@pytest.mark.parametrize("path, status, message", [
    ("/nobody/v1/messages", 404, "Unknown client 'nobody'"),
    ("/pt_not-a-real-token-at-all/v1/messages", 401, "Unknown proxy token"),
    ("/tok/v1/messages", 401, None),
    ("/dev-1/v1/%2e%2e/admin", 400, "Path may not contain . or .. segments"),
    ("/dev-1/v1//x", 400, "Path may not contain empty segments (//)"),
])
def test_a_path_the_proxy_refuses_gets_its_status_in_anthropic_shape(client, upstream, path, status, message):
    assert_error(client.post(path, json={}), status, message=message)
    assert not upstream.calls


@pytest.mark.parametrize("method", ["PROPFIND", "TRACE", "CONNECT"])
def test_a_method_aspy_does_not_forward_gets_405_naming_the_allowed_ones(client, upstream, method):
    r = client.open("/dev-1/v1/messages", method=method)
    assert_error(r, 405, "invalid_request_error")
    assert "POST" in r.headers["Allow"]
    assert not upstream.calls


def test_a_body_over_32_mib_gets_413(client, upstream):
    r = client.post("/dev-1/v1/messages", data=b"{}", environ_overrides={"CONTENT_LENGTH": str(40 << 20)})
    assert "33554432 bytes" in assert_error(r, 413, "request_too_large")
    assert not upstream.calls


def test_a_transfer_coding_other_than_chunked_gets_400(client, upstream):
    r = client.post("/dev-1/v1/messages", data=b"{}", environ_overrides={"HTTP_TRANSFER_ENCODING": "gzip, chunked"})
    assert_error(r, 400, "invalid_request_error")
    assert not upstream.calls


@pytest.mark.parametrize("failure, status, kind, message", [
    (requests.ConnectionError(), 502, "upstream_error", "Upstream unreachable"),
    (requests.exceptions.ConnectTimeout(), 502, "upstream_error", "Upstream unreachable"),
    (requests.exceptions.ReadTimeout(), 504, "timeout_error", None),
])
def test_an_upstream_that_fails_gets_its_status_in_anthropic_shape(client, upstream, failure, status, kind, message):
    upstream.add(responses.POST, f"{FAKE_UPSTREAM}/v1/messages", body=failure)
    assert_error(client.post("/dev-1/v1/messages", json={}), status, kind, message)


# The API (aspy/api.py).

@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": f"Basic {API_TOKEN}"},
    {"Authorization": API_TOKEN}, {"x-api-key": API_TOKEN},
])
def test_the_api_without_its_token_gets_401(client, headers):
    assert_error(client.get("/api/stats", headers=headers), 401, "authentication_error",
                 "This API needs Authorization: Bearer <api_token> (or a client's proxy token)")


@pytest.mark.parametrize("method, path, kwargs, status, message", [
    ("GET", "/api/stats?client=dev-1", {"headers": {"Authorization": f"Bearer {TOKEN}"}}, 403,
     "This token can only read its own client's data"),
    ("POST", "/api/session/start", {"headers": {"Authorization": f"Bearer {TOKEN}"},
                                    "json": {"client": "dev-1", "session_id": "s"}}, 403,
     "This token can only start sessions for its own client"),
    ("GET", "/api/nothing", {"headers": AUTH}, 404, "No API endpoint /api/nothing"),
    ("GET", "/api/stats?client=nobody", {"headers": AUTH}, 404, "Unknown client 'nobody'"),
    ("GET", "/api/stats?session=nobody", {"headers": AUTH}, 404, "Unknown session 'nobody'"),
    ("POST", "/api/session/end", {"headers": AUTH, "json": {"session_id": "nobody"}}, 404, "Unknown session 'nobody'"),
    ("POST", "/api/search", {"headers": AUTH, "data": b"{not json", "content_type": "application/json"}, 400,
     "the body must be a JSON object"),
    ("POST", "/api/search", {"headers": AUTH, "json": ["keyword"]}, 400, "the body must be a JSON object"),
    ("POST", "/api/search", {"headers": AUTH, "json": {}}, 400, "keyword is required"),
    ("GET", "/api/events?limit=0", {"headers": AUTH}, 400, "limit must be between 1 and 500"),
    ("GET", "/api/events?type=nope", {"headers": AUTH}, 400, None),
    ("GET", "/api/usage?tz=Nowhere/Land", {"headers": AUTH}, 400, None),
])
def test_an_api_refusal_gets_its_status_in_anthropic_shape(client, method, path, kwargs, status, message):
    assert_error(client.open(path, method=method, **kwargs), status, message=message)


def test_an_unknown_api_method_gets_405(client):
    assert_error(client.open("/api/stats", method="TRACE", headers=AUTH), 405, "invalid_request_error")


def test_a_store_failure_in_the_api_gets_503_without_the_stores_password(app, client, monkeypatch):
    def fail(*args):
        raise StoreError("cannot reach postgresql://aspy:hunter2-password@db.internal/aspy")

    monkeypatch.setattr(app.extensions["aspy.store"], "totals", fail)
    message = assert_error(client.get("/api/stats", headers=AUTH), 503, "api_error")
    assert message.startswith("The store is unavailable: cannot reach postgresql://aspy:…@db.internal")
    assert "hunter2" not in message


# /metrics, /dashboard and /health.

@pytest.mark.parametrize("headers, status, kind", [
    ({}, 401, "authentication_error"),
    ({"Authorization": "Bearer wrong-token-0123456789"}, 401, "authentication_error"),
    ({"Authorization": f"Bearer {TOKEN}"}, 403, "permission_error"),
])
def test_metrics_without_the_api_token_are_refused(client, headers, status, kind):
    assert_error(client.get("/metrics", headers=headers), status, kind)


def test_metrics_with_the_api_token_answer_prometheus_text(client):
    r = client.get("/metrics", headers=AUTH)
    assert r.status_code == 200 and r.content_type.startswith("text/plain")


def test_metrics_a_worker_cannot_keep_get_503(app, client, monkeypatch):
    monkeypatch.setitem(app.extensions, "aspy.metrics", None)
    assert_error(client.get("/metrics", headers=AUTH), 503, "api_error")


@pytest.mark.parametrize("path", ["/dashboard/nothing", "/dashboard/static/nothing.js", "/dashboard/static/../x"])
def test_an_unknown_dashboard_path_gets_404_in_anthropic_shape_with_the_pages_headers(client, path):
    r = client.get(path)
    assert_error(r, 404, "not_found_error")
    assert r.headers["Content-Security-Policy"].startswith("default-src 'none'")


def test_the_dashboards_trailing_slash_still_redirects(client):
    r = client.get("/dashboard/")
    assert r.status_code == 302 and r.headers["Location"].endswith("/dashboard")


@pytest.mark.parametrize("method, path", [
    ("POST", "/health"), ("DELETE", "/health"), ("POST", "/metrics"), ("PUT", "/dashboard"),
    ("DELETE", "/api/clients"), ("PATCH", "/api/search"), ("PROPFIND", "/health"), ("TRACE", "/dashboard"),
])
def test_a_wrong_method_on_any_blueprint_gets_4xx_in_anthropic_shape(client, upstream, method, path):
    r = client.open(path, method=method, headers=AUTH)
    assert 400 <= r.status_code < 500
    assert_error(r, r.status_code)
    assert not upstream.calls


def test_health_answers_json_without_a_token(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json["status"] in ("ok", "degraded")


# What Werkzeug raises itself, and what nobody expected.

def test_a_body_werkzeug_cannot_decode_as_json_gets_400(client):
    assert_error(client.post("/_probe/json", data=b"{oops", content_type="application/json"), 400,
                 "invalid_request_error")


def test_a_body_that_is_not_json_where_json_is_wanted_gets_415(client):
    assert_error(client.post("/_probe/json", data=b"x", content_type="text/plain"), 415, "invalid_request_error")


def test_a_body_over_werkzeugs_limit_gets_413(client):
    assert_error(client.post("/_probe/data", data=b"x" * 2000), 413, "request_too_large")


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 410, 413, 415, 422, 429, 500, 501, 502, 503, 504])
def test_any_http_error_werkzeug_raises_gets_anthropics_type_for_its_status(client, status):
    assert_error(client.get(f"/_probe/abort/{status}"), status, ERROR_TYPES.get(status, error_type(status)))


@pytest.mark.parametrize("kind", ["gunicorn", "reset"])
def test_a_request_body_that_broke_off_gets_400(client, kind):
    assert_error(client.get(f"/_probe/broken/{kind}"), 400, "invalid_request_error",
                 "The request body broke off or its chunked framing is invalid")


def test_an_unexpected_error_gets_500_and_is_logged_without_its_token(client, aspy_log):
    r = client.get(f"/_probe/boom/{TOKEN}/x")
    assert_error(r, 500, "api_error", "aspy failed to handle this request; see its log")
    assert KEY not in r.text
    [record] = [r for r in aspy_log.records if r.name == "aspy.errors"]
    assert record.getMessage() == "unexpected error answering GET /_probe/boom/pt_…/x"


def test_an_unexpected_error_in_the_proxy_gets_500_and_is_logged_without_its_token(client, upstream, aspy_log,
                                                                                    monkeypatch):
    def broken(environ, drop_credentials):
        raise RuntimeError("planted fault forwarding")

    monkeypatch.setattr(aspy.proxy, "forward_headers", broken)
    assert_error(client.post(f"/{TOKEN}/v1/messages", json={}), 500, "api_error")
    assert "unexpected error answering POST /pt_…/v1/messages" in aspy_log.text
    assert TOKEN not in aspy_log.text
    assert not upstream.calls


# No secret in any message.

@pytest.mark.parametrize("method, path, headers", [
    ("POST", f"/{KEY}/v1/messages", {}),
    ("POST", f"/{API_TOKEN}/v1/messages", {"Authorization": f"Bearer {API_TOKEN}"}),
    ("GET", f"/api/stats?client={KEY}", AUTH),
    ("GET", f"/api/stats?client={API_TOKEN}", AUTH),
    ("GET", f"/api/stats?session={TOKEN}", AUTH),
    ("GET", f"/api/nothing/{TOKEN}", AUTH),
    ("GET", f"/api/nothing/{API_TOKEN}", AUTH),
    ("GET", "/api/stats?client=basic-secret-in-the-header", {**AUTH, "x-api-key": "basic-secret-in-the-header"}),
    ("GET", "/api/stats?client=my-own-credential-0001", {"Authorization": "Bearer my-own-credential-0001"}),
    ("GET", "/dashboard/nothing-my-own-credential-0001", {"Authorization": "Basic my-own-credential-0001"}),
])
def test_no_message_carries_a_secret(client, upstream, method, path, headers):
    r = client.open(path, method=method, headers=headers)
    message = assert_error(r, r.status_code)
    for secret in (KEY, API_TOKEN, TOKEN, TOKEN[3:], "basic-secret-in-the-header", "my-own-credential-0001"):
        assert secret not in message, message


def test_gunicorns_own_error_answers_carry_no_token():
    from aspy.worker import write_error

    ours, theirs = socket.socketpair()
    with ours, theirs:
        write_error(ours, 400, "Bad Request", f"Invalid HTTP request line: 'GET /{TOKEN}/v1/messages HTTP/1.1 x'")
        answer = theirs.recv(65536)
    assert TOKEN.encode() not in answer and b"/pt_\\u2026/v1/messages" in answer


@pytest.mark.parametrize("text, expected", [
    (f"Unknown client {KEY!r}", "Unknown client 'sk-ant-…'"),
    (f"No API endpoint /api/{TOKEN}/x", "No API endpoint /api/pt_…/x"),
    ("cannot reach postgresql://aspy:s3cret@db/aspy", "cannot reach postgresql://aspy:…@db/aspy"),
    ("Unknown client 'dev-1'", "Unknown client 'dev-1'"),
])
def test_secrets_are_taken_out_of_a_message_even_outside_a_request(text, expected):
    assert without_secrets(text) == expected
