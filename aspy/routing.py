"""Who is asking and where their request goes.

The first path segment names a client (``/dev-1/v1/messages``) or carries a client's proxy
token (``/pt_.../v1/messages``); a path that starts with ``/v1/`` is a legacy request for
the legacy provider. What is left of the path is appended to the provider's base URL, and
is checked first so that nothing in it can leave the provider's host or base path.

The same questions for the API and ``/metrics``: :func:`api_caller` tells the operator (the
``api_token``) from a client (its proxy token) by the ``Authorization: Bearer`` header. A
proxy token is found by :func:`client_by_token` only, and a bearer token read by
:func:`bearer_token` only, wherever they come from.
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
        client = client_by_token(config, segment)
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


def client_by_token(config: Config, token: str) -> Client | None:
    """Find the client owning a proxy token, comparing every token in constant time."""
    found = None
    given = token.encode()
    # No early return: the time taken tells nothing about which token, or how much of one, matched.
    for client in config.clients.values():
        if client.proxy_token and hmac.compare_digest(client.proxy_token.encode(), given):
            found = client
    return found


def bearer_token(authorization: str | None) -> str | None:
    """Return the token of an ``Authorization: Bearer <token>`` header (any case of Bearer), or None."""
    # Not Werkzeug's Authorization.from_header: it reads a token with an "=" inside as
    # parameters (RFC 7235's token68 allows "=" only at the end), and an api_token may hold one.
    if not authorization or authorization[:7].lower() != "bearer ":
        return None
    return authorization[7:].strip() or None


def user_hash(api_key: str | None, authorization: str | None) -> str:
    """Return the legacy user hash: SHA-256 of the API key (or bearer token), 16 hex chars."""
    key = api_key or bearer_token(authorization)
    if not key:
        return ANONYMOUS
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Caller:
    """Who calls the API or /metrics: the operator, or one client by its proxy token."""

    # None for the operator, who reads every client's data; else the only client this caller sees.
    client: Client | None = None


OPERATOR = Caller()


def api_caller(config: Config, authorization: str | None) -> Caller | None:
    """Return who an ``Authorization`` header proves the caller is, or None when it proves no one.

    Without ``[server] api_token`` everyone is the operator; with it, the caller is the operator
    by that token and a client by its proxy token.
    """
    api_token = config.server.api_token
    if api_token is None:
        return OPERATOR
    given = bearer_token(authorization)
    if given is None:
        return None
    if hmac.compare_digest(given.encode(), api_token.encode()):
        return OPERATOR
    client = client_by_token(config, given)
    return Caller(client) if client is not None else None
