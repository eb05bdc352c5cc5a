"""Declare config.toml's tables and keys, then read and check a file against them.

The file is found at ``--config``, else ``$ASPY_CONFIG``, else
``$XDG_CONFIG_HOME/aspy/config.toml``. No file at all is valid: aspy then runs in
legacy mode to Anthropic. Each key is declared once, with :func:`key`, in the settings class
of its table: its default in the file's own words, the rule its value must pass, and what it
means (the README's key table is checked against these). :class:`Config` lists the tables.
Every mistake is collected and reported in one :class:`ConfigError` whose lines name the
file, the table, the key and what was expected.
"""
from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from .addresses import split_listen, store_url_problem, url_problem

DEFAULT_PROVIDER = "anthropic"
DEFAULT_BASE_URL = "https://api.anthropic.com"
CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
PROXY_TOKEN = re.compile(r"pt_[A-Za-z0-9_-]{16,128}")
# First path segments that mean something to aspy itself, so no client may take them.
RESERVED_SEGMENTS = frozenset({"api", "v1", "health", "metrics", "dashboard"})
DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
# Longer than any timeout or session gap anyone means; a socket cannot even wait ~290 years.
MAX_DURATION = 365 * 86400
MAX_WORKERS = 256
# Each connection holds at least one file descriptor, and the shipped unit allows 65,536.
MAX_WORKER_CONNECTIONS = 65536
MAX_RETENTION_DAYS = 36500
MAX_EVENTS_PER_SESSION = 1_000_000
# The default of a key that takes its table's name, such as a provider's display name.
TABLE_NAME = object()

Rule = Callable[[Any], Any]


class ConfigError(Exception):
    """One or more mistakes in the configuration, each on its own line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class KeyDeclaration:
    """How one key of config.toml is read: its rule, its default as written in the file, what it means."""

    rule: Rule
    # The default as config.toml would say it, a function making it, or TABLE_NAME.
    written: Any
    meaning: str
    # For a required key, what a missing value should have been; its default then only lets checking go on.
    required: str | None = None
    # The default as the README shows it, when the written one says nothing (a path found at run time).
    shown: str | None = None


def key(default: Any, rule: Rule, meaning: str, *, required: str | None = None, shown: str | None = None,
        secret: bool = False) -> Any:
    """Declare a key: its default as config.toml would say it (or a function making it), its rule, its meaning."""
    spec = KeyDeclaration(rule, default, meaning, required, shown)
    if callable(default):
        return field(default_factory=default, repr=not secret, metadata={"key": spec})
    if default is TABLE_NAME:
        return field(repr=not secret, metadata={"key": spec})
    # A written default passes its own rule, which turns it into the value aspy uses ("5m": 300.0).
    return field(default=None if default is None else rule(default), repr=not secret, metadata={"key": spec})


def keys(settings: type) -> dict[str, KeyDeclaration]:
    """Return the keys a settings class declares, in their order."""
    return {f.name: f.metadata["key"] for f in fields(settings) if "key" in f.metadata}


def _typed(value: Any, kind: type, expected: str) -> Any:
    """Return value if it is of the kind, else raise ValueError saying what was expected."""
    # A bool is an int to isinstance, but never one in a config file.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"expected {expected}, got {value!r}")
    return value


def flag(value: Any) -> bool:
    """Check true or false."""
    return _typed(value, bool, "true or false")


def text(expected: str) -> Rule:
    """Make a rule for any string."""
    return lambda value: _typed(value, str, expected)


def whole(low: int, high: int, unit: str) -> Rule:
    """Make a rule for a whole number of units from low to high."""
    def rule(value: Any) -> int:
        if not low <= _typed(value, int, f"a whole number of {unit}") <= high:
            raise ValueError(f"expected a whole number of {unit} from {low} to {high:,}, got {value}")
        return value
    return rule


def strings(pattern: str, expected: str) -> Rule:
    """Make a rule for a list of strings, each matching pattern."""
    def rule(value: Any) -> tuple[str, ...]:
        bad = [v for v in _typed(value, list, f"a list of {expected}")
               if not isinstance(v, str) or not re.fullmatch(pattern, v)]
        if bad:
            raise ValueError(f"expected a list of {expected}, got {bad!r}")
        return tuple(value)
    return rule


def parse_duration(value: Any) -> float | None:
    """Return seconds for ``"5m"``, ``"30s"``, ``"1h"``, ``"250ms"`` or a number; None if invalid."""
    seconds = None
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:
            return None
    elif isinstance(value, str):
        match = DURATION.fullmatch(value.strip())
        if match:
            seconds = float(match.group(1)) * DURATION_UNITS[match.group(2)]
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def duration(value: Any) -> float:
    """Check a duration above zero and up to 365 days; return it in seconds."""
    seconds = parse_duration(value)
    if seconds is None or not 0 < seconds <= MAX_DURATION:
        raise ValueError('expected a duration above zero and up to 365 days, such as "30s", "5m" or "1h", '
                         f"got {value!r}")
    return seconds


def listen_address(value: Any) -> str:
    """Check ``host:port`` and return it as it is bound."""
    host, port = split_listen(_typed(value, str, 'a string "host:port"'))
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bearer_token(value: Any) -> str:
    """Check a token that clients of the API send in an Authorization header."""
    if len(_typed(value, str, "a string")) < 16:
        raise ValueError("expected at least 16 characters")
    if not (value.isascii() and value.isprintable() and value == value.strip()):
        # Sent in a header, such a token could never match.
        raise ValueError("expected printable ASCII characters, without spaces at either end")
    return value


def store_url(value: Any) -> str:
    """Check a store URL that aspy can open."""
    problem = store_url_problem(_typed(value, str, "a string URL"))
    if problem:
        raise ValueError(problem)
    return value


def upstream_url(value: Any) -> str:
    """Check an upstream base URL; return it without a trailing slash."""
    problem = url_problem(value)
    if problem:
        raise ValueError(problem)
    return value.rstrip("/")


def env_name(value: Any) -> str:
    """Check the name of an environment variable."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", _typed(value, str, "the name of an environment variable")):
        raise ValueError(f"expected an environment variable name, got {value!r}")
    return value


def pt_token(value: Any) -> str:
    """Check a proxy token as ``aspy token new`` makes them."""
    if not PROXY_TOKEN.fullmatch(_typed(value, str, "a string")):
        raise ValueError('expected "pt_" followed by at least 16 URL-safe characters (make one with `aspy token new`)')
    return value


def state_dir() -> Path:
    """Return where aspy keeps its local state: ``$XDG_STATE_HOME/aspy``."""
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "aspy"


def default_store_url() -> str:
    """Return the embedded store's default location under ``$XDG_STATE_HOME``."""
    return f"sqlite:///{state_dir() / 'aspy.db'}"


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """The ``[server]`` table."""

    listen: str = key("127.0.0.1:8080", listen_address, "address to listen on")
    workers: int = key(2, whole(1, MAX_WORKERS, "worker processes"),
                       f"gunicorn worker processes (gevent), 1 to {MAX_WORKERS}")
    worker_connections: int = key(
        1000, whole(1, MAX_WORKER_CONNECTIONS, "connections per worker"),
        f"connections each worker serves for the proxy at once, 1 to {MAX_WORKER_CONNECTIONS:,}; 64 more are kept "
        "for `/health` and `/metrics`, and a proxy request beyond gets 529 `overloaded_error`")
    api_token: str | None = key(None, bearer_token, "when set, `/api/*` and `/metrics` need it as a bearer token",
                                secret=True)
    upstream_timeout: float = key("600s", duration, "wait this long for upstream headers (504 past it), and "
                                                    "between two reads of a stream")
    connect_timeout: float = key("10s", duration, "connecting to the upstream (502 past it)")
    read_timeout: float = key("30s", duration, "a new connection's request headers must arrive within it (2 s "
                                               "while the worker is full), and a body may pause no longer (408 "
                                               "past it)")

    @property
    def host(self) -> str:
        """Return the host to listen on (an IPv6 one without brackets)."""
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        """Return the port to listen on."""
        return split_listen(self.listen)[1]


@dataclass(frozen=True, kw_only=True)
class StoreSettings:
    """The ``[store]`` table."""

    url: str = key(default_store_url, store_url, "where sessions live: `sqlite:////absolute/path.db` (four slashes) "
                                                 "or `sqlite:///~/path.db`; `postgresql://...` to share one database",
                   shown="`sqlite:///$XDG_STATE_HOME/aspy/aspy.db`")
    retention_days: int = key(90, whole(1, MAX_RETENTION_DAYS, "days"),
                              f"how long events are kept, 1 to {MAX_RETENTION_DAYS:,}")


@dataclass(frozen=True, kw_only=True)
class SessionSettings:
    """The ``[sessions]`` table, durations in seconds."""

    idle_after: float = key("5m", duration, "no traffic this long: idle")
    end_after: float = key("60m", duration, "no traffic this long: ended and archived")
    events_per_session: int = key(500, whole(1, MAX_EVENTS_PER_SESSION, "events"),
                                  f"live events kept per session, 1 to {MAX_EVENTS_PER_SESSION:,}")


@dataclass(frozen=True, kw_only=True)
class CaptureSettings:
    """The ``[capture]`` table."""

    content: bool = key(True, flag, "keep prompt and answer text for search")


@dataclass(frozen=True, kw_only=True)
class LegacySettings:
    """The ``[legacy]`` table: requests that carry no client segment."""

    enabled: bool = key(True, flag, "accept `/v1/...` with no client segment")
    provider: str = key(DEFAULT_PROVIDER, text("a provider name"), "where legacy requests go")


@dataclass(frozen=True, kw_only=True)
class Provider:
    """An upstream that speaks the Messages API (or Bedrock's framing of it): a ``[providers.<id>]`` table."""

    id: str
    base_url: str = key(DEFAULT_BASE_URL, upstream_url, "upstream base URL; its path is kept (`https://host/anthropic`)",
                        required="a URL")
    name: str = key(TABLE_NAME, text("a string"), "display name")
    api_key_env: str | None = key(None, env_name, "the proxy sends this variable's value as the key and drops the "
                                                  "client's")


@dataclass(frozen=True, kw_only=True)
class Client:
    """A named user of the proxy, reached as ``/<id>/...`` or ``/<proxy_token>/...``: a ``[clients.<id>]`` table."""

    id: str
    name: str = key(TABLE_NAME, text("a string"), "display name", required="a string")
    provider: str = key(DEFAULT_PROVIDER, text("a provider name"), "a `[providers.*]` name", required="a string")
    tags: tuple[str, ...] = key([], strings(r".{1,64}", "short strings"), "labels")
    proxy_token: str | None = key(None, pt_token, "`pt_...`: the client is then reached as `/<proxy_token>/...` "
                                                  "only", secret=True)
    legacy_user_hashes: tuple[str, ...] = key([], strings(r"[0-9a-f]{16}", "16 lowercase hex characters each"),
                                              "old API-key hashes this client takes over")


def client_id_problem(cid: str) -> str | None:
    """Say why a client id cannot be used, or return None."""
    if not CLIENT_ID.fullmatch(cid):
        return "client id must be 1 to 64 of A-Z a-z 0-9 . _ -"
    if cid.lower() in RESERVED_SEGMENTS or cid.startswith("pt_") or cid in (".", ".."):
        return (f"client id {cid!r} is reserved (api, v1, health, metrics, dashboard, ., .., "
                "and anything starting with pt_)")
    return None


def table() -> Any:
    """Declare a table of config.toml, read into the settings class its attribute is annotated with."""
    return field(metadata={"table": True})


def tables(entry: type, example: str, id_problem: Callable[[str], str | None] = lambda _: None,
           builtin: tuple = ()) -> Any:
    """Declare a family of named tables, such as ``[clients.<id>]``, each read into an entry."""
    return field(metadata={"entry": entry, "example": example, "id_problem": id_problem, "builtin": builtin})


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything aspy was told, checked: one attribute per table of config.toml."""

    path: Path | None
    server: ServerSettings = table()
    store: StoreSettings = table()
    sessions: SessionSettings = table()
    capture: CaptureSettings = table()
    legacy: LegacySettings = table()
    clients: dict[str, Client] = tables(Client, "[clients.dev-1]", id_problem=client_id_problem)
    # A provider named anthropic exists unless the file defines its own.
    providers: dict[str, Provider] = tables(Provider, "[providers.anthropic]", builtin=(
        Provider(id=DEFAULT_PROVIDER, base_url=DEFAULT_BASE_URL, name="Anthropic"),))

    @property
    def capture_content(self) -> bool:
        """Tell whether prompt and answer text are kept (``[capture] content``)."""
        return self.capture.content


def config_path(explicit: str | os.PathLike | None = None) -> Path:
    """Return where the configuration is looked for, by the documented order."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("ASPY_CONFIG"):
        return Path(os.environ["ASPY_CONFIG"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "aspy" / "config.toml"


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Find, read and check the configuration; raise ConfigError on any mistake."""
    found = config_path(path)
    try:
        exists = found.exists()
    except OSError as exc:
        raise ConfigError([f"{found}: cannot read: {exc}"]) from None
    if not exists:
        if path or os.environ.get("ASPY_CONFIG"):
            raise ConfigError([f"{found}: file not found"])
        return parse_config({}, None)
    try:
        data = tomllib.loads(found.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{found}: cannot read: {exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{found}: not valid TOML: {exc}"]) from None
    except RecursionError:
        raise ConfigError([f"{found}: not valid TOML: arrays or tables nested too deeply"]) from None
    return parse_config(data, found)


def parse_config(data: dict[str, Any], path: Path | None) -> Config:
    """Check a decoded TOML document and build the Config it describes; raise ConfigError naming every mistake."""
    reader = _Reader(path)
    config = reader.config(data)
    for check in (_session_gaps, _references, _owned_once):
        for table_name, name, message in check(config):
            reader.problem(table_name, name, message)
    if reader.problems:
        raise ConfigError(reader.problems)
    return config


class _Reader:
    """Read a TOML document by the declarations, noting every mistake and carrying on with defaults."""

    def __init__(self, path: Path | None):
        self.path = path
        self.problems: list[str] = []

    def problem(self, table_name: str, name: str | None, message: str) -> None:
        """Note one mistake, naming file, table and key."""
        spot = f"[{table_name}]" + (f" {name}" if name else "")
        self.problems.append(f"{self.path or '(defaults)'}: {spot}: {message}")

    def config(self, data: dict[str, Any]) -> Config:
        """Read every table Config declares, noting any other."""
        declared = {f.name: f.metadata for f in fields(Config) if f.metadata}
        classes = get_type_hints(Config)
        for name in data.keys() - declared.keys():
            self.problem(name, None, f"unknown table; expected one of: {', '.join(sorted(declared))}")
        values: dict[str, Any] = {}
        for name, metadata in declared.items():
            if "table" in metadata:
                values[name] = self.table(classes[name], name, data.get(name, {}), {})
            else:
                values[name] = self.tables(name, data.get(name, {}), **metadata)
        return Config(path=self.path, **values)

    def tables(self, name: str, data: Any, entry: type, example: str, id_problem: Callable[[str], str | None],
               builtin: tuple) -> dict[str, Any]:
        """Read each ``[name.<id>]`` table into an entry, after the built-in ones."""
        entries = {item.id: item for item in builtin}
        if not isinstance(data, dict):
            self.problem(name, None, f"expected tables such as {example}")
            return entries
        for tid, value in data.items():
            problem = id_problem(tid)
            if problem:
                self.problem(f"{name}.{tid}", None, problem)
            if isinstance(value, dict):
                entries[tid] = self.table(entry, f"{name}.{tid}", value, {"id": tid})
            else:
                self.problem(f"{name}.{tid}", None, "expected a table")
        return entries

    def table(self, settings: Any, name: str, data: Any, given: dict[str, Any]) -> Any:
        """Read one table into its settings class; a key with a mistake keeps its default."""
        if not isinstance(data, dict):
            self.problem(name, None, "expected a table")
            data = {}
        declared = keys(settings)
        for unknown in data.keys() - declared.keys():
            self.problem(name, unknown, f"unknown key; expected one of: {', '.join(sorted(declared))}")
        values = dict(given)
        for kname, spec in declared.items():
            if kname in data:
                try:
                    values[kname] = spec.rule(data[kname])
                except ValueError as exc:
                    self.problem(name, kname, str(exc))
            elif spec.required:
                self.problem(name, kname, f"missing required field; expected {spec.required}")
            if kname not in values and spec.written is TABLE_NAME:
                values[kname] = given["id"]
        return settings(**values)


def _session_gaps(config: Config) -> Iterator[tuple[str, str, str]]:
    """Find a session that would end before it went idle."""
    if config.sessions.end_after < config.sessions.idle_after:
        yield "sessions", "end_after", "expected a duration no shorter than idle_after"


def _references(config: Config) -> Iterator[tuple[str, str, str]]:
    """Find a provider named by ``[legacy]`` or by a client that no table defines."""
    users = [("legacy", config.legacy.provider)] + [(f"clients.{c.id}", c.provider) for c in config.clients.values()]
    for table_name, provider in users:
        if provider not in config.providers:
            yield table_name, "provider", (f"unknown provider {provider!r}; expected one of: "
                                           f"{', '.join(sorted(config.providers))}")


def _owned_once(config: Config) -> Iterator[tuple[str, str, str]]:
    """Find a legacy hash or proxy token that two clients claim, or an API token that is a client's too."""
    hash_owner: dict[str, str] = {}
    token_owner: dict[str, str] = {}
    for client in config.clients.values():
        for user in client.legacy_user_hashes:
            if user in hash_owner:
                yield (f"clients.{client.id}", "legacy_user_hashes", f"{user} is taken over by "
                       f"clients.{hash_owner[user]} already; expected each hash in one client only")
            hash_owner.setdefault(user, client.id)
        token = client.proxy_token
        if token in token_owner:
            yield f"clients.{client.id}", "proxy_token", f"duplicate proxy token: clients.{token_owner[token]} has " \
                                                         "the same one"
        elif token:
            token_owner[token] = client.id
    owner = token_owner.get(config.server.api_token or "")
    if owner:
        yield "server", "api_token", (f"expected a token of its own, not clients.{owner}'s proxy_token (that client "
                                      "could then read every client's data)")
