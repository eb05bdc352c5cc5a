"""``GET /dashboard``: a web page for people, drawn in the browser from the JSON API alone.

The page, its stylesheet, its script and the one vendored chart library (uPlot, MIT, its
licence beside it) ship in the package under ``aspy/web/``: nothing is fetched from
elsewhere and nothing is built at install. The page itself holds no data, so it needs no
token; the API calls its script makes carry the token the user gives it. A strict
Content-Security-Policy lets the page load only its own files and talk only to this
origin, so that text recorded from traffic can never run as code in it.
"""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, redirect, send_from_directory, url_for
from werkzeug.wrappers import Response as BaseResponse

from .errors import AspyError

WEB = Path(__file__).with_name("web")
bp = Blueprint("dashboard", __name__, url_prefix="/dashboard", static_folder="web", static_url_path="/static")

# No inline script or style, no eval, no other origin; the page's forms are handled by its script.
CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self'",
    "connect-src 'self'", "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'",
))


@bp.after_request
def secure_headers(response: Response) -> Response:
    """Add the page's security headers, and ask browsers to check for a newer copy on every load."""
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("")
def page() -> Response:
    """Answer the dashboard: a static page whose script reads the API."""
    # The page links its files relative to itself, so it works under any prefix nginx adds.
    return send_from_directory(WEB, "index.html", mimetype="text/html")


@bp.get("/")
def trailing_slash() -> BaseResponse:
    """Send /dashboard/ to /dashboard, where the page's relative links resolve."""
    return redirect(url_for("dashboard.page"))


@bp.route("/<path:_rest>")
def unknown(_rest: str):
    """Answer any other path under /dashboard with 404 (never the proxy's "Unknown client")."""
    raise AspyError(404, f"No dashboard page /dashboard/{_rest}")
