"""The ``accountd`` command: ``run``, ``demo``, ``db …`` and ``config check``.

This is the process boundary: configuration errors become one line on stderr and exit status 2,
expected runtime failures (a database that cannot be reached, …) one line and status 1. Heavy
modules (the daemon, migrations) are imported only by the command that needs them, so
``accountd config check`` stays fast and works on a machine without a database.

Exit statuses: 0 ok, 1 runtime failure, 2 usage or configuration error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from accountd.errors import AccountdError, ConfigError
from accountd.logs import redact, register_secret, setup_logging
from accountd.settings import Settings, load_settings

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], int]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except AccountdError as exc:  # DatabaseUnavailable and the like: expected, no traceback
        return _fail(str(exc), EXIT_FAILURE)
    except SQLAlchemyError as exc:
        # Driver errors can span many lines (SQL, parameters); the first one says what failed.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return _fail(f"database error: {first}", EXIT_FAILURE)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)


def _fail(message: str, status: int) -> int:
    print(f"accountd: {redact(message)}", file=sys.stderr)
    return status


def build_parser() -> argparse.ArgumentParser:
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "--config",
        metavar="PATH",
        type=Path,
        default=None,
        help="TOML config file (default: built-in defaults; ACCOUNTD_<SECTION>__<KEY> "
        "environment variables override either)",
    )
    parser = argparse.ArgumentParser(
        prog="accountd",
        description="Supervise the lifecycle of WeCom automation accounts.",
        epilog="Exit statuses: 0 ok, 1 runtime failure, 2 usage or configuration error.",
    )
    parser.add_argument("--version", action="version", version=f"accountd {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        parents=[config],
        help="run the daemon in the foreground",
        description=(
            "Run the daemon in the foreground (as systemd's Type=notify service). "
            "Requires [ingest] token."
        ),
    )
    run.set_defaults(handler=_cmd_run)

    demo = commands.add_parser(
        "demo",
        parents=[config],
        help="run the daemon on SQLite with simulated workers and demo accounts",
        description="Run the daemon on embedded SQLite under ./var/demo with the built-in "
        "worker simulator and N demo accounts going through their whole lifecycle.",
    )
    demo.add_argument(
        "--accounts",
        metavar="N",
        type=_positive_int,
        default=20,
        help="number of demo accounts (default: 20)",
    )
    demo.set_defaults(handler=_cmd_demo)

    db = commands.add_parser(
        "db",
        help="database migrations and integrity check",
        description="Alembic migrations for the core, platform and analytics databases.",
    )
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_commands.add_parser(
        "upgrade", parents=[config], help="migrate all three databases to the latest revision"
    ).set_defaults(handler=_cmd_db_upgrade)
    downgrade = db_commands.add_parser(
        "downgrade", parents=[config], help="migrate all three databases down to REV"
    )
    downgrade.add_argument("rev", metavar="REV", help="target revision (e.g. 'base' or '-1')")
    downgrade.set_defaults(handler=_cmd_db_downgrade)
    db_commands.add_parser(
        "current", parents=[config], help="print each database's current revision"
    ).set_defaults(handler=_cmd_db_current)
    verify = db_commands.add_parser(
        "verify",
        parents=[config],
        help="check integrity: orphans, cross-database references, status vs. last log row",
        description="Check data integrity: every account's status against its last status log "
        "row, the log chain, duplicated decisions, the daemon's supervision rows, orphans "
        "where partitioning dropped a foreign key and references across databases. Each "
        "violated check is reported with the offending ids; exit status 1 when any fails.",
    )
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.add_argument(
        "--limit",
        metavar="N",
        type=_positive_int,
        default=20,
        help="offending ids to show per check (default: 20)",
    )
    verify.set_defaults(handler=_cmd_db_verify)

    cfg = commands.add_parser("config", help="configuration tools")
    cfg_commands = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = cfg_commands.add_parser(
        "check",
        parents=[config],
        help="validate and print the effective config, secrets masked",
        description="Validate the configuration and print the effective values (file, "
        "environment and defaults merged) with secrets masked. Warnings go to stderr.",
    )
    check.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    check.set_defaults(handler=_cmd_config_check)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("accountd")
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- commands


def _settings(args: argparse.Namespace, *, with_logging: bool = True) -> Settings:
    settings = load_settings(args.config)
    # Before the first log line: from here on neither the token nor a password can be logged.
    for secret in settings.secrets():
        register_secret(secret)
    if with_logging:
        setup_logging(settings.logging.level, settings.logging.format)
    return settings


def _cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    settings.require_runnable()
    from accountd.daemon.app import run_daemon

    return int(run_daemon(settings))


def _cmd_demo(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from accountd.daemon.demo import run_demo

    return int(run_demo(accounts=args.accounts, settings=settings))


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from accountd.adapters.migrate import upgrade

    urls = _settings(args).database_urls()
    asyncio.run(upgrade(urls))
    return _print_revisions(urls)


def _cmd_db_downgrade(args: argparse.Namespace) -> int:
    from alembic.util import CommandError

    from accountd.adapters.migrate import downgrade

    urls = _settings(args).database_urls()
    try:
        asyncio.run(downgrade(urls, args.rev))
    except (ValueError, CommandError) as exc:  # a REV that is malformed or names nothing
        return _fail(f"db downgrade: {exc}", EXIT_USAGE)
    return _print_revisions(urls)


def _cmd_db_current(args: argparse.Namespace) -> int:
    return _print_revisions(_settings(args).database_urls())


def _print_revisions(urls: Mapping[str, str]) -> int:
    from accountd.adapters.migrate import current

    revisions: Mapping[str, str | None] = asyncio.run(current(urls))
    for key, rev in revisions.items():
        print(f"{key}: {rev if rev is not None else '(empty: no revision)'}")
    return EXIT_OK


def _cmd_db_verify(args: argparse.Namespace) -> int:
    from accountd.adapters.verify import verify

    # No logging setup, as for `config check`: the report is this command's whole output.
    urls = _settings(args, with_logging=False).database_urls()
    report = asyncio.run(verify(urls, limit=args.limit))
    print(json.dumps(report.as_dict(), indent=2) if args.json else report)
    return EXIT_OK if report.ok else EXIT_FAILURE


def _cmd_config_check(args: argparse.Namespace) -> int:
    # No logging setup: this command's whole output is the report below.
    settings = _settings(args, with_logging=False)
    for warning in settings.warnings():
        print(f"accountd: warning: {warning}", file=sys.stderr)
    data = settings.masked()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        source = str(settings.source_path) if settings.source_path else "built-in defaults"
        print(f"# effective configuration: {source} + environment; secrets masked")
        print(to_toml(data), end="")
    return EXIT_OK


def to_toml(data: Mapping[str, Any]) -> str:
    """Render our two-level config data as TOML (unset values become comments)."""
    lines: list[str] = []
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for key, value in data.items():
        if key not in tables:
            lines.append(_toml_pair(key, value))
    for name, table in tables.items():
        lines.append(f"\n[{name}]")
        lines.extend(_toml_pair(key, value) for key, value in table.items())
    return "\n".join(lines) + "\n"


def _toml_pair(key: str, value: Any) -> str:
    if value is None:
        return f"# {key} is not set"
    return f"{key} = {_toml_value(value)}"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    # JSON string escapes are valid TOML basic-string escapes.
    return json.dumps(str(value), ensure_ascii=False)


if __name__ == "__main__":
    raise SystemExit(main())
