"""The one place that makes errors in Anthropic's shape.

Claude Code and the SDKs read ``{"type": "error", "error": {"type", "message"}}``. A view
that refuses a request raises :class:`AspyError` (a status and a message; the type follows
from the status by :data:`ERROR_TYPES`), and :func:`init_app` registers the app's handlers
that answer it: an :class:`AspyError`, an HTTP error from Werkzeug itself (404, 405, 400 for
a body it cannot decode, 413), a request body that broke off while it was read, and any
unexpected exception (500, logged) all leave as JSON in that shape, never as an HTML page.
Every such answer, and those the gunicorn worker and a broken stream write, is made by
:func:`error_body`, which takes every secret out of the message first: a proxy token, an API
key, a URL's password, the api_token, or the credentials of the request being answered.
"""
from __future__ import annotations

import json
import logging
import re

from flask import Flask, Response, current_app, has_request_context, request
from gunicorn.http.errors import NoMoreData, ParseException
from werkzeug.exceptions import HTTPException

from .logs import redact

log = logging.getLogger(__name__)

# Anthropic's error types by status (https://docs.claude.com/en/api/errors): any other 4xx is
# an invalid_request_error there too. 502 and 504 are the proxy's own (SPEC section 2).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "upstream_error",
    504: "timeout_error",
    529: "overloaded_error",
}

# What reading a request body raises when the client hung up before its end, or broke the
# chunked framing: gunicorn's parse errors, and a connection reset under the read.
BROKEN_BODY = (NoMoreData, ParseException, ConnectionError)

# Anthropic keys and OAuth tokens (sk-ant-api03-..., sk-ant-oat01-...), and the password of a URL.
API_KEY = re.compile(r"sk-ant-[A-Za-z0-9_-]+")
URL_PASSWORD = re.compile(r"(://[^/:@\s]*:)[^@\s/]+@")
# Shorter values are no secret worth hiding, and replacing them would garble the message.
SHORTEST_SECRET = 8
HIDDEN = "…"


class AspyError(Exception):
    """An error to answer with, in Anthropic's shape; its type follows from its status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.kind = error_type(status)
        self.message = message


def error_type(status: int) -> str:
    """Return Anthropic's error type for a status."""
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_body(kind: str, message: str) -> bytes:
    """Return the JSON bytes of an Anthropic-shaped error, its message without secrets."""
    return json.dumps({"type": "error", "error": {"type": kind, "message": without_secrets(message)}}).encode()


def error_response(status: int, kind: str, message: str) -> Response:
    """Return an Anthropic-shaped error response."""
    return Response(error_body(kind, message), status=status, content_type="application/json")


def without_secrets(message: str) -> str:
    """Return a message with every secret it might echo hidden: tokens, keys, passwords, the request's credentials."""
    message = URL_PASSWORD.sub(r"\1" + HIDDEN + "@", API_KEY.sub("sk-ant-" + HIDDEN, redact(message)))
    if not has_request_context():
        return message
    # Whatever the caller sent as credentials, whatever its form (a key of another provider, Basic).
    secrets = [request.headers.get("x-api-key", ""), *request.headers.get("Authorization", "").split()]
    config = current_app.config.get("ASPY")
    if config is not None and config.server.api_token:
        secrets.append(config.server.api_token)
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= SHORTEST_SECRET:
            message = message.replace(secret, HIDDEN)
    return message


def answer_error(exc: AspyError) -> Response:
    """Answer an error a view raised."""
    return error_response(exc.status, exc.kind, exc.message)


def answer_http_error(exc: HTTPException) -> Response:
    """Answer an HTTP error Werkzeug raised (no route for this method, a body it cannot decode), keeping its headers."""
    status = exc.code or 500
    response = error_response(status, error_type(status), exc.description or exc.name)
    # A 405 names the methods that are allowed.
    for name, value in exc.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def answer_unexpected(exc: Exception) -> Response:
    """Answer any other exception: a body that broke off (400), or a failure of aspy's own (500, logged)."""
    if isinstance(exc, BROKEN_BODY):
        return error_response(400, error_type(400), "The request body broke off or its chunked framing is invalid")
    # Flask logs nothing once a handler answers; the path is logged without its proxy token.
    log.error("unexpected error answering %s %s", request.method, redact(request.path), exc_info=exc)
    return error_response(500, error_type(500), "aspy failed to handle this request; see its log")


def init_app(app: Flask) -> None:
    """Answer every error the app's views or Werkzeug raise in Anthropic's shape."""
    app.register_error_handler(AspyError, answer_error)
    # Flask hands redirects (Werkzeug's RoutingException) back as they are, never to this handler.
    app.register_error_handler(HTTPException, answer_http_error)
    # The last resort, for the proxy's routes too: none of its answers may be an HTML page or a traceback.
    app.register_error_handler(Exception, answer_unexpected)
