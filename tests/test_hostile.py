"""Hostile input (SPEC 2, 5, 6): what a broken or malicious client sends never reaches the upstream
half-done, never gets an HTML page or a traceback, and never puts a proxy token in the log.

Framing is tested end to end (raw sockets against aspy under gunicorn with gevent workers);
the API's answers to any input are tested with Hypothesis through Flask's test client.
"""
from __future__ import annotations

import gzip
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import MESSAGE, ROOT, eventually, free_port, standard_config, wait_for_health

BODY = json.dumps(MESSAGE).encode()
TOKEN = "pt_HostileTestToken0123456789abcdefXY"


def send_raw(port: int, head: str, body: bytes = b"", then: str = "half-close") -> socket.socket:
    """Send a request's head and (part of) a body as they are; then half-close, or hang up at once."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
    if then == "hang-up":
        sock.close()
    else:
        sock.shutdown(socket.SHUT_WR)
    return sock


def answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read the answer to a raw request: status, headers (lowercase names), body."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    sock.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def assert_anthropic_shape(status: int, headers: dict[str, str], body: bytes, expected: int, kind: str) -> str:
    """Check an answer aspy made itself: its status, JSON in Anthropic's error shape; return the message."""
    assert status == expected, body[:300]
    assert headers["content-type"] == "application/json", body[:300]
    error = json.loads(body)
    assert error["type"] == "error" and error["error"]["type"] == kind
    return error["error"]["message"]


def head(method: str, target: str, session: str, *lines: str) -> str:
    """Return a request head with a session key of its own."""
    return "\n".join([f"{method} {target} HTTP/1.1", "Host: x", "Content-Type: application/json",
                      f"x-claude-code-session-id: {session}", *lines]) + "\n"


def recorded_as_failed(aspy, session: str) -> dict:
    """Wait until the session's one exchange is recorded; return its requests figures."""
    stats = eventually(lambda: (r := requests.get(f"{aspy.url}/api/stats", params={"session": session})).ok
                       and r.json()["requests"]["total"] >= 1 and r.json())
    return stats["requests"]


def test_a_body_shorter_than_its_content_length_is_never_forwarded(aspy, upstream):
    session = f"hostile-{uuid.uuid4()}"
    before = len(upstream.requests)
    send_raw(aspy.port, head("POST", "/dev-1/v1/messages", session, "Content-Length: 100055"),
             b"x" * 50_000, then="hang-up")
    assert recorded_as_failed(aspy, session) == {"total": 1, "failed": 1}
    assert len(upstream.requests) == before


def test_a_body_shorter_than_its_content_length_gets_400_in_anthropic_shape(aspy, upstream):
    before = len(upstream.requests)
    sock = send_raw(aspy.port, head("POST", "/dev-1/v1/messages", f"hostile-{uuid.uuid4()}",
                                    "Content-Length: 100055"), b"x" * 50_000)
    message = assert_anthropic_shape(*answer(sock), 400, "invalid_request_error")
    assert "50000 of its declared 100055 bytes" in message
    assert len(upstream.requests) == before


def test_a_chunked_body_cut_off_is_never_forwarded(aspy, upstream):
    session = f"hostile-{uuid.uuid4()}"
    before = len(upstream.requests)
    sock = send_raw(aspy.port, head("POST", "/dev-1/v1/messages", session, "Transfer-Encoding: chunked"),
                    b"%x\r\n%s\r\n" % (len(BODY), BODY) + b"4000\r\n" + b"a" * 1000)
    assert_anthropic_shape(*answer(sock), 400, "invalid_request_error")
    assert recorded_as_failed(aspy, session) == {"total": 1, "failed": 1}
    assert len(upstream.requests) == before


def test_a_chunked_body_with_a_bad_chunk_size_gets_400_not_a_traceback(aspy, upstream):
    before = len(upstream.requests)
    sock = send_raw(aspy.port, head("POST", "/dev-1/v1/messages", f"hostile-{uuid.uuid4()}",
                                    "Transfer-Encoding: chunked"), b"zz\r\nhello\r\n0\r\n\r\n")
    assert_anthropic_shape(*answer(sock), 400, "invalid_request_error")
    assert len(upstream.requests) == before


def test_a_chunked_body_cut_off_on_the_way_to_the_api_gets_400(aspy):
    sock = send_raw(aspy.port, "POST /api/search HTTP/1.1\nHost: x\nContent-Type: application/json\n"
                               "Transfer-Encoding: chunked\n", b'40\r\n{"keyword": "he')
    assert_anthropic_shape(*answer(sock), 400, "invalid_request_error")


def test_a_request_transfer_coding_other_than_chunked_is_refused(aspy, upstream):
    session = f"hostile-{uuid.uuid4()}"
    before = len(upstream.requests)
    packed = gzip.compress(BODY)
    sock = send_raw(aspy.port, head("POST", "/dev-1/v1/messages", session, "Transfer-Encoding: gzip, chunked"),
                    b"%x\r\n%s\r\n0\r\n\r\n" % (len(packed), packed))
    message = assert_anthropic_shape(*answer(sock), 400, "invalid_request_error")
    assert "gzip" in message
    assert recorded_as_failed(aspy, session) == {"total": 1, "failed": 1}
    assert len(upstream.requests) == before


@pytest.mark.parametrize("framing", [
    "Content-Length: 5\nTransfer-Encoding: chunked", "Transfer-Encoding: chunked, gzip", "Content-Length: 12abc",
    "Content-Length: 5\nContent-Length: 6", "Transfer-Encoding: x-unknown",
])
def test_framing_that_gunicorn_refuses_is_answered_in_anthropic_shape(aspy, upstream, framing):
    before = len(upstream.requests)
    sock = send_raw(aspy.port, head("POST", "/dev-1/v1/messages", "x", framing), b"0\r\n\r\n")
    status, headers, body = answer(sock)
    assert status in (400, 501) and headers["content-type"] == "application/json", body[:300]
    assert json.loads(body)["type"] == "error"
    assert len(upstream.requests) == before


@pytest.mark.parametrize("method", ["TRACE", "PROPFIND"])
def test_a_method_aspy_does_not_forward_gets_405_in_anthropic_shape(aspy, upstream, method):
    before = len(upstream.requests)
    sock = send_raw(aspy.port, head(method, "/dev-1/v1/messages", "x", "Connection: close"))
    status, headers, body = answer(sock)
    assert_anthropic_shape(status, headers, body, 405, "invalid_request_error")
    assert "POST" in headers["allow"]
    assert len(upstream.requests) == before


@pytest.mark.parametrize("path, status, kind", [
    ("/dev-1/v1/%0d%0aX-Injected:%20yes", 400, "invalid_request_error"),
    ("/dev-1/v1/messages%0a", 400, "invalid_request_error"),
    ("/%0d%0a", 404, "not_found_error"),  # no such client
])
def test_a_cr_or_lf_in_the_path_is_answered_in_anthropic_shape(aspy, upstream, path, status, kind):
    before = len(upstream.requests)
    sock = send_raw(aspy.port, head("GET", path, "x", "Connection: close"))
    assert_anthropic_shape(*answer(sock), status, kind)
    assert len(upstream.requests) == before


# A gunicorn configuration file: the shipped one with gunicorn's access log on, plus faults
# planted in each worker once its app is loaded, so that an unexpected error happens on a
# proxy-token path.
FAULTY_GUNICORN_CONF = f"""
exec(open({str(ROOT / "conf" / "gunicorn.conf.py")!r}).read())
accesslog = "-"


def post_worker_init(worker):
    import aspy.proxy

    forward_headers, observer_for = aspy.proxy.forward_headers, aspy.proxy.observer_for

    def broken_forward_headers(environ, drop_credentials):
        if "HTTP_X_BREAK_VIEW" in environ:
            raise RuntimeError("planted fault forwarding " + environ["RAW_URI"])
        return forward_headers(environ, drop_credentials)

    def broken_observer_for(content_type, *rest):
        if content_type == "application/x-break":
            raise RuntimeError("planted fault relaying")
        return observer_for(content_type, *rest)

    aspy.proxy.forward_headers = broken_forward_headers
    aspy.proxy.observer_for = broken_observer_for
"""


@pytest.fixture
def faulty_aspy(upstream, tmp_path):
    """aspy under gunicorn with the shipped settings, a client with a proxy token, and planted faults."""
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(standard_config(upstream.url, f'\n[clients.tok]\nname = "Token client"\nprovider = "fake"\n'
                                                    f'proxy_token = "{TOKEN}"\n')
                      .replace("[server]\n", f'[server]\nlisten = "127.0.0.1:{port}"\n'))
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(FAULTY_GUNICORN_CONF)
    log = tmp_path / "aspy.log"
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(conf)], cwd=ROOT,
                            env={**os.environ, "ASPY_CONFIG": str(config), "XDG_STATE_HOME": str(tmp_path)},
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_for_health(url, proc)
    yield url, log
    proc.send_signal(signal.SIGINT)
    proc.wait(15)


def test_an_unexpected_error_on_a_token_path_is_json_and_never_logs_the_token(faulty_aspy):
    url, log = faulty_aspy
    r = requests.post(f"{url}/{TOKEN}/v1/files", data=b"x", headers={"x-break-view": "1"})
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["type"] == "api_error"
    eventually(lambda: "planted fault forwarding" in log.read_text() and '"POST /pt_…/v1/files' in log.read_text())
    text = log.read_text()
    assert TOKEN not in text and TOKEN[3:] not in text
    assert "unexpected error answering POST /pt_…/v1/files" in text


def test_an_error_while_relaying_on_a_token_path_is_json_and_never_logs_the_token(faulty_aspy):
    url, log = faulty_aspy
    # The fault comes before the response's first byte: gunicorn answers it, as aspy would.
    r = requests.post(f"{url}/{TOKEN}/v1/files", data=b"x", headers={
        "x-fake-status": "200", "x-fake-body": "{}", "x-fake-content-type": "application/x-break"})
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["type"] == "api_error"
    eventually(lambda: "planted fault relaying" in log.read_text())
    text = log.read_text()
    assert TOKEN not in text and TOKEN[3:] not in text


# The API's answers to anything: every one is JSON, errors in Anthropic's shape, none a 5xx.

API_TOKEN = "api-token-for-hostile-tests"
ENDPOINTS = [("GET", "/api/stats"), ("GET", "/api/events"), ("GET", "/api/context"), ("GET", "/api/sessions"),
             ("GET", "/api/clients"), ("GET", "/api/in_flight"), ("POST", "/api/session/start"),
             ("POST", "/api/session/end"), ("POST", "/api/search"), ("PUT", "/api/search"), ("DELETE", "/api/sessions"),
             ("GET", "/api/nothing")]
# The POST endpoints read the most input: they get most of the examples.
ENDPOINTS += [e for e in ENDPOINTS if e[0] == "POST"] * 2
FIELDS = ["keyword", "role", "time_range", "client", "user", "session", "session_id", "source", "reason",
          "limit", "since", "until", "status", "type"]
# Any code point, lone surrogates and NUL included, and the values the API knows.
TEXT = st.one_of(st.text(st.characters(exclude_categories=()), max_size=20),
                 st.sampled_from(["dev-1", "anonymous", "0123456789abcdef", "today", "user", "assistant",
                                  "active", "2025-01-01T00:00:00Z", "\ud800", "\x00", "hello", "50", ""]))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=8)
# A valid body per endpoint and the fields it reads: a fault in any one field is then reached,
# not only in the first one checked.
VALID_BODIES = {"/api/search": {"keyword": "hello"}, "/api/session/start": {"client": "dev-1", "session_id": "hyp"},
                "/api/session/end": {"session_id": "hyp"}}
FIELDS_OF = {"/api/search": ["keyword", "role", "time_range", "client", "user", "session", "limit"],
             "/api/session/start": ["client", "user", "session_id", "source"],
             "/api/session/end": ["session_id", "reason"]}
QUERIES = st.dictionaries(st.sampled_from(FIELDS), TEXT, max_size=3).map(
    lambda q: "&".join(f"{k}={quote(v.encode('utf-8', 'surrogatepass'), safe='')}" for k, v in q.items()))
# Mostly the API token, so that most examples get past authorization.
AUTHORIZATION = st.sampled_from([f"Bearer {API_TOKEN}"] * 8
                                + [f"Bearer {TOKEN}", None, "Bearer pt_wrong", "Basic \xe9"])


def bodies(path: str) -> st.SearchStrategy[bytes]:
    """Any bytes, any JSON, or the endpoint's valid body with one field set to anything."""
    valid_but = st.tuples(st.sampled_from(FIELDS_OF.get(path, FIELDS)), JSON).map(
        lambda field: json.dumps(VALID_BODIES.get(path, {}) | dict([field])).encode())
    # Listed twice: half of the bodies are valid but for one field.
    return st.one_of(st.binary(max_size=200), JSON.map(lambda v: json.dumps(v).encode()), valid_but, valid_but)


@pytest.fixture(scope="module")
def api_client(store_kind, tmp_path_factory, postgres_databases, model_table):
    """Flask's test client on an app with an API token and a proxy-token client, on SQLite or PostgreSQL."""
    from aspy import create_app
    from aspy.config import parse_config

    url = (f"sqlite:///{tmp_path_factory.mktemp('hostile-api') / 'aspy.db'}" if store_kind == "sqlite"
           else postgres_databases.take())
    config = parse_config({
        "server": {"api_token": API_TOKEN}, "store": {"url": url},
        "providers": {"fake": {"base_url": "http://127.0.0.1:9"}},
        "clients": {"dev-1": {"name": "Dev", "provider": "fake"},
                    "tok": {"name": "Token client", "provider": "fake", "proxy_token": TOKEN}},
    }, None)
    app = create_app(config, {"TESTING": True}, models=model_table)
    yield app.test_client()
    if store_kind == "postgresql":
        app.extensions["aspy.store"].close()
        postgres_databases.give_back(url)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(endpoint=st.sampled_from(ENDPOINTS), query=QUERIES, authorization=AUTHORIZATION, data=st.data())
def test_the_api_answers_any_input_with_json_in_anthropic_shape_never_5xx(api_client, endpoint, query,
                                                                          authorization, data):
    method, path = endpoint
    body = data.draw(bodies(path), label="body")
    headers = {"Authorization": authorization} if authorization is not None else {}
    r = api_client.open(path, method=method, data=body, headers=headers, content_type="application/json",
                        environ_overrides={"QUERY_STRING": query})
    assert r.status_code < 500, r.data[:300]
    assert r.content_type == "application/json", r.data[:300]
    answer = json.loads(r.data)
    if r.status_code >= 400:
        assert answer["type"] == "error"
        assert isinstance(answer["error"]["type"], str) and isinstance(answer["error"]["message"], str)


@pytest.mark.parametrize("path, body", [
    ("/api/search", {"keyword": "hello", "time_range": ["today"]}),
    ("/api/search", {"keyword": "hello", "client": ["dev-1"]}),
    ("/api/search", {"keyword": "hello", "client": {"id": "dev-1"}}),
    ("/api/search", {"keyword": "hello", "session": ["x"]}),
    ("/api/search", {"keyword": "hello", "session": "\ud800"}),
    ("/api/search", {"keyword": "hello", "session": "a\x00"}),
    ("/api/session/start", {"client": "dev-1", "session_id": "\ud800"}),
    ("/api/session/start", {"client": "dev-1", "session_id": "ok", "source": "\udfff"}),
    ("/api/session/end", {"session_id": "\ud800"}),
    ("/api/session/end", {"session_id": "x\x00y"}),
])
def test_the_api_refuses_wrong_types_and_unstorable_text_with_400(api_client, path, body):
    r = api_client.post(path, data=json.dumps(body), content_type="application/json",
                        headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert r.status_code == 400 and r.content_type == "application/json", r.data[:300]
    assert r.json["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("query", ["session=x%00y", "client=dev-1%00"])
@pytest.mark.parametrize("path", ["/api/stats", "/api/sessions", "/api/events", "/api/context"])
def test_a_nul_in_a_filter_gets_400_never_a_store_error(api_client, path, query):
    # PostgreSQL refuses NUL in text: the store was blamed (503) for the caller's input.
    r = api_client.get(path, headers={"Authorization": f"Bearer {API_TOKEN}"},
                       environ_overrides={"QUERY_STRING": query})
    assert r.status_code == 400 and r.json["error"]["type"] == "invalid_request_error", r.data[:300]


def test_a_body_nested_100k_deep_gets_400(api_client):
    r = api_client.post("/api/search", data=b"[" * 100_000, content_type="application/json",
                        headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert r.status_code == 400 and r.json["error"]["message"] == "the body is nested too deeply"
