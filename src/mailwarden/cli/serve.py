"""``mailwarden serve``: run the gateway in the foreground.

Security: operator input only; the config file is validated before anything is bound.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mailwarden.cli.main import EXIT_FAIL, EXIT_USAGE, add_config_option
from mailwarden.config import load_config
from mailwarden.errors import ConfigError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the gateway in the foreground",
        description=(
            "Start the gateway: bind the configured listeners, deliver queued mail and "
            "accept new mail until SIGTERM/Ctrl-C. Without -c, the embedded default runs: "
            "domain example.edu, SMTP on 127.0.0.1:2525, submission on 2587 (STARTTLS) and "
            "2465 (implicit TLS), state under ./var."
        ),
    )
    add_config_option(p)
    p.add_argument("--workers", type=int, default=None, help="override gateway.workers")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from mailwarden.gateway import run_gateway

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"mailwarden: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.workers is not None:
        if args.workers < 1:
            print("mailwarden: --workers must be at least 1", file=sys.stderr)
            return EXIT_USAGE
        cfg = cfg.model_copy(
            update={"gateway": cfg.gateway.model_copy(update={"workers": args.workers})}
        )
    try:
        return run_gateway(cfg)
    except OSError as exc:
        print(f"mailwarden: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAIL
