"""Structured events: one JSON object per line, emitted by every stage.

The schema (documented in ``docs/events.md``): every event has ``ts`` (RFC 3339 UTC),
``event`` (dotted name, e.g. ``smtp.connect``), ``node`` and optional well-known fields
``session``, ``queue_id``, ``message_id``, ``client``, ``sender``, ``recipient``, ``reply``,
``control`` plus any stage-specific keys. A later stage (``logstore``) ingests these lines.

Public names: ``Event``, ``EventSink``, ``JsonLinesSink``, ``TeeSink``, ``StreamSink``,
``MemorySink``, ``emit``, ``flush``,
``set_sink``, ``get_sink``.
Security: field values come from untrusted clients (HELO names, addresses, replies). They
are serialised with orjson (``json`` as a fallback; control characters escaped, so a value
can never start a new log line) and truncated to ``MAX_FIELD``. Never pass secrets
(passwords, AUTH blobs).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

MAX_FIELD = 2048  # characters kept of any one string value; the rest is cut with a marker
FLUSH_BYTES = 65536  # buffered event bytes that force a write before the loop iteration ends


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened, with its fields."""

    name: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ts": _rfc3339(self.ts),
            "event": self.name,
            "node": _NODE,
        }
        for key, value in self.fields.items():
            if value is None:
                continue
            out[key] = _clip(value)
        return out

    def to_line(self) -> str:
        return self.to_bytes().decode("utf-8")

    def to_bytes(self) -> bytes:
        """The JSON line, UTF-8, newline included: orjson (a tenth of ``json.dumps``'s cost
        here); a value it refuses (an integer past 64 bits, a lone surrogate) falls back
        to ``json`` with every non-ASCII character escaped, so the event is never lost."""
        obj = self.to_json()
        try:
            return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)
        except (orjson.JSONEncodeError, TypeError):
            return json.dumps(obj, separators=(",", ":")).encode("ascii") + b"\n"


_NODE = socket.gethostname()
_last_ts: tuple[int, str] = (-1, "")  # (milliseconds, RFC 3339 text): events come in bursts


def _rfc3339(ts: float) -> str:
    """``ts`` as RFC 3339 UTC with milliseconds; the text of the last millisecond is reused
    (formatting a datetime was a third of an event's cost)."""
    global _last_ts
    ms = int(ts * 1000)
    last = _last_ts
    if last[0] != ms:
        text = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
        last = _last_ts = (ms, text)
    return last[1]


def _clip(value: Any) -> Any:
    kind = type(value)
    if kind is str:  # the common cases first, without isinstance chains
        return value if len(value) <= MAX_FIELD else value[:MAX_FIELD] + "...[truncated]"
    if kind is int or kind is bool or kind is float:
        return value
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
    """Appends events as JSON lines to a file, safe across forked worker processes.

    Inside a running event loop, lines are buffered and written with one ``write`` per loop
    iteration (or as soon as ``FLUSH_BYTES`` are pending): under load one system call
    carries many events instead of one each. Outside a loop (CLI commands, threads) each
    event is written at once. Every write goes to an ``O_APPEND`` descriptor in one call, so
    lines from several processes never interleave. ``flush()``/``close()`` write what is
    pending; a SIGKILL loses at most the events of the current loop iteration.
    """

    def __init__(self, path: str, *, buffered: bool = True) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.buffered = buffered
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self._lock = threading.Lock()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._scheduled = False

    def write(self, event: Event) -> None:
        data = event.to_bytes()
        loop = _running_loop() if self.buffered else None
        with self._lock:
            self._pending.append(data)
            self._pending_bytes += len(data)
            if loop is None or self._pending_bytes >= FLUSH_BYTES:
                self._flush_locked()
                return
            if self._scheduled:
                return
            self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        if not self._pending:  # cheap check first: called before every SMTP reply batch
            return
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def close(self) -> None:
        self.flush()
        os.close(self._fd)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class TeeSink:
    """Writes every event to several sinks (e.g. the file and standard error)."""

    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = sinks

    def write(self, event: Event) -> None:
        for sink in self.sinks:
            sink.write(event)

    def flush(self) -> None:
        for sink in self.sinks:
            flush_fn = getattr(sink, "flush", None)
            if flush_fn is not None:
                flush_fn()


class StreamSink:
    """Writes JSON lines to an already open descriptor (standard error by default)."""

    def __init__(self, fd: int = 2) -> None:
        self.fd = fd

    def write(self, event: Event) -> None:
        os.write(self.fd, event.to_bytes())


class MemorySink:
    """Keeps events in a list (for the CLI's one-shot commands and for unit tests)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def write(self, event: Event) -> None:
        self.events.append(event)


_sink: EventSink = MemorySink()


def set_sink(sink: EventSink) -> None:
    """Route all further events to ``sink`` (what the old sink buffered is written first)."""
    global _sink
    flush()
    _sink = sink


def flush() -> None:
    """Write whatever the current sink buffers (call before a process exits)."""
    flush_fn = getattr(_sink, "flush", None)
    if flush_fn is not None:
        flush_fn()


def get_sink() -> EventSink:
    return _sink


def emit(name: str, **fields: Any) -> None:
    """Emit one event. Never raises: an event that cannot be written is dropped to stderr."""
    try:
        _sink.write(Event(name, fields))
    except Exception as exc:
        os.write(2, f"mailwarden: cannot write event {name!r}: {exc}\n".encode())
