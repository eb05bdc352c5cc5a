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

import pytest
import requests

from conftest import ROOT, free_port, standard_config, wait_for_health
from test_sessions_api import eventually

MESSAGE = json.dumps({"model": "claude-sonnet-4-5-20250929", "max_tokens": 8,
                      "messages": [{"role": "user", "content": "hello"}]}).encode()
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
    """Return a request head for dev-1 with a session key of its own."""
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
                    b"%x\r\n%s\r\n" % (len(MESSAGE), MESSAGE) + b"4000\r\n" + b"a" * 1000)
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
    packed = gzip.compress(MESSAGE)
    sock = send_raw(aspy.port, head("POST", "/dev-1/v1/messages", session, "Transfer-Encoding: gzip, chunked"),
                    b"%x\r\n%s\r\n0\r\n\r\n" % (len(packed), packed))
    message = assert_anthropic_shape(*answer(sock), 400, "invalid_request_error")
    assert "gzip" in message
    assert recorded_as_failed(aspy, session) == {"total": 1, "failed": 1}
    assert len(upstream.requests) == before


@pytest.mark.parametrize("method", ["TRACE", "PROPFIND"])
def test_a_method_aspy_does_not_forward_gets_405_in_anthropic_shape(aspy, upstream, method):
    before = len(upstream.requests)
    sock = send_raw(aspy.port, head(method, "/dev-1/v1/messages", "x", "Connection: close"))
    status, headers, body = answer(sock)
    assert_anthropic_shape(status, headers, body, 405, "invalid_request_error")
    assert "POST" in headers["allow"]
    assert len(upstream.requests) == before


@pytest.mark.parametrize("path", ["/dev-1/v1/%0d%0aX-Injected:%20yes", "/dev-1/v1/messages%0a", "/%0d%0a"])
def test_a_cr_or_lf_in_the_path_is_answered_in_anthropic_shape(aspy, upstream, path):
    before = len(upstream.requests)
    sock = send_raw(aspy.port, head("GET", path, "x", "Connection: close"))
    status, headers, body = answer(sock)
    kind = "not_found_error" if path == "/%0d%0a" else "invalid_request_error"
    assert_anthropic_shape(status, headers, body, 404 if path == "/%0d%0a" else 400, kind)
    assert len(upstream.requests) == before


# A gunicorn configuration file: the shipped one, plus faults planted in each worker once its
# app is loaded, so that an unexpected error happens on a proxy-token path.
FAULTY_GUNICORN_CONF = f"""
exec(open({str(ROOT / "conf" / "gunicorn.conf.py")!r}).read())


def post_worker_init(worker):
    import aspy.proxy

    forward_headers = aspy.proxy.forward_headers

    def broken_forward_headers(environ, drop_credentials):
        if "HTTP_X_BREAK_VIEW" in environ:
            raise RuntimeError("planted fault forwarding " + environ["RAW_URI"])
        return forward_headers(environ, drop_credentials)

    aspy.proxy.forward_headers = broken_forward_headers
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
    eventually(lambda: "planted fault forwarding" in log.read_text())
    text = log.read_text()
    assert TOKEN not in text and TOKEN[3:] not in text
    assert "/pt_…/v1/files" in text
