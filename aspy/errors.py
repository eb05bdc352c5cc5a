"""The one place that makes errors in Anthropic's shape.

Claude Code and the SDKs read ``{"type": "error", "error": {"type", "message"}}``; every
error aspy itself produces, from the proxy or the API, goes through :func:`error_response`.
"""
from __future__ import annotations

import json

from flask import Response
from gunicorn.http.errors import NoMoreData, ParseException

# What reading a request body raises when the client hung up before its end, or broke the
# chunked framing: gunicorn's parse errors, and a connection reset under the read.
BROKEN_BODY = (NoMoreData, ParseException, ConnectionError)


class AspyError(Exception):
    """An error to answer with, in Anthropic's shape."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


def error_body(kind: str, message: str) -> bytes:
    """Return the JSON bytes of an Anthropic-shaped error."""
    return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()


def error_response(status: int, kind: str, message: str) -> Response:
    """Return an Anthropic-shaped error response."""
    return Response(error_body(kind, message), status=status, content_type="application/json")
