"""The API's session commands: register a session, end one now.

They write, so they live here rather than in the API's reads: ``POST /api/session/start``
and ``POST /api/session/end`` call them with the app's session ledger (:mod:`aspy.sessions`),
and each runs in one store transaction that first ends the sessions already past
``end_after``, as the ledger's upkeep would.
"""
from __future__ import annotations

import time

from .accounting import event, session_summary
from .records import ANONYMOUS, ENDED, Session
from .sessions import REGISTERED, Sessions


def start_session(ledger: Sessions, client_id: str | None, user: str | None, key: str,
                  source: str | None) -> tuple[Session, bool]:
    """Register a session for a client or user; return it and whether it is new."""
    identity = ledger.identities.of(client_id, user or ANONYMOUS)
    with ledger.store.transaction() as tx:
        ledger.expire(tx, time.time())
        found = tx.find_session(identity.client_id, identity.user, key)
        if found:
            return found, False
        return ledger.open(tx, identity, key, REGISTERED, time.time(), requested_source=source), True


def end_session(ledger: Sessions, key: str, reason: str) -> Session | None:
    """End a session now; return it as archived, or None if there is no such session."""
    now = time.time()
    with ledger.store.transaction() as tx:
        ledger.expire(tx, now)
        session = tx.get_session(key)
        if session is None:
            return None
        if session.status != ENDED:
            session.status, session.ended, session.end_reason = ENDED, now, reason
            tx.save_session(session)
            tx.add_events([event(session, "session_end", now, reason=reason, stats=session_summary(session))])
    return session
