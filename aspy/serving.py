"""Run the app under gunicorn with gevent workers, configured from ``[server]``."""
from __future__ import annotations

import ipaddress
import logging
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger

from .config import Config, ConfigError, Server, load_config
from .logs import REDACT_TOKENS

log = logging.getLogger(__name__)

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


def warn_if_exposed(server: Server) -> None:
    """Say loudly when anyone who can reach aspy can read the conversations it records."""
    if server.api_token is None and not is_loopback(server.host):
        message = (f"aspy listens on {server.listen} and [server] api_token is not set: anyone who can reach "
                   "this address can read every recorded conversation, key hash and cost through /api/. "
                   "Set [server] api_token, or listen on 127.0.0.1.")
        logging.getLogger("gunicorn.error").warning("!" * 20 + " " + message)


class RedactingLogger(Logger):
    """gunicorn's logger, with proxy tokens cut out of its error lines and its access log (if on)."""

    def setup(self, cfg) -> None:
        """Set gunicorn's loggers up as usual, then filter them; runs again on each reload."""
        super().setup(cfg)
        for logger in (self.error_log, self.access_log):
            # "Error handling request POST /pt_.../v1/messages" would carry the token otherwise.
            logger.addFilter(REDACT_TOKENS)


def gunicorn_settings(server: Server) -> dict[str, Any]:
    """Return gunicorn's settings for a ``[server]`` table."""
    return {
        "bind": [server.listen],
        "workers": server.workers,
        # gunicorn's gevent worker, with its own error pages in Anthropic's shape (aspy/worker.py).
        "worker_class": "aspy.worker.AspyWorker",
        "worker_connections": 1000,
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
    }


class AspyServer(BaseApplication):
    """A gunicorn application that serves aspy with a checked Config."""

    def __init__(self, config: Config, overrides: dict[str, Any] | None = None):
        self.aspy_config = config
        self.overrides = overrides or {}
        self.loaded = False
        super().__init__()

    def load_config(self) -> None:
        """Apply the settings to gunicorn; on HUP, re-read config.toml first."""
        if self.loaded and self.aspy_config.path is not None:
            self._reload_aspy_config()
        self.loaded = True
        for key, value in (gunicorn_settings(self.aspy_config.server) | self.overrides).items():
            # Settings an older gunicorn does not know are left out.
            if key in self.cfg.settings:
                self.cfg.set(key, value)

    def _reload_aspy_config(self) -> None:
        """Take the changed config.toml, or keep the running one if the new file has mistakes."""
        try:
            self.aspy_config = load_config(self.aspy_config.path)
        except ConfigError as exc:
            log.error("config.toml was not reloaded, the running configuration stays: %s", exc)

    def load(self):
        """Build the app, in each worker."""
        from . import create_app

        return create_app(self.aspy_config)
