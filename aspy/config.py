"""Read config.toml and check every table and key before anything is served.

The file is found at ``--config``, else ``$ASPY_CONFIG``, else
``$XDG_CONFIG_HOME/aspy/config.toml``. No file at all is valid: aspy then runs in
legacy mode to Anthropic. Every mistake is collected and reported in one
:class:`ConfigError` whose lines name the file, the table, the key and what was expected.
"""
from __future__ import annotations

import importlib.util
import ipaddress
import json
import math
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEFAULT_LISTEN = "127.0.0.1:8080"
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
DEFAULT_WORKER_CONNECTIONS = 1000
# Each connection holds at least one file descriptor, and the shipped unit allows 65,536.
MAX_WORKER_CONNECTIONS = 65536
MAX_RETENTION_DAYS = 36500
MAX_EVENTS_PER_SESSION = 1_000_000
HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


class ConfigError(Exception):
    """One or more mistakes in the configuration, each on its own line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class Provider:
    """An upstream that speaks the Messages API (or Bedrock's framing of it)."""

    id: str
    base_url: str
    name: str
    api_key_env: str | None = None


@dataclass(frozen=True)
class Client:
    """A named user of the proxy, reached as ``/<id>/...`` or ``/<proxy_token>/...``."""

    id: str
    name: str
    provider: str
    tags: tuple[str, ...] = ()
    proxy_token: str | None = field(default=None, repr=False)
    legacy_user_hashes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Server:
    """The ``[server]`` table."""

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 2
    # Connections each gevent worker serves at once (gunicorn's worker_connections).
    worker_connections: int = DEFAULT_WORKER_CONNECTIONS
    api_token: str | None = field(default=None, repr=False)
    # Seconds to wait for upstream headers, and between two reads of its body.
    upstream_timeout: float = 600.0
    connect_timeout: float = 10.0
    # Seconds a client has to send a new connection's request headers, and the longest
    # pause while it sends a body.
    read_timeout: float = 30.0

    @property
    def listen(self) -> str:
        """Return the address as ``host:port`` (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Store:
    """The ``[store]`` table."""

    url: str
    retention_days: int = 90


@dataclass(frozen=True)
class Sessions:
    """The ``[sessions]`` table, durations in seconds."""

    idle_after: float = 300.0
    end_after: float = 3600.0
    events_per_session: int = 500


@dataclass(frozen=True)
class Legacy:
    """The ``[legacy]`` table: requests that carry no client segment."""

    enabled: bool = True
    provider: str = DEFAULT_PROVIDER


@dataclass(frozen=True)
class Config:
    """Everything aspy was told, checked."""

    path: Path | None
    server: Server
    store: Store
    sessions: Sessions
    capture_content: bool
    legacy: Legacy
    clients: dict[str, Client]
    providers: dict[str, Provider]

    def client_by_token(self) -> dict[str, Client]:
        """Return the clients that have a proxy token, keyed by it."""
        return {c.proxy_token: c for c in self.clients.values() if c.proxy_token}


def client_id_problem(cid: str) -> str | None:
    """Say why a client id cannot be used, or return None."""
    if not CLIENT_ID.fullmatch(cid):
        return "client id must be 1 to 64 of A-Z a-z 0-9 . _ -"
    if cid.lower() in RESERVED_SEGMENTS or cid.startswith("pt_") or cid in (".", ".."):
        return (f"client id {cid!r} is reserved (api, v1, health, metrics, dashboard, ., .., "
                "and anything starting with pt_)")
    return None


def config_path(explicit: str | os.PathLike | None = None) -> Path:
    """Return where the configuration is looked for, by the documented order."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("ASPY_CONFIG"):
        return Path(os.environ["ASPY_CONFIG"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "aspy" / "config.toml"


def state_dir() -> Path:
    """Return where aspy keeps its local state: ``$XDG_STATE_HOME/aspy``."""
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "aspy"


def default_store_url() -> str:
    """Return the embedded store's default location under ``$XDG_STATE_HOME``."""
    return f"sqlite:///{state_dir() / 'aspy.db'}"


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
    """Check a decoded TOML document and build the Config it describes."""
    checker = _Checker(path)
    return checker.config(data)


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


def host_problem(host: str) -> str | None:
    """Say why a host is neither an IP address nor a DNS name, or return None."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return f"expected a host name or an IP address, got {host!r}"
    # One trailing dot is a fully qualified name.
    labels = ascii_host.removesuffix(".").split(".")
    if len(ascii_host) > 253 or not all(HOST_LABEL.fullmatch(label) for label in labels):
        return f"expected a host name or an IP address, got {host!r}"
    if labels[-1].isdigit():
        # No top-level domain is a number: this is a mistyped IPv4 address such as 300.1.2.3.
        return f"expected a valid IPv4 address, got {host!r}"
    return None


def split_listen(listen: str) -> tuple[str, int]:
    """Split ``host:port`` (an IPv6 host in brackets); raise ValueError saying what is wrong."""
    example = f'expected "host:port" such as "{DEFAULT_LISTEN}" or "[::1]:8080", got {listen!r}'
    host, colon, port = listen.rpartition(":")
    if not colon or not host:
        raise ValueError(example)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"expected an IPv6 address in the brackets, got {listen!r}") from None
    elif ":" in host:
        raise ValueError(f'expected an IPv6 address in brackets, such as "[::1]:8080", got {listen!r}')
    else:
        problem = host_problem(host)
        if problem:
            raise ValueError(f"{problem} in {listen!r}")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"expected a port from 1 to 65535 in {listen!r}")
    return host, int(port)


def unprintable(text: str, space_too: bool = True) -> bool:
    """Tell whether text holds a control character (CR, LF, tab, NUL...), or with space_too, any space."""
    return any(not c.isprintable() or (space_too and c.isspace()) for c in text)


def url_problem(url: Any) -> str | None:
    """Say what is wrong with an upstream base URL, or return None if it is usable."""
    if not isinstance(url, str):
        return "expected a string URL such as \"https://api.anthropic.com\""
    if unprintable(url):
        return f"expected a URL without spaces or control characters (CR, LF, tab), got {url!r}"
    try:
        parts = urlsplit(url)
    except ValueError:
        return f"expected a valid URL (an IPv6 host in brackets: http://[::1]:8080), got {url!r}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"expected an http:// or https:// URL with a host, got {url!r}"
    if "?" in url or "#" in url or "@" in parts.netloc or "\\" in url:
        return f"expected a plain base URL without credentials, query or fragment, got {url!r}"
    problem = host_problem(parts.hostname)
    if problem:
        return f"{problem} in {url!r}"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        return f"expected a port from 1 to 65535 in {url!r}"
    return None


def store_url_problem(url: str) -> str | None:
    """Say what is wrong with a ``[store] url``, or return None if it can be opened."""
    forms = '"sqlite:////absolute/path.db", "sqlite:///~/path.db" or "postgresql://..."'
    if url.startswith("sqlite:///"):
        if unprintable(url, space_too=False):
            return f"expected a path without control characters (CR, LF, tab, NUL), got {url!r}"
        path = url[len("sqlite:///"):]
        if not path:
            return f"expected a file path after sqlite:///, such as {forms}"
        try:
            full = Path(path).expanduser()
        except RuntimeError:
            return f"cannot find the home directory that ~ stands for in {url!r}"
        if not full.is_absolute():
            return (f"expected an absolute path, such as \"sqlite:////var/lib/aspy/aspy.db\" (four slashes) or "
                    f"\"sqlite:///~/aspy.db\"; {url!r} would depend on the directory aspy starts in")
        try:
            directory = path.endswith("/") or full.is_dir()
        except OSError:
            directory = False
        if directory:
            return f"expected the path of a file, not of a directory, got {url!r}"
        return None
    if url.startswith(("postgresql://", "postgres://")):
        if unprintable(url):
            return ("expected a URL without spaces or control characters (CR, LF, tab; write a space "
                    f"as %20), got {_redacted(url, url)!r}")
        return postgres_url_problem(url)
    return f"expected {forms}, got {_redacted(url, url)!r}"


def _password(url: str) -> str:
    """Return the password written in a URL, as written, or ''."""
    netloc = url.partition("://")[2].partition("/")[0]
    return netloc.rpartition("@")[0].partition(":")[2]


def _redacted(text: str, url: str) -> str:
    """Return text with the URL's password replaced by ***."""
    password = _password(url)
    return text.replace(password, "***") if password else text


# libpq, through psycopg, is the judge of a PostgreSQL URL. It is asked in a child process:
# imported here, psycopg would load in gunicorn's master before the gevent workers patch the
# standard library, and would then wait for the database without yielding to other requests.
# The URL goes through stdin, never argv, which other users can read.
_CONNINFO = """
import json, sys
try:
    import psycopg_pool
    from psycopg.conninfo import conninfo_to_dict
except ImportError as exc:
    print(json.dumps({"missing": str(exc)}))
    sys.exit()
try:
    info = conninfo_to_dict(sys.stdin.read())
except Exception as exc:
    print(json.dumps({"error": str(exc).strip()}))
    sys.exit()
info.pop("password", None)
print(json.dumps({"info": {key: str(value) for key, value in info.items()}}))
"""
PG_EXTRA = "pip install 'aspy[postgres]'"


def postgres_url_problem(url: str) -> str | None:
    """Ask libpq whether it understands a PostgreSQL URL; say what is wrong, or return None.

    Without psycopg no PostgreSQL store can open, so that is a mistake too. If the question
    cannot be asked at all (no interpreter to run), the URL passes: opening it will tell.
    """
    if importlib.util.find_spec("psycopg") is None or importlib.util.find_spec("psycopg_pool") is None:
        return f"a PostgreSQL store needs psycopg and psycopg_pool: {PG_EXTRA}"
    if not sys.executable:
        return None
    try:
        done = subprocess.run([sys.executable, "-c", _CONNINFO], input=url, capture_output=True, text=True,
                              timeout=60)
        answer = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if "missing" in answer:
        return f"a PostgreSQL store needs psycopg and psycopg_pool, which do not load here ({answer['missing']}): " \
               f"{PG_EXTRA}"
    if "error" in answer:
        return f"libpq cannot read this URL: {_redacted(answer['error'], url)}"
    info = answer.get("info", {})
    hosts = info.get("host", "").split(",")
    ports = info.get("port", "").split(",")
    for host in hosts:
        problem = host and not host.startswith("/") and host_problem(host)
        if problem:
            return problem
    for port in ports:
        if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            return f"expected a port from 1 to 65535, got {port!r}"
    if len(ports) > 1 and len(ports) != len(hosts):
        return f"expected one port, or one for each of the {len(hosts)} hosts, got {len(ports)}"
    if "sslmode" in info and info["sslmode"] not in SSL_MODES:
        return f"expected sslmode to be one of: {', '.join(SSL_MODES)}, got {info['sslmode']!r}"
    return None


class _Checker:
    """Walk a TOML document, building typed tables and collecting every problem."""

    def __init__(self, path: Path | None):
        self.where = str(path) if path else "(defaults)"
        self.problems: list[str] = []

    def problem(self, table: str, key: str | None, message: str) -> None:
        """Note one mistake, naming file, table and key."""
        spot = f"[{table}]" + (f" {key}" if key else "")
        self.problems.append(f"{self.where}: {spot}: {message}")

    def table(self, data: dict, name: str, known: set[str]) -> dict:
        """Return a table, reporting a wrong type or unknown keys."""
        value = data.get(name, {})
        if not isinstance(value, dict):
            self.problem(name, None, "expected a table")
            return {}
        for key in value.keys() - known:
            self.problem(name, key, f"unknown key; expected one of: {', '.join(sorted(known))}")
        return value

    def typed(self, table: str, data: dict, key: str, kind: type | tuple, default: Any,
              expected: str) -> Any:
        """Return ``data[key]`` if it has the right type, else note it and return default."""
        if key not in data:
            return default
        value = data[key]
        # A bool is an int to isinstance, but never one in a config file.
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
        if not ok:
            self.problem(table, key, f"expected {expected}, got {value!r}")
            return default
        return value

    def whole(self, table: str, data: dict, key: str, default: int, low: int, high: int, unit: str) -> int:
        """Return a whole number from low to high, noting a wrong type or one out of range."""
        value = self.typed(table, data, key, int, default, f"a whole number of {unit}")
        if not low <= value <= high:
            self.problem(table, key, f"expected a whole number of {unit} from {low} to {high:,}, got {value}")
            return default
        return value

    def duration(self, table: str, data: dict, key: str, default: float) -> float:
        """Return a duration in seconds above zero, noting a malformed, zero or absurd one."""
        if key not in data:
            return default
        seconds = parse_duration(data[key])
        if seconds is None or not 0 < seconds <= MAX_DURATION:
            self.problem(table, key, 'expected a duration above zero and up to 365 days, such as "30s", "5m" '
                                     f'or "1h", got {data[key]!r}')
            return default
        return seconds

    def config(self, data: dict) -> Config:
        """Check the whole document."""
        known = {"server", "store", "sessions", "capture", "legacy", "clients", "providers"}
        for key in data.keys() - known:
            self.problem(key, None, f"unknown table; expected one of: {', '.join(sorted(known))}")
        server = self.server(data)
        store = self.store(data)
        sessions = self.sessions(data)
        capture = self.table(data, "capture", {"content"})
        capture_content = self.typed("capture", capture, "content", bool, True, "true or false")
        providers = self.providers(data)
        legacy = self.legacy(data, providers)
        clients = self.clients(data, providers)
        self.api_token_is_own(server, clients)
        if self.problems:
            raise ConfigError(self.problems)
        return Config(
            path=None if self.where == "(defaults)" else Path(self.where),
            server=server, store=store, sessions=sessions, capture_content=capture_content,
            legacy=legacy, clients=clients, providers=providers,
        )

    def server(self, data: dict) -> Server:
        """Check ``[server]``."""
        t = self.table(data, "server", {"listen", "workers", "worker_connections", "api_token",
                                        "upstream_timeout", "connect_timeout", "read_timeout"})
        listen = self.typed("server", t, "listen", str, DEFAULT_LISTEN, 'a string "host:port"')
        try:
            host, port = split_listen(listen)
        except ValueError as exc:
            self.problem("server", "listen", str(exc))
            host, port = "127.0.0.1", 8080
        workers = self.whole("server", t, "workers", 2, 1, MAX_WORKERS, "worker processes")
        connections = self.whole("server", t, "worker_connections", DEFAULT_WORKER_CONNECTIONS, 1,
                                 MAX_WORKER_CONNECTIONS, "connections per worker")
        token = self.typed("server", t, "api_token", str, None, "a string")
        if token is not None and len(token) < 16:
            self.problem("server", "api_token", "expected at least 16 characters")
        elif token is not None and not (token.isascii() and token.isprintable() and token == token.strip()):
            # Clients send it in an Authorization header: nothing else could ever match it.
            self.problem("server", "api_token", "expected printable ASCII characters, without spaces at either end")
        return Server(
            host=host, port=port, workers=workers, worker_connections=connections, api_token=token,
            upstream_timeout=self.duration("server", t, "upstream_timeout", 600.0),
            connect_timeout=self.duration("server", t, "connect_timeout", 10.0),
            read_timeout=self.duration("server", t, "read_timeout", 30.0),
        )

    def api_token_is_own(self, server: Server, clients: dict[str, Client]) -> None:
        """Note an API token that is also a client's proxy token (that client would see everyone's data)."""
        for client in clients.values():
            if server.api_token is not None and client.proxy_token == server.api_token:
                self.problem("server", "api_token", f"expected a token of its own, not clients.{client.id}'s "
                                                    "proxy_token (that client could then read every client's data)")

    def store(self, data: dict) -> Store:
        """Check ``[store]``."""
        t = self.table(data, "store", {"url", "retention_days"})
        url = self.typed("store", t, "url", str, None, "a string URL")
        if url is None:
            url = default_store_url()
        else:
            problem = store_url_problem(url)
            if problem:
                self.problem("store", "url", problem)
        days = self.whole("store", t, "retention_days", 90, 1, MAX_RETENTION_DAYS, "days")
        return Store(url=url, retention_days=days)

    def sessions(self, data: dict) -> Sessions:
        """Check ``[sessions]``."""
        t = self.table(data, "sessions", {"idle_after", "end_after", "events_per_session"})
        idle = self.duration("sessions", t, "idle_after", 300.0)
        end = self.duration("sessions", t, "end_after", 3600.0)
        if end < idle:
            self.problem("sessions", "end_after", "expected a duration no shorter than idle_after")
        events = self.whole("sessions", t, "events_per_session", 500, 1, MAX_EVENTS_PER_SESSION, "events")
        return Sessions(idle_after=idle, end_after=end, events_per_session=events)

    def providers(self, data: dict) -> dict[str, Provider]:
        """Check every ``[providers.*]`` table; add the default Anthropic one."""
        providers = {DEFAULT_PROVIDER: Provider(DEFAULT_PROVIDER, DEFAULT_BASE_URL, "Anthropic")}
        tables = data.get("providers", {})
        if not isinstance(tables, dict):
            self.problem("providers", None, "expected tables such as [providers.anthropic]")
            return providers
        for pid, t in tables.items():
            name = f"providers.{pid}"
            if not isinstance(t, dict):
                self.problem(name, None, "expected a table")
                continue
            for key in t.keys() - {"base_url", "name", "api_key_env"}:
                self.problem(name, key, "unknown key; expected one of: api_key_env, base_url, name")
            if "base_url" not in t:
                self.problem(name, "base_url", "missing required field; expected a URL")
                continue
            problem = url_problem(t["base_url"])
            if problem:
                self.problem(name, "base_url", problem)
                continue
            env = self.typed(name, t, "api_key_env", str, None, "the name of an environment variable")
            if env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env):
                self.problem(name, "api_key_env", f"expected an environment variable name, got {env!r}")
            providers[pid] = Provider(
                id=pid, base_url=t["base_url"].rstrip("/"),
                name=self.typed(name, t, "name", str, pid, "a string"), api_key_env=env,
            )
        return providers

    def legacy(self, data: dict, providers: dict[str, Provider]) -> Legacy:
        """Check ``[legacy]``."""
        t = self.table(data, "legacy", {"enabled", "provider"})
        enabled = self.typed("legacy", t, "enabled", bool, True, "true or false")
        provider = self.typed("legacy", t, "provider", str, DEFAULT_PROVIDER, "a provider name")
        if provider not in providers:
            self.problem("legacy", "provider", f"unknown provider {provider!r}; expected one of: "
                         f"{', '.join(sorted(providers))}")
        return Legacy(enabled=enabled, provider=provider)

    def clients(self, data: dict, providers: dict[str, Provider]) -> dict[str, Client]:
        """Check every ``[clients.*]`` table."""
        tables = data.get("clients", {})
        if not isinstance(tables, dict):
            self.problem("clients", None, "expected tables such as [clients.dev-1]")
            return {}
        clients: dict[str, Client] = {}
        token_owner: dict[str, str] = {}
        hash_owner: dict[str, str] = {}
        known = {"name", "provider", "tags", "proxy_token", "legacy_user_hashes"}
        for cid, t in tables.items():
            name = f"clients.{cid}"
            problem = client_id_problem(cid)
            if problem:
                self.problem(name, None, problem)
            if not isinstance(t, dict):
                self.problem(name, None, "expected a table")
                continue
            for key in t.keys() - known:
                self.problem(name, key, f"unknown key; expected one of: {', '.join(sorted(known))}")
            for key in ("name", "provider"):
                if key not in t:
                    self.problem(name, key, "missing required field; expected a string")
            display = self.typed(name, t, "name", str, cid, "a string")
            provider = self.typed(name, t, "provider", str, None, "a provider name")
            if provider is not None and provider not in providers:
                self.problem(name, "provider", f"unknown provider {provider!r}; expected one of: "
                             f"{', '.join(sorted(providers))}")
            tags = self.string_list(name, t, "tags", re.compile(r".{1,64}"), "short strings")
            hashes = self.string_list(name, t, "legacy_user_hashes", re.compile(r"[0-9a-f]{16}"),
                                      "16 lowercase hex characters each")
            for user in hashes:
                if user in hash_owner:
                    self.problem(name, "legacy_user_hashes", f"{user} is taken over by clients.{hash_owner[user]} "
                                                             "already; expected each hash in one client only")
                hash_owner.setdefault(user, cid)
            token = self.typed(name, t, "proxy_token", str, None, "a string")
            if token is not None:
                if not PROXY_TOKEN.fullmatch(token):
                    self.problem(name, "proxy_token", "expected \"pt_\" followed by at least 16 URL-safe "
                                                      "characters (make one with `aspy token new`)")
                elif token in token_owner:
                    self.problem(name, "proxy_token", f"duplicate proxy token: clients.{token_owner[token]} "
                                                      "has the same one")
                else:
                    token_owner[token] = cid
            clients[cid] = Client(id=cid, name=display, provider=provider or DEFAULT_PROVIDER,
                                  tags=tags, proxy_token=token, legacy_user_hashes=hashes)
        return clients

    def string_list(self, table: str, data: dict, key: str, pattern: re.Pattern,
                    expected: str) -> tuple[str, ...]:
        """Return a list of strings each matching ``pattern``, noting any that does not."""
        value = self.typed(table, data, key, list, [], f"a list of {expected}")
        bad = [v for v in value if not isinstance(v, str) or not pattern.fullmatch(v)]
        if bad:
            self.problem(table, key, f"expected a list of {expected}, got {bad!r}")
            return ()
        return tuple(value)
