"""A real local fake of the Anthropic API, for the tests and the bench.

An asyncio HTTP/1.1 server (keep-alive, chunked or sized bodies both ways) that answers
``/v1/messages`` with a Message, or with an event stream sent event by event with delays.
What it does is chosen by request headers, which aspy forwards untouched:

- ``x-fake-fixture: NAME``: replay ``tests/fixtures/real/sse/NAME`` event by event.
- ``x-fake-delay: MS``: pause between events (default 0).
- ``x-fake-events: N``: a generated stream of N text events (with the delay between).
- ``x-fake-status: CODE`` with optional ``x-fake-body``: answer that status and body as JSON.
- ``x-fake-content-type: TYPE`` (``none`` for no header), ``x-fake-file: PATH``: send a
  file from ``tests/fixtures/real`` with that content type, in odd-sized chunks.
- ``x-fake-sleep: SECONDS``: wait before sending headers.
- ``x-fake-gzip: 1``: gzip the body although nobody asked for it.
- ``x-fake-break: N``: cut the connection after N events, with no end chunk.
- ``x-fake-close-delimited: 1``: send the body with no length and no chunking, then close.
- ``x-fake-usage: JSON``: the usage object of a generated answer.
- ``x-fake-tool: NAME`` (and ``x-fake-tool-id``): a generated answer that calls that tool.
- ``x-fake-tool-once: NAME[,NAME...]``: call these tools in turn where the request offers them,
  the n-th once n tool results came back, then answer with text (so a real agent loop ends).
- ``x-fake-text: TEXT``: the text of a generated answer.
- ``x-fake-delta-usage: JSON``: more usage fields in a stream's ``message_delta``.
- ``x-fake-refusal: before|after``: a stream refused before any output (no content) or after some,
  with stop reason ``refusal``.
- ``x-fake-echo: 1``: answer 200 with the request's own body, byte for byte, as the content type
  ``x-fake-content-type`` says (default ``application/json``): any answer a test can write,
  JSON or an event stream, arrives as sent.
- ``x-fake-answer: BASE64``: the same with these bytes (a few KB at most, as a header), so that
  a well-formed request can get any answer, an event stream with its newlines included.
- ``x-fake-huge: event|line|gzip-bomb`` with ``x-fake-size: BYTES``: a body too large to observe
  (:func:`huge_body`): a stream whose one text event carries that many bytes, that many bytes
  of event stream with no newline at all, or that many zero bytes gzipped into a small body
  sent with ``content-encoding: gzip``.
- ``x-fake-chunk: BYTES``: with ``x-fake-echo``, ``x-fake-answer`` or ``x-fake-huge``, send the
  body in chunks of that size (chunked), else whole with a ``content-length``.
- A request with a structured output format (Claude Code's session title) gets a small JSON
  title and ``TITLE_USAGE``, whatever the headers ask of the other answers.

Every request is kept in ``requests`` (method, raw target, headers, body), and every stream
whose client went away is noted in ``disconnects``.
"""
from __future__ import annotations

import asyncio
import base64
import gzip
import json
import struct
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "real" / "sse"
REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           413: "Payload Too Large", 429: "Too Many Requests", 500: "Internal Server Error",
           529: "Overloaded"}
TITLE_USAGE = {"input_tokens": 554, "output_tokens": 9}
DEFAULT_USAGE = {"input_tokens": 12, "output_tokens": 7, "cache_read_input_tokens": 100,
                 "cache_creation_input_tokens": 20,
                 "cache_creation": {"ephemeral_5m_input_tokens": 15, "ephemeral_1h_input_tokens": 5}}


@dataclass
class Seen:
    """One request as the fake upstream received it."""

    method: str
    target: str
    headers: dict[str, str]
    header_list: list[tuple[str, str]]
    body: bytes
    at: float = field(default_factory=time.time)
    # The client's address and port: requests on one kept-alive connection share it.
    peer: tuple | None = None

    def json(self):
        """Return the body decoded as JSON."""
        return json.loads(self.body)


def sse(event: str, data: dict) -> bytes:
    """Return one server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def message(model: str, text: str, usage: dict, tool: str | None = None, tool_id: str = "toolu_fake_1",
            tool_input: dict | None = None) -> dict:
    """Return a whole Message object."""
    content = [{"type": "text", "text": text}]
    if tool:
        content.append({"type": "tool_use", "id": tool_id, "name": tool,
                        "input": {"command": "ls"} if tool_input is None else tool_input})
    return {"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": "tool_use" if tool else "end_turn",
            "stop_sequence": None, "usage": usage}


def stream_events(model: str, text_parts: list[str], usage: dict, tool: str | None = None,
                  tool_id: str = "toolu_fake_1", tool_input: dict | None = None, delta_usage: dict | None = None,
                  stop_reason: str | None = None) -> list[bytes]:
    """Return the events of a streamed Message, one text delta per part (a tool's input in two)."""
    raw_input = json.dumps({"command": "ls"} if tool_input is None else tool_input)
    start_usage = {k: v for k, v in usage.items() if k != "output_tokens"} | {"output_tokens": 1}
    events = [
        sse("message_start", {"type": "message_start", "message": {
            "id": "msg_fake", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": start_usage}}),
    ]
    if text_parts:
        events.append(sse("content_block_start", {"type": "content_block_start", "index": 0,
                                                  "content_block": {"type": "text", "text": ""}}))
        for part in text_parts:
            events.append(sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                      "delta": {"type": "text_delta", "text": part}}))
        events.append(sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
    if tool:
        events += [
            sse("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
                "type": "tool_use", "id": tool_id, "name": tool, "input": {}}}),
            sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                        "delta": {"type": "input_json_delta", "partial_json": raw_input[:12]}}),
            sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                        "delta": {"type": "input_json_delta", "partial_json": raw_input[12:]}}),
            sse("content_block_stop", {"type": "content_block_stop", "index": 1}),
        ]
    events += [
        sse("message_delta", {"type": "message_delta",
                              "delta": {"stop_reason": stop_reason or ("tool_use" if tool else "end_turn"),
                                        "stop_sequence": None},
                              "usage": {"output_tokens": usage.get("output_tokens", 0)} | (delta_usage or {})}),
        sse("message_stop", {"type": "message_stop"}),
    ]
    return events


def gzip_bomb(size: int, block: int = 1 << 20) -> bytes:
    """Return a gzip body that inflates to ``size`` zero bytes (about 1 KB per MB), made in a blink.

    Each block is compressed after a full flush, so every one is the same bytes: one is made and repeated.
    """
    zero = bytes(block)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = deflate.compress(zero) + deflate.flush(zlib.Z_FULL_FLUSH)
    blocks, rest = divmod(size, block)
    crc = 0
    for _ in range(blocks):
        crc = zlib.crc32(zero, crc)
    tail = deflate.compress(bytes(rest)) + deflate.flush()
    crc = zlib.crc32(bytes(rest), crc)
    return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + piece * blocks + tail
            + struct.pack("<II", crc, size & 0xFFFFFFFF))


_BOMBS: dict[int, bytes] = {}


def huge_body(kind: str, size: int) -> bytes:
    """Return the body ``x-fake-huge`` sends, as it goes on the wire (a gzip bomb still compressed)."""
    if kind == "event":
        head = b"".join(stream_events("claude-sonnet-4-5-20250929", [], DEFAULT_USAGE)[:1]) + sse(
            "content_block_start", {"type": "content_block_start", "index": 0,
                                    "content_block": {"type": "text", "text": ""}})
        delta = (b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, '
                 b'"delta": {"type": "text_delta", "text": "' + b"a" * size + b'"}}\n\n')
        tail = b"".join(stream_events("claude-sonnet-4-5-20250929", [], DEFAULT_USAGE)[1:])
        return head + delta + sse("content_block_stop", {"type": "content_block_stop", "index": 0}) + tail
    if kind == "line":
        return b"data: " + b"a" * (size - 6)
    if kind == "gzip-bomb":
        if size not in _BOMBS:
            _BOMBS[size] = gzip_bomb(size)
        return _BOMBS[size]
    raise ValueError(f"no huge body {kind!r}")


def fixture_events(name: str) -> list[bytes]:
    """Split a recorded stream into its events, keeping their bytes."""
    raw = (FIXTURES / name).read_bytes()
    parts = raw.replace(b"\r\n", b"\n").split(b"\n\n")
    return [p + b"\n\n" for p in parts if p.strip()]


class FakeUpstream:
    """The server; ``start()`` runs it in a thread, ``serve_forever()`` in this one."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host, self.port = host, port
        self.requests: list[Seen] = []
        self.disconnects: list[float] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        """Return the server's base URL."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeUpstream:
        """Serve from a background thread; return once listening."""
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self._ready.wait(10)
        return self

    def serve_forever(self) -> None:
        """Serve until the process ends."""
        self.loop = asyncio.new_event_loop()
        server = self.loop.run_until_complete(
            asyncio.start_server(self._connection, self.host, self.port, backlog=1024))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    def last(self) -> Seen:
        """Return the newest request."""
        return self.requests[-1]

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _one_request(self, reader, writer) -> bool:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        header_list = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:] if line]
        headers = {k.lower(): v for k, v in header_list}
        if "chunked" in headers.get("transfer-encoding", ""):
            body = bytearray()
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                body += await reader.readexactly(size + 2)
                del body[-2:]
                if size == 0:
                    break
            body = bytes(body)
        else:
            body = await reader.readexactly(int(headers.get("content-length", 0)))
        seen = Seen(method, target, headers, header_list, body, peer=writer.get_extra_info("peername"))
        self.requests.append(seen)
        keep_alive = headers.get("connection", "").lower() != "close"
        return await self._answer(seen, writer, reader) and keep_alive

    async def _answer(self, seen: Seen, writer, reader) -> bool:
        h = seen.headers
        if "x-fake-sleep" in h:
            await asyncio.sleep(float(h["x-fake-sleep"]))
        content_type = h.get("x-fake-content-type", "application/json")
        if content_type == "none":
            content_type = None
        if "x-fake-file" in h:
            raw = (FIXTURES.parent / h["x-fake-file"]).read_bytes()
            return await self._send(writer, 200, content_type, [raw[i:i + 997] for i in range(0, len(raw), 997)], h,
                                    reader=reader)
        if "x-fake-echo" in h or "x-fake-answer" in h or "x-fake-huge" in h:
            if "x-fake-echo" in h:
                raw = seen.body
            elif "x-fake-answer" in h:
                raw = base64.b64decode(h["x-fake-answer"])
            else:
                raw = huge_body(h["x-fake-huge"], int(h["x-fake-size"]))
                if "x-fake-content-type" not in h:
                    content_type = "text/event-stream; charset=utf-8"
            extra = [("content-encoding", "gzip")] if h.get("x-fake-huge") == "gzip-bomb" else []
            step = int(h.get("x-fake-chunk", 0)) or len(raw) or 1
            # Sent as one part unless chunks were asked for, even when it is a single chunk.
            parts = [raw[i:i + step] for i in range(0, len(raw), step)] or [b""]
            return await self._send(writer, 200, content_type, parts, h, extra=extra, reader=reader,
                                    chunked="x-fake-chunk" in h)
        if "x-fake-status" in h:
            status = int(h["x-fake-status"])
            body = h.get("x-fake-body", json.dumps({"type": "error", "error": {
                "type": "overloaded_error", "message": "Overloaded"}})).encode()
            return await self._send(writer, status, content_type, [body] if body else [], h,
                                    extra=[("request-id", "req_fake_error")], reader=reader)
        if not seen.target.split("?")[0].endswith("/messages"):
            echo = {"method": seen.method, "target": seen.target, "headers": seen.header_list,
                    "body_bytes": len(seen.body)}
            return await self._send(writer, 200, "application/json", [json.dumps(echo).encode()], h, reader=reader)
        try:
            request = json.loads(seen.body or b"{}")
        except ValueError:
            request = {}
        model = request.get("model", "claude-sonnet-4-5-20250929")
        usage = json.loads(h["x-fake-usage"]) if "x-fake-usage" in h else DEFAULT_USAGE
        tool = h.get("x-fake-tool")
        tool_id = h.get("x-fake-tool-id", "toolu_fake_1")
        tool_input: dict = {"command": "ls"}
        if "x-fake-tool-once" in h:
            # Ask for each tool once, in order, where it is offered: the n-th after n results came back.
            offered = {t.get("name") for t in request.get("tools") or [] if isinstance(t, dict)}
            results = [b.get("tool_use_id", "") for m in request.get("messages") or [] if isinstance(m, dict)
                       and isinstance(m.get("content"), list)
                       for b in m["content"] if isinstance(b, dict) and b.get("type") == "tool_result"]
            answered = sum(1 for r in results if not r.startswith("toolu_wait_"))
            wanted = [name.strip() for name in h["x-fake-tool-once"].split(",")]
            tool = wanted[answered] if answered < len(wanted) and wanted[answered] in offered else None
            tool_id, tool_input = f"toolu_fake_{answered + 1}", {}
            waits = len(results) - answered
            if answered < len(wanted) and tool is None and "Bash" in offered and waits < 40:
                # Claude Code may ask before its MCP servers are connected: wait for the tool with a
                # short sleep, as a model would, until the next request offers it.
                tool, tool_id, tool_input = "Bash", f"toolu_wait_{waits + 1}", {"command": "sleep 0.25"}
        text = h.get("x-fake-text", "Hello from the fake upstream.")
        if (request.get("output_config") or {}).get("format"):
            # Claude Code's session title: a small structured answer, whatever the test asked of the turns.
            text, usage, tool = json.dumps({"title": "A fake title"}), TITLE_USAGE, None
        extra = [("request-id", "req_fake_1"), ("anthropic-ratelimit-requests-remaining", "99"),
                 ("anthropic-ratelimit-tokens-limit", "400000"), ("x-fake-seen", "1")]
        if "x-fake-fixture" in h:
            events = fixture_events(h["x-fake-fixture"])
        elif request.get("stream"):
            count = int(h.get("x-fake-events", 3))
            parts = [text] if "x-fake-text" in h else [f"part {i} " for i in range(count)]
            refusal = h.get("x-fake-refusal")
            events = stream_events(model, [] if refusal == "before" else parts, usage, tool, tool_id, tool_input,
                                   json.loads(h.get("x-fake-delta-usage", "{}")), "refusal" if refusal else None)
        else:
            body = json.dumps(message(model, text, usage, tool, tool_id, tool_input)).encode()
            return await self._send(writer, 200, "application/json", [body], h, extra=extra, reader=reader)
        return await self._send(writer, 200, "text/event-stream; charset=utf-8", events, h,
                                extra=extra + [("cache-control", "no-cache")], reader=reader)

    async def _send(self, writer, status: int, content_type: str | None, parts: list[bytes], h: dict,
                    extra: list[tuple[str, str]] = (), reader=None, chunked: bool = False) -> bool:
        """Send a response part by part; return False when the connection must end."""
        delay = float(h.get("x-fake-delay", 0)) / 1000
        cut_after = int(h["x-fake-break"]) if "x-fake-break" in h else None
        headers = ([("content-type", content_type)] if content_type else []) + list(extra)
        if not parts:
            head = f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n" + "".join(
                f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
            writer.write(head.encode())
            await writer.drain()
            return True
        if h.get("x-fake-gzip"):
            parts = [gzip.compress(b"".join(parts))]
            headers.append(("content-encoding", "gzip"))
        close_delimited = bool(h.get("x-fake-close-delimited"))
        streamed = len(parts) > 1 or close_delimited or chunked
        if close_delimited:
            headers.append(("connection", "close"))
        elif streamed:
            headers.append(("transfer-encoding", "chunked"))
        else:
            headers.append(("content-length", str(len(parts[0]))))
        head = f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        writer.write(head.encode())
        try:
            for index, part in enumerate(parts):
                if cut_after is not None and index == cut_after:
                    await writer.drain()
                    writer.transport.abort()
                    return False
                if index and delay and await self._hung_up(reader, delay):
                    self.disconnects.append(time.time())
                    return False
                if streamed and not close_delimited:
                    # An empty chunk would end the body: there is nothing to send.
                    if part:
                        writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                else:
                    writer.write(part)
                await writer.drain()
            if streamed and not close_delimited:
                writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            self.disconnects.append(time.time())
            return False
        return not close_delimited


    @staticmethod
    async def _hung_up(reader, delay: float) -> bool:
        """Pause between events; say whether the client hung up meanwhile (seen at once, not at the next write)."""
        try:
            return await asyncio.wait_for(reader.read(1), delay) == b""
        except TimeoutError:
            return False


def main() -> None:
    """Run the fake upstream in the foreground: ``python tests/upstream.py [PORT]``."""
    server = FakeUpstream(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    threading.Timer(0, lambda: (server._ready.wait(), print(server.url, flush=True))).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
