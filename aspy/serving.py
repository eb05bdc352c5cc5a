"""Run the app under gunicorn with gevent workers, configured from ``[server]``.

A reload (HUP) reads config.toml and models.yaml again in gunicorn's master. Whatever is
wrong with them (a mistake, a file that cannot be read, an address that cannot be listened
on), the master logs why and keeps the configuration it runs: a reload never stops aspy.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger

from .addresses import split_listen
from .config import Config, ConfigError, ServerSettings, load_config, state_dir
from .logs import REDACT_TOKENS

if TYPE_CHECKING:
    from .models import ModelTable

# gunicorn's own log: the master has no other, and its lines carry time and pid.
log = logging.getLogger("gunicorn.error")

# Streams can last 10 minutes; a graceful stop lets them finish.
LONGEST_STREAM = 600


def is_loopback(host: str) -> bool:
    """Tell whether a listen host is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(server: ServerSettings) -> None:
    """Say loudly when anyone who can reach aspy can read the conversations it records."""
    if server.api_token is None and not is_loopback(server.host):
        message = (f"aspy listens on {server.listen} and [server] api_token is not set: anyone who can reach "
                   "this address can read every recorded conversation, key hash and cost through /api/. "
                   "Set [server] api_token, or listen on 127.0.0.1.")
        log.warning("!" * 20 + " " + message)


def fresh_metrics_folder() -> None:
    """Give this server's workers an empty folder for their Prometheus counters, and name it for them.

    Runs in gunicorn's master before it forks any worker (prometheus_client reads the variable
    when a worker imports it). The folder outlives every worker, so counters never go back when
    one dies or a reload replaces them all; a new server starts again from zero. It is named
    after the master, so that another aspy sharing the state folder keeps its own; those of
    servers that have stopped go.
    """
    root = state_dir() / "metrics"
    folder = root / str(os.getpid())
    try:
        for old in root.iterdir() if root.is_dir() else []:
            if old == folder or not (old.name.isdigit() and _alive(int(old.name))):
                shutil.rmtree(old, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.error("/metrics will be off: cannot make %s: %s", folder, exc)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


def _alive(pid: int) -> bool:
    """Tell whether a process is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's
    return True


class RedactingLogger(Logger):
    """gunicorn's logger, with proxy tokens cut out of its error lines and its access log (if on)."""

    def setup(self, cfg) -> None:
        """Set gunicorn's loggers up as usual, then filter them; runs again on each reload."""
        super().setup(cfg)
        for logger in (self.error_log, self.access_log):
            # "Error handling request POST /pt_.../v1/messages" would carry the token otherwise.
            logger.addFilter(REDACT_TOKENS)


def gunicorn_settings(server: ServerSettings) -> dict[str, Any]:
    """Return gunicorn's settings for a ``[server]`` table."""
    return {
        "bind": [server.listen],
        "workers": server.workers,
        # gunicorn's gevent worker, with its own error pages in Anthropic's shape (aspy/worker.py).
        "worker_class": "aspy.worker.AspyWorker",
        "worker_connections": server.worker_connections,
        # The gevent worker heartbeats from its own greenlet, so long streams never trip this.
        "timeout": 30,
        "graceful_timeout": LONGEST_STREAM + 20,
        # Above nginx's upstream keep-alive, so nginx closes idle connections first.
        "keepalive": 75,
        # Each worker builds its own app after fork: gevent must patch before anything loads.
        "preload_app": False,
        "proc_name": "aspy",
        "errorlog": "-",
        "loglevel": "info",
        # No access log by default (nginx keeps one); when one is turned on, it is redacted too.
        "logger_class": RedactingLogger,
        # gunicorn 23+ opens a control socket in ~/.gunicorn; aspy needs none, and several
        # instances on one host would fight over it.
        "control_socket_disable": True,
        "when_ready": lambda _arbiter: warn_if_exposed(server),
        "on_starting": lambda _arbiter: fresh_metrics_folder(),
    }


def checked_configuration(path: Path | None = None) -> tuple[Config, ModelTable]:
    """Read config.toml and the model table beside it; raise ConfigError naming every mistake."""
    from .models import load_models

    config = load_config(path)
    return config, load_models(config.path.parent if config.path else None)


def bind_problem(address: str) -> str | None:
    """Say why this host cannot listen on ``host:port`` right now, or return None."""
    try:
        host, port = split_listen(address)
    except ValueError as exc:
        return str(exc)
    try:
        family, kind, proto, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(where)
    except OSError as exc:
        return f"cannot listen on {address}: {exc.strerror or exc}"
    return None


def reloaded(path: Path | None, running: tuple[Config, ModelTable],
             overrides: dict[str, Any]) -> tuple[Config, ModelTable]:
    """Return the configuration to run after a reload: the files' if sound, else the running one."""
    try:
        config, models = checked_configuration(path)
        binds = (gunicorn_settings(config.server) | overrides)["bind"]
        if binds != (gunicorn_settings(running[0].server) | overrides)["bind"]:
            # gunicorn closes the old address before it opens the new one, and stops if it cannot.
            moved = [problem for problem in map(bind_problem, binds) if problem]
            if moved:
                raise ConfigError([f"{config.path or '(defaults)'}: [server] listen: {problem}" for problem in moved])
    except ConfigError as exc:
        log.error("config.toml and models.yaml were not reloaded, the running configuration stays: %s", exc)
        return running
    except Exception:
        # A mistake in aspy itself, not in the file: say so loudly, but keep serving.
        log.exception("config.toml and models.yaml were not reloaded, the running configuration stays")
        return running
    log.info("configuration reloaded from %s", config.path or "(defaults)")
    return config, models


# What conf/gunicorn.conf.py last accepted: kept in gunicorn's master across reloads, and
# inherited by each worker it forks, which wsgi.py then serves.
_accepted: tuple[Config, ModelTable] | None = None


def gunicorn_conf_settings() -> dict[str, Any]:
    """Return the settings for conf/gunicorn.conf.py; on a reload, keep the running ones if the files are not sound."""
    global _accepted
    if _accepted is None:
        try:
            _accepted = checked_configuration()
        except ConfigError as exc:
            # SystemExit passes gunicorn's handler, which would add a traceback to any other error.
            sys.exit(f"aspy: {exc}")
    else:
        _accepted = reloaded(None, _accepted, {})
    return gunicorn_settings(_accepted[0].server)


def accepted_configuration() -> tuple[Config, ModelTable]:
    """Return what gunicorn's master accepted, when it read conf/gunicorn.conf.py; else read the files."""
    return _accepted or checked_configuration()


class AspyServer(BaseApplication):
    """A gunicorn application that serves aspy with a checked Config and model table."""

    def __init__(self, config: Config, models: ModelTable, overrides: dict[str, Any] | None = None):
        self.aspy_config = config
        self.models = models
        self.overrides = overrides or {}
        self.loaded = False
        super().__init__()

    def load_config(self) -> None:
        """Apply the settings to gunicorn; on HUP, re-read config.toml and models.yaml first."""
        if self.loaded and self.aspy_config.path is not None:
            self.aspy_config, self.models = reloaded(self.aspy_config.path, (self.aspy_config, self.models),
                                                     self.overrides)
        self.loaded = True
        for key, value in (gunicorn_settings(self.aspy_config.server) | self.overrides).items():
            # Settings an older gunicorn does not know are left out.
            if key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self):
        """Build the app, in each worker."""
        from . import create_app

        return create_app(self.aspy_config, models=self.models)
