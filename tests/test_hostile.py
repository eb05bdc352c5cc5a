"""Hostile input (SPEC 2, 5, 6): what a broken or malicious client sends never reaches the upstream
half-done, never gets an HTML page or a traceback, and never puts a proxy token in the log.

Framing is tested end to end (raw sockets against aspy under gunicorn with gevent workers);
the API's answers to any input are tested with Hypothesis through Flask's test client.
"""
from __future__ import annotations

import gzip
import http.client
import json
import socket
import uuid

import requests

from test_sessions_api import eventually

MESSAGE = json.dumps({"model": "claude-sonnet-4-5-20250929", "max_tokens": 8,
                      "messages": [{"role": "user", "content": "hello"}]}).encode()


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
