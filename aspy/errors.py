"""The one place that makes errors in Anthropic's shape.

Claude Code and the SDKs read ``{"type": "error", "error": {"type", "message"}}``; every
error aspy itself produces, from the proxy or the API, goes through :func:`error_response`.
:func:`answer_exception` is the app's one error handler: an :class:`AspyError`, an HTTP
error from werkzeug's routing (404, 405), a request body that broke off while it was read,
and any unexpected exception all leave as JSON in that shape, never as an HTML page.
"""
from __future__ import annotations

import json
import logging

from flask import Response, request
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
    """Return the JSON bytes of an Anthropic-shaped error."""
    return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()


def error_response(status: int, kind: str, message: str) -> Response:
    """Return an Anthropic-shaped error response."""
    return Response(error_body(kind, message), status=status, content_type="application/json")


def answer_exception(exc: Exception) -> Response:
    """Answer any exception a view raised in Anthropic's shape; log the unexpected ones."""
    if isinstance(exc, AspyError):
        return error_response(exc.status, exc.kind, exc.message)
    if isinstance(exc, HTTPException):
        status = exc.code or 500
        response = error_response(status, error_type(status), exc.description or exc.name)
        # A 405 names the methods that are allowed.
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response
    if isinstance(exc, BROKEN_BODY):
        return error_response(400, "invalid_request_error",
                              "The request body broke off or its chunked framing is invalid")
    # Flask logs nothing once a handler answers; the path is logged without its proxy token.
    log.error("unexpected error answering %s %s", request.method, redact(request.path), exc_info=exc)
    return error_response(500, "api_error", "aspy failed to handle this request; see its log")
