"""Faults end to end (SPEC 2 and 5): what the upstream or a client sends can cost aspy only bounded
memory and time, never stalls a worker, and never makes an exchange vanish from the figures.

Everything goes through real ``aspy serve`` (gunicorn, two gevent workers) to the fake upstream
(tests/upstream.py: ``x-fake-huge``, ``x-fake-echo``, ``x-fake-answer``, ``x-fake-chunk``). Memory is read from the
workers' own ``/proc/<pid>/status``; a worker's stall is seen from a keep-alive connection held
to each worker, so the probes reach the busy one, not only the idle one.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import (
    API_KEY,
    MESSAGE,
    MODEL,
    ROOT,
    AspyProcess,
    api_json,
    eventually,
    free_port,
    standard_config,
    stats_when,
    wait_for_health,
    workers_of,
)
from upstream import huge_body

# The bounds, each with a wide margin over what bounded, linear observation costs (a worker grows by
# about 5 MB, /health answers within 0.2 s, 10 MB pass in 0.2 s), and far under what the unbounded
# parser cost (29 s, a worker stalled 29 s and 54 MB more for a 10 MB event in 4 KiB chunks; 647 MB
# for a 200 MB event). The gzip bomb inflates to 1 GB, so that a worker held for the whole transfer
# (5 s) is told apart from a machine that is merely busy.
HEALTH_WITHIN = 2.0  # seconds, the slowest /health probe on the relaying worker during a transfer
MEMORY_GROWTH = 32 * 2**20  # bytes the relaying worker's peak RSS may grow by over its RSS before
TEN_MB_EVENT_WITHIN = 10.0  # seconds, for the whole 10 MB event in 4 KiB chunks
FIFTY_MB_LINE_WITHIN = 30.0  # seconds, for 50 MB with no newline in 16 KiB chunks


# Reading the workers from /proc

def reset_peak(pid: int) -> None:
    """Reset a process's peak RSS (VmHWM) to its RSS now, so that the next peak is the one that follows."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def status_kb(pid: int, field: str) -> int:
    """Return a memory figure of a process from /proc/<pid>/status, in kB (VmRSS now, VmHWM its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


def owner_of(server: AspyProcess, client: socket.socket) -> int | None:
    """Return the worker that holds the server side of a client's connection, or None if none does yet."""
    port = client.getsockname()[1]
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server.port and int(remote.split(":")[1], 16) == port:
            inodes.add(fields[9])
    for pid in workers_of(server):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) in {f"socket:[{inode}]" for inode in inodes}:
                    return pid
            except OSError:
                continue
    return None


def exchange(connection: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Send one request on a kept-alive connection and read the whole answer: status and body."""
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    return response.status, response.read()


def connections_to_each_worker(server: AspyProcess) -> dict[int, http.client.HTTPConnection]:
    """Open a keep-alive connection to each worker of a server (which one accepts a connection is chance)."""
    workers = set(workers_of(server))
    connections: dict[int, http.client.HTTPConnection] = {}
    deadline = time.time() + 20
    while set(connections) != workers:
        assert time.time() < deadline, f"no connection reached every worker of {sorted(workers)}"
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        assert exchange(connection, "GET", "/health")[0] == 200
        pid = owner_of(server, connection.sock)
        if pid is None or pid in connections:
            connection.close()
        else:
            connections[pid] = connection
    return connections


class Probes:
    """``GET /health`` every 50 ms on a keep-alive connection held to each worker, while a fault runs."""

    def __init__(self, connections: dict[int, http.client.HTTPConnection]):
        self.connections = connections
        # (worker, when sent, seconds to the whole answer)
        self.answers: list[tuple[int, float, float]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Probes:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)
        for connection in self.connections.values():
            connection.close()

    @staticmethod
    def _get(connection: http.client.HTTPConnection) -> None:
        status, body = exchange(connection, "GET", "/health")
        assert status == 200 and json.loads(body)["status"] == "ok", body[:300]

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid, connection in self.connections.items():
                sent = time.monotonic()
                try:
                    self._get(connection)
                except Exception as exc:  # a probe that fails is a finding, not a crash of the test
                    self.failures.append(f"worker {pid}: {type(exc).__name__}: {exc}")
                    continue
                self.answers.append((pid, sent, time.monotonic() - sent))
            self._stop.wait(0.05)

    def slowest(self, pid: int) -> float:
        """Return the slowest answer of a worker, in seconds."""
        return max(took for worker, _, took in self.answers if worker == pid)

    def answered(self, pid: int, start: float, end: float) -> int:
        """Return how many probes a worker answered whole between two moments."""
        return sum(1 for worker, sent, took in self.answers if worker == pid and start <= sent and sent + took <= end)


def exchange_lines(server: AspyProcess) -> list[dict]:
    """Return the structured exchange lines of the server's log (ASPY_LOG_LEVEL=DEBUG)."""
    marker = " aspy.exchange "
    return [json.loads(line.split(marker, 1)[1]) for line in server.log_text().splitlines() if marker in line]


@pytest.fixture
def observed(start_aspy, upstream):
    """A fresh aspy (two gevent workers, SQLite), logging one line per exchange."""
    return start_aspy(standard_config(upstream.url), env={"ASPY_LOG_LEVEL": "DEBUG"})


def relay_huge(server: AspyProcess, kind: str, size: int, chunk: int | None) -> dict:
    """Have the upstream send a huge body through aspy, with probes on every worker; return the figures."""
    headers = {"x-api-key": API_KEY, "x-fake-huge": kind, "x-fake-size": str(size)}
    if chunk:
        headers["x-fake-chunk"] = str(chunk)
    workers = workers_of(server)
    connections = connections_to_each_worker(server)
    for connection in connections.values():
        # Each worker has relayed a stream before its memory is read: what a first exchange loads is not counted.
        status, _ = exchange(connection, "POST", "/dev-2/v1/messages", body_of(MESSAGE | {"stream": True}),
                             {"content-type": "application/json", "x-api-key": API_KEY})
        assert status == 200
    for pid in workers:
        reset_peak(pid)
    at_start = {pid: status_kb(pid, "VmRSS") for pid in workers}
    digest, received, nonzero = hashlib.sha256(), 0, 0
    with Probes(connections) as probes:
        started = time.monotonic()
        with requests.post(f"{server.url}/dev-1/v1/messages", json=MESSAGE | {"stream": True},
                           headers=headers, stream=True, timeout=120) as response:
            busy = owner_of(server, response.raw.connection.sock)
            assert busy in workers
            assert response.status_code == 200
            assert "content-encoding" not in response.headers
            for piece in response.raw.stream(1 << 20, decode_content=False):
                received += len(piece)
                if kind == "gzip-bomb":
                    nonzero += len(piece) - piece.count(0)
                else:
                    digest.update(piece)
        ended = time.monotonic()
    assert not probes.failures, probes.failures
    assert workers_of(server) == workers, "a worker died and was replaced"
    return {"received": received, "sha256": None if kind == "gzip-bomb" else digest.hexdigest(), "nonzero": nonzero,
            "seconds": ended - started,
            "slowest_health": probes.slowest(busy),
            "health_answered": probes.answered(busy, started, ended),
            "memory_growth": (status_kb(busy, "VmHWM") - at_start[busy]) * 1024,
            "rss_at_start": at_start[busy] * 1024}


def assert_worker_kept_serving(figures: dict) -> None:
    """The worker that relayed the body answered /health all along: never slowly, and once a second at least."""
    assert figures["slowest_health"] < HEALTH_WITHIN, figures
    assert figures["health_answered"] >= int(figures["seconds"]), figures


def assert_counted_and_given_up(server: AspyProcess, received: int) -> None:
    """The exchange is in the figures, and its record says the observation gave up."""
    assert stats_when(server, 1, client="dev-1")["requests"]["total"] == 1
    line = eventually(lambda: next((x for x in exchange_lines(server) if x["response_bytes"] == received), None))
    assert line["status"] == 200 and line["failure"] is None, line
    assert line["parse_error"], line


def test_one_10mb_event_costs_bounded_memory_and_time_and_never_stalls_the_worker(observed):
    size = 10 * 2**20
    sent = huge_body("event", size)
    figures = relay_huge(observed, "event", size, chunk=4096)
    print(f"10 MB event in 4 KiB chunks: {figures}")
    assert figures["received"] == len(sent) and figures["sha256"] == hashlib.sha256(sent).hexdigest()
    assert figures["seconds"] < TEN_MB_EVENT_WITHIN, figures
    assert figures["memory_growth"] < MEMORY_GROWTH, figures
    assert_counted_and_given_up(observed, len(sent))
    assert_worker_kept_serving(figures)


def test_50mb_without_a_newline_costs_bounded_memory_and_time_and_never_stalls_the_worker(observed):
    size = 50 * 2**20
    sent = huge_body("line", size)
    figures = relay_huge(observed, "line", size, chunk=16384)
    print(f"50 MB without a newline in 16 KiB chunks: {figures}")
    assert figures["received"] == len(sent) and figures["sha256"] == hashlib.sha256(sent).hexdigest()
    assert figures["seconds"] < FIFTY_MB_LINE_WITHIN, figures
    assert figures["memory_growth"] < MEMORY_GROWTH, figures
    assert_counted_and_given_up(observed, len(sent))
    assert_worker_kept_serving(figures)


@pytest.mark.parametrize("framing", ["chunked", "sized"])
def test_a_gzip_bomb_is_relayed_whole_with_bounded_memory_and_never_stalls_the_worker(observed, framing):
    size = 10**9
    figures = relay_huge(observed, "gzip-bomb", size, chunk=16384 if framing == "chunked" else None)
    print(f"gzip bomb of 1 GB ({framing}): {figures}")
    assert figures["received"] == size and figures["nonzero"] == 0
    assert figures["memory_growth"] < MEMORY_GROWTH, figures
    assert_counted_and_given_up(observed, size)
    assert_worker_kept_serving(figures)


# Exchanges never vanish from the figures (SPEC 5): whatever a request or an answer holds, the
# exchange is counted, what can be read of it is recorded, and the exchanges after it are too.

def body_of(value) -> bytes:
    """Return a JSON body, its text as JSON has it (escapes kept as escapes)."""
    return value if isinstance(value, bytes) else json.dumps(value).encode()


def request_with(**fields) -> dict:
    """Return a Messages request with some fields replaced."""
    return {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hello"}]} | fields


def distinct_words(size: int) -> str:
    """Return about ``size`` characters of words that are all different (a pasted log, a list of ids)."""
    return " ".join(f"w{i:x}" for i in range(size // 7))


DEEP = b"[" * 100_000 + b"]" * 100_000
# Request bodies (and headers) that cannot be recorded as they are; each gets a well-formed answer.
HOSTILE_REQUESTS = {
    "nested 100,000 deep": (b'{"model": "%s", "max_tokens": 8, "messages": [{"role": "user", "content": %s}]}'
                            % (MODEL.encode(), DEEP), {}),
    "the whole body nested 100,000 deep": (DEEP, {}),
    "a lone surrogate in the prompt": (rb'{"model": "%s", "max_tokens": 8, "messages": [{"role": "user", '
                                       rb'"content": "hi \ud800 there \udfff"}]}' % MODEL.encode(), {}),
    "NUL in the prompt": (rb'{"model": "%s", "max_tokens": 8, "messages": [{"role": "user", '
                          rb'"content": [{"type": "text", "text": "a\u0000b"}]}]}' % MODEL.encode(), {}),
    "a model that is an object": (request_with(model={"id": MODEL}), {}),
    "metadata.user_id a number": (request_with(metadata={"user_id": 12345}), {}),
    "a session id with NUL in metadata.user_id": (
        request_with(metadata={"user_id": json.dumps({"session_id": "s\x00nul"})}), {}),
    "a session id with a lone surrogate in metadata.user_id": (
        request_with(metadata={"user_id": json.dumps({"session_id": "s\ud800lone"})}), {}),
    "a session id of every type in metadata.user_id": (
        request_with(metadata={"user_id": json.dumps({"session_id": {"a": [1]}})}), {}),
    "a prompt of 2 MB of distinct words": (
        request_with(messages=[{"role": "user", "content": distinct_words(2 * 10**6)}]), {}),
    "not JSON at all": (b"\xff\xfe\x00{not json", {}),
    "JSON that is a list": (b"[1, 2, 3]", {}),
    "messages an object, content a number, system a number": (
        request_with(messages={"role": "user"}, system=5, tools="x"), {}),
    "a user turn whose content is a number": (request_with(messages=[{"role": "user", "content": 5}]), {}),
    "tool results whose ids are of every type": (request_with(messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": {"a": 1}}, {"type": "tool_result", "tool_use_id": 10**30},
        {"type": "tool_result", "tool_use_id": None, "is_error": "yes"}, 7, None]}]), {}),
    "tool result ids with NUL and a lone surrogate": (
        rb'{"model": "%s", "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "tool_result", '
        rb'"tool_use_id": "t\u0000\ud800"}]}]}' % MODEL.encode(), {}),
    "numbers past 64 bits": (request_with(max_tokens=10**30, stream=10**30, temperature=1e308), {}),
    "cache_control of odd types": (request_with(tools=[1, {"cache_control": "x"}, {"cache_control": {"ttl": []}}],
                                                system=[{"cache_control": 5}]), {}),
    "a session header of latin-1 bytes": (request_with(), {"x-claude-code-session-id": "s\xe9\xff\x80"}),
    "a session header of 4,000 characters": (request_with(), {"x-claude-code-session-id": "s" * 4000}),
    "agent id and beta headers of odd bytes": (request_with(), {"x-claude-code-agent-id": "\xff" * 20,
                                                                "anthropic-beta": "context-1m-2025-08-07,\xe9"}),
}
NORMAL_ANSWER = json.dumps({"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
                            "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                            "usage": {"input_tokens": 1000, "output_tokens": 10}})


def sse_stream(*events) -> bytes:
    """Return an event stream of these events: dicts as JSON data, bytes as they are."""
    return b"".join(e if isinstance(e, bytes) else b"event: x\ndata: " + json.dumps(e).encode() + b"\n\n"
                    for e in events)


def message(**fields) -> dict:
    """Return a whole Message answer with some fields replaced."""
    return json.loads(NORMAL_ANSWER) | fields


HUGE = {"input_tokens": 10**30, "output_tokens": 10**30, "cache_read_input_tokens": 10**30,
        "cache_creation_input_tokens": 10**30,
        "cache_creation": {"ephemeral_5m_input_tokens": 10**30, "ephemeral_1h_input_tokens": 10**30},
        "server_tool_use": {"web_search_requests": 10**30}}
START = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
                                              "content": [], "usage": {"input_tokens": 1000, "output_tokens": 1}}}
STOP = [{"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 10}},
        {"type": "message_stop"}]
JSON_ANSWER, STREAM = "application/json", "text/event-stream; charset=utf-8"
# Answers that cannot be recorded as they are, to a well-formed request: (content type, body).
HOSTILE_ANSWERS = {
    "input_tokens of 10**30": (JSON_ANSWER, message(usage=HUGE)),
    "usage fields of every wrong type": (JSON_ANSWER, message(usage={
        "input_tokens": "12", "output_tokens": 1.5, "cache_read_input_tokens": -5, "cache_creation_input_tokens": True,
        "cache_creation": "x", "server_tool_use": [1], "speed": {}, "service_tier": 3,
        "iterations": [1, "x", None, {"type": {}, "model": [], "input_tokens": 10**30}]})),
    "usage a list": (JSON_ANSWER, message(usage=[1, 2])),
    "numbers JSON cannot hold": (JSON_ANSWER, NORMAL_ANSWER.replace(
        '"input_tokens": 1000', '"input_tokens": Infinity, "cache_read_input_tokens": NaN, "x": 1e999').encode()),
    "content holding non-objects": (JSON_ANSWER, message(content=[1, "text", None, [], {"type": 5},
                                                                  {"type": "text", "text": 5}])),
    "content a string": (JSON_ANSWER, message(content="hello")),
    "a tool_use whose id is a number": (JSON_ANSWER, message(stop_reason="tool_use", content=[
        {"type": "tool_use", "id": 12345, "name": {"x": 1}, "input": "not an object"},
        {"type": "tool_use", "id": 12345, "name": "Bash", "input": {"command": "ls"}}])),
    "tool input with NUL and lone surrogates": (JSON_ANSWER, NORMAL_ANSWER.replace(
        '{"type": "text", "text": "ok"}', r'{"type": "tool_use", "id": "toolu_\u0000\ud800", "name": "B\u0000\udfff", '
                                           r'"input": {"command": "a\u0000b\ud800", "\udfff": ["\u0000"]}}').encode()),
    "a lone surrogate and NUL in the answer text": (JSON_ANSWER, NORMAL_ANSWER.replace(
        '"text": "ok"', r'"text": "ok \ud800 then \u0000 and \udfff"').encode()),
    "model, id and stop_reason of odd types": (JSON_ANSWER, message(model=42, id=[], stop_reason={"x": 1})),
    "an error of odd types": (JSON_ANSWER, {"type": "error", "error": "a string"}),
    "an error whose type and message are objects": (JSON_ANSWER, {"type": "error", "error": {"type": {"x": 1},
                                                                                            "message": ["a"]}}),
    "a stream with usage of 10**30": (STREAM, sse_stream(
        START | {"message": START["message"] | {"usage": HUGE}}, STOP[0] | {"usage": HUGE}, STOP[1])),
    "a stream with odd types everywhere": (STREAM, sse_stream(
        {"type": "message_start", "message": [1]}, {"type": "content_block_start", "index": {"a": 1},
                                                    "content_block": "text"},
        {"type": "content_block_delta", "index": {"a": 1}, "delta": {"type": "text_delta", "text": 5}},
        {"type": "content_block_stop", "index": 99}, {"type": "message_delta", "delta": [], "usage": "lots"},
        b"data: {not json\n\n", b"data: [1, 2]\n\n", {"type": 7}, {"type": "error", "error": "a string"},
        STOP[1])),
    "a stream whose block indexes are of every type": (STREAM, sse_stream(START, *(
        e for index in (1.5, True, "0", None, [0]) for e in (
            {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
            {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": "x"}})),
        *STOP)),
    "a stream tool_use with a numeric id and input holding NUL and lone surrogates": (STREAM, sse_stream(
        START, {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": 7,
                                                                             "name": "Bash", "input": {}}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "input_json_delta", "partial_json": r'{"command": "a\u0000\ud800", "\udfff": 1}'}},
        {"type": "content_block_stop", "index": 0}, *STOP)),
    "a stream whose text has a lone surrogate and NUL": (STREAM, sse_stream(
        START, {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        b'data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", '
        b'"text": "ok \\ud800 \\u0000 \\udfff"}}\n\n',
        {"type": "content_block_stop", "index": 0}, *STOP)),
    "a stream with CR line ends, no final blank line and stray fields": (
        STREAM, sse_stream(START).replace(b"\n", b"\r") + b"id: 1\r\nretry: x\r\n: comment\r\n"
        + sse_stream(*STOP).rstrip(b"\n")),
}
# Answers too large to travel in a header: the request carries them, and the upstream echoes it.
HOSTILE_ANSWERS_ECHOED = {
    "tool input nested 100,000 deep": (JSON_ANSWER, NORMAL_ANSWER.encode().replace(
        b'{"type": "text", "text": "ok"}', b'{"type": "tool_use", "id": "toolu_deep", "name": "Bash", "input": '
        + DEEP + b"}")),
    "a stream tool input nested 100,000 deep": (STREAM, sse_stream(
        START, {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "toolu_d",
                                                                             "name": "Bash", "input": {}}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "input_json_delta", "partial_json": DEEP.decode()}},
        {"type": "content_block_stop", "index": 0}, *STOP)),
    "an answer text of 2 MB of distinct words": (JSON_ANSWER, message(content=[
        {"type": "text", "text": distinct_words(2 * 10**6)}])),
}


def hostile_server(start_aspy, upstream, fresh_store, names) -> AspyProcess:
    """Start an aspy with one client per case (h-0, h-1, ...) and one for the exchanges after them."""
    clients = "".join(f'\n[clients.h-{i}]\nname = "Case {i}"\nprovider = "fake"\n' for i in range(len(names)))
    clients += '\n[clients.after]\nname = "After"\nprovider = "fake"\n'
    return start_aspy(standard_config(upstream.url, clients) + fresh_store())


def assert_every_exchange_counted(server: AspyProcess, names: list[str], per_case: int, connections) -> None:
    """Each case is counted exactly, and a normal exchange sent after them through each worker is too."""
    for connection in connections.values():
        status, body = exchange(connection, "POST", "/after/v1/messages", body_of(request_with()),
                                {"content-type": "application/json", "x-api-key": API_KEY})
        assert status == 200, body[:300]
    expected = len(names) * per_case + len(connections)
    try:
        stats_when(server, expected)
    except AssertionError:
        pass  # say which cases are missing, below
    after = "(normal exchanges sent after them, one per worker)"
    counted = {name: api_json(server, "stats", client=f"h-{i}")["requests"]["total"] for i, name in enumerate(names)}
    counted[after] = api_json(server, "stats", client="after")["requests"]["total"]
    want = dict.fromkeys(names, per_case) | {after: len(connections)}
    assert counted == want, {name: n for name, n in counted.items() if n != want[name]}


def test_hostile_requests_are_each_counted_and_never_hold_back_the_exchanges_after_them(start_aspy, upstream,
                                                                                        fresh_store):
    names = list(HOSTILE_REQUESTS)
    server = hostile_server(start_aspy, upstream, fresh_store, names)
    connections = connections_to_each_worker(server)
    answer = {"x-fake-status": "200", "x-fake-body": NORMAL_ANSWER, "x-api-key": API_KEY}
    for i, name in enumerate(names):
        body, headers = HOSTILE_REQUESTS[name]
        for connection in connections.values():
            status, got = exchange(connection, "POST", f"/h-{i}/v1/messages", body_of(body),
                                   {"content-type": "application/json", **answer, **headers})
            assert (status, got) == (200, NORMAL_ANSWER.encode()), name
    assert_every_exchange_counted(server, names, len(connections), connections)
    # What could be read was: every answer's tokens, whatever its request held.
    hostile = (api_json(server, "stats")["tokens"]["input"]
               - api_json(server, "stats", client="after")["tokens"]["input"])
    assert hostile == 1000 * len(connections) * len(names)


def test_hostile_answers_are_each_counted_and_never_hold_back_the_exchanges_after_them(start_aspy, upstream,
                                                                                       fresh_store):
    names = list(HOSTILE_ANSWERS) + list(HOSTILE_ANSWERS_ECHOED)
    server = hostile_server(start_aspy, upstream, fresh_store, names)
    connections = connections_to_each_worker(server)
    for i, name in enumerate(names):
        content_type, answer = HOSTILE_ANSWERS.get(name) or HOSTILE_ANSWERS_ECHOED[name]
        answer = body_of(answer)
        if name in HOSTILE_ANSWERS:
            body, headers = body_of(request_with()), {"x-fake-answer": base64.b64encode(answer).decode()}
        else:
            body, headers = answer, {"x-fake-echo": "1"}
        for connection in connections.values():
            status, got = exchange(connection, "POST", f"/h-{i}/v1/messages", body, {
                "content-type": "application/json", "x-api-key": API_KEY, "x-fake-content-type": content_type,
                **headers})
            assert (status, got) == (200, answer), name
    assert_every_exchange_counted(server, names, len(connections), connections)


# Any input at all (Hypothesis): the bytes pass untouched both ways, the worker lives on, and each
# exchange is counted exactly once.

# Any code point, lone surrogates and NUL included, and the words a Messages body is made of.
TEXT = st.one_of(st.text(st.characters(exclude_categories=()), max_size=12),
                 st.sampled_from(["", "\x00", "\ud800", "\udfff", "user", "assistant", "text", "tool_use",
                                  "tool_result", "message", MODEL, "1h", "toolu_1", "context-1m-2025-08-07"]))
KEYS = st.one_of(st.sampled_from(["model", "messages", "role", "content", "type", "text", "metadata", "user_id",
                                  "session_id", "tools", "system", "stream", "max_tokens", "tool_use_id", "is_error",
                                  "cache_control", "ttl", "id", "name", "input", "usage", "input_tokens",
                                  "output_tokens", "cache_creation", "iterations", "index", "delta", "stop_reason",
                                  "content_block", "partial_json", "error", "message"]), TEXT)
NUMBERS = st.one_of(st.integers(), st.sampled_from([0, -1, 10**30, -(10**30), 2**63, 2**64]),
                    st.floats(allow_nan=True, allow_infinity=True))
JSON = st.recursive(st.none() | st.booleans() | NUMBERS | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
                    max_leaves=25)
BLOCK = st.fixed_dictionaries({"type": st.sampled_from(["text", "tool_use", "tool_result", "thinking"]) | JSON},
                              optional={"text": TEXT | JSON, "id": TEXT | JSON, "tool_use_id": TEXT | JSON,
                                        "is_error": JSON, "input": JSON, "cache_control": JSON})
MESSAGES_REQUEST = st.fixed_dictionaries(
    {"model": st.just(MODEL) | JSON,
     "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]) | JSON,
                                                 "content": TEXT | st.lists(BLOCK | JSON, max_size=4) | JSON}),
                          max_size=4) | JSON},
    optional={"max_tokens": NUMBERS | JSON, "stream": st.booleans() | JSON, "tools": st.lists(JSON, max_size=3) | JSON,
              "system": TEXT | JSON, "metadata": st.fixed_dictionaries({}, optional={"user_id": TEXT | JSON})})


def json_bytes(value) -> bytes:
    """Return a value as JSON text (NaN, Infinity and lone surrogates written as Python writes them)."""
    return json.dumps(value).encode()


REQUEST_BODIES = st.one_of(st.binary(max_size=3000), JSON.map(json_bytes), MESSAGES_REQUEST.map(json_bytes))
# Header values gunicorn takes (visible ASCII and latin-1's upper half): a request it refuses never reaches aspy.
HEADER_VALUES = st.text(st.characters(codec="latin-1", exclude_categories=("Cc", "Zs")), min_size=1, max_size=40)
USAGE = st.fixed_dictionaries({}, optional=dict.fromkeys((
    "input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "cache_creation",
    "server_tool_use", "iterations", "speed", "service_tier"), NUMBERS | JSON))
EVENT = st.fixed_dictionaries(
    {"type": st.sampled_from(["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                              "message_delta", "message_stop", "error", "ping"]) | JSON},
    optional={"index": st.integers(0, 3) | JSON,
              "message": st.fixed_dictionaries({}, optional={"model": st.just(MODEL) | JSON, "id": TEXT | JSON,
                                                             "usage": USAGE | JSON}) | JSON,
              "content_block": BLOCK | JSON,
              "delta": st.fixed_dictionaries({}, optional={"type": TEXT, "text": TEXT | JSON,
                                                           "stop_reason": TEXT | JSON,
                                                           "partial_json": TEXT | JSON.map(json.dumps)}) | JSON,
              "usage": USAGE | JSON, "error": JSON})
LINE = st.one_of(
    EVENT.map(lambda e: b"data: " + json_bytes(e)),
    st.sampled_from([b"event: message_start", b"event: content_block_delta", b"event: error", b": a comment",
                     b"retry: x", b"id: 1", b"data:", b"data: [DONE]", b""]),
    st.binary(max_size=40))
# Events of one to three lines, each event ended by a blank line (but maybe the last), with any line end.
STREAMS = st.tuples(st.lists(st.lists(LINE, min_size=1, max_size=3), max_size=8),
                    st.sampled_from([b"\n", b"\r\n", b"\r"]), st.booleans()).map(
    lambda s: s[1].join(line for event in s[0] for line in (*event, b""))[:None if s[2] else -len(s[1]) or None]
).filter(lambda stream: len(stream) <= 4000)  # it travels base64 in a header
ANSWERS = st.one_of(JSON, st.fixed_dictionaries({"type": st.just("message") | JSON}, optional={
    "model": st.just(MODEL) | JSON, "id": JSON, "content": st.lists(BLOCK | JSON, max_size=4) | JSON,
    "stop_reason": TEXT | JSON, "usage": USAGE | JSON})).map(json_bytes).filter(lambda answer: len(answer) <= 4000)
CHUNKS = st.none() | st.integers(1, 64)
PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def steady(upstream, tmp_path_factory):
    """One aspy (two gevent workers, SQLite) for every example, with its workers' pids and expected counts."""
    clients = "".join(f'\n[clients.{c}]\nname = "{c}"\nprovider = "fake"\n' for c in ("any-request", "any-stream",
                                                                                    "any-answer"))
    server = AspyProcess(tmp_path_factory.mktemp("steady"), standard_config(upstream.url, clients)).start()
    server.workers_at_start = workers_of(server)
    server.sent = {}
    yield server
    server.stop()


def relayed_and_counted(server: AspyProcess, upstream, client: str, body: bytes, headers: dict[str, str],
                        answer: bytes) -> None:
    """Send one exchange: the client gets the upstream's answer untouched, the worker lives, it counts once."""
    tag = uuid.uuid4().hex
    r = requests.post(f"{server.url}/{client}/v1/messages", data=body, timeout=30,
                      headers={"x-api-key": API_KEY, "x-test-tag": tag, **headers})
    assert r.status_code == 200, r.content[:300]
    assert r.content == answer
    seen = next(s for s in reversed(upstream.requests) if s.headers.get("x-test-tag") == tag)
    assert seen.body == body
    server.sent[client] = server.sent.get(client, 0) + 1
    stats_when(server, server.sent[client], client=client)
    health = requests.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert workers_of(server) == server.workers_at_start, "a worker died and was replaced"


@PROPERTY
@given(body=REQUEST_BODIES, content_type=st.sampled_from(["application/json", "text/plain", None]),
       answer_type=st.sampled_from(["application/json", "text/event-stream", "application/octet-stream"]),
       session=st.none() | HEADER_VALUES, chunk=CHUNKS)
def test_any_request_body_reaches_the_upstream_and_back_untouched_and_is_counted_once(
        steady, upstream, body, content_type, answer_type, session, chunk):
    headers = {"x-fake-echo": "1", "x-fake-content-type": answer_type}
    if content_type:
        headers["content-type"] = content_type
    if session:
        headers["x-claude-code-session-id"] = session
    if chunk:
        headers["x-fake-chunk"] = str(chunk)
    relayed_and_counted(steady, upstream, "any-request", body, headers, answer=body)


@PROPERTY
@given(stream=STREAMS, chunk=CHUNKS)
def test_any_event_stream_from_the_upstream_reaches_the_client_untouched_and_is_counted_once(
        steady, upstream, stream, chunk):
    headers = {"content-type": "application/json", "x-fake-content-type": STREAM,
               "x-fake-answer": base64.b64encode(stream).decode()}
    if chunk:
        headers["x-fake-chunk"] = str(chunk)
    relayed_and_counted(steady, upstream, "any-stream", body_of(request_with(stream=True)), headers, answer=stream)


@PROPERTY
@given(answer=ANSWERS, chunk=CHUNKS)
def test_any_json_answer_reaches_the_client_untouched_and_is_counted_once(steady, upstream, answer, chunk):
    headers = {"content-type": "application/json", "x-fake-answer": base64.b64encode(answer).decode()}
    if chunk:
        headers["x-fake-chunk"] = str(chunk)
    relayed_and_counted(steady, upstream, "any-answer", body_of(request_with()), headers, answer=answer)


# Reads never stall the proxy: a slow API query (planted: every read of events takes 2 s, as on a
# large store) delays its own answer only, never the worker's other requests.
SLOW_READS_CONF = f"""
exec(open({str(ROOT / "conf" / "gunicorn.conf.py")!r}).read())
workers = 1


def post_worker_init(worker):
    import time as _time

    from aspy.native import native
    from aspy.store.sqlite import SqliteStore

    query = SqliteStore._query

    def slow_query(self, statement, params):
        if "FROM events" in statement:
            native("time", "sleep")(2.0)  # blocks its thread as SQLite in C does
        return query(self, statement, params)

    SqliteStore._query = slow_query
"""


def test_a_slow_api_read_delays_only_its_own_answer(upstream, tmp_path):
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(standard_config(upstream.url).replace("[server]\n", f'[server]\nlisten = "127.0.0.1:{port}"\n'))
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(SLOW_READS_CONF)
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(conf)], cwd=ROOT,
                            env={**os.environ, "ASPY_CONFIG": str(config), "XDG_STATE_HOME": str(tmp_path)},
                            stdout=(tmp_path / "aspy.log").open("ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, proc)
        slow = threading.Thread(target=lambda: requests.get(f"{url}/api/events", timeout=30))
        slow.start()
        time.sleep(0.3)  # the read is under way on the only worker
        took = []
        for _ in range(5):
            started = time.monotonic()
            r = requests.post(f"{url}/dev-1/v1/messages", json={"model": "claude-sonnet-4-6", "max_tokens": 8,
                                                               "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
            middle = time.monotonic()
            assert requests.get(f"{url}/health").json()["status"] == "ok"
            took.append((round(middle - started, 3), round(time.monotonic() - middle, 3)))
        slow.join()
        # Served while the 2 s read ran, not after it.
        assert max(max(pair) for pair in took) < 0.5, took
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(15)
