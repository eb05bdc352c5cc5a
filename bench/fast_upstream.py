"""A fast fake Anthropic upstream for the workloads W1, W2 and W3: ``python bench/fast_upstream.py PORT``.

Adapted from ../shared/peer-bench/upstream.py (the side-by-side harness aspy is measured
with beside nginx, mitmproxy and LiteLLM), so that ``bench/`` and that harness answer the
same streams. Unlike tests/upstream.py, which can answer anything a test asks in its
headers, it keeps nothing and parses no JSON: the direct column stays far faster than
any proxy, and its CPU does not crowd aspy's on a small machine.

A bare asyncio HTTP/1.1 server (keep-alive, sized or chunked request bodies). A POST to a
path ending in ``/v1/messages`` gets an event stream, chunked, shaped by a marker in the
request body (which every proxy forwards as it is):

- ``bench:w2``: wait 50 ms, then 80 events 10 ms apart (text, then a tool_use block, then
  ``message_delta`` with usage and ``message_stop``): about 0.85 s.
- ``bench:w3:N``: N events (3 to 600) one second apart.
- otherwise (W1): a 3.3 KB stream of 24 events, written at once in one write.

``GET /__stats`` answers ``{"received": n, "served": n, "open": n, "floor_open": n}``: Messages
requests received, streams written to their last byte, streams open now; the floor's
(bench/floor.py, whose requests come under ``/floor/``) are counted apart, so that what it
serves late never counts as aspy's, and only their open streams are given. Any other request
gets a small JSON answer (a readiness probe).
"""
from __future__ import annotations

import asyncio
import json
import re
import sys

MODEL = "claude-sonnet-4-5-20250929"
STATS = {"received": 0, "served": 0, "open": 0}
FLOOR = {"received": 0, "served": 0, "open": 0}
HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
        b"request-id: req_bench\r\nanthropic-ratelimit-requests-remaining: 99\r\ntransfer-encoding: chunked\r\n\r\n")
WORDS = ["I'll", "look", "at", "the", "failing", "test", "first,", "then", "read", "the", "module", "it",
         "exercises", "and", "check", "how", "the", "session", "figures", "are", "computed", "before", "changing",
         "anything", "in", "the", "recorder", "path."]
W3_MARK = re.compile(rb"bench:w3:(\d+)")


def sse(event: str, data: dict) -> bytes:
    """Return one server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def message_start(input_tokens: int, cache_read: int, cache_write: int) -> bytes:
    """Return a stream's first event, with its usage."""
    return sse("message_start", {"type": "message_start", "message": {
        "model": MODEL, "id": "msg_01BenchBenchBenchBenchBen", "type": "message", "role": "assistant",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "cache_creation_input_tokens": cache_write,
                  "cache_read_input_tokens": cache_read,
                  "cache_creation": {"ephemeral_5m_input_tokens": cache_write, "ephemeral_1h_input_tokens": 0},
                  "output_tokens": 1, "service_tier": "standard"}}})


def block_start(index: int, block: dict) -> bytes:
    """Return a content_block_start event."""
    return sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})


def block_stop(index: int) -> bytes:
    """Return a content_block_stop event."""
    return sse("content_block_stop", {"type": "content_block_stop", "index": index})


def text_delta(text: str) -> bytes:
    """Return a text delta of the first block."""
    return sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": text}})


def tail(stop_reason: str, output_tokens: int, input_tokens: int, cache_read: int, cache_write: int) -> list[bytes]:
    """Return a stream's last two events: message_delta with the final usage, message_stop."""
    return [sse("message_delta", {"type": "message_delta",
                                  "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                  "usage": {"input_tokens": input_tokens, "cache_creation_input_tokens": cache_write,
                                            "cache_read_input_tokens": cache_read, "output_tokens": output_tokens}}),
            sse("message_stop", {"type": "message_stop"})]


def words(i: int, n: int) -> str:
    """Return the i-th piece of n words of the text, and a space."""
    start = (i * n) % len(WORDS)
    return " ".join(WORDS[start:start + n]) + " "


def w1_events() -> list[bytes]:
    """Return a short text answer: 24 events, 3.3 KB."""
    events = [message_start(12, 2048, 0), block_start(0, {"type": "text", "text": ""}), sse("ping", {"type": "ping"})]
    i = 0
    while sum(map(len, events)) < 2850:
        events.append(text_delta(words(i, 3)))
        i += 1
    return events + [block_stop(0)] + tail("end_turn", 3 * i, 12, 2048, 0)


def w2_events() -> list[bytes]:
    """Return a Claude Code turn: some text, then a Bash tool call; 80 events."""
    events = [message_start(3, 98304, 1523), block_start(0, {"type": "text", "text": ""}),
              sse("ping", {"type": "ping"})]
    events += [text_delta(words(i, 2)) for i in range(45)]
    events += [block_stop(0), block_start(1, {"type": "tool_use", "id": "toolu_01BenchBenchBenchBenchBe",
                                              "name": "Bash", "input": {}})]
    command = json.dumps({"command": "python -m pytest -x -q tests/test_sessions.py -k record",
                          "description": "Run the recorder tests"})
    # The input in 27 pieces, as the model streams it: four characters each, the rest in the last.
    pieces = [command[i:i + 4] for i in range(0, 4 * 26, 4)] + [command[4 * 26:]]
    events += [sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                           "delta": {"type": "input_json_delta", "partial_json": piece}})
               for piece in pieces]
    return events + [block_stop(1)] + tail("tool_use", 312, 3, 98304, 1523)


def w3_events(count: int) -> list[bytes]:
    """Return a slow stream of ``count`` events (3 at least): start, text deltas, the end."""
    if count < 5:  # no room for a content block: start, pings, delta with usage, stop
        return [message_start(5, 4096, 0)] + [sse("ping", {"type": "ping"})] * (count - 3) + \
            tail("end_turn", 0, 5, 4096, 0)
    deltas = count - 5
    return ([message_start(5, 4096, 0), block_start(0, {"type": "text", "text": ""})]
            + [text_delta(f"tick {i} ") for i in range(deltas)] + [block_stop(0)]
            + tail("end_turn", 2 * deltas, 5, 4096, 0))


def chunk(part: bytes) -> bytes:
    """Return the part as one chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(part), part)


W1_EVENTS = w1_events()
W1_RESPONSE = HEAD + b"".join(chunk(e) for e in W1_EVENTS) + b"0\r\n\r\n"
W2_EVENTS = w2_events()


def small(body: bytes) -> bytes:
    """Return a whole small JSON answer."""
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


async def read_request(reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> tuple[str, str, bytes, bool] | None:
    """Read one request: method, target, body and whether the connection stays open; None at its end."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append((await reader.readexactly(size + 2))[:-2])
        await reader.readuntil(b"\r\n")  # the empty trailer
        body = b"".join(parts)
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return method, target, body, headers.get("connection", "").lower() != "close"


async def stream(writer: asyncio.StreamWriter, events: list[bytes], first_wait: float, gap: float) -> None:
    """Send the events one chunk each, the first after first_wait, then gap seconds apart."""
    await asyncio.sleep(first_wait)
    writer.write(HEAD + chunk(events[0]))
    await writer.drain()
    for event in events[1:]:
        await asyncio.sleep(gap)
        writer.write(chunk(event))
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()


async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serve one connection's requests until it closes."""
    try:
        while (request := await read_request(reader, writer)) is not None:
            method, target, body, keep_alive = request
            path = target.split("?", 1)[0]
            if method == "POST" and path.endswith("/v1/messages"):
                stats = FLOOR if path.startswith("/floor/") else STATS
                stats["received"] += 1
                stats["open"] += 1
                try:
                    if b"bench:w2" in body:
                        await stream(writer, W2_EVENTS, 0.05, 0.01)
                    elif (mark := W3_MARK.search(body)) is not None:
                        await stream(writer, w3_events(min(600, max(3, int(mark.group(1))))), 0, 1.0)
                    else:
                        writer.write(W1_RESPONSE)
                        await writer.drain()
                    stats["served"] += 1
                finally:
                    stats["open"] -= 1
            else:
                counts = STATS | {"floor_open": FLOOR["open"]} if path == "/__stats" else None
                writer.write(small(json.dumps(counts).encode() if counts is not None else b'{"ok":true}'))
                await writer.drain()
            if not keep_alive:
                break
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    """Serve on the loopback port until interrupted."""
    server = await asyncio.start_server(connection, "127.0.0.1", port, backlog=4096, limit=1 << 20)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main(int(sys.argv[1])))
    except KeyboardInterrupt:
        pass
