"""gunicorn's gevent worker, whose own error answers are in Anthropic's shape like aspy's.

gunicorn answers some requests before the app sees them: one it cannot parse (a malformed
request line or header, ``Content-Length`` beside ``Transfer-Encoding``, a transfer-coding
that does not end in ``chunked``) gets 400, 414, 431 or 501, and an error that breaks a
response before its first byte gets 500. gunicorn writes those as HTML pages; in aspy's
workers they are JSON in Anthropic's shape, like every other answer aspy makes.

gunicorn's master imports this module to find the worker class, before any worker has
patched the standard library: it imports gunicorn's gevent worker (which the master loads
anyway) and nothing of the app.
"""
from __future__ import annotations

from gunicorn import util
from gunicorn.workers.ggevent import GeventWorker


def write_error(sock, status: int, reason: str, message: str) -> None:
    """Write gunicorn's own error answer as JSON in Anthropic's shape (in place of its HTML page)."""
    # The app is loaded in the worker by now, so this imports nothing new.
    from .errors import error_body, error_type

    body = error_body(error_type(status), message or reason)
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + body)


class AspyWorker(GeventWorker):
    """gunicorn's gevent worker, answering what gunicorn refuses itself in Anthropic's shape."""

    def init_process(self) -> None:
        """Swap gunicorn's error page for aspy's in this worker process, then run as usual."""
        # gunicorn writes every error answer through util.write_error; nothing else calls it.
        util.write_error = write_error
        super().init_process()
