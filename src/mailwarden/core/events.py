"""Structured events: one JSON object per line, emitted by every stage.

The schema (documented in ``docs/events.md``): every event has ``ts`` (RFC 3339 UTC),
``event`` (dotted name, e.g. ``smtp.connect``), ``node`` and optional well-known fields
``session``, ``queue_id``, ``message_id``, ``client``, ``sender``, ``recipient``, ``reply``,
``control`` plus any stage-specific keys. A later stage (``logstore``) ingests these lines.

Public names: ``Event``, ``EventSink``, ``JsonLinesSink``, ``TeeSink``, ``StreamSink``,
``MemorySink``, ``emit``,
``set_sink``, ``get_sink``.
Security: field values come from untrusted clients (HELO names, addresses, replies). They
are serialised with ``json.dumps`` (control characters escaped, so a value can never start a
new log line) and truncated to ``MAX_FIELD``. Never pass secrets (passwords, AUTH blobs).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

MAX_FIELD = 2048  # characters kept of any one string value; the rest is cut with a marker


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened, with its fields."""

    name: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(self.ts, UTC).isoformat(timespec="milliseconds"),
            "event": self.name,
            "node": _NODE,
        }
        for key, value in self.fields.items():
            if value is None:
                continue
            out[key] = _clip(value)
        return out

    def to_line(self) -> str:
        return json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n"


_NODE = socket.gethostname()


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_FIELD:
        return value[:MAX_FIELD] + "...[truncated]"
    if isinstance(value, bytes):
        return _clip(value.decode("utf-8", "backslashreplace"))
    if isinstance(value, (list, tuple)):
        return [_clip(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _clip(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return _clip(str(value))


class EventSink(Protocol):
    """Where events go. One method, like every backend interface here."""

    def write(self, event: Event) -> None: ...


class JsonLinesSink:
    """Appends events as JSON lines to a file (line-buffered, safe across forked workers).

    Each event is written with one ``write`` on an ``O_APPEND`` descriptor, so lines from
    several worker processes never interleave.
    """

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self._lock = threading.Lock()

    def write(self, event: Event) -> None:
        data = event.to_line().encode("utf-8")
        with self._lock:
            os.write(self._fd, data)

    def close(self) -> None:
        os.close(self._fd)


class TeeSink:
    """Writes every event to several sinks (e.g. the file and standard error)."""

    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = sinks

    def write(self, event: Event) -> None:
        for sink in self.sinks:
            sink.write(event)


class StreamSink:
    """Writes JSON lines to an already open descriptor (standard error by default)."""

    def __init__(self, fd: int = 2) -> None:
        self.fd = fd

    def write(self, event: Event) -> None:
        os.write(self.fd, event.to_line().encode("utf-8"))


class MemorySink:
    """Keeps events in a list (for the CLI's one-shot commands and for unit tests)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def write(self, event: Event) -> None:
        self.events.append(event)


_sink: EventSink = MemorySink()


def set_sink(sink: EventSink) -> None:
    """Route all further events to ``sink``."""
    global _sink
    _sink = sink


def get_sink() -> EventSink:
    return _sink


def emit(name: str, **fields: Any) -> None:
    """Emit one event. Never raises: an event that cannot be written is dropped to stderr."""
    try:
        _sink.write(Event(name, fields))
    except Exception as exc:
        os.write(2, f"mailwarden: cannot write event {name!r}: {exc}\n".encode())
