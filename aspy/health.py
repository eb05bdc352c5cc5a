"""``GET /health``: is aspy alive, and can it reach its store."""
from __future__ import annotations

from flask import Blueprint, jsonify

from . import __version__

bp = Blueprint("health", __name__)


@bp.get("/health")
def health():
    """Answer liveness."""
    return jsonify(status="ok", version=__version__)
