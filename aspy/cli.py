"""The ``aspy`` command: serve, check."""
from __future__ import annotations

import argparse
import sys

from .config import Config, ConfigError, config_path, load_config


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
    commands.add_parser("check", parents=[common], help="validate the configuration")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"aspy: {exc}", file=sys.stderr)
        return 2
    return {"serve": serve_command, "check": check_command}[args.command](config, args)


def serve_command(config: Config, args: argparse.Namespace) -> int:
    """Serve the proxy until stopped."""
    from .serving import AspyServer

    overrides = {}
    if args.listen:
        overrides["bind"] = [args.listen]
    if args.workers:
        overrides["workers"] = args.workers
    AspyServer(config, overrides).run()
    return 0


def check_command(config: Config, args: argparse.Namespace) -> int:
    """Report that the configuration is valid, and what it describes."""
    where = config.path or f"{config_path(args.config)} (not found: defaults, legacy mode)"
    print(f"config: {where}")
    print(f"listen: {config.server.listen}, workers: {config.server.workers}")
    print(f"providers: {', '.join(f'{p.id} ({p.base_url})' for p in config.providers.values())}")
    print(f"clients: {', '.join(config.clients) or '(none)'}")
    print("legacy requests: " + (f"to {config.legacy.provider}" if config.legacy.enabled else "disabled"))
    print("ok")
    return 0
