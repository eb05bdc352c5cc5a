"""Requests in flight on this host: what every worker is forwarding right now.

A worker notes an exchange when it goes upstream (the proxy's :class:`~aspy.proxy.Flight`,
read here through :class:`Relayed`) and forgets it when it ends: the request's path pays a
dict update and an event. A greenlet of the worker writes its list to
``$XDG_STATE_HOME/aspy/in_flight/<pid>.json`` within 0.2 s after it changes, and every second
while anything is open (so that time to first byte and the model show as they become known).
Any worker reads every living worker's list, for ``GET /api/in_flight``, ``aspy top`` and
``/metrics``, so a long turn is visible while it streams, whichever worker serves it.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from .config import Config
from .identity import Identities
from .records import STREAM_TYPES, Exchange

# A change is written this long after it happens, so that a burst of requests is one write: under
# load the list changes all the time, and each write costs about 10 µs an open request (W2,
# 100 clients: 0.05 s made it 2.6 % of a worker's CPU).
SETTLE = 0.2
# While anything is in flight the list is written again this often.
REFRESH = 1.0
# The model a request names, near the start of its body (where the SDKs and Claude Code put it).
MODEL_NAMED = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')
MODEL_WITHIN = 4096


class Relayed(Protocol):
    """An exchange while the proxy relays it: what the list shows of it as it goes."""

    # The record as it stood when the request went upstream.
    opened: Exchange
    # The request body, until the answer has ended.
    body: bytes
    ttfb_ms: float | None
    # The answer's content type, once its headers came.
    content_type: str
    # True once its record is made.
    done: bool

    def answering_model(self) -> str | None:
        """Return the model the answer has named so far, if it has."""


class InFlight:
    """This worker's open exchanges, and the greenlet that shares them with the host's other workers."""

    def __init__(self, config: Config, folder: Path | None):
        self.folder = folder
        self.open: dict[str, Relayed] = {}
        # Legacy key hashes a client has taken over count as that client's, as in the store.
        self.identities = Identities(config)
        self._changed: threading.Event | None = None
        self._pid: int | None = None

    def opened(self, flight: Relayed) -> None:
        """Note an exchange that is going upstream."""
        self.open[flight.opened.id] = flight
        if self._changed is not None:
            self._changed.set()

    def closed(self, exchange: Exchange) -> None:
        """Forget an exchange that ended (or never went upstream)."""
        if self.open.pop(exchange.id, None) is not None and self._changed is not None:
            self._changed.set()

    def start(self) -> None:
        """Start sharing this worker's list (once per process); a greenlet under gevent."""
        if self.folder is None or self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._changed = changed = threading.Event()
        threading.Thread(target=self._run, args=(self.folder, changed), name="aspy-in-flight", daemon=True).start()

    def entries(self) -> list[dict[str, Any]]:
        """Return this worker's exchanges in flight, as plain data."""
        # An exchange whose end was not reported (a bug on the way) leaves once its record is made.
        return [self._entry(f) for f in list(self.open.values()) if not f.done]

    def host(self) -> list[dict[str, Any]]:
        """Return every living worker's exchanges in flight (this one's as they are now), oldest first."""
        found = self.entries()
        if self.folder is not None and self.folder.is_dir():
            for path in self.folder.glob("*.json"):
                found += _living_workers_list(path)
        return sorted(found, key=lambda e: e["started"])

    def _entry(self, flight: Relayed) -> dict[str, Any]:
        exchange = flight.opened
        headers = exchange.request.headers
        client = exchange.client or self.identities.of(None, exchange.user).client_id
        return {"client": client, "user": exchange.user,
                "session": headers.get("x-claude-code-session-id") or headers.get("x-session-id"),
                "model": _model(flight), "method": exchange.request.method, "path": exchange.request.path,
                "started": exchange.started_at, "ttfb_ms": flight.ttfb_ms,
                "streaming": flight.content_type.startswith(STREAM_TYPES),
                "agent_id": headers.get("x-claude-code-agent-id")}

    def _run(self, folder: Path, changed: threading.Event) -> None:
        path = folder / f"{os.getpid()}.json"
        while True:
            self._write(path)
            changed.wait(REFRESH if self.open else None)
            time.sleep(SETTLE)
            changed.clear()

    def _write(self, path: Path) -> None:
        """Write this worker's list; a full disk only hides it from the other workers."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            temporary.write_text(json.dumps({"pid": os.getpid(), "in_flight": self.entries()}))
            temporary.replace(path)
        except (OSError, ValueError):
            pass


def _living_workers_list(path: Path) -> list[dict[str, Any]]:
    """Return another living worker's list from its file; forget a dead worker's file."""
    try:
        pid = int(path.stem)
        if pid == os.getpid():
            return []
        os.kill(pid, 0)
        return list(json.loads(path.read_text())["in_flight"])
    except ProcessLookupError:
        path.unlink(missing_ok=True)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # being replaced, or not ours
    return []


def _model(flight: Relayed) -> str | None:
    """Return the model that answers (once the answer said), else the one the request names near its start."""
    observed = flight.answering_model()
    if observed:
        return observed
    named = MODEL_NAMED.search(flight.body, 0, MODEL_WITHIN)
    return named.group(1).decode("utf-8", "replace") if named else None
