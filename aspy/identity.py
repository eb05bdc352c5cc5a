"""Who traffic belongs to: a named client, or a legacy user known by the hash of its API key.

A request that names a client (by its path segment or its proxy token) is that client's.
Legacy traffic (``/v1/...`` with no client) is known by its key hash (``routing.user_hash``);
a client that took over legacy hashes (``legacy_user_hashes``, which ``aspy migrate`` writes)
owns that traffic too. This is the migration shim, and this module is its only place: the
session ledger, the in-flight list, the API's scopes and the migration all ask it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import Client, Config


@dataclass
class Identity:
    """Whose traffic this is: a named client, or a legacy user known by key hash."""

    client: Client | None
    user: str

    @property
    def client_id(self) -> str | None:
        """Return the client's id, None for a legacy user."""
        return self.client.id if self.client is not None else None


class Identities:
    """The configured clients, and which of them took over which legacy key hash."""

    def __init__(self, config: Config):
        self.clients = config.clients
        # A hash belongs to one client at most (config.py refuses it twice).
        self.owners = {h: c for c in config.clients.values() for h in c.legacy_user_hashes}

    def of(self, client_id: str | None, user: str) -> Identity:
        """Return the identity of traffic from a client (by id) or a legacy user, with the shim applied."""
        if client_id is not None:
            return Identity(self.clients.get(client_id), user)
        return Identity(self.owners.get(user), user)

    def owner(self, user: str) -> Client | None:
        """Return the client that took over a legacy key hash, if one did."""
        return self.owners.get(user)

    def clients_of(self, user: str) -> tuple[str, ...]:
        """Return the ids of the clients that took over a legacy key hash (none, or one)."""
        owner = self.owners.get(user)
        return (owner.id,) if owner is not None else ()
