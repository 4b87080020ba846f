"""Durations in configuration files: ``"30s"``, ``"5m"``, ``"4h"``, ``"5d"``, ``"1w"`` or seconds.

Lives in ``core`` so that every stage's settings (``config``, ``scan.settings``) can use it
without importing each other.

Public names: ``parse_duration``, ``Duration`` (a pydantic-annotated float of seconds).
Security: parses operator-supplied values with an anchored regex; negative or malformed
values are errors, never silently zero.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any) -> float:
    """``"5d"``, ``"4h"``, ``"30m"``, ``"10s"`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '4h'")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"not a duration: {value!r} (use seconds or e.g. '30s', '5m', '4h', '5d')")


Duration = Annotated[float, BeforeValidator(parse_duration)]
