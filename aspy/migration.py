"""Move an old hash-based setup to named clients, and bring in the earlier aspy's event logs.

``plan`` lists each legacy key hash seen with its figures and the client it would get;
``apply`` writes those clients into config.toml (through :mod:`aspy.config_file`: comments
and layout kept, a backup beside it) and re-attributes the stored sessions; ``import_logs``
reads the earlier aspy's JSONL event logs into the store as archived sessions, counting each
record with the same steps as live traffic (:class:`aspy.accounting.Tally`). Everything is
idempotent: a second run finds nothing left to do.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .accounting import Tally, event
from .billing import samplings
from .config import Config, client_id_problem, config_path
from .config_file import ConfigFileError, add_legacy_hashes
from .identity import Identities
from .models import STANDARD, ModelTable
from .prompts import read_request
from .records import ANONYMOUS, ENDED, FIVE_MINUTES, Session
from .sessions import write_tally
from .store import LegacyUser, Store, Transaction

HASH = re.compile(r"[0-9a-f]{16}")
IMPORTED = "imported"
# Event types of the earlier aspy that carry figures worth keeping; the rest are skipped.
IMPORTED_TYPES = frozenset({"Request", "Response", "ApiUsage", "ToolCall", "ToolResult", "Thinking",
                            "ContextCompact", "Error"})


class MigrationError(Exception):
    """A migration request that cannot be carried out as asked."""


@dataclass
class Move(LegacyUser):
    """One legacy key hash, with its figures, and the client that takes it over."""

    client: str
    new_client: bool
    in_config: bool


def parse_map(pairs: list[str]) -> dict[str, str]:
    """Read ``HASH=CLIENT_ID`` pairs, checking both sides."""
    mapping = {}
    for pair in pairs:
        user, sep, client = pair.partition("=")
        if not sep or not HASH.fullmatch(user):
            raise MigrationError(f"--map {pair!r}: expected HASH=CLIENT_ID with a 16-character lowercase hex hash")
        problem = client_id_problem(client)
        if problem:
            raise MigrationError(f"--map {pair!r}: {problem}")
        mapping[user] = client
    return mapping


def plan(config: Config, store: Store, mapping: dict[str, str]) -> list[Move]:
    """Return what a migration would do, one move per legacy key hash seen in the store."""
    identities = Identities(config)
    moves = []
    for seen in store.legacy_users():
        if seen.user == ANONYMOUS or not HASH.fullmatch(seen.user):
            continue
        owner = identities.owner(seen.user)
        client = mapping.get(seen.user) or (owner.id if owner else None) or f"legacy-{seen.user[:8]}"
        existing = config.clients.get(client)
        moves.append(Move(**vars(seen), client=client, new_client=existing is None,
                          in_config=existing is not None and seen.user in existing.legacy_user_hashes))
    done_before = {u for u, c in mapping.items() if c in config.clients and u in config.clients[c].legacy_user_hashes}
    unseen = set(mapping) - {m.user for m in moves} - done_before
    if unseen:
        raise MigrationError(f"--map names hashes with no legacy sessions in the store: {', '.join(sorted(unseen))}")
    return moves


def apply(config: Config, store: Store, moves: list[Move], provider: str | None) -> tuple[Path | None, int]:
    """Write the moves into config.toml and re-attribute sessions; return (backup, sessions moved)."""
    provider = provider or config.legacy.provider
    if provider not in config.providers:
        raise MigrationError(f"--provider {provider!r} is not a configured provider; expected one of: "
                             f"{', '.join(sorted(config.providers))}")
    backup = None
    additions = [m for m in moves if not m.in_config]
    if additions:
        try:
            backup = add_legacy_hashes(config.path or config_path(),
                                       [(m.client, m.user, legacy_name(m.user)) for m in additions], provider)
        except ConfigFileError as exc:
            raise MigrationError(str(exc)) from None
    moved = 0
    with store.transaction() as tx:
        for move in moves:
            name = config.clients[move.client].name if not move.new_client else legacy_name(move.user)
            moved += tx.reattribute(move.user, move.client, name)
    return backup, moved


def legacy_name(user: str) -> str:
    """Return the display name given to a client made from a legacy key hash."""
    return f"Legacy key {user[:8]}"


# The earlier aspy's event logs ------------------------------------------------------------


@dataclass
class LogSession:
    """The events of one (user, session) found in log files, as a session to archive."""

    session: Session
    # What its records add (events and text for search too), kept and written as the recorder's are.
    tally: Tally = field(default_factory=Tally)
    # The cache lifetime the session's last request asked for.
    cache_ttl: str = FIVE_MINUTES


@dataclass
class LogFile:
    """One JSONL log file, read."""

    path: Path
    digest: str
    lines: int
    sessions: dict[str, LogSession]
    skipped: int = 0
    bad_lines: list[int] = field(default_factory=list)


def parse_time(value: Any) -> float | None:
    """Read an RFC 3339 timestamp with up to nine fractional digits."""
    if not isinstance(value, str):
        return None
    trimmed = re.sub(r"(\.\d{6})\d+", r"\1", value.replace("Z", "+00:00"))
    try:
        return datetime.fromisoformat(trimmed).timestamp()
    except ValueError:
        return None


def duration_ms(value: Any) -> float | None:
    """Read a Rust Duration ``{"secs", "nanos"}`` as milliseconds."""
    if isinstance(value, dict) and isinstance(value.get("secs"), int):
        return value["secs"] * 1000 + value.get("nanos", 0) / 1e6
    return None


def read_log(path: Path, config: Config, models: ModelTable) -> LogFile:
    """Read one event log into sessions; unreadable lines are counted, not fatal."""
    raw = path.read_bytes()
    log = LogFile(path=path, digest=hashlib.sha256(raw).hexdigest(), lines=0, sessions={})
    identities = Identities(config)
    for number, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        log.lines += 1
        try:
            record = json.loads(line)
            at = parse_time(record.get("timestamp")) or parse_time(record["tracked_at"])
            if at is None or not isinstance(record.get("type"), str):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            log.bad_lines.append(number)
            continue
        if record["type"] not in IMPORTED_TYPES:
            log.skipped += 1
            continue
        _apply_record(_log_session(log, record, at, config, identities), record, at, config, models)
    return log


def _log_session(log: LogFile, record: dict, at: float, config: Config, identities: Identities) -> LogSession:
    """Return the session a log record belongs to, opening it on first sight."""
    user = record["user_id"] if isinstance(record.get("user_id"), str) else ANONYMOUS
    key = record["session_id"] if isinstance(record.get("session_id"), str) else None
    sid = "imp_" + hashlib.sha256(f"{user}\0{key}".encode()).hexdigest()[:20]
    if sid not in log.sessions:
        client = config.clients.get(user) or identities.owner(user)
        log.sessions[sid] = LogSession(Session(
            id=sid, claude_session_id=key, source=IMPORTED, client=client.id if client else None,
            client_name=client.name if client else None,
            provider=client.provider if client else config.legacy.provider,
            user=user if client is None or user != client.id else ANONYMOUS,
            started=at, last_activity=at, status=ENDED, ended=at, end_reason=IMPORTED))
    entry = log.sessions[sid]
    entry.session.started = min(entry.session.started, at)
    entry.session.last_activity = entry.session.ended = max(entry.session.last_activity, at)
    return entry


def _apply_record(entry: LogSession, record: dict, at: float, config: Config, models: ModelTable) -> None:
    """Add one log record (of IMPORTED_TYPES) to its session, with the same steps as live traffic."""
    s, kind, tally, capture = entry.session, record["type"], entry.tally, config.capture_content

    def note(name: str, **data: Any) -> None:
        tally.events.append(event(s, name, at, **data))

    if kind == "Request":
        s.requests += 1
        body = record["body"] if isinstance(record.get("body"), dict) else {}
        facts = read_request(json.dumps(body).encode(), "application/json")
        entry.cache_ttl = facts.cache_ttl
        tally.add_bucket(at, s, facts.model or None, STANDARD, requests=1)
        note("request", method=record.get("method"), path=record.get("path"), model=facts.model,
             stream=facts.stream, messages=facts.message_count, tools=facts.tool_count,
             body_bytes=record.get("body_size"), imported=True)
        if capture and facts.prompt.strip():
            tally.text(s, "user", at, facts.prompt)
    elif kind == "Response":
        status = record["status"] if isinstance(record.get("status"), int) else 0
        body = record["body"] if isinstance(record.get("body"), dict) else {}
        s.failed += status >= 400
        if status >= 400:
            tally.add_bucket(at, s, body["model"] if isinstance(body.get("model"), str) else None, STANDARD, failed=1)
        ttfb = duration_ms(record.get("ttfb"))
        tally.ttfb(s, ttfb)
        note("response", status=status, model=body.get("model"), stop_reason=body.get("stop_reason"),
             ttfb_ms=ttfb, duration_ms=duration_ms(record.get("duration")), imported=True)
        text = "".join(b.get("text", "") for b in body.get("content") or [] if isinstance(b, dict)
                       and b.get("type") == "text")
        if capture and text.strip():
            tally.text(s, "assistant", at, text)
    elif kind == "ApiUsage":
        model = record["model"] if isinstance(record.get("model"), str) else "unknown"
        usage = {"input_tokens": record.get("input_tokens"), "output_tokens": record.get("output_tokens"),
                 "cache_read_input_tokens": record.get("cache_read_tokens"),
                 "cache_creation_input_tokens": record.get("cache_creation_tokens")}
        # The log has no 5m/1h split: writes take the lifetime the session's last request asked for. The
        # log counts requests by their Request records: the buckets take only the tokens.
        tally.bill(s, at, samplings(usage, model, ttl=entry.cache_ttl), models, counted=None)
    elif kind == "ToolCall":
        tally.tool_call(s, at, record.get("tool_name") or "unknown", tool=record.get("tool_name"),
                        tool_use_id=record.get("id"), input=record.get("input") if capture else None, imported=True)
    elif kind == "ToolResult":
        is_error = record.get("success") is False
        tally.tool_result(s, at, record.get("tool_name") or "unknown", is_error, at, tool=record.get("tool_name"),
                          tool_use_id=record.get("id"), is_error=is_error,
                          duration_ms=duration_ms(record.get("duration")), imported=True)
    elif kind == "Thinking":
        tally.thinking(s, at, chars=len(str(record.get("content") or "")), preview=None, imported=True)
    elif kind == "ContextCompact":
        tally.compaction(s, at, before_tokens=record.get("previous_context"),
                         after_tokens=record.get("new_context"), imported=True)
    elif kind == "Error":
        note("error", status=None, error_type="proxy", message=str(record.get("message", ""))[:500], imported=True)


def read_logs(folder: Path, config: Config, models: ModelTable) -> list[LogFile]:
    """Read every ``*.jsonl`` log in a folder, oldest name first."""
    if not folder.is_dir():
        raise MigrationError(f"{folder}: not a folder")
    return [read_log(path, config, models) for path in sorted(folder.glob("*.jsonl"))]


def import_logs(store: Store, logs: list[LogFile]) -> list[tuple[LogFile, bool]]:
    """Write log files' sessions into the store; return each file and whether it was new."""
    results = []
    for log in logs:
        with store.transaction() as tx:
            fresh = tx.mark_imported(log.digest, log.path.name, log.lines)
            if fresh:
                for entry in log.sessions.values():
                    _store_session(tx, entry)
        results.append((log, fresh))
    return results


def _store_session(tx: Transaction, entry: LogSession) -> None:
    """Add an imported session, merging it into one an earlier file already brought in."""
    new = entry.session
    old = tx.get_session(new.id)
    if old is None:
        tx.insert_session(new)
    else:
        old.started, old.last_activity = min(old.started, new.started), max(old.last_activity, new.last_activity)
        old.ended = old.last_activity
        for name in ("requests", "failed", "cost_usd", "savings_usd", "tool_calls", "tool_failed",
                     "thinking_blocks", "ttfb_total_ms", "ttfb_count", "compactions"):
            setattr(old, name, getattr(old, name) + getattr(new, name))
        old.usage = old.usage + new.usage
        tx.save_session(old)
    entry.tally.events.sort(key=lambda e: e.timestamp)
    write_tally(tx, entry.tally)
