"""The JSON API under ``/api/``: stats, events, context, sessions, clients, session commands, search, usage.

Every answer's shape is written down in docs/api.md. A refusal raises AspyError, which the
app answers in Anthropic's shape (aspy/errors.py). With ``[server] api_token`` set, every call
needs ``Authorization: Bearer <api_token>``, or a client's proxy token, which then sees that
client's data only (aspy/routing.py tells which).
"""
from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from . import commands, usage
from .accounting import warning_level
from .config import Config
from .errors import AspyError, answer_error
from .identity import Identities
from .records import status_of
from .routing import api_caller
from .store import ACTIVE, ENDED, EVENT_TYPES, IDLE, LIVE, Horizon, ModelUsage, Scope, Session, Store, StoreError
from .timerange import TimeRangeError, parse_time_range, parse_window, server_zone, zone
from .usage import USD_DIGITS, tokens_json

bp = Blueprint("api", __name__, url_prefix="/api")

USER_HASH = re.compile(r"[0-9a-f]{16}|anonymous")
MAX_LIMIT = 500


def iso(ts: float | None) -> str | None:
    """Return an ISO 8601 timestamp with offset (UTC), or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def bad_request(message: str) -> AspyError:
    """Return a 400 in Anthropic's shape."""
    return AspyError(400, message)


def config() -> Config:
    """Return the app's configuration."""
    return current_app.config["ASPY"]


def store() -> Store:
    """Return the app's store."""
    return current_app.extensions["aspy.store"]


def ledger() -> Any:
    """Return the app's session ledger (aspy.sessions.Sessions), for the session commands."""
    return current_app.extensions["aspy.sessions"]


@bp.errorhandler(StoreError)
def store_unavailable(exc: StoreError) -> Response:
    """Answer a store failure with 503, saying what failed."""
    current_app.logger.error("API call failed on the store: %s", exc)
    # The failure is the store's, not the caller's request: 503, not 500.
    return answer_error(AspyError(503, f"The store is unavailable: {exc}"))


@bp.before_request
def authorize() -> None:
    """Check the API token, or a client's proxy token that limits the caller to that client."""
    caller = api_caller(config(), request.headers.get("Authorization"))
    if caller is None:
        raise AspyError(401, "This API needs Authorization: Bearer <api_token> (or a client's proxy token)")
    g.only_client = caller.client.id if caller.client is not None else None


def text_value(value: Any, name: str) -> str:
    """Return a text parameter, or raise 400: a string that a store can hold (no NUL, no lone surrogate)."""
    if not isinstance(value, str):
        raise bad_request(f"{name} must be a string")
    try:
        # JSON's "\\ud800" escapes make strings that no UTF-8 store can take.
        value.encode()
    except UnicodeEncodeError:
        raise bad_request(f"{name} must be text without lone surrogates") from None
    if "\x00" in value:
        raise bad_request(f"{name} must be text without NUL characters")
    return value


def scope(args: dict[str, Any] | None = None) -> Scope:
    """Build the scope a request asks for from ``client``, ``user``, ``session`` and ``tag``."""
    args = request.args if args is None else args
    client, user, session, tag = (None if args.get(name) is None else text_value(args.get(name), name)
                                  for name in ("client", "user", "session", "tag"))
    # A tag no client carries is no mistake: it selects nothing.
    tagged = None if tag is None else tuple(c.id for c in config().clients.values() if tag in c.tags)
    if g.only_client:
        if client not in (None, g.only_client):
            raise AspyError(403, "This token can only read its own client's data")
        client = g.only_client
    if client is not None and client not in config().clients:
        raise AspyError(404, f"Unknown client {client!r}")
    user_clients: tuple[str, ...] = ()
    if user is not None:
        if not isinstance(user, str) or not USER_HASH.fullmatch(user):
            raise bad_request("user must be a 16-character lowercase hex key hash, or 'anonymous'")
        user_clients = Identities(config()).clients_of(user)
    if session is not None:
        found = store().get_session(session)
        if found is None or (g.only_client and found.client != g.only_client):
            raise AspyError(404, f"Unknown session {session!r}")
    return Scope(client=client, user=user, user_clients=user_clients, session=session, clients=tagged)


def time_zone() -> tuple[str, Any]:
    """Return the ``tz`` parameter's name and zone, else the server's own."""
    name = request.args.get("tz")
    if name is None:
        return server_zone()
    try:
        return name, zone(text_value(name, "tz"))
    except TimeRangeError as exc:
        raise bad_request(str(exc)) from None


def window(tz: Any = None) -> tuple[float | None, float | None]:
    """Return the (since, until) a GET asks for with ``time_range``, or ``since`` and ``until``; days follow tz."""
    args = request.args
    try:
        return parse_window(args.get("time_range"), args.get("since"), args.get("until"), time.time(),
                            tz if tz is not None else time_zone()[1])
    except TimeRangeError as exc:
        raise bad_request(str(exc)) from None


def limit_arg(default: int, maximum: int = MAX_LIMIT) -> int:
    """Return the ``limit`` parameter, checked."""
    raw = request.args.get("limit", default)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise bad_request(f"limit must be a whole number, got {raw!r}") from None
    if not 1 <= value <= maximum:
        raise bad_request(f"limit must be between 1 and {maximum}")
    return value


def horizon() -> Horizon:
    """Return when an open session counts as idle and as ended, now: reads derive statuses, never write them."""
    now = time.time()
    return Horizon(idle_before=now - config().sessions.idle_after, ended_before=now - config().sessions.end_after)


def cost_json(total: float, savings: float, by_model: dict[str, ModelUsage]) -> dict[str, Any]:
    """Return cost in the API's shape; unknown models are listed, never priced."""
    return {"total_usd": round(total, USD_DIGITS), "savings_usd": round(savings, USD_DIGITS),
            "by_model": {m: round(u.cost_usd, USD_DIGITS) for m, u in sorted(by_model.items())},
            "unpriced_models": sorted(m for m, u in by_model.items() if not u.priced)}


def context_json(s: Session | None, client: str | None = None) -> dict[str, Any]:
    """Return a session's context gauge."""
    if s is None:
        return {"session": None, "client": client, "model": None, "current_tokens": 0, "limit_tokens": None,
                "usage_pct": 0.0, "warning_level": "normal", "compactions": 0}
    pct = round(100 * s.context_tokens / s.context_limit, 2) if s.context_limit else 0.0
    return {"session": s.id, "claude_session_id": s.claude_session_id, "client": s.client, "user": s.user,
            "model": s.context_model, "current_tokens": s.context_tokens, "limit_tokens": s.context_limit,
            "usage_pct": pct, "warning_level": warning_level(pct), "compactions": s.compactions}


def session_json(s: Session) -> dict[str, Any]:
    """Return a session with its statistics."""
    rules = config().sessions
    status = status_of(s, time.time(), rules.idle_after, rules.end_after)
    # Past end_after it has ended, even before the writer's upkeep marks it so.
    ended, reason = (s.ended, s.end_reason) if s.status == ENDED or status != ENDED else \
        (s.last_activity + rules.end_after, "timeout")
    return {
        "id": s.id, "claude_session_id": s.claude_session_id, "source": s.source, "client": s.client,
        "client_name": s.client_name, "user": s.user, "provider": s.provider,
        "status": status, "started": iso(s.started),
        "last_activity": iso(s.last_activity), "ended": iso(ended), "end_reason": reason,
        "stats": {
            "requests": {"total": s.requests, "failed": s.failed},
            "tokens": tokens_json(s.usage),
            "cost": cost_json(s.cost_usd, s.savings_usd, s.by_model),
            "tools": {"total_calls": s.tool_calls, "failed_calls": s.tool_failed,
                      "by_tool": {t: calls for t, (calls, _) in sorted(s.by_tool.items())},
                      "failed_by_tool": {t: failed for t, (_, failed) in sorted(s.by_tool.items()) if failed}},
            "thinking_blocks": s.thinking_blocks,
            "avg_ttfb_ms": round(s.ttfb_total_ms / s.ttfb_count, 1) if s.ttfb_count else None,
        },
        "context": context_json(s),
    }


def event_json(event) -> dict[str, Any]:
    """Return an event: its fixed keys, then its own data."""
    return {"id": event.id, "type": event.type, "timestamp": iso(event.timestamp), "session": event.session,
            "client": event.client, "user": event.user, **event.data}


@bp.get("/stats")
def stats():
    """Answer aggregate figures, for everything or a scope; with a window, of the exchanges in it."""
    wanted = scope()
    totals = store().totals(wanted, horizon(), *window())
    return jsonify({
        "requests": {"total": totals.requests, "failed": totals.failed},
        "tokens": tokens_json(totals.usage),
        "cost": cost_json(totals.cost_usd, totals.savings_usd, totals.by_model),
        "tools": {"total_calls": totals.tool_calls, "failed_calls": totals.tool_failed,
                  "by_tool": dict(sorted(totals.by_tool.items()))},
        "sessions": {ACTIVE: totals.active, IDLE: totals.idle, ENDED: totals.ended},
    })


@bp.get("/events")
def events():
    """Answer events, newest first."""
    kinds = [t for t in request.args.get("type", "").split(",") if t]
    unknown = [t for t in kinds if t not in EVENT_TYPES]
    if unknown:
        raise bad_request(f"unknown event type {unknown[0]!r}; expected one of: {', '.join(EVENT_TYPES)}")
    wanted = scope()
    since, until = window()
    found = store().events(wanted, kinds, since, limit_arg(50), until)
    return jsonify({"events": [event_json(e) for e in found]})


@bp.get("/context")
def context():
    """Answer the context gauge: one object when filtered, else one per live session."""
    wanted = scope()
    if not any(name in request.args for name in ("client", "user", "session")):
        live = store().sessions(wanted, LIVE, horizon(), MAX_LIMIT)
        return jsonify({"contexts": [context_json(s) for s in live]})
    if wanted.session is not None:
        return jsonify(context_json(store().get_session(wanted.session)))
    live = store().sessions(wanted, LIVE, horizon(), 1)
    return jsonify(context_json(live[0] if live else None, wanted.client))


@bp.get("/sessions")
def list_sessions():
    """Answer sessions with their statistics, most recently active first."""
    status = request.args.get("status")
    if status not in (None, ACTIVE, IDLE, ENDED):
        raise bad_request("status must be active, idle or ended")
    wanted = scope()
    found = store().sessions(wanted, status, horizon(), limit_arg(50), *window())
    return jsonify({"sessions": [session_json(s) for s in found]})


@bp.get("/clients")
def clients():
    """Answer the configured clients with their live session count and last activity."""
    activity = store().client_activity(horizon())
    shown = [c for c in config().clients.values() if g.only_client in (None, c.id)]
    return jsonify({"clients": [
        {"id": c.id, "name": c.name, "provider": c.provider, "tags": list(c.tags),
         "active_sessions": activity.get(c.id, (0, None))[0], "last_seen": iso(activity.get(c.id, (0, None))[1])}
        for c in shown]})


@bp.get("/in_flight")
def in_flight():
    """Answer the requests every worker of this host is forwarding right now, oldest first."""
    wanted = scope({name: request.args.get(name) for name in ("client", "user")})
    session = request.args.get("session")
    now = time.time()
    found = [e for e in current_app.extensions["aspy.in_flight"].host()
             if wanted.client in (None, e["client"]) and session in (None, e["session"])
             and (wanted.user is None or e["user"] == wanted.user or e["client"] in wanted.user_clients)]
    return jsonify({"in_flight": [{**e, "started": iso(e["started"]), "elapsed_ms": round((now - e["started"]) * 1000),
                                   "ttfb_ms": None if e["ttfb_ms"] is None else round(e["ttfb_ms"], 1)}
                                  for e in found]})


def json_body() -> dict[str, Any]:
    """Return the request's JSON object, or raise 400."""
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        raise bad_request("the body is nested too deeply") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    return body


def text_field(body: dict, name: str, required: bool = False, longest: int = 256) -> str | None:
    """Return a string field of a JSON body, checked."""
    value = body.get(name)
    if value is None:
        if required:
            raise bad_request(f"{name} is required")
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > longest:
        raise bad_request(f"{name} must be a non-empty string of at most {longest} characters")
    return text_value(value, name)


@bp.post("/session/start")
def start_session():
    """Register a session for a client or a legacy user."""
    body = json_body()
    client, user = text_field(body, "client"), text_field(body, "user")
    key = text_field(body, "session_id", required=True)
    source = text_field(body, "source")
    if (client is None) == (user is None):
        raise bad_request('give exactly one of "client" or "user"')
    if g.only_client and client != g.only_client:
        raise AspyError(403, "This token can only start sessions for its own client")
    if client is not None and client not in config().clients:
        raise AspyError(404, f"Unknown client {client!r}")
    if user is not None and not USER_HASH.fullmatch(user):
        raise bad_request("user must be a 16-character lowercase hex key hash, or 'anonymous'")
    session, created = commands.start_session(ledger(), client, user, key, source)
    return jsonify({"created": created, "session": session_json(store().get_session(session.id))}), \
        201 if created else 200


@bp.post("/session/end")
def end_session():
    """End a session now and answer its final statistics."""
    body = json_body()
    key = text_field(body, "session_id", required=True)
    reason = text_field(body, "reason") or "api"
    found = store().get_session(key)
    if found is None or (g.only_client and found.client != g.only_client):
        raise AspyError(404, f"Unknown session {key!r}")
    commands.end_session(ledger(), found.id, reason)
    return jsonify({"session": session_json(store().get_session(found.id))})


@bp.post("/search")
def search():
    """Search prompts and answers; answer ranked matches with snippets."""
    body = json_body()
    keyword = text_field(body, "keyword", required=True, longest=500)
    words = re.findall(r"\w+", keyword)
    if not words:
        raise bad_request("keyword must contain at least one word")
    role = body.get("role")
    if role not in (None, "user", "assistant"):
        raise bad_request("role must be user or assistant")
    limit = body.get("limit", 20)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 100:
        raise bad_request("limit must be a whole number from 1 to 100")
    try:
        since, until = parse_time_range(body.get("time_range"), time.time())
    except TimeRangeError as exc:
        raise bad_request(str(exc)) from None
    wanted = scope({k: body.get(k) for k in ("client", "user", "session")})
    total, hits = store().search(words, since, until, wanted, role, limit)
    return jsonify({"total_matches": total, "results": [
        {"session": h.session, "client": h.client, "timestamp": iso(h.timestamp), "role": h.role,
         "snippet": h.snippet, "score": round(h.score, 4)} for h in hits]})


@bp.get("/usage")
def usage_figures():
    """Answer figures over time, grouped by time, client, model, tag or session; as JSON or CSV."""
    tz_name, tz = time_zone()
    try:
        group_by = usage.parse_group_by(request.args.get("group_by", "day"))
    except usage.UsageError as exc:
        raise bad_request(str(exc)) from None
    kind = request.args.get("format", "json")
    if kind not in ("json", "csv"):
        raise bad_request("format must be json or csv")
    question = usage.Question(group_by, tz_name, tz, *window(tz), scope())
    figures = usage.answer(store(), question, {c.id: c.tags for c in config().clients.values()})
    if kind == "csv":
        return Response(usage.to_csv(figures), mimetype="text/csv")
    # Keys in the documented order (a row's keys, then its figures); a year by day and client is
    # megabytes, and not sorting them is also quicker.
    return Response(current_app.json.dumps(figures, sort_keys=False, separators=(",", ":")),
                    mimetype="application/json")


@bp.route("/<path:_unknown>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def unknown(_unknown: str):
    """Answer an unknown API path with 404."""
    raise AspyError(404, f"No API endpoint /api/{_unknown}")
