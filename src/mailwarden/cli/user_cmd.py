"""``mailwarden user add|passwd|disable|enable|list``: SMTP AUTH accounts of the database.

The accounts the ``database`` AUTH backend checks (``[auth] backend``, SU-8): a login, an
argon2id hash made with ``[auth.argon2]``, the envelope senders the user may use
(``--address``, repeatable) and a disabled flag. The password is read from the terminal
(asked twice) or, with ``--password-stdin``, from the first line of standard input; it is
never a command-line argument (other users could read it in the process list). ``list
--json`` prints one JSON object per user per line. A running gateway sees changes at the
next login (no restart). Exit codes: 0 ok, 1 failure, 2 usage (bad login, empty or short
password), 3 unknown user.

Public names: ``register``, ``MIN_PASSWORD``.
Security: operator input; the password goes only to argon2 and is never printed, logged or
stored; events (``user.add`` ...) carry the login only.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from mailwarden.auth.base import MAX_LOGIN, MAX_PASSWORD, escape_login, normalise_login
from mailwarden.auth.passwords import Hasher
from mailwarden.cli.dbaccess import cli_store
from mailwarden.cli.main import EXIT_FAIL, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, add_config_option
from mailwarden.config import Config, load_config
from mailwarden.core.events import JsonLinesSink, emit, set_sink
from mailwarden.errors import AddressError
from mailwarden.smtp.address import parse_path
from mailwarden.store import users as user_table

MIN_PASSWORD = 8  # characters; shorter passwords are refused


def register(sub: Any) -> None:
    p = sub.add_parser(
        "user",
        help="manage SMTP AUTH users of the database backend",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    usub = p.add_subparsers(dest="user_command", metavar="ACTION")
    usub.required = True

    add = usub.add_parser("add", help="add a user (password asked, or --password-stdin)")
    add_config_option(add)
    add.add_argument("login", metavar="LOGIN")
    add.add_argument(
        "--address",
        metavar="ADDR",
        action="append",
        default=[],
        help="an envelope sender the user may use (repeat for several)",
    )
    _password_option(add)
    add.set_defaults(func=_add)

    pw = usub.add_parser("passwd", help="set a user's password")
    add_config_option(pw)
    pw.add_argument("login", metavar="LOGIN")
    _password_option(pw)
    pw.set_defaults(func=_passwd)

    for name, helptext, disabled in (
        ("disable", "refuse the user's logins (the account is kept)", True),
        ("enable", "accept the user's logins again", False),
    ):
        cmd = usub.add_parser(name, help=helptext)
        add_config_option(cmd)
        cmd.add_argument("login", metavar="LOGIN")
        cmd.set_defaults(func=_toggle, disabled=disabled)

    ls = usub.add_parser("list", help="list users (never their hashes)")
    add_config_option(ls)
    ls.add_argument("--json", action="store_true", help="one JSON object per user per line")
    ls.set_defaults(func=_list)


def _password_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input (no prompt)",
    )


def _err(text: str) -> None:
    print(f"mailwarden: {text}", file=sys.stderr)


def _setup(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config)
    set_sink(JsonLinesSink(str(cfg.events_path)))  # operator actions are logged as events
    return cfg


def _login(text: str) -> str | None:
    login = normalise_login(text)
    if not login or len(login) > MAX_LOGIN or not login.isprintable() or " " in login:
        _err(f"invalid login {escape_login(text)!r}: printable, no spaces, 1-{MAX_LOGIN} chars")
        return None
    return login


def _read_password(args: argparse.Namespace) -> str | None:
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        password = password.removesuffix("\r")
    else:
        if not sys.stdin.isatty():
            _err("no terminal to ask the password on: use --password-stdin")
            return None
        password = getpass.getpass("Password: ")
        if getpass.getpass("Password again: ") != password:
            _err("the passwords do not match")
            return None
    if len(password) < MIN_PASSWORD or len(password) > MAX_PASSWORD:
        _err(f"the password must have {MIN_PASSWORD} to {MAX_PASSWORD} characters")
        return None
    if "\x00" in password:
        _err("the password must not contain NUL")
        return None
    return password


def _addresses(values: list[str]) -> list[str] | None:
    out: list[str] = []
    for value in values:
        try:
            addr, rest = parse_path(f"<{value}>", smtputf8=True)
        except AddressError:
            addr, rest = None, ""
        if addr is None or rest.strip() or not addr.text:
            _err(f"not an e-mail address: {escape_login(value)!r}")
            return None
        if addr.text.lower() not in out:
            out.append(addr.text.lower())
    return out


def _add(args: argparse.Namespace) -> int:
    login = _login(args.login)
    addresses = _addresses(args.address)
    if login is None or addresses is None:
        return EXIT_USAGE
    cfg = _setup(args)
    password = _read_password(args)
    if password is None:
        return EXIT_USAGE
    hashed = Hasher(cfg.auth.argon2).hash(password)
    with cli_store(cfg) as store:
        try:
            user_table.add_user(store, login, hashed, addresses)
        except user_table.UserExists:
            _err(f"user {login!r} already exists (use 'mailwarden user passwd')")
            return EXIT_FAIL
    emit("user.add", user=login, addresses=addresses)
    print(f"user {login} added" + (f" ({', '.join(addresses)})" if addresses else ""))
    if cfg.auth.backend != "database":
        _err(f"note: [auth] backend is {cfg.auth.backend!r}; database users are not checked")
    return EXIT_OK


def _passwd(args: argparse.Namespace) -> int:
    login = _login(args.login)
    if login is None:
        return EXIT_USAGE
    cfg = _setup(args)
    with cli_store(cfg) as store:
        if user_table.get_user(store, login) is None:
            _err(f"no such user: {login!r}")
            return EXIT_NOT_FOUND
        password = _read_password(args)
        if password is None:
            return EXIT_USAGE
        if not user_table.set_password_hash(store, login, Hasher(cfg.auth.argon2).hash(password)):
            _err(f"no such user: {login!r}")
            return EXIT_NOT_FOUND
    emit("user.passwd", user=login)
    print(f"password of {login} changed")
    return EXIT_OK


def _toggle(args: argparse.Namespace) -> int:
    login = _login(args.login)
    if login is None:
        return EXIT_USAGE
    cfg = _setup(args)
    with cli_store(cfg) as store:
        found = user_table.set_disabled(store, login, args.disabled)
    if not found:
        _err(f"no such user: {login!r}")
        return EXIT_NOT_FOUND
    verb = "disabled" if args.disabled else "enabled"
    emit(f"user.{verb[:-1]}", user=login)
    print(f"user {login} {verb}")
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    with cli_store(cfg) as store:
        rows = user_table.list_users(store)
    if args.json:
        for row in rows:
            print(json.dumps(row.to_json(), ensure_ascii=False))
        return EXIT_OK
    if not rows:
        print("no users")
        return EXIT_OK
    for row in rows:
        state = "disabled" if row.disabled else "enabled"
        addrs = ", ".join(row.addresses) or "-"
        print(f"{escape_login(row.login):<32} {state:<9} {escape_login(addrs)}")
    return EXIT_OK
