"""The bytes of one queued message: ``MWQ1`` header line, envelope JSON, ``\\n``, data.

``MWQ1 <json length> <data length> <crc32 of data>\\n``, then the envelope
(``EnvelopeSnapshot.to_json``) as compact JSON, ``\\n``, then the raw message bytes. A
per-file spool message is exactly these bytes; a segment-log record carries them verbatim,
so materialising a record into a spool file is a plain write.

``encode(snapshot, data)`` returns the part before the data and the data's CRC;
``parse_header`` / ``parse_envelope`` check the pieces of a file read incrementally;
``parse_message`` checks a whole message held in memory (a segment record).

Public names: ``MAGIC``, ``MAX_HEADER_LINE``, ``MAX_ENVELOPE_JSON``, ``envelope_json``,
``encode``, ``parse_header``, ``parse_envelope``, ``parse_message``, ``Parsed``.
Security: parses bytes read back from the spool, which may be torn or damaged: lengths
are bounded, the data is checked against its CRC, and any failure is ``SpoolCorrupt``;
the message bytes themselves are untrusted and never interpreted.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, fields

from mailwarden.core.types import EnvelopeSnapshot
from mailwarden.errors import SpoolCorrupt

MAGIC = b"MWQ1"  # first bytes of every message (format version 1)
MAX_HEADER_LINE = 64  # bytes of the first line: magic and three numbers
MAX_ENVELOPE_JSON = 8 * 1024 * 1024  # an envelope larger than this is corrupt

_ENVELOPE_FIELDS = tuple(f.name for f in fields(EnvelopeSnapshot))


def envelope_json(snapshot: EnvelopeSnapshot) -> bytes:
    """``snapshot.to_json()`` as compact JSON, without ``dataclasses.asdict`` (which
    deep-copies every field and was a fifth of the enqueue CPU). Every field is a scalar,
    a tuple of strings (JSON array) or a ``StrEnum`` (JSON string of its value)."""
    obj = {name: getattr(snapshot, name) for name in _ENVELOPE_FIELDS}
    return json.dumps(obj, separators=(",", ":")).encode()


def encode(snapshot: EnvelopeSnapshot, data: bytes) -> tuple[bytes, int]:
    """The bytes before ``data`` (header line, envelope, ``\\n``) and ``crc32(data)``."""
    envelope = envelope_json(snapshot)
    crc = zlib.crc32(data)
    return b"%s %d %d %d\n%s\n" % (MAGIC, len(envelope), len(data), crc, envelope), crc


def parse_header(qid: str, line: bytes) -> tuple[int, int, int]:
    """The envelope length, data length and data CRC of a header line (with its ``\\n``)."""
    parts = line.split()
    if len(parts) != 4 or parts[0] != MAGIC or not line.endswith(b"\n"):
        raise SpoolCorrupt(f"{qid}: bad spool file header")
    try:
        env_len, data_len, crc = (int(p) for p in parts[1:])
    except ValueError as exc:
        raise SpoolCorrupt(f"{qid}: bad spool file header") from exc
    if not 0 < env_len <= MAX_ENVELOPE_JSON or data_len < 0:
        raise SpoolCorrupt(f"{qid}: bad spool file header lengths")
    return env_len, data_len, crc


def parse_envelope(qid: str, raw: bytes) -> EnvelopeSnapshot:
    """The envelope from its JSON followed by ``\\n``; it must carry ``qid``."""
    try:
        snapshot = EnvelopeSnapshot.from_json(json.loads(raw[:-1]))
    except (ValueError, KeyError, TypeError) as exc:
        raise SpoolCorrupt(f"{qid}: unreadable envelope: {exc}") from exc
    if snapshot.queue_id != qid or raw[-1:] != b"\n":
        raise SpoolCorrupt(f"{qid}: envelope does not match the file name")
    return snapshot


@dataclass(frozen=True, slots=True)
class Parsed:
    """A message checked in memory: its envelope and where its data is."""

    snapshot: EnvelopeSnapshot
    data_offset: int  # relative to the start of the message bytes
    data_length: int
    data_crc: int


def parse_message(qid: str, raw: bytes | memoryview) -> Parsed:
    """Check a whole message (header, envelope, data length and CRC)."""
    view = memoryview(raw)
    end = bytes(view[:MAX_HEADER_LINE]).find(b"\n")
    if end < 0:
        raise SpoolCorrupt(f"{qid}: bad spool file header")
    line = bytes(view[: end + 1])
    env_len, data_len, crc = parse_header(qid, line)
    offset = len(line) + env_len + 1
    if len(view) != offset + data_len:
        raise SpoolCorrupt(f"{qid}: message is truncated or has trailing bytes")
    snapshot = parse_envelope(qid, bytes(view[len(line) : offset]))
    if zlib.crc32(view[offset:]) != crc:
        raise SpoolCorrupt(f"{qid}: message data fails its checksum")
    return Parsed(snapshot, offset, data_len, crc)
