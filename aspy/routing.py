"""Who is asking and where their request goes.

The first path segment names a client (``/dev-1/v1/messages``) or carries a client's proxy
token (``/pt_.../v1/messages``); a path that starts with ``/v1/`` is a legacy request for
the legacy provider. What is left of the path is appended to the provider's base URL, and
is checked first so that nothing in it can leave the provider's host or base path.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from urllib.parse import unquote

from .config import Client, Config, Provider
from .errors import AspyError
from .records import ANONYMOUS


@dataclass(frozen=True)
class Route:
    """Where one request goes: its client (None for legacy), provider and upstream URL."""

    client: Client | None
    provider: Provider
    url: str
    # The path after the client segment, as sent upstream: safe to record (no proxy token).
    path: str


def resolve(config: Config, raw_path: str, query: str) -> Route:
    """Map a raw (still percent-encoded) request path to its client and upstream URL."""
    segment, _, rest = raw_path.lstrip("/").partition("/")
    rest = "/" + rest
    if segment.startswith("pt_"):
        client = _client_by_token(config, segment)
        if client is None:
            raise AspyError(401, "Unknown proxy token")
    elif segment in config.clients:
        client = config.clients[segment]
        if client.proxy_token:
            raise AspyError(401,
                            f"Client {segment!r} must be reached with its proxy token, "
                            "not its id: use http://HOST:PORT/<proxy_token>/")
    elif segment == "v1":
        if not config.legacy.enabled:
            raise AspyError(404,
                            "Requests without a client segment are disabled; "
                            "use http://HOST:PORT/<client-id>/v1/...")
        client, rest = None, raw_path
    else:
        raise AspyError(404, f"Unknown client {unquote(segment)[:80]!r}")
    check_path(rest)
    provider = config.providers[client.provider if client else config.legacy.provider]
    url = provider.base_url + rest + (f"?{query}" if query else "")
    return Route(client=client, provider=provider, url=url, path=rest)


def check_path(rest: str) -> None:
    """Refuse a path that could change the upstream host or climb out of its base path."""
    decoded = rest
    # Decode until stable so that %252e%252e is caught as surely as ..
    for _ in range(4):
        once = unquote(decoded)
        if once == decoded:
            break
        decoded = once
    else:
        raise AspyError(400, "Path is encoded too many times")
    if "\\" in decoded or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in decoded):
        raise AspyError(400, "Path may not contain backslashes or control characters")
    segments = decoded.split("/")[1:]
    if any(s in (".", "..") for s in segments):
        raise AspyError(400, "Path may not contain . or .. segments")
    if "" in segments[:-1]:
        raise AspyError(400, "Path may not contain empty segments (//)")


def _client_by_token(config: Config, token: str) -> Client | None:
    """Find the client owning a proxy token, comparing every token in constant time."""
    found = None
    for client in config.clients.values():
        if client.proxy_token and hmac.compare_digest(client.proxy_token.encode(), token.encode()):
            found = client
    return found


def user_hash(api_key: str | None, authorization: str | None) -> str:
    """Return the legacy user hash: SHA-256 of the API key (or bearer token), 16 hex chars."""
    key = api_key
    if not key and authorization and authorization[:7].lower() == "bearer ":
        key = authorization[7:].strip()
    if not key:
        return ANONYMOUS
    return hashlib.sha256(key.encode()).hexdigest()[:16]
