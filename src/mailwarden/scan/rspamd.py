"""rspamd over HTTP ``POST /checkv2``, one pooled ``scan.httpclient.HttpClient`` per scanner.

``RspamdScanner(settings)`` is a ``Scanner`` named ``RSPAMD``. It posts the raw message with
the envelope as rspamd's request headers (``IP``, ``Helo``, ``From``, one ``Rcpt`` per
recipient, ``Queue-Id``, ``User`` for an authenticated sender; never ``Pass: all``) and turns
the JSON reply into symbols:

- every rspamd symbol becomes ``RSPAMD_<NAME>`` with rspamd's score and its options as
  detail. The prefix marks the source (rspamd has its own ``MIME_BAD``-style names that
  would collide with the built-in scanners) and lets ``[scan.scores]`` override one
  rspamd symbol without touching a built-in one;
- rspamd's action becomes ``RSPAMD_ACTION_<ACTION>`` (``no action`` -> ``NO_ACTION``,
  ``soft reject`` -> ``SOFT_REJECT``) with score 0; the verdict engine's ``forced`` table
  maps ``RSPAMD_ACTION_REJECT`` to a reject. rspamd's own total is in the detail.

Anything else -- connection refused, timeout, non-200, not JSON, no ``action``, an
``error`` key -- is ``RSPAMD_FAIL``.

The HTTP client is our own small one (``scan.httpclient``): rspamd's normal worker closes
the connection after every reply, and per request ours costs about half the CPU of aiohttp
and a third of httpx (docs/benchmarks.md, "Scan stage CPU"); it reuses connections when
the server keeps them alive (rspamd's proxy worker).

Public names: ``RspamdScanner``, ``parse_result``, ``request_headers``.
Security: the message and envelope are hostile: header values are stripped of control
characters (no header injection into the HTTP request), the reply is read with a size cap
and parsed defensively (types checked, names restricted to ``[A-Z0-9_]``).
"""

from __future__ import annotations

import asyncio
import functools
import re
from typing import Any

import orjson

from mailwarden.core.types import Symbol
from mailwarden.scan.base import ScanInput, clean_detail, fail_symbol
from mailwarden.scan.httpclient import HttpClient, HttpError
from mailwarden.scan.settings import RspamdSettings

NAME = "RSPAMD"
MAX_REPLY = 1 << 20  # bytes of a /checkv2 reply we accept
MAX_SYMBOLS = 500  # symbols taken from one reply
MAX_HEADER_VALUE = 998  # characters of one request header value
MAX_OPTIONS = 5  # symbol options quoted in a detail
MAX_NAME_CACHE = 4096  # rspamd symbol names remembered with their RSPAMD_ form
_NAME_UNSAFE = re.compile(r"[^A-Z0-9_]")
_CTL = re.compile(r"[\x00-\x1f\x7f]")


def _hv(value: str) -> bytes:
    """A request header value: no control characters, bounded, UTF-8."""
    return _CTL.sub("", value)[:MAX_HEADER_VALUE].encode("utf-8", "replace")


def request_headers(msg: ScanInput, password: str = "") -> list[tuple[bytes, bytes]]:
    """rspamd's request headers for ``msg`` (repeated ``Rcpt``; absent facts left out)."""
    headers: list[tuple[bytes, bytes]] = []
    if msg.client_ip:
        headers.append((b"IP", _hv(msg.client_ip)))
    if msg.helo:
        headers.append((b"Helo", _hv(msg.helo)))
    headers.append((b"From", _hv(msg.sender)))
    headers.extend((b"Rcpt", _hv(r)) for r in msg.recipients)
    if msg.queue_id:
        headers.append((b"Queue-Id", _hv(msg.queue_id)))
    if msg.auth_user:
        headers.append((b"User", _hv(msg.auth_user)))
    if password:
        headers.append((b"Password", _hv(password)))
    headers.append((b"Content-Type", b"message/rfc822"))
    return headers


@functools.lru_cache(maxsize=MAX_NAME_CACHE)
def _symbol_name(raw: str) -> str:
    return NAME + "_" + _NAME_UNSAFE.sub("_", raw.upper())[:60]


def parse_result(body: bytes) -> list[Symbol]:
    """Symbols for a ``/checkv2`` JSON reply; ``RSPAMD_FAIL`` if it is not a usable one."""
    try:
        data = orjson.loads(body)  # a third of json.loads's CPU on rspamd's replies
    except (ValueError, RecursionError):  # orjson.JSONDecodeError is a ValueError
        return [fail_symbol(NAME, "reply is not JSON")]
    if not isinstance(data, dict):
        return [fail_symbol(NAME, "reply is not a JSON object")]
    if "error" in data:
        return [fail_symbol(NAME, f"rspamd error: {clean_detail(str(data['error']), 120)}")]
    action = data.get("action")
    score = data.get("score")
    if not isinstance(action, str) or not action or not _is_number(score):
        return [fail_symbol(NAME, "reply has no action or score")]
    required = data.get("required_score")
    out: list[Symbol] = []
    symbols = data.get("symbols", {})
    if not isinstance(symbols, dict):
        return [fail_symbol(NAME, "reply symbols are not an object")]
    for key, entry in list(symbols.items())[:MAX_SYMBOLS]:
        if not isinstance(entry, dict):
            return [fail_symbol(NAME, "reply symbol is not an object")]
        name = entry.get("name", key)
        sym_score = entry.get("score", 0.0)
        if not isinstance(name, str) or not _is_number(sym_score):
            return [fail_symbol(NAME, "reply symbol has no name or score")]
        options = entry.get("options") or []
        detail = ""
        if isinstance(options, list):
            detail = ", ".join(str(o) for o in options[:MAX_OPTIONS])
        out.append(Symbol(_symbol_name(name), float(sym_score), clean_detail(detail)))
    req = f" required={required:.2f}" if _is_number(required) else ""
    out.append(
        Symbol(
            _symbol_name("ACTION_" + action.replace(" ", "_")),
            0.0,
            clean_detail(f"rspamd action {action!r} score={score:.2f}{req}"),
        )
    )
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RspamdScanner:
    """The ``RSPAMD`` scanner (one HTTP connection pool, shared by all sessions)."""

    name = NAME

    def __init__(self, settings: RspamdSettings) -> None:
        if not settings.url:
            raise ValueError("rspamd url is empty")
        self.settings = settings
        self.timeout = settings.timeout
        self._client = HttpClient(settings.url, settings.max_connections)

    async def scan(self, msg: ScanInput) -> list[Symbol]:
        headers = request_headers(msg, self.settings.password)
        try:
            async with asyncio.timeout(self.settings.timeout):
                resp = await self._client.request(
                    "POST", "/checkv2", headers, msg.raw, max_reply=MAX_REPLY
                )
        except TimeoutError:
            return [fail_symbol(NAME, f"no answer within {self.settings.timeout:g} s")]
        except (HttpError, OSError) as exc:
            return [fail_symbol(NAME, str(exc) or type(exc).__name__)]
        if resp.status != 200:
            return [fail_symbol(NAME, f"HTTP status {resp.status}")]
        return parse_result(resp.body)

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.settings.timeout):
                resp = await self._client.request("GET", "/ping", max_reply=1024)
        except (TimeoutError, HttpError, OSError):
            return False
        return resp.status == 200 and resp.body.strip() == b"pong"

    async def aclose(self) -> None:
        await self._client.aclose()
