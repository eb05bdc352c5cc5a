"""``GET /health``: is aspy alive, and can it reach its store."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from . import __version__
from .store import StoreError

bp = Blueprint("health", __name__)


@bp.get("/health")
def health():
    """Answer liveness, store reachability, and this worker's recording failures."""
    recorder = current_app.extensions["aspy.recorder"]
    answer = {"status": "ok", "version": __version__,
              "recording": {"failures": recorder.failures, "dropped": recorder.dropped,
                            "pending": len(recorder.pending) + recorder.queue.qsize(),
                            "last_error": recorder.last_error}}
    try:
        answer["store"] = {"reachable": True, **current_app.extensions["aspy.store"].check()}
    except StoreError as exc:
        # The proxy still forwards; say so, but report the store as down.
        answer["status"] = "degraded"
        answer["store"] = {"reachable": False, "error": str(exc)}
    return jsonify(answer)
