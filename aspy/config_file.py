"""Edit config.toml in place for ``aspy token new --write`` and ``aspy migrate``: comments and layout kept.

Each edit reads the file with tomlkit, changes one table, checks the result as aspy would
read it (a file aspy would refuse to start with is never written), keeps a timestamped backup
beside the file and replaces it atomically.
"""
from __future__ import annotations

import os
import shutil
import time
import tomllib
from pathlib import Path

import tomlkit

from .config import ConfigError, parse_config


class ConfigFileError(Exception):
    """An edit of config.toml that cannot be made as asked."""


def add_legacy_hashes(path: Path, additions: list[tuple[str, str, str]], provider: str) -> Path | None:
    """Give clients the legacy key hashes they take over, making the clients that are new; return the backup.

    Each addition is (client id, key hash, display name if the client is new).
    """
    doc = _read(path)
    if "clients" not in doc:
        doc["clients"] = tomlkit.table(is_super_table=True)
    clients = doc["clients"]
    for client, user, name in additions:
        if client in clients:
            hashes = clients[client].setdefault("legacy_user_hashes", tomlkit.array())
            if user not in hashes:
                hashes.append(user)
        else:
            table = tomlkit.table()
            table["name"] = name
            table["provider"] = provider
            table["legacy_user_hashes"] = [user]
            clients[client] = table
    return _write(path, doc)


def set_proxy_token(path: Path, client: str, token: str) -> Path | None:
    """Store a client's proxy token in config.toml; return the backup."""
    doc = _read(path)
    if client not in doc.get("clients", {}):
        raise ConfigFileError(f"{path} has no [clients.{client}] table")
    doc["clients"][client]["proxy_token"] = token
    return _write(path, doc)


def _read(path: Path) -> tomlkit.TOMLDocument:
    """Read config.toml for editing (an empty document if there is none)."""
    return tomlkit.parse(path.read_text(encoding="utf-8") if path.exists() else "")


def _write(path: Path, doc: tomlkit.TOMLDocument) -> Path | None:
    """Check and write an edited config.toml atomically, keeping a backup; return it."""
    new_text = tomlkit.dumps(doc)
    # Never write a file aspy would refuse to start with.
    try:
        parse_config(tomllib.loads(new_text), path)
    except ConfigError as exc:
        raise ConfigFileError("the migrated configuration would not be valid:\n  "
                              + "\n  ".join(exc.problems)) from None
    backup = None
    if path.exists():
        backup = path.with_name(f"{path.name}.bak-{time.strftime('%Y%m%dT%H%M%S')}")
        shutil.copy2(path, backup)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(new_text, encoding="utf-8")
    os.replace(temporary, path)
    return backup
