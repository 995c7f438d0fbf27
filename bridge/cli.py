"""The ``bridge`` command: ``run``, ``simulate``, ``health``, ``check-config``, ``--version``.

Exit codes (CONTRACT §6, bridge/exit_codes.py): 0 ok, 1 unexpected error, 2 invalid
configuration or usage, 3 authentication failed, 4 retries exhausted and 5 namespace taken over
(the last three returned by ``bridge.service.run``).

The service, the simulator and the health probe are imported only by the sub-command that
needs them, so ``bridge --version`` and ``bridge check-config`` stay fast and keep working
while one of them is broken.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import platform
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final

import orjson
import structlog

from bridge import __version__
from bridge.config import ConfigError, Settings, load_settings
from bridge.exit_codes import EXIT_CONFIG, EXIT_CRASH, EXIT_OK
from bridge.kite.feed import KiteFeed
from bridge.logs import (
    LOG_LEVELS,
    MASK,
    configure_logging,
    logging_configured,
    redact_text,
)
from bridge.payload import readable_subscriptions

__all__ = ["main", "version_text"]

LOG_FORMATS: Final = ("auto", "json", "console")

Handler = Callable[[argparse.Namespace], int]


def _dist_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def version_text() -> str:
    """``bridge 0.1.0 (Python 3.11.7, websockets 17.4, redis-py 8.1.0)``."""
    return (
        f"bridge {__version__} (Python {platform.python_version()}, "
        f"websockets {_dist_version('websockets')}, redis-py {_dist_version('redis')})"
    )


def _load(args: argparse.Namespace, **overrides: Any) -> Settings:
    return load_settings(getattr(args, "config", None), **overrides)


def _cmd_run(args: argparse.Namespace) -> int:
    settings = _load(args, log_level=args.log_level, log_format=args.log_format)
    configure_logging(settings.log_level, settings.log_format)
    service = importlib.import_module("bridge.service")
    return int(service.run(settings))


def _cmd_simulate(args: argparse.Namespace) -> int:
    # argparse checks --log-level/--log-format against their choices, not the env defaults.
    if args.log_level not in LOG_LEVELS:
        raise ConfigError(f"BRIDGE_LOG_LEVEL: expected one of {', '.join(LOG_LEVELS)}")
    if args.log_format not in LOG_FORMATS:
        raise ConfigError(f"BRIDGE_LOG_FORMAT: expected one of {', '.join(LOG_FORMATS)}")
    configure_logging(args.log_level, args.log_format)
    simulator = importlib.import_module("bridge.simulator.cli")
    return int(simulator.run(args))


def _cmd_health(args: argparse.Namespace) -> int:
    # The probe reads only Redis, so it works in any container, with or without credentials.
    settings = _load(args, require_credentials=False)
    configure_logging(settings.log_level, settings.log_format)
    health = importlib.import_module("bridge.health")
    return int(health.main(settings, args.max_age))


def effective_settings(settings: Settings) -> dict[str, Any]:
    """The settings as check-config shows them: secrets masked, the Redis password too."""
    shown = settings.model_dump(mode="json")
    for name in ("kite_access_token", "kite_enctoken"):
        if shown[name] is not None:
            shown[name] = MASK
    shown["redis_url"] = settings.redis_url_redacted
    if settings.kite_ws_url is not None:
        shown["kite_ws_url"] = redact_text(settings.kite_ws_url)
    shown["subscribe"] = readable_subscriptions(settings.subscribe)
    # kite_ws_url is null when the default applies; this is the URL the feed will open.
    shown["feed_url"] = KiteFeed(**settings.feed_credentials()).redacted_url
    config_file = settings.config_file
    return {"config_file": None if config_file is None else str(config_file), **shown}


def _cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args)
    shown = effective_settings(settings)
    if not args.connect:
        _print_json(shown)
        return EXIT_OK
    preflight = importlib.import_module("bridge.preflight")
    checks = asyncio.run(preflight.preflight(settings))
    _print_json({**shown, "checks": [check.as_json() for check in checks]})
    for check in checks:
        if not check.ok:
            print(f"bridge: check failed: {check.check}: {check.detail}", file=sys.stderr)
        elif check.warning:
            print(f"bridge: warning: {check.check}: {check.detail}", file=sys.stderr)
    return int(preflight.exit_code(checks))


def _print_json(document: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
    sys.stdout.write("\n")


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="TOML settings file (overrides BRIDGE_CONFIG; default: config/bridge.toml if present)",
    )


def _add_logging(parser: argparse.ArgumentParser, level: str | None, fmt: str | None) -> None:
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=list(LOG_LEVELS),
        default=level,
        help="overrides BRIDGE_LOG_LEVEL",
    )
    parser.add_argument(
        "--log-format",
        type=str.lower,
        choices=LOG_FORMATS,
        default=fmt,
        help="auto: console on a terminal, JSON lines otherwise (overrides BRIDGE_LOG_FORMAT)",
    )


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _parser(simulate: bool) -> argparse.ArgumentParser:
    """The argument parser; the simulator's options are added only when ``simulate`` runs."""
    parser = argparse.ArgumentParser(
        prog="bridge", description="Zerodha Kite ticker websocket -> Redis pub/sub bridge."
    )
    parser.add_argument("--version", action="version", version=version_text())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run the bridge",
        description="Run the bridge until SIGTERM or SIGINT. Exit codes: 0 stopped, "
        "1 unexpected error, 2 bad configuration, 3 authentication failed, 4 retries exhausted, "
        "5 another bridge took the namespace over.",
    )
    _add_config(run)
    _add_logging(run, None, None)
    run.set_defaults(handler=_cmd_run)

    sim = commands.add_parser(
        "simulate",
        help="run the built-in Kite ticker simulator",
        description="Serve the Kite ticker protocol locally; point KITE_WS_URL at it.",
    )
    if simulate:
        importlib.import_module("bridge.simulator.cli").add_arguments(sim)
        # The simulator does not read Settings (it needs no credentials): env or flags only.
        _add_logging(
            sim,
            os.environ.get("BRIDGE_LOG_LEVEL", "info").lower(),
            os.environ.get("BRIDGE_LOG_FORMAT", "auto").lower(),
        )
    sim.set_defaults(handler=_cmd_simulate)

    health = commands.add_parser(
        "health",
        help="exit 0 if the bridge's status in Redis is fresh and live (container HEALTHCHECK)",
        description="Read <ns>:status and exit 0 when it is fresh and live, 1 otherwise.",
    )
    _add_config(health)
    health.add_argument(
        "--max-age",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="oldest acceptable status update (default: %(default)s)",
    )
    health.set_defaults(handler=_cmd_health)

    check = commands.add_parser(
        "check-config",
        help="validate the settings and print them as JSON, secrets masked",
        description="Load and validate the settings; print them as JSON with secrets masked. "
        "Exit 0 when valid, 2 with one line naming the setting when not. With --connect, "
        "also check Redis and the Kite login and add the results as 'checks'.",
    )
    _add_config(check)
    check.add_argument(
        "--connect",
        action="store_true",
        help="also reach Redis and complete one Kite websocket handshake (nothing is written or "
        "subscribed); exit 3 if Kite refuses the login, 1 if another check fails",
    )
    check.set_defaults(handler=_cmd_check_config)
    return parser


def _command_word(argv: Sequence[str]) -> str | None:
    """The sub-command: the first argument that is not an option (top-level options take no
    value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bridge`` and ``python -m bridge``; returns the process exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser(_command_word(arguments) == "simulate").parse_args(arguments)
    except SystemExit as exc:  # --help, --version and usage errors: keep main() returning
        if exc.code is None:
            return EXIT_OK
        return exc.code if isinstance(exc.code, int) else EXIT_CONFIG
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"bridge: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:  # ^C before the service installed its own handler: a clean stop
        return EXIT_OK
    except Exception:
        if not logging_configured():
            configure_logging()
        structlog.get_logger("bridge.cli").exception("unexpected error", command=args.command)
        return EXIT_CRASH
