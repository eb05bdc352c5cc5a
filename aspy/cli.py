"""The ``aspy`` command: serve, check, models, migrate, token, top, mcp, report."""
from __future__ import annotations

import argparse
import os
import secrets
import sys
from datetime import datetime
from pathlib import Path

from .addresses import split_listen
from .config import Config, ConfigError, ServerSettings, config_path, keys, load_config


def main(argv: list[str] | None = None) -> int:
    """Run the aspy command line."""
    parser = argparse.ArgumentParser(prog="aspy", description="Observability proxy for Claude Code.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", help="config.toml (default: $ASPY_CONFIG, "
                        "else $XDG_CONFIG_HOME/aspy/config.toml)")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", parents=[common], help="run the proxy under gunicorn")
    serve.add_argument("--listen", metavar="HOST:PORT", help="override [server] listen")
    serve.add_argument("--workers", type=int, help="override [server] workers")
    commands.add_parser("check", parents=[common], help="validate the configuration and the store")
    models = commands.add_parser("models", parents=[common],
                                 help="the model table in force, its sources, and models seen that it cannot price")
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    migrate = commands.add_parser("migrate", parents=[common],
                                  help="move legacy API-key hashes to named clients (shows the plan unless --apply)")
    migrate.add_argument("--apply", action="store_true", help="carry the plan out")
    migrate.add_argument("--map", action="append", default=[], metavar="HASH=CLIENT_ID",
                         help="the client a hash goes to (default legacy-<first 8 hex>)")
    migrate.add_argument("--provider", help="provider of the clients it creates (default: the legacy provider)")
    migrate.add_argument("--import-logs", metavar="DIR", type=Path,
                         help="read the earlier aspy's *.jsonl event logs into the store")
    for name, helptext in (("top", "live terminal view of clients, sessions, cost, context and events"),
                           ("mcp", "MCP server over stdio, for Claude Code (claude mcp add aspy -- aspy mcp)")):
        viewer = commands.add_parser(name, help=helptext)
        viewer.add_argument("--url", help="aspy's address (default: $ASPY_URL, else from $ANTHROPIC_BASE_URL, "
                                          "else http://127.0.0.1:8080)")
        viewer.add_argument("--client", help="own client id (default: $ASPY_CLIENT_ID, else from $ANTHROPIC_BASE_URL)")
    from . import report

    report.add_arguments(commands.add_parser(
        "report", parents=[common], help="figures over time (daily, weekly, monthly, sessions) as a table, "
                                         "from the store, or from the API with --url"))
    token = commands.add_parser("token", help="proxy tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    new = token_commands.add_parser("new", parents=[common], help="make a proxy token for a client")
    new.add_argument("client", help="the client id")
    new.add_argument("--write", action="store_true", help="store it in config.toml (a backup is kept)")
    args = parser.parse_args(argv)
    if args.command in ("top", "mcp"):
        # Clients of the API: they need no config, and may watch an aspy on another host.
        return api_command(args)
    if args.command == "report" and args.url is not None:
        return report.run(args, None)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"aspy: {exc}", file=sys.stderr)
        return 2
    handlers = {"serve": serve_command, "check": check_command, "migrate": migrate_command, "token": token_command,
                "models": models_command, "report": report_command}
    return handlers[args.command](config, args)


def api_command(args: argparse.Namespace) -> int:
    """Run `aspy top` or `aspy mcp` against the API."""
    from .apiclient import ApiClient, find_target

    api = ApiClient(find_target(args.url, args.client))
    if args.command == "mcp":
        from . import mcp_server

        mcp_server.run(api)
        return 0
    from . import top

    try:
        return top.run(api, args.client)
    except KeyboardInterrupt:
        return 0


def report_command(config: Config, args: argparse.Namespace) -> int:
    """Print figures over time from the configured store."""
    from . import report

    return report.run(args, config)


def serve_command(config: Config, args: argparse.Namespace) -> int:
    """Serve the proxy until stopped."""
    from .models import load_models
    from .serving import AspyServer

    problems = []
    try:
        # Every mistake is reported before serving starts, the model table's too.
        models = load_models(config.path.parent if config.path else None)
    except ConfigError as exc:
        problems += exc.problems
    overrides = {}
    if args.listen is not None:
        try:
            split_listen(args.listen)
            overrides["bind"] = [args.listen]
        except ValueError as exc:
            problems.append(f"--listen: {exc}")
    if args.workers is not None:
        try:
            # The same rule, and words, as [server] workers.
            overrides["workers"] = keys(ServerSettings)["workers"].rule(args.workers)
        except ValueError as exc:
            problems.append(f"--workers: {exc}")
    if problems:
        print(f"aspy: {ConfigError(problems)}", file=sys.stderr)
        return 2
    AspyServer(config, models, overrides).run()
    return 0


def check_command(config: Config, args: argparse.Namespace) -> int:
    """Report whether the configuration, the model table and the store are usable."""
    from .models import load_models
    from .store import StoreError, open_store

    where = config.path or f"{config_path(args.config)} (not found: defaults, legacy mode)"
    print(f"config: {where}")
    print(f"listen: {config.server.listen}, workers: {config.server.workers} "
          f"({config.server.worker_connections} connections each)")
    print(f"providers: {', '.join(f'{p.id} ({p.base_url})' for p in config.providers.values())}")
    for provider in config.providers.values():
        if provider.api_key_env and not os.environ.get(provider.api_key_env):
            print(f"aspy: warning: [providers.{provider.id}] api_key_env: ${provider.api_key_env} is not set here; "
                  "aspy will send an empty key unless its service environment sets it", file=sys.stderr)
    print(f"clients: {', '.join(config.clients) or '(none)'}")
    print("legacy requests: " + (f"to {config.legacy.provider}" if config.legacy.enabled else "disabled"))
    try:
        table = load_models(config.path.parent if config.path else None)
    except ConfigError as exc:
        print(f"aspy: {exc}", file=sys.stderr)
        return 2
    print(f"models: {len(table.models)} priced (taken {table.taken})")
    try:
        info = open_store(config.store.url).inspect()
    except StoreError as exc:
        print(f"aspy: store: {exc}", file=sys.stderr)
        return 3
    store_at = info.get("path") or info.get("database")
    version, expected = info["schema_version"], info["expected_version"]
    if version is None:
        print(f"store: {info['kind']} {store_at}: not created yet; aspy creates it on first use")
    elif version < expected:
        print(f"store: {info['kind']} {store_at}: schema version {version}; aspy migrates it to {expected} at start")
    elif version > expected:
        print(f"aspy: store: {store_at} has schema version {version}, newer than this aspy understands "
              f"({expected}): upgrade aspy", file=sys.stderr)
        return 3
    else:
        print(f"store: {info['kind']} {store_at}: reachable, schema version {version} (current)")
        _warn_unpriced(table, open_store(config.store.url))
    print("ok")
    return 0


def _unpriced(table, store) -> list[str]:
    """Return the models seen in traffic that the table in force still cannot price."""
    return [model for model in store.unpriced_models() if table.find(model) is None]


def _warn_unpriced(table, store) -> None:
    """Tell which models seen in traffic have no price (their cost counts as 0)."""
    from .store import StoreError

    try:
        missing = _unpriced(table, store)
    except StoreError as exc:
        print(f"aspy: store: {exc}", file=sys.stderr)
        return
    if missing:
        print(f"aspy: warning: no price for {', '.join(missing)}: their cost counts as 0 until models.yaml "
              "has them (aspy models)", file=sys.stderr)


def models_command(config: Config, args: argparse.Namespace) -> int:
    """Print the model table in force, its sources, and the models seen in traffic that it cannot price."""
    import json
    from dataclasses import asdict

    from .models import load_models
    from .store import StoreError, open_store

    try:
        table = load_models(config.path.parent if config.path else None)
    except ConfigError as exc:
        print(f"aspy: {exc}", file=sys.stderr)
        return 2
    try:
        store = open_store(config.store.url)
        info = store.inspect()
        seen = _unpriced(table, store) if info["schema_version"] == info["expected_version"] else []
    except StoreError as exc:
        print(f"aspy: store: {exc} (models seen in traffic are not listed)", file=sys.stderr)
        seen = []
    if args.json:
        print(json.dumps({"source": table.source, "taken": table.taken, "models": [
            {"id": m.id, "aliases": sorted(a for a, k in table.aliases.items() if k == m.id),
             "rates": asdict(m.rates), "context_window": m.context_window,
             "fast": asdict(m.fast) if m.fast else None, "geo_us": m.geo_us,
             "long_context": {"above": m.long_above, **asdict(m.long_rates)} if m.long_rates else None,
             "source": m.source, "taken": m.taken} for m in table.models.values()],
            "unpriced_models_seen": seen}, indent=1))
        return 0
    print("USD per million tokens: input, output, cache writes (5m, 1h), cache read; window in tokens")
    print(f"{'model':<24}{'in':>7}{'out':>7}{'w5m':>7}{'w1h':>7}{'read':>7}{'window':>10}  notes")
    for m in table.models.values():
        notes = [f"fast {m.fast.input:g}/{m.fast.output:g}"] if m.fast else []
        notes += ["us 1.1x"] if m.geo_us else []
        notes += [f">{m.long_above // 1000}K {m.long_rates.input:g}/{m.long_rates.output:g}"] if m.long_rates \
            and m.long_above is not None else []
        r = m.rates
        print(f"{m.id:<24}{r.input:>7g}{r.output:>7g}{r.cache_write_5m:>7g}{r.cache_write_1h:>7g}"
              f"{r.cache_read:>7g}{m.context_window:>10}  {', '.join(notes)}")
    print(f"\nsources (table taken {table.taken}):")
    for m in table.models.values():
        print(f"  {m.id} ({m.taken or '?'}): {m.source or table.source}")
    print("\nseen in traffic, not priced: " + (", ".join(seen) if seen else "none"))
    return 0


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "-"


def migrate_command(config: Config, args: argparse.Namespace) -> int:
    """Show or carry out the move from legacy key hashes to named clients, or import old logs."""
    from . import migration
    from .models import load_models
    from .store import StoreError, open_store

    store = open_store(config.store.url)
    try:
        if args.import_logs:
            return _import_logs(config, store, args, load_models(config.path.parent if config.path else None))
        moves = migration.plan(config, store, migration.parse_map(args.map))
        if not moves:
            print("Nothing to migrate: no legacy traffic without a client in the store.")
            return 0
        print(f"{'hash':<18}{'sessions':>9}{'requests':>10}{'tokens in/out':>22}{'cost':>11}  "
              f"{'first seen':<17}{'last seen':<17}client")
        for m in moves:
            note = "new client" if m.new_client else ("already mapped" if m.in_config else "existing client")
            print(f"{m.user:<18}{m.sessions:>9}{m.requests:>10}{f'{m.input_tokens}/{m.output_tokens}':>22}"
                  f"{f'${m.cost_usd:.2f}':>11}  {_when(m.first_seen):<17}{_when(m.last_seen):<17}"
                  f"{m.client} ({note})")
        if not args.apply:
            print("\nNothing changed. Run again with --apply to write these clients and re-attribute sessions.")
            return 0
        backup, moved = migration.apply(config, store, moves, args.provider)
        target = config.path or config_path(args.config)
        if backup:
            print(f"\nWrote {target} (backup: {backup}).")
        elif any(not m.in_config for m in moves):
            print(f"\nWrote {target}.")
        else:
            print(f"\n{target} already has every client; left as it is.")
        print(f"Re-attributed {moved} sessions. Restart aspy (or send it HUP) to load the new clients.")
        return 0
    except (migration.MigrationError, StoreError) as exc:
        print(f"aspy migrate: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()


def _import_logs(config, store, args, models) -> int:
    """Read (and with --apply, import) an earlier aspy's event-log folder."""
    from . import migration

    logs = migration.read_logs(args.import_logs, config, models)
    if not logs:
        print(f"No *.jsonl logs in {args.import_logs}.")
        return 0
    for log in logs:
        bad = f", {len(log.bad_lines)} unreadable (lines {', '.join(map(str, log.bad_lines[:5]))})" \
            if log.bad_lines else ""
        print(f"{log.path.name}: {log.lines} lines, {len(log.sessions)} sessions, "
              f"{log.skipped} events of types not imported{bad}")
    if not args.apply:
        print("\nNothing changed. Run again with --apply to import these sessions as archived.")
        return 0
    for log, fresh in migration.import_logs(store, logs):
        print(f"{log.path.name}: " + ("imported" if fresh else "already imported, skipped"))
    return 0


def token_command(config: Config, args: argparse.Namespace) -> int:
    """Make a proxy token for a client; with --write, store it in config.toml."""
    from . import config_file

    if args.client not in config.clients:
        print(f"aspy token: unknown client {args.client!r}; expected one of: "
              f"{', '.join(sorted(config.clients)) or '(none configured)'}", file=sys.stderr)
        return 2
    token = "pt_" + secrets.token_urlsafe(24)
    if args.write:
        try:
            backup = config_file.set_proxy_token(config.path or config_path(args.config), args.client, token)
        except config_file.ConfigFileError as exc:
            print(f"aspy token: {exc}", file=sys.stderr)
            return 2
        print(f"Stored in {config.path} for [clients.{args.client}] (backup: {backup}). Restart aspy to use it.")
    else:
        print(f"Add to [clients.{args.client}] in {config.path or config_path(args.config)}:")
        print(f'proxy_token = "{token}"')
    print(f"\nClaude Code then connects with ANTHROPIC_BASE_URL=http://{config.server.listen}/{token}")
    return 0
