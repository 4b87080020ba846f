"""``mailwarden dkim keygen DOMAIN``: make the DKIM key the gateway signs outbound mail with.

Writes an RSA key (default 2048 bits) to ``state_dir/dkim/DOMAIN/SELECTOR.key`` (mode
0600; the selector defaults to ``[dkim] selector``) and prints the DNS TXT record to
publish: ``SELECTOR._domainkey.DOMAIN. IN TXT "v=DKIM1; k=rsa; p=..."``. An existing key
is never replaced without ``--force`` (the old signatures stop verifying once DNS
changes). A running gateway signs with the new key from its next outbound message of
that domain (``[dkim] domains`` empty, or listing the domain). ``dkim show DOMAIN``
prints the record of an existing key again. Exit codes: 0 ok, 1 failure, 2 refused
(bad domain, selector or size; key exists), 3 no such key.

Public names: ``register``.
Security: operator input only; the private key is written 0600 and never printed.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from mailwarden.cli.main import EXIT_FAIL, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, add_config_option
from mailwarden.config import load_config
from mailwarden.scan.dkimsign import KeyExists, dns_record, generate_key, key_path

_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}$")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "dkim",
        help="DKIM keys for signing outbound mail (keygen prints the DNS record)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    dsub = p.add_subparsers(dest="dkim_command", metavar="ACTION")
    dsub.required = True
    gen = dsub.add_parser("keygen", help="generate a signing key and print its DNS record")
    add_config_option(gen)
    gen.add_argument("domain", metavar="DOMAIN", help="the From domain to sign for")
    gen.add_argument("--selector", default=None, help="DKIM selector (default: [dkim] selector)")
    gen.add_argument("--bits", type=int, default=2048, help="RSA key size (1024-4096)")
    gen.add_argument("--force", action="store_true", help="replace an existing key")
    gen.set_defaults(func=_keygen)
    show = dsub.add_parser("show", help="print the DNS record of an existing key")
    add_config_option(show)
    show.add_argument("domain", metavar="DOMAIN")
    show.add_argument("--selector", default=None)
    show.set_defaults(func=_show)


def _target(args: argparse.Namespace) -> tuple[str, str, Any] | None:
    cfg = load_config(args.config)
    domain = args.domain.strip().lower().rstrip(".")
    selector = (args.selector or cfg.dkim.selector_for(domain)).strip().lower()
    if not _DOMAIN.match(domain):
        print(f"mailwarden dkim: not a domain name: {args.domain!r}", file=sys.stderr)
        return None
    return domain, selector, cfg


def _keygen(args: argparse.Namespace) -> int:
    target = _target(args)
    if target is None:
        return EXIT_USAGE
    domain, selector, cfg = target
    try:
        path, record = generate_key(domain, selector, cfg.dkim_path, args.bits, args.force)
    except KeyExists as exc:
        print(f"mailwarden dkim: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"mailwarden dkim: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"mailwarden dkim: cannot write the key: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(f"; key written to {path} (keep it private)", file=sys.stderr)
    print(f"; publish this record in the zone of {domain}:", file=sys.stderr)
    print(record)
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    target = _target(args)
    if target is None:
        return EXIT_USAGE
    domain, selector, cfg = target
    try:
        path = key_path(cfg.dkim_path, domain, selector)
        pem = path.read_bytes()
    except ValueError as exc:
        print(f"mailwarden dkim: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError:
        print(f"mailwarden dkim: no key for {domain} (selector {selector})", file=sys.stderr)
        return EXIT_NOT_FOUND
    except OSError as exc:
        print(f"mailwarden dkim: cannot read the key: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(dns_record(domain, selector, pem))
    return EXIT_OK
