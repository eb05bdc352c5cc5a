"""Check the addresses config.toml names: a listen address, upstream base URLs, store URLs.

Each check says what is wrong in words a config file's author understands, or returns None.
A PostgreSQL URL is read by libpq itself, in a child process, so that its mistakes are caught
before serving starts without loading psycopg into gunicorn's master.
"""
from __future__ import annotations

import importlib.util
import ipaddress
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEFAULT_LISTEN = "127.0.0.1:8080"
HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


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
    """Ask libpq whether it understands a PostgreSQL URL; say what is wrong, or return None."""
    # Without psycopg no PostgreSQL store can open, so that is a mistake too.
    if importlib.util.find_spec("psycopg") is None or importlib.util.find_spec("psycopg_pool") is None:
        return f"a PostgreSQL store needs psycopg and psycopg_pool: {PG_EXTRA}"
    # If the question cannot be asked at all (no interpreter to run), the URL passes: opening it will tell.
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
