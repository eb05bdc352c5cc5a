"""Forward every request to its client's provider and relay the answer as it arrives.

The request body is read whole (up to 32 MiB) and sent as the same bytes; headers are
filtered in one place (:func:`forward_headers`, :func:`relay_headers`); the response is
streamed back chunk by chunk through ``iter_content`` and each chunk is handed to an
observer (:mod:`aspy.observe`) only after it was yielded, so parsing never delays the client.
While it is relayed an exchange is a :class:`Flight`, the proxy's working state; when the
answer has ended (or the client left), after the last byte is out, the flight makes the
exchange's record (:class:`aspy.records.Exchange`) once and hands it to the recorder.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import requests
import urllib3
from flask import Blueprint, Response, current_app, request
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from requests.utils import requote_uri
from werkzeug.http import is_hop_by_hop_header
from werkzeug.routing import PathConverter
from werkzeug.wsgi import ClosingIterator

from . import chunked, records
from .config import Config
from .errors import BROKEN_BODY, AspyError, error_body, error_response, error_type
from .native import readable
from .observe import Observer, observer_for
from .prompts import read_request
from .records import CLIENT_WENT_AWAY, STREAM_TYPES, Exchange, Observation, Request
from .routing import resolve, user_hash

log = logging.getLogger(__name__)
bp = Blueprint("proxy", __name__)

MAX_BODY = 32 * 1024 * 1024
READ_CHUNK = 64 * 1024
# Never passed on, besides the connection-specific fields (is_hop_by_hop): what aspy sets itself.
NOT_FORWARDED = frozenset({"host", "content-length", "accept-encoding"})
NOT_RELAYED = frozenset({"content-length", "content-encoding"})
# Request headers kept on the record: session keys and context hints, never credentials.
OBSERVED_HEADERS = ("x-claude-code-session-id", "x-session-id", "x-claude-code-agent-id",
                    "anthropic-beta", "user-agent")


def connection_tokens(connection: str | None) -> frozenset[str]:
    """Return the header names a Connection header lists, in lowercase."""
    if not connection:
        return frozenset()
    return frozenset(t.strip().lower() for t in connection.split(","))


def is_hop_by_hop(name: str, named: frozenset[str]) -> bool:
    """Tell whether a header (its lowercase name) belongs to one connection only, and is never passed on.

    Those are RFC 9110's connection-specific fields (Werkzeug's list), Proxy-Connection (a
    legacy one still seen, not in that list), and those the Connection header names.
    """
    return name in named or name == "proxy-connection" or is_hop_by_hop_header(name)


def forward_headers(environ: dict, drop_credentials: bool) -> dict[str, str]:
    """Return the client's headers as they go upstream."""
    # Read from the environ, not request.headers: this runs for every request, and going
    # through Werkzeug's EnvironHeaders makes it 1.7 times as slow (20 µs against 34).
    named = connection_tokens(environ.get("HTTP_CONNECTION"))
    headers = {}
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = key[5:].replace("_", "-").lower()
        elif key == "CONTENT_TYPE" and value:
            name = "content-type"
        else:
            continue
        if name in NOT_FORWARDED or is_hop_by_hop(name, named):
            continue
        headers[name] = value
    if drop_credentials:
        headers.pop("x-api-key", None)
        headers.pop("authorization", None)
    # aspy reads the body to observe it, so it asks for it plain.
    headers["accept-encoding"] = "identity"
    return headers


def relay_headers(upstream: requests.Response) -> list[tuple[str, str]]:
    """Return the upstream's response headers as they go back to the client."""
    raw = upstream.raw.headers
    named = connection_tokens(raw.get("connection"))
    headers = [(k, v) for k, v in raw.items()
               if k.lower() not in NOT_RELAYED and not is_hop_by_hop(k.lower(), named)]
    if upstream.headers.get("content-type", "").startswith(STREAM_TYPES):
        headers.append(("X-Accel-Buffering", "no"))
    return headers


def upstream_adapter() -> HTTPAdapter:
    """Return this worker's pooled connections to the providers, made on first use after fork."""
    # Kept with the pid that made it: a forked worker makes its own.
    made = current_app.extensions.get("aspy.upstream")
    if made is None or made[0] != os.getpid():
        made = (os.getpid(), HTTPAdapter(pool_connections=16, pool_maxsize=256, max_retries=0))
        current_app.extensions["aspy.upstream"] = made
    return made[1]


def send_upstream(method: str, url: str, headers: dict[str, str], body: bytes,
                  timeout: tuple[float, float]) -> requests.Response:
    """Send one request as it is: no cookies, redirects, proxies from the environment or retries.

    A Session would merge all of those in on every request; a proxy wants none of them, and
    skipping them is a good part of aspy's per-request cost.
    """
    prepared = requests.PreparedRequest()
    prepared.method = method
    prepared.url = requote_uri(url)
    prepared.headers = CaseInsensitiveDict(headers)
    prepared.body = body or None
    if body or method not in ("GET", "HEAD"):
        prepared.headers["Content-Length"] = str(len(body))
    return upstream_adapter().send(prepared, stream=True, timeout=timeout)


def read_body(environ: dict, pause: float | None = None) -> bytes:
    """Read the whole request body, sized or chunked; refuse one that is too large, incomplete or stalled.

    Nothing is forwarded unless all of it arrived: a body shorter than its Content-Length, or a
    chunked body that broke off, is the client going away, and gets 400. A transfer-coding other
    than chunked (``gzip, chunked``) would reach the upstream still encoded: it gets 400 too. A
    client that sends nothing for ``pause`` seconds mid-body gets 408 (under gunicorn).
    """
    too_large = AspyError(413,
                          f"Request body is larger than the proxy's limit of {MAX_BODY} bytes (32 MiB)")
    codings = [c.strip().lower() for c in environ.get("HTTP_TRANSFER_ENCODING", "").split(",") if c.strip()]
    if codings and codings != ["chunked"]:
        raise AspyError(400,
                        f"Transfer-Encoding {environ['HTTP_TRANSFER_ENCODING']!r} is not accepted: "
                        "send the body as it is, with Content-Length or chunked")
    length = None
    if not codings:
        declared = environ.get("CONTENT_LENGTH")
        if not declared:
            return b""
        if not (declared.isascii() and declared.isdigit()):
            raise AspyError(400, "Content-Length is not a number of bytes")
        length = int(declared)
        if length > MAX_BODY:
            raise too_large
    stream = environ["wsgi.input"]
    client = environ.get("gunicorn.socket")
    if client is not None and pause is not None:
        # A timeout on each receive: a slow body may take long, but never pause longer.
        client.settimeout(pause)
    parts, size = [], 0
    try:
        # A read may return less than asked before the end: read until the length, or the end.
        while length is None or size < length:
            part = stream.read(READ_CHUNK if length is None else length - size)
            if not part:
                break
            size += len(part)
            if size > MAX_BODY:
                raise too_large
            parts.append(part)
    except BROKEN_BODY:
        raise AspyError(400,
                        f"The request body broke off after {size} bytes; nothing was forwarded") from None
    except TimeoutError:
        # Read no more from this client: the answer goes out, then the connection closes.
        if client is not None:
            client.shutdown(socket.SHUT_RD)
        raise AspyError(408,
                        f"The request body stalled: nothing arrived for {pause:g} seconds after {size} bytes; "
                        "nothing was forwarded") from None
    finally:
        if client is not None and pause is not None:
            client.settimeout(None)
    if length is not None and size < length:
        raise AspyError(400,
                        f"The request body ended after {size} of its declared {length} bytes; "
                        "nothing was forwarded")
    return b"".join(parts)


class AnyPath(PathConverter):
    """A path of any characters: one with a CR or LF in it reaches check_path (400), not a bare 404."""

    regex = "(?s:[^/].*?)"


@bp.record_once
def _add_any_path(state) -> None:
    """Teach the app's URL map the ``anypath`` converter before the routes below are added."""
    state.app.url_map.converters["anypath"] = AnyPath


@bp.route("/", defaults={"_path": ""}, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
@bp.route("/<anypath:_path>", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
def forward(_path: str) -> Response:
    """Forward one request to its provider and stream the answer back."""
    config: Config = current_app.config["ASPY"]
    environ = request.environ
    started = time.time()
    # The path as the client sent it, still percent-encoded (request.path is decoded). Here and
    # below the environ is read directly, not request.headers: this runs for every request.
    # A refusal raises AspyError, which the app answers (aspy/errors.py).
    raw_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ.get("PATH_INFO", "/")
    route = resolve(config, raw_uri.split("?", 1)[0], environ.get("QUERY_STRING", ""))

    api_key_env = route.provider.api_key_env
    headers = forward_headers(environ, drop_credentials=bool(api_key_env))
    if api_key_env:
        headers["x-api-key"] = os.environ.get(api_key_env, "")
    try:
        body, refused = read_body(environ, config.server.read_timeout), None
    except AspyError as exc:
        body, refused = b"", exc
    flight = Flight(Exchange(
        started_at=started, client=route.client.id if route.client else None, provider=route.provider.id,
        user=user_hash(environ.get("HTTP_X_API_KEY"), environ.get("HTTP_AUTHORIZATION")),
        request=Request(request.method, route.path, {h: headers[h] for h in OBSERVED_HEADERS if h in headers},
                        environ.get("CONTENT_TYPE", ""), len(body))), body)
    record = current_app.extensions["aspy.record"]
    if refused is not None:
        # The request reached aspy, so it is recorded, as failed; nothing went upstream.
        return _failed(flight, record, refused.status, refused.message)
    # From here the request reaches the provider: the journal notes it, so that it is recorded
    # (as failed) even if this worker dies before the answer ends.
    current_app.extensions["aspy.recorder"].opened(flight.opened)
    # Shown in flight (GET /api/in_flight, aspy top, /metrics) until it ends.
    current_app.extensions["aspy.in_flight"].opened(flight)
    timeout = (config.server.connect_timeout, config.server.upstream_timeout)
    try:
        upstream = send_upstream(request.method, route.url, headers, body, timeout)
    except requests.exceptions.ConnectTimeout:
        return _failed(flight, record, 502, "Upstream unreachable")
    except requests.exceptions.ReadTimeout:
        return _failed(flight, record, 504,
                       f"Upstream sent no response headers within {config.server.upstream_timeout:g} seconds")
    except requests.exceptions.RequestException as exc:
        log.warning("upstream %s unreachable: %s", route.provider.id, type(exc).__name__)
        return _failed(flight, record, 502, "Upstream unreachable")

    flight.answered(upstream, started)
    # The record is made on close, after the server wrote the last byte; direct passthrough
    # skips werkzeug's own close hooks, so the iterator carries it.
    relayed = ClosingIterator(_relay(upstream, flight, environ.get("gunicorn.socket")),
                              lambda: _finish(flight, record))
    response = Response(relayed, status=upstream.status_code, headers=relay_headers(upstream),
                        direct_passthrough=True)
    if "content-type" not in upstream.headers:
        # werkzeug adds a default type; the client must see the upstream's headers only.
        del response.headers["Content-Type"]
    return response


class Flight:
    """One exchange while the proxy relays it: what is known so far, its body until read, its parser.

    Filled as the exchange goes (the answer's head when it comes, the bytes as they pass), it
    makes the exchange's record once, in :meth:`ended`. The journal keeps :attr:`opened`, the
    record as it stands when the request goes upstream; the in-flight list reads the flight
    itself while it lasts.
    """

    __slots__ = ("opened", "body", "observer", "status", "ttfb_ms", "content_type", "request_id",
                 "rate_limits", "bytes", "complete", "error", "done")

    def __init__(self, opened: Exchange, body: bytes):
        self.opened = opened
        # Kept until its facts are read, once the answer is out.
        self.body = body
        self.observer: Observer | None = None
        # The answer's head: the upstream's headers, or aspy's own answer.
        self.status = 0
        self.ttfb_ms: float | None = None
        self.content_type = ""
        self.request_id: str | None = None
        self.rate_limits: dict[str, str] = {}
        self.bytes = 0
        self.complete = False
        self.error: str | None = None
        self.done = False

    def answered(self, upstream: requests.Response, started: float) -> None:
        """Note the upstream's response headers: status, time to them, type, request id, rate limits."""
        self.status = upstream.status_code
        self.ttfb_ms = (time.time() - started) * 1000
        self.content_type = upstream.headers.get("content-type", "")
        self.request_id = upstream.headers.get("request-id")
        self.rate_limits = {k.lower(): v for k, v in upstream.headers.items()
                            if k.lower().startswith("anthropic-ratelimit-")}

    def answering_model(self) -> str | None:
        """Return the model the answer has named so far, if it has."""
        return self.observer.obs.model if self.observer is not None else None

    def ended(self) -> Exchange:
        """Return the exchange's record, now that its answer has ended; let the body go."""
        opened, self.done = self.opened, True
        duration_ms = (time.time() - opened.started_at) * 1000
        # A HEAD answer has no body: the server closes it without reading one.
        complete = self.complete or opened.request.method == "HEAD"
        observation = self.observer.finish() if self.observer is not None else Observation()
        body, self.body = self.body, b""
        facts = read_request(body, opened.request.content_type,
                             claude_code="x-claude-code-session-id" in opened.request.headers)
        return replace(opened, request=replace(opened.request, facts=facts),
                       response=records.Response(self.status, duration_ms, self.ttfb_ms, self.content_type,
                                                 self.request_id, self.rate_limits, self.bytes, complete, observation),
                       error=self.error or (None if complete else CLIENT_WENT_AWAY))


def _relay(upstream: requests.Response, flight: Flight, client: socket.socket | None) -> Iterator[bytes]:
    """Yield the upstream body as it arrives, observing each chunk after it went out."""
    flight.observer = observer = observer_for(flight.content_type, flight.opened.request.path)
    gone = threading.Event()

    def hang_up() -> None:
        gone.set()
        # Shut the socket down rather than close the response: the read under way then ends.
        connection = upstream.raw.connection
        if connection is not None and connection.sock is not None:
            connection.sock.shutdown(socket.SHUT_RDWR)

    # Only streams can keep an upstream busy for minutes; other answers end on their own.
    stop_watching = _watch_client(client, hang_up) if flight.content_type.startswith(STREAM_TYPES) \
        else lambda: None
    pause = _cooperate()
    try:
        for chunk in _chunks(upstream, flight.content_type):
            if not chunk:
                continue
            yield chunk
            flight.bytes += len(chunk)
            observer.feed(chunk)
            # A fast upstream (or a gzip body inflating) never blocks a read: let the worker's
            # other requests run between two chunks.
            pause()
        flight.complete = True
    except Exception as exc:
        if gone.is_set():
            # The client hung up and its upstream was closed under the read: nobody is listening.
            return
        if not isinstance(exc, (requests.exceptions.RequestException, urllib3.exceptions.HTTPError)):
            raise
        flight.error = f"upstream stream broke off: {type(exc).__name__}"
        log.warning("upstream stream broke off after %d bytes: %s", flight.bytes, type(exc).__name__)
        if flight.content_type.startswith("text/event-stream"):
            # Tell the client in the stream's own terms; the SDKs raise it as an API error.
            yield b"event: error\ndata: " + error_body(
                "api_error", "Upstream stream broke off before it was complete") + b"\n\n"
        else:
            raise
    finally:
        stop_watching()
        upstream.close()


def _cooperate() -> Callable[[], None]:
    """Return what gives the gevent hub a turn (nothing to do outside gevent)."""
    if "gevent" not in sys.modules:
        return lambda: None
    import gevent

    return lambda: gevent.sleep(0)


def _watch_client(client: socket.socket | None, on_hangup: Callable[[], None]) -> Callable[[], None]:
    """Call on_hangup as soon as the client closes its connection, even while the upstream is silent.

    Under gevent a greenlet waits for the client's socket to turn readable; reading nothing
    then (without consuming a pipelined request) means the client has gone. A client that had
    closed its sending side before the answer began half-closed the connection and still
    reads the answer: it is not watched (a hang-up then shows at the next write, as WSGI
    allows, and as everywhere outside gevent). Returns the function that stops watching.
    """
    if client is None or "gevent" not in sys.modules:
        return lambda: None
    import gevent
    from gevent.socket import wait_read

    try:
        if readable(client) and client.recv(1, socket.MSG_PEEK) == b"":
            return lambda: None
    except OSError:
        on_hangup()
        return lambda: None

    def watch() -> None:
        try:
            wait_read(client.fileno())
            if client.recv(1, socket.MSG_PEEK) == b"":
                on_hangup()
        except OSError:
            on_hangup()

    watcher = gevent.spawn(watch)
    return watcher.kill


def _chunks(upstream: requests.Response, content_type: str) -> Iterator[bytes]:
    """Yield the body as it arrives: chunk by chunk, or read by read for an unchunked stream."""
    if "chunked" in upstream.headers.get("transfer-encoding", "").lower():
        if chunked.readable(upstream):
            # What one read brought, in one piece: one write to the client for what came at once.
            return chunked.relayed_chunks(upstream, READ_CHUNK)
        # A compressed body: each chunk as it comes, but never more than READ_CHUNK decoded at once: a gzip bomb
        # in one chunk is inflated piece by piece, not into memory whole.
        return _coalesced(upstream.raw.read_chunked(READ_CHUNK, decode_content=True), _arrived(upstream))
    if content_type.startswith(STREAM_TYPES):
        # iter_content would wait for 64 KiB (or the end) before yielding: read what has come.
        return iter(lambda: upstream.raw.read1(READ_CHUNK, decode_content=True), b"")
    return upstream.iter_content(chunk_size=READ_CHUNK)


def _arrived(upstream: requests.Response) -> Callable[[], bool]:
    """Return what tells, without waiting, whether more of the body is already here to read."""
    reader = getattr(upstream.raw._fp, "fp", None)  # http.client's buffered reader on the socket
    connection = upstream.raw.connection
    sock = connection.sock if connection is not None else None
    if reader is None or sock is None:
        return lambda: False

    def arrived() -> bool:
        # A peek that cannot wait: what the reader holds, or what the socket has now.
        timeout = sock.gettimeout()
        sock.settimeout(0.0)
        try:
            return bool(reader.peek(1))
        except OSError:
            return False
        finally:
            sock.settimeout(timeout)

    return arrived


def _coalesced(pieces: Iterator[bytes], arrived: Callable[[], bool]) -> Iterator[bytes]:
    """Yield the pieces, each joined with those that arrived with it: one write for what came at once.

    Never waits for more: a piece is held only while the next one is already here, and at most
    READ_CHUNK of them, so events reach the client as soon as they reach aspy.
    """
    held: list[bytes] = []
    size = 0
    for piece in pieces:
        held.append(piece)
        size += len(piece)
        if size >= READ_CHUNK or not arrived():
            yield b"".join(held)
            held, size = [], 0
    if held:
        yield b"".join(held)


def _finish(flight: Flight, record: Callable[[Exchange], None]) -> None:
    """Make the record of an exchange whose answer has ended, and hand it on; observation never raises."""
    try:
        record(flight.ended())
    except Exception:
        log.exception("recording an exchange failed; the proxy goes on")


def _failed(flight: Flight, record: Callable[[Exchange], None], status: int, message: str) -> Response:
    """Answer a failure in Anthropic's shape (the upstream's, or the request's own), and record it."""
    flight.status, flight.error, flight.complete = status, message, True
    response = error_response(status, error_type(status), message)
    response.call_on_close(lambda: _finish(flight, record))
    return response
