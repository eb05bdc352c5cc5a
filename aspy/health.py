"""``GET /health``: is aspy alive, and can it reach its store."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from . import __version__
from .status import host_status
from .store import StoreError

bp = Blueprint("health", __name__)


@bp.get("/health")
def health():
    """Answer liveness, store reachability, and recording failures of this worker and of the whole host."""
    recorder = current_app.extensions["aspy.recorder"]
    answer = {"status": "ok", "version": __version__,
              "recording": {"failures": recorder.failures, "dropped": recorder.dropped,
                            "pending": recorder.waiting(),
                            "last_error": recorder.last_error}}
    # Every worker of this host, whichever one answers: writes failing anywhere make the host degraded.
    workers = host_status(recorder.status.folder) if recorder.status is not None else []
    failing = [w for w in workers if w["failing"]]
    answer["host"] = {"workers": len(workers), "failing_workers": len(failing),
                      "pending": sum(w["pending"] for w in workers),
                      "last_error": next((w["last_error"] for w in failing if w["last_error"]), None)}
    if failing or recorder.failing:
        answer["status"] = "degraded"
    try:
        answer["store"] = {"reachable": True, **current_app.extensions["aspy.store"].check()}
    except StoreError as exc:
        # The proxy still forwards; say so, but report the store as down.
        answer["status"] = "degraded"
        answer["store"] = {"reachable": False, "error": str(exc)}
    return jsonify(answer)
