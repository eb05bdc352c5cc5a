"""aspy: an observability proxy for Claude Code and other Anthropic API clients."""
from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from .config import Config
    from .models import ModelTable
    from .records import Exchange

__version__ = "0.1.0"


def create_app(config: Config | None = None, test_config: dict | None = None,
               models: ModelTable | None = None) -> Flask:
    """Create the WSGI app: the proxy, the API, the health check, the metrics and the dashboard.

    ``models`` is the model table read with the config (by default, read now from beside it).
    """
    # Imported here so that gunicorn's master, and gevent before it patches, load nothing heavy.
    from flask import Flask

    from . import api, dashboard, errors, health, metrics, proxy
    from .config import load_config, state_dir
    from .inflight import InFlight
    from .journal import Journal, default_folder
    from .models import load_models
    from .recorder import Recorder
    from .sessions import Sessions
    from .status import WorkerStatus
    from .store import open_store

    # No app-wide /static/: every first path segment but the reserved ones is a client's.
    app = Flask(__name__, static_folder=None)
    config = config if config is not None else load_config()
    app.config["ASPY"] = config
    app.config.update(test_config or {})
    _setup_logging()
    # Opening the store touches nothing yet: a store that fails never stops the proxy.
    store = open_store(config.store.url)
    if hasattr(store, "serve_here"):
        # create_app runs in the thread that serves requests: reads made there go to other threads.
        store.serve_here()
    if models is None:
        models = load_models(config.path.parent if config.path else None)
    sessions = Sessions(config, store, models)
    # Counted once the store has an exchange; None when this worker cannot keep them (logged).
    meter = metrics.open_metrics(config, models)
    # Tests in-process keep no journal, and share nothing with other workers; a served worker
    # keeps its journal and its notes under $XDG_STATE_HOME.
    recorder = Recorder(sessions, None if app.testing else Journal(default_folder()),
                        None if app.testing else WorkerStatus(state_dir() / "workers"), meter)
    in_flight = InFlight(config, None if app.testing else state_dir() / "in_flight")
    app.extensions.update({"aspy.store": store, "aspy.sessions": sessions, "aspy.recorder": recorder,
                           "aspy.metrics": meter, "aspy.in_flight": in_flight})

    exchange_log = logging.getLogger("aspy.exchange")

    def record(exchange: Exchange) -> None:
        in_flight.closed(exchange)
        if exchange_log.isEnabledFor(logging.DEBUG):
            log_exchange(exchange)
        recorder(exchange)

    app.extensions["aspy.record"] = record
    # The writer starts with the worker: it keeps the store up to date even before any traffic.
    # An app under test starts it with its first exchange, so idle test apps leave no thread behind.
    if not app.testing:
        recorder.start()
        in_flight.start()
    app.register_blueprint(health.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(dashboard.bp)
    app.register_blueprint(proxy.bp)
    # Whatever goes wrong, the client gets JSON in Anthropic's shape (405, 404, a broken body, a bug).
    errors.init_app(app)
    return app


def log_exchange(exchange: Exchange) -> None:
    """Write one structured log line for an exchange (at DEBUG: the store has the figures)."""
    logging.getLogger("aspy.exchange").debug(json.dumps(exchange.summary(), separators=(",", ":")))


def _setup_logging() -> None:
    """Send aspy's own log lines to stderr unless something else already set them up; never a proxy token."""
    from .logs import REDACT_TOKENS

    logger = logging.getLogger("aspy")
    # On the logger for the lines Flask logs as the app ("aspy"), on the handler for aspy.* below it.
    logger.addFilter(REDACT_TOKENS)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.addFilter(REDACT_TOKENS)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        logger.addHandler(handler)
        # ASPY_LOG_LEVEL=DEBUG adds one structured line per exchange.
        logger.setLevel(os.environ.get("ASPY_LOG_LEVEL", "INFO").upper())
        logger.propagate = False
