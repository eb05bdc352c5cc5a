"""A client of aspy's JSON API, for ``aspy top`` and ``aspy mcp``, local or remote.

The API is found at ``ASPY_URL``, else at the scheme, host and port of
``ANTHROPIC_BASE_URL``, else at http://127.0.0.1:8080. The bearer token is
``ASPY_API_TOKEN``, else the proxy token in ``ANTHROPIC_BASE_URL``. The caller's own client
is ``ASPY_CLIENT_ID``, else the client segment of ``ANTHROPIC_BASE_URL``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

DEFAULT_URL = "http://127.0.0.1:8080"


class ApiError(Exception):
    """The API could not be reached, or refused; the message says which, in plain words."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Target:
    """Where the API is, what token to send, and whose data is "mine"."""

    url: str
    token: str | None
    client: str | None
    claude_session_id: str | None


def find_target(url: str | None = None, client: str | None = None,
                env: Mapping[str, str] | None = None) -> Target:
    """Work out the API address, token and own client from flags and the environment."""
    env = os.environ if env is None else env
    base = env.get("ANTHROPIC_BASE_URL", "")
    parts = urlsplit(base) if base else None
    segment = parts.path.strip("/").split("/")[0] if parts else ""
    token_in_url = segment if segment.startswith("pt_") else None
    if url is None:
        url = env.get("ASPY_URL") or (f"{parts.scheme}://{parts.netloc}" if parts and parts.netloc else DEFAULT_URL)
    if client is None:
        client = env.get("ASPY_CLIENT_ID") or (segment if segment and not token_in_url and segment != "v1" else None)
    return Target(url=url.rstrip("/"), token=env.get("ASPY_API_TOKEN") or token_in_url, client=client,
                  claude_session_id=env.get("CLAUDE_CODE_SESSION_ID") or env.get("CLAUDE_SESSION_ID"))


class ApiClient:
    """Call the API, turning every failure into an ApiError with a clear message."""

    def __init__(self, target: Target, timeout: float = 5.0):
        self.target = target
        self.timeout = timeout
        self.http = requests.Session()
        self.http.trust_env = False
        if target.token:
            self.http.headers["Authorization"] = f"Bearer {target.token}"

    def get(self, path: str, **params: Any) -> dict:
        """GET /api/<path> with the non-empty parameters."""
        return self._call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict) -> dict:
        """POST a JSON body to /api/<path>."""
        return self._call("POST", path, json={k: v for k, v in body.items() if v is not None})

    def _call(self, method: str, path: str, **kwargs: Any) -> dict:
        url = f"{self.target.url}/api/{path}"
        try:
            response = self.http.request(method, url, timeout=self.timeout, **kwargs)
        except requests.ConnectionError:
            raise ApiError(f"cannot reach aspy at {self.target.url} (is `aspy serve` running there?)") from None
        except requests.Timeout:
            raise ApiError(f"aspy at {self.target.url} did not answer within {self.timeout:g} s") from None
        if response.status_code == 401:
            raise ApiError(f"aspy at {self.target.url} refused the API token: set ASPY_API_TOKEN to its "
                           "[server] api_token (or use a client's proxy token)", 401)
        try:
            body = response.json()
        except ValueError:
            raise ApiError(f"{self.target.url} answered {response.status_code} with no JSON: is it aspy?",
                           response.status_code) from None
        if response.status_code >= 400:
            message = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
            raise ApiError(f"aspy answered {response.status_code}: {message or response.reason}", response.status_code)
        return body
