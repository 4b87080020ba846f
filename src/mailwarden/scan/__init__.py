"""Content scanning (issue 4): scanners add symbols, the verdict engine decides.

Use ``build_engine(settings)`` once per process and ``await engine.judge(ScanInput(...))``
at end of DATA; the ``Verdict`` says what to do (``action``), what to answer (``reply()``) and
which headers to prepend (``headers``).

Public names: ``Action``, ``Verdict``, ``VerdictEngine``, ``ScanInput``, ``Scanner``,
``ScanSettings``, ``ClamdScanner``, ``RspamdScanner``, ``BuiltinScanner``, ``build_engine``,
``build_scanners``, ``scanning_notice``, ``render_headers``.
Security: everything scanned here is hostile input; see each module's ``Security`` line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mailwarden.scan.base import ScanInput, Scanner
    from mailwarden.scan.builtin import BuiltinScanner
    from mailwarden.scan.clamav import ClamdScanner
    from mailwarden.scan.factory import build_engine, build_scanners, scanning_notice
    from mailwarden.scan.rspamd import RspamdScanner
    from mailwarden.scan.settings import ScanAction, ScanSettings
    from mailwarden.scan.verdict import Action, Verdict, VerdictEngine, render_headers

# Imported on first use, so that loading the configuration (which needs only
# ``scan.settings``) does not import the HTTP client and the scanners.
_WHERE = {
    "ScanInput": "base",
    "Scanner": "base",
    "BuiltinScanner": "builtin",
    "ClamdScanner": "clamav",
    "build_engine": "factory",
    "build_scanners": "factory",
    "scanning_notice": "factory",
    "RspamdScanner": "rspamd",
    "ScanAction": "settings",
    "ScanSettings": "settings",
    "Action": "verdict",
    "Verdict": "verdict",
    "VerdictEngine": "verdict",
    "render_headers": "verdict",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'mailwarden.scan' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mailwarden.scan.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "Action",
    "BuiltinScanner",
    "ClamdScanner",
    "RspamdScanner",
    "ScanAction",
    "ScanInput",
    "ScanSettings",
    "Scanner",
    "Verdict",
    "VerdictEngine",
    "build_engine",
    "build_scanners",
    "render_headers",
    "scanning_notice",
]
