"""The standard library's own threads, locks and queues, even where gevent has patched them.

Under gevent, ``threading.Thread`` is a greenlet and ``time.sleep`` yields to the hub. Work
that blocks in C, such as SQLite, is better done in a real OS thread: there it leaves the
hub free to serve requests.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any


def native(module: str, name: str) -> Any:
    """Return ``module.name`` as the standard library defines it, unpatched."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched(module):
        return monkey.get_original(module, name)
    return getattr(importlib.import_module(module), name)


def gevent_patched() -> bool:
    """Tell whether gevent has patched threading in this process."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("threading")


def readable(sock: Any) -> bool:
    """Tell, without waiting or yielding, whether a socket has something to read: a connection, bytes, or the end."""
    poller = native("select", "poll")()
    poller.register(sock.fileno(), native("select", "POLLIN"))
    return bool(poller.poll(0))
