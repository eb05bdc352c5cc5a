"""Forwarding (SPEC 2), end to end: aspy under gunicorn + gevent, a real fake upstream."""
from __future__ import annotations

import gzip
import http.client
import json
import os
import socket
import time
import uuid

import pytest
import requests

from helpers import API_KEY, FIXTURES, MESSAGE, assert_anthropic_error, eventually, standard_config


def raw_request(port: int, method: str, target: str, headers: list[tuple[str, str]],
                body: bytes = b"") -> http.client.HTTPResponse:
    """Send a request with exactly these headers (http.client adds only Host)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest(method, target, skip_accept_encoding=True)
    for name, value in headers:
        conn.putheader(name, value)
    if body:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body or None)
    return conn.getresponse()


def test_client_segment_routes_to_its_provider(aspy, upstream):
    r = requests.post(f"{aspy.url}/dev-1/v1/messages", json=MESSAGE)
    assert r.status_code == 200
    assert r.json()["content"][0]["text"] == "Hello from the fake upstream."
    assert upstream.last().target == "/v1/messages"


def test_provider_base_path_is_joined_with_the_rest(aspy, upstream):
    r = requests.get(f"{aspy.url}/dev-2/v1/models/claude-x")
    assert r.status_code == 200
    assert upstream.last().target == "/base/path/v1/models/claude-x"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_any_method_is_forwarded(aspy, upstream, method):
    r = requests.request(method, f"{aspy.url}/dev-1/v1/files/f1", data=b"x" if method != "GET" else None)
    assert r.status_code == 200
    assert upstream.last().method == method


def test_head_is_forwarded(aspy, upstream):
    r = requests.head(f"{aspy.url}/dev-1/v1/files/f1")
    assert r.status_code == 200
    assert upstream.last().method == "HEAD"


def test_query_string_is_kept_as_it_is(aspy, upstream):
    query = "beta=true&a=1&a=2&b=%20x%2Fy&empty="
    requests.get(f"{aspy.url}/dev-1/v1/models?{query}")
    assert upstream.last().target == f"/v1/models?{query}"


def test_body_bytes_are_forwarded_unchanged(aspy, upstream):
    body = bytes(range(256)) * 300 + "héllo \u2603".encode() + b'{"not": json'
    r = requests.post(f"{aspy.url}/dev-1/v1/files", data=body,
                      headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200
    assert upstream.last().body == body


def test_json_body_is_not_re_encoded(aspy, upstream):
    body = b'{ "model" : "claude-x",\n  "messages":[],   "max_tokens": 1, "k": "\\u00e9" }'
    requests.post(f"{aspy.url}/dev-1/v1/messages", data=body, headers={"content-type": "application/json"})
    assert upstream.last().body == body


def test_request_headers_are_forwarded_except_hop_by_hop(aspy, upstream):
    response = raw_request(aspy.port, "POST", "/dev-1/v1/messages", [
        ("Content-Type", "application/json"), ("X-Api-Key", API_KEY),
        ("anthropic-version", "2023-06-01"), ("anthropic-beta", "context-1m-2025-08-07"),
        ("X-Custom", "kept"), ("Accept-Encoding", "gzip, br"), ("Connection", "keep-alive, x-private"),
        ("X-Private", "dropped"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"),
        ("Proxy-Authorization", "Basic abc"), ("Upgrade", "h2c"), ("Trailer", "x-t"),
    ], json.dumps(MESSAGE).encode())
    response.read()
    seen = upstream.last().headers
    assert seen["x-custom"] == "kept"
    assert seen["x-api-key"] == API_KEY
    assert seen["anthropic-version"] == "2023-06-01"
    assert seen["anthropic-beta"] == "context-1m-2025-08-07"
    assert seen["content-type"] == "application/json"
    assert seen["host"] == f"127.0.0.1:{upstream.port}"
    assert seen["accept-encoding"] == "identity"
    for name in ("x-private", "keep-alive", "te", "proxy-authorization", "upgrade", "trailer"):
        assert name not in seen, name
    assert seen.get("connection", "keep-alive").lower() == "keep-alive"
    assert seen["content-length"] == str(len(json.dumps(MESSAGE)))


def test_response_status_and_headers_come_back_except_excluded(aspy, upstream):
    response = raw_request(aspy.port, "POST", "/dev-1/v1/messages",
                           [("Content-Type", "application/json")], json.dumps(MESSAGE).encode())
    body = response.read()
    headers = {k.lower(): v for k, v in response.getheaders()}
    assert response.status == 200
    assert headers["request-id"] == "req_fake_1"
    assert headers["anthropic-ratelimit-tokens-limit"] == "400000"
    assert headers["x-fake-seen"] == "1"
    assert headers["content-type"] == "application/json"
    # The upstream's Content-Length is not relayed: the body goes out chunked.
    assert "content-length" not in headers
    assert headers["transfer-encoding"] == "chunked"
    assert json.loads(body)["type"] == "message"


def test_a_response_without_content_type_gets_none_added(aspy):
    r = requests.post(f"{aspy.url}/dev-1/v1/messages", json=MESSAGE,
                      headers={"x-fake-status": "204", "x-fake-body": "", "x-fake-content-type": "none"})
    assert r.status_code == 204 and r.content == b""
    assert "content-type" not in r.headers


def test_bedrock_event_stream_is_relayed_byte_for_byte_and_observed(aspy):
    name = "bedrock/bedrock_sso_proxy_stream-out.bin"
    session = f"bedrock-{uuid.uuid4()}"
    r = requests.post(f"{aspy.url}/dev-1/model/anthropic.claude-sonnet-4-20250514-v1:0/invoke-with-response-stream",
                      json=MESSAGE, headers={"x-fake-file": name, "x-claude-code-session-id": session,
                                             "x-fake-content-type": "application/vnd.amazon.eventstream"})
    assert r.status_code == 200 and r.headers["x-accel-buffering"] == "no"
    assert r.content == (FIXTURES / "real" / name).read_bytes()
    # The frames carry a claude-sonnet-4 answer: 17 tokens in, 322 out, at $3 and $15 per million.
    stats = eventually(lambda: (s := requests.get(f"{aspy.url}/api/stats", params={"session": session})).ok
                       and s.json()["requests"]["total"] == 1 and s.json())
    assert stats["tokens"]["input"] == 17 and stats["tokens"]["output"] == 322
    cost = pytest.approx((17 * 3 + 322 * 15) / 1e6, abs=1e-12)
    assert stats["cost"]["by_model"] == {"claude-sonnet-4-20250514": cost}
    assert stats["requests"]["failed"] == 0


def test_upstream_error_body_passes_through_unchanged(aspy):
    body = '{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_x"}'
    r = requests.post(f"{aspy.url}/dev-1/v1/messages", json=MESSAGE,
                      headers={"x-fake-status": "529", "x-fake-body": body})
    assert r.status_code == 529
    assert r.content == body.encode()
    assert r.headers["request-id"] == "req_fake_error"


def test_upstream_429_keeps_status_and_body(aspy):
    body = ('{"type":"error","error":{"type":"rate_limit_error",'
            '"message":"Number of request tokens has exceeded your per-minute rate limit"}}')
    r = requests.post(f"{aspy.url}/dev-1/v1/messages", json=MESSAGE,
                      headers={"x-fake-status": "429", "x-fake-body": body})
    assert r.status_code == 429 and r.text == body


def test_declared_body_over_32_mib_gets_413(aspy, upstream):
    before = len(upstream.requests)
    conn = http.client.HTTPConnection("127.0.0.1", aspy.port, timeout=30)
    conn.putrequest("POST", "/dev-1/v1/messages")
    conn.putheader("Content-Length", str(32 * 1024 * 1024 + 1))
    conn.endheaders()
    response = conn.getresponse()
    body = json.loads(response.read())
    assert response.status == 413
    assert body["error"]["type"] == "request_too_large"
    assert "32 MiB" in body["error"]["message"]
    assert len(upstream.requests) == before


def test_chunked_body_over_32_mib_gets_413(aspy, upstream):
    before = len(upstream.requests)
    sock = socket.create_connection(("127.0.0.1", aspy.port))
    sock.sendall(b"POST /dev-1/v1/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                 b"Content-Type: application/json\r\n\r\n")
    chunk = b"a" * (1024 * 1024)
    try:
        for _ in range(33):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # aspy may answer and close before the client finished sending
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = json.loads(response.read())
    sock.close()
    assert response.status == 413
    assert body["error"]["type"] == "request_too_large"
    assert len(upstream.requests) == before


def test_chunked_body_under_the_limit_is_forwarded_whole(aspy, upstream):
    body = os.urandom(3 * 1024 * 1024)
    r = requests.post(f"{aspy.url}/dev-1/v1/files", data=iter([body[:1000], body[1000:]]))
    assert r.status_code == 200
    assert upstream.last().body == body


def test_unknown_client_gets_404_naming_it(aspy):
    r = requests.post(f"{aspy.url}/nobody/v1/messages", json=MESSAGE)
    message = assert_anthropic_error(r, 404, "not_found_error")
    assert "nobody" in message


def test_unreachable_upstream_gets_502(aspy):
    r = requests.post(f"{aspy.url}/gone/v1/messages", json=MESSAGE)
    assert assert_anthropic_error(r, 502, "upstream_error") == "Upstream unreachable"


def test_upstream_too_slow_before_headers_gets_504(start_aspy, upstream):
    server = start_aspy(standard_config(upstream.url).replace('"20s"', '"1s"'))
    started = time.time()
    r = requests.post(f"{server.url}/dev-1/v1/messages", json=MESSAGE, headers={"x-fake-sleep": "3"})
    message = assert_anthropic_error(r, 504, "timeout_error")
    assert "1 seconds" in message
    assert time.time() - started < 2.9


@pytest.mark.parametrize("path", [
    "/dev-1/../v1/messages", "/dev-1/v1/../../etc/passwd", "/dev-1/%2e%2e/v1/messages",
    "/dev-1/%2E%2E%2Fv1", "/dev-1/v1/%252e%252e/x", "/dev-1//evil.example/v1/messages",
    "/dev-1/%2f%2fevil.example/v1", "/dev-1/v1\\..\\x", "/dev-1/v1/%5c..%5cx", "/dev-1/./v1",
    "/v1/../dev-1/v1/messages",
])
def test_path_escapes_are_refused(aspy, upstream, path):
    before = len(upstream.requests)
    sock = socket.create_connection(("127.0.0.1", aspy.port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    answer = sock.makefile("rb").read()
    sock.close()
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b'"invalid_request_error"' in answer
    assert len(upstream.requests) == before


def test_at_sign_in_path_stays_on_the_provider(aspy, upstream):
    r = requests.get(f"{aspy.url}/dev-2/v1/models/claude@evil.example/x")
    assert r.status_code == 200
    assert upstream.last().target == "/base/path/v1/models/claude@evil.example/x"
    assert upstream.last().headers["host"] == f"127.0.0.1:{upstream.port}"


def test_gzip_from_upstream_is_decoded_for_the_client(aspy):
    r = requests.post(f"{aspy.url}/dev-1/v1/messages", json=MESSAGE, headers={"x-fake-gzip": "1"},
                      stream=True)
    raw = r.raw.read()
    assert "content-encoding" not in r.headers
    assert json.loads(raw)["content"][0]["text"] == "Hello from the fake upstream."


def test_gzip_event_stream_is_decoded_and_relayed(aspy):
    r = requests.post(f"{aspy.url}/dev-1/v1/messages", json=MESSAGE | {"stream": True},
                      headers={"x-fake-gzip": "1", "x-fake-fixture": "llm-anthropic_tool_use_gzip_body_haiku45.sse"},
                      stream=True)
    raw = r.raw.read()
    expected = (pytest.importorskip("upstream").FIXTURES / "llm-anthropic_tool_use_haiku45_body.gzip.bin").read_bytes()
    assert raw == gzip.decompress(expected)
    assert "content-encoding" not in r.headers


def test_event_stream_gets_x_accel_buffering_no(aspy):
    r = requests.post(f"{aspy.url}/dev-1/v1/messages", json=MESSAGE | {"stream": True})
    assert r.headers["x-accel-buffering"] == "no"
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.count("event: ") == 8


def test_first_event_arrives_long_before_the_stream_ends(aspy):
    started = time.time()
    r = requests.post(f"{aspy.url}/dev-1/v1/messages", json=MESSAGE | {"stream": True},
                      headers={"x-fake-events": "10", "x-fake-delay": "300"}, stream=True)
    arrivals = []
    for line in r.iter_lines():
        if line.startswith(b"event:"):
            arrivals.append(time.time() - started)
    assert len(arrivals) == 15
    assert arrivals[-1] > 3.5
    # Events arrive as they are sent: the first long before the end, and spread out.
    assert arrivals[0] < arrivals[-1] - 3
    assert arrivals[7] - arrivals[2] > 1.2


def test_recorded_stream_is_relayed_byte_for_byte(aspy):
    name = "llm-anthropic_web_search_server_tool_opus41.sse"
    r = requests.post(f"{aspy.url}/dev-1/v1/messages", json=MESSAGE | {"stream": True},
                      headers={"x-fake-fixture": name})
    from upstream import fixture_events
    assert r.content == b"".join(fixture_events(name))


def test_streams_one_after_another_reuse_one_upstream_connection(aspy, upstream):
    # A chunked stream read to its end hands its connection back (aspy/chunked.py): the next
    # request on the same worker goes on it, and each stream still arrives whole.
    with requests.Session() as session:
        seen_before = len(upstream.requests)
        for _ in range(5):
            r = session.post(f"{aspy.url}/dev-1/v1/messages", json=MESSAGE | {"stream": True},
                             headers={"x-fake-events": "3"})
            assert r.status_code == 200 and r.text.count("event: ") == 8 and r.text.endswith("\n\n")
    peers = {seen.peer for seen in upstream.requests[seen_before:]}
    assert len(upstream.requests) - seen_before == 5 and len(peers) == 1


def test_close_delimited_stream_is_relayed_as_it_arrives(aspy):
    started = time.time()
    r = requests.post(f"{aspy.url}/dev-1/v1/messages", json=MESSAGE | {"stream": True},
                      headers={"x-fake-close-delimited": "1", "x-fake-events": "6", "x-fake-delay": "300"}, stream=True)
    arrivals = [time.time() - started for line in r.iter_lines() if line.startswith(b"event:")]
    assert r.status_code == 200 and len(arrivals) == 11
    assert arrivals[0] < arrivals[-1] - 2


def leave_a_stream(aspy, upstream, events: int, delay_ms: int, wait: float) -> float | None:
    """Start a stream, hang up after its first bytes; return how long the upstream took to see it."""
    before = len(upstream.disconnects)
    sock = socket.create_connection(("127.0.0.1", aspy.port))
    body = json.dumps(MESSAGE | {"stream": True}).encode()
    sock.sendall(b"POST /dev-1/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"x-fake-events: %d\r\nx-fake-delay: %d\r\nContent-Length: %d\r\n\r\n%s"
                 % (events, delay_ms, len(body), body))
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    left = time.time()
    sock.close()
    while len(upstream.disconnects) == before and time.time() < left + wait:
        time.sleep(0.05)
    return upstream.disconnects[-1] - left if len(upstream.disconnects) > before else None


def test_client_disconnect_closes_the_upstream(aspy, upstream):
    assert leave_a_stream(aspy, upstream, events=200, delay_ms=100, wait=5) is not None, \
        "upstream still streaming after the client left"


def test_client_disconnect_closes_a_silent_upstream_at_once(aspy, upstream):
    # The upstream is silent for 4 s between events; aspy must not wait for the next one.
    took = leave_a_stream(aspy, upstream, events=5, delay_ms=4000, wait=3.5)
    assert took is not None and took < 3


def test_broken_upstream_stream_ends_with_an_error_event(aspy):
    r = requests.post(f"{aspy.url}/dev-1/v1/messages", json=MESSAGE | {"stream": True},
                      headers={"x-fake-break": "3"})
    assert r.status_code == 200
    assert r.text.count("event: message_start") == 1
    last = r.text.strip().split("\n\n")[-1]
    assert last.startswith("event: error")
    assert json.loads(last.split("data: ", 1)[1])["error"]["type"] == "api_error"


def test_legacy_request_goes_to_the_legacy_provider(aspy, upstream):
    r = requests.post(f"{aspy.url}/v1/messages?beta=true", json=MESSAGE, headers={"x-api-key": API_KEY})
    assert r.status_code == 200
    assert upstream.last().target == "/v1/messages?beta=true"


def test_legacy_requests_can_be_disabled(start_aspy, upstream):
    server = start_aspy(standard_config(upstream.url).replace('[legacy]\n', '[legacy]\nenabled = false\n'))
    r = requests.post(f"{server.url}/v1/messages", json=MESSAGE)
    assert "client" in assert_anthropic_error(r, 404, "not_found_error")


def test_each_exchange_is_logged_without_secrets(aspy):
    requests.post(f"{aspy.url}/dev-1/v1/messages", json=MESSAGE | {"stream": True},
                  headers={"x-api-key": API_KEY, "x-fake-tool": "Read", "authorization": "Bearer sk-secret-bearer"})
    deadline = time.time() + 5
    while time.time() < deadline:
        lines = [line for line in aspy.log_text().splitlines() if "aspy.exchange" in line and '"Read"' in line]
        if lines:
            break
        time.sleep(0.05)
    record = json.loads(lines[-1].split("aspy.exchange ", 1)[1])
    assert record["client"] == "dev-1" and record["status"] == 200 and record["stream"] is True
    assert record["usage"]["output_tokens"] == 7
    assert record["usage"]["cache_creation"]["ephemeral_1h_input_tokens"] == 5
    assert record["tool_uses"] == ["Read"] and record["stop_reason"] == "tool_use"
    assert API_KEY not in aspy.log_text() and "sk-secret-bearer" not in aspy.log_text()


def test_health_answers(aspy):
    assert requests.get(f"{aspy.url}/health").json()["status"] == "ok"


def test_pieces_that_arrived_together_leave_in_one_write_and_none_waits():
    from aspy.proxy import READ_CHUNK, _coalesced

    events = [b"event: e%d\ndata: {}\n\n" % i for i in range(40)]
    # All forty came in one read from the upstream: one write to the client.
    assert list(_coalesced(iter(events), lambda: True)) == [b"".join(events)]
    # Each came on its own: each leaves at once, never held for the next.
    assert list(_coalesced(iter(events), lambda: False)) == events
    # Held pieces never exceed READ_CHUNK (plus the one that crossed it).
    big = [b"x" * (READ_CHUNK // 2 + 1)] * 5
    assert [len(p) for p in _coalesced(iter(big), lambda: True)] == [2 * len(big[0])] * 2 + [len(big[0])]
