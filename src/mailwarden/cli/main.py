"""Entry point of the ``mailwarden`` command.

Each sibling module named in ``_COMMANDS`` exposes ``register(subparsers)``, which adds its
subcommand with ``set_defaults(func=...)``; ``func(args) -> int`` is the exit code.

Exit codes (scripts can trust them): 0 success, 1 the operation failed, 2 usage or
configuration error, 3 not found (unknown queue id, ...).

Public names: ``main``, ``build_parser``, ``EXIT_OK``, ``EXIT_FAIL``, ``EXIT_USAGE``,
``EXIT_NOT_FOUND``.
Security: operator input only.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mailwarden import __version__
from mailwarden.errors import MailwardenError

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3

_COMMANDS = (
    "serve",
    "config_cmd",
    "queue_cmd",
    "quarantine_cmd",
    "status_cmd",
    "user_cmd",
    "senders_cmd",
    "blocks_cmd",
    "dkim_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailwarden",
        description=(
            "mailwarden: campus email security gateway. Receives mail for hosted domains, "
            "queues it durably and delivers it (Maildir, LMTP, SMTP)."
        ),
        epilog="Run 'mailwarden COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"mailwarden {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMANDS:
        module = importlib.import_module(f"mailwarden.cli.{name}")
        module.register(sub)
    return parser


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """The ``-c/--config`` option every subcommand that reads the config takes."""
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=None,
        help="TOML configuration file (default: the embedded demo configuration)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except MailwardenError as exc:
        print(f"mailwarden: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
