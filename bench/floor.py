"""The floor: the smallest proxy of aspy's chosen shape, which observes and records nothing.

A Flask route forwards the request with requests (one pooled adapter, ``stream=True``) and
relays the answer chunk by chunk through ``iter_content``, under gunicorn with 2 gevent
workers and keep-alive like ``aspy serve``. What it costs is what the shape itself costs on
this machine; aspy's figures beside it show what observing and recording add.

    UPSTREAM=http://127.0.0.1:PORT gunicorn -k gevent -w 2 floor:app
"""
from __future__ import annotations

import os

import requests
from flask import Flask, Response, request
from requests.adapters import HTTPAdapter

app = Flask(__name__)
UPSTREAM = os.environ.get("UPSTREAM", "http://127.0.0.1:8000")
DROPPED = frozenset({"host", "content-length", "connection", "transfer-encoding", "keep-alive"})
_session: requests.Session | None = None


def session() -> requests.Session:
    """Return this worker's pooled session, made after fork."""
    global _session
    if _session is None:
        _session = requests.Session()
        _session.mount("http://", HTTPAdapter(pool_maxsize=256, max_retries=0))
    return _session


@app.route("/<path:path>", methods=["GET", "POST"])
def forward(path: str) -> Response:
    """Forward one request and stream the answer back as it arrives."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in DROPPED}
    answer = session().request(request.method, f"{UPSTREAM}/{path}", data=request.get_data(), headers=headers,
                               stream=True)
    return Response(answer.iter_content(chunk_size=None), status=answer.status_code,
                    content_type=answer.headers.get("content-type"))
