"""Keep proxy tokens out of every log line: aspy's own, Flask's and gunicorn's.

A proxy token is the first segment of its client's paths (``/pt_.../v1/messages``), so any
line that names a path would carry it. :func:`redact` cuts it to ``pt_…``; the
:class:`RedactTokens` filter applies it to a whole record, its traceback included.
"""
from __future__ import annotations

import logging
import re

# "pt_" at the start of a word, and what follows up to the end of its path segment.
PROXY_TOKEN = re.compile(r"(?<![A-Za-z0-9_])pt_[^\s/?#&\"'<>\\]+")
REDACTED = "pt_…"


def redact(text: str) -> str:
    """Return text with every proxy token cut to ``pt_…``."""
    return PROXY_TOKEN.sub(REDACTED, text)


class RedactTokens(logging.Filter):
    """A logging filter that redacts proxy tokens from the message and the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record without tokens; never drop it."""
        try:
            message = record.getMessage()
        except Exception:
            # A malformed logging call: the handler reports it, as it would without this filter.
            return True
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            # Formatted here, once, so that the handler prints the redacted text.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


REDACT_TOKENS = RedactTokens()
