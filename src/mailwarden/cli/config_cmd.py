"""``mailwarden config check|show``: validate a configuration file, print the effective one.

Security: reads an operator-supplied file; prints its values, except that the password in
``[database] url`` is shown as ``***`` (``DatabaseSettings.safe_url``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mailwarden.cli.main import EXIT_OK, EXIT_USAGE, add_config_option
from mailwarden.config import check_config, default_config


def register(sub: Any) -> None:
    p = sub.add_parser("config", help="check or show the configuration")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    check = csub.add_parser(
        "check", help="validate a config file; print every error with its key and line"
    )
    check.add_argument("-c", "--config", metavar="FILE", required=True, help="file to check")
    check.set_defaults(func=_check)
    show = csub.add_parser("show", help="print the effective configuration as JSON")
    add_config_option(show)
    show.set_defaults(func=_show)


def _check(args: argparse.Namespace) -> int:
    cfg, problems = check_config(args.config)
    if cfg is None:
        for line in problems:
            print(line, file=sys.stderr)
        print(f"{len(problems)} problem(s) found in {args.config}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.config}: OK")
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    if args.config:
        cfg, problems = check_config(args.config)
        if cfg is None:
            for line in problems:
                print(line, file=sys.stderr)
            return EXIT_USAGE
    else:
        cfg = default_config()
    data = cfg.model_dump()
    data["database"]["url"] = cfg.database.safe_url  # never print the database password
    print(json.dumps(data, indent=2))
    return EXIT_OK
