"""Open archives (zip, tar, gzip, bzip2, xz) recursively, within a hard budget.

``expand(data, label, budget)`` yields ``(path, content)`` for every file inside ``data``
(``path`` like ``"a.zip/b.tar.gz/c.exe"``), descending into archives found inside archives.
All expansion is streamed in ``CHUNK`` steps against one ``Budget`` per message: nesting
depth, member count, total expanded bytes and a compression-ratio check. The first breach
records ``ARCHIVE_BOMB`` in ``budget.findings`` and stops all further expansion -- a zip bomb
is a verdict, never a crash or unbounded memory. Unreadable archives are ``ARCHIVE_CORRUPT``
and encrypted members ``ARCHIVE_ENCRYPTED`` (content not scannable).

Public names: ``Budget``, ``expand``, ``archive_kind``, and the limit constants.
Security: ``data`` is hostile. Sizes claimed by archive headers are never trusted for
allocation: bytes are counted as they come out of the decompressor; a zip's central
directory is counted before ``zipfile`` parses it. Nothing is written to disk.
"""

from __future__ import annotations

import bz2
import io
import lzma
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from mailwarden.core.types import Symbol
from mailwarden.scan.base import clean_detail

MAX_DEPTH = 5  # archives inside archives (a .tar.gz counts as two levels)
MAX_MEMBERS = 1000  # files across all archives of one message
MAX_EXPANDED_BYTES = 100 * 1024 * 1024  # decompressed bytes across one message
MAX_RATIO = 250  # expanded/compressed bytes above which a member is a bomb ...
RATIO_MIN_BYTES = 2 * 1024 * 1024  # ... once it has expanded past this many bytes
CHUNK = 64 * 1024  # decompression step

_ZIP = b"PK\x03\x04"
_ZIP_EMPTY = b"PK\x05\x06"
_ZIP_CENTRAL = b"PK\x01\x02"
_GZIP = b"\x1f\x8b"
_BZIP2 = b"BZh"
_XZ = b"\xfd7zXZ\x00"
_TAR_MAGIC_OFFSET = 257


def archive_kind(data: bytes) -> str | None:
    """``"zip"``, ``"tar"``, ``"gzip"``, ``"bzip2"``, ``"xz"`` by content, else None."""
    head = data[:8]
    if head.startswith((_ZIP, _ZIP_EMPTY)):
        return "zip"
    if head.startswith(_GZIP):
        return "gzip"
    if head.startswith(_BZIP2) and len(data) > 10 and data[4:10] == b"1AY&SY":
        return "bzip2"
    if head.startswith(_XZ):
        return "xz"
    if data[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar":
        return "tar"
    return None


@dataclass
class Budget:
    """What one message may still expand; collects the findings."""

    max_depth: int = MAX_DEPTH
    max_members: int = MAX_MEMBERS
    max_bytes: int = MAX_EXPANDED_BYTES
    members: int = 0
    expanded: int = 0
    exhausted: bool = False
    findings: list[Symbol] = field(default_factory=list)

    def bomb(self, reason: str) -> None:
        if not self.exhausted:
            self.exhausted = True
            self.findings.append(Symbol("ARCHIVE_BOMB", 10.0, clean_detail(reason)))

    def note(self, name: str, score: float, detail: str) -> None:
        if not any(f.name == name for f in self.findings):
            self.findings.append(Symbol(name, score, clean_detail(detail)))

    def count_member(self, label: str) -> bool:
        self.members += 1
        if self.members > self.max_members:
            self.bomb(f"more than {self.max_members} archive members (at {label})")
        return not self.exhausted


class _Reader(Protocol):
    def read(self, n: int = ..., /) -> bytes: ...


def _drain(reader: _Reader, compressed: int, label: str, budget: Budget) -> bytes | None:
    """Read a member chunk by chunk under the budget; None when the budget breaks."""
    out = bytearray()
    while True:
        chunk = reader.read(CHUNK)
        if not chunk:
            return bytes(out)
        out += chunk
        if not _charge(budget, len(chunk), len(out), compressed, label):
            return None


def _claim(budget: Budget, size: int, compressed: int, label: str) -> bool:
    """Stop early when a header honestly claims too much (a lie is caught by ``_charge``)."""
    if budget.expanded + size > budget.max_bytes:
        budget.bomb(
            f"claims {size >> 20} MB, past the {budget.max_bytes >> 20} MB budget (at {label})"
        )
    elif size > RATIO_MIN_BYTES and size > MAX_RATIO * max(compressed, 1):
        budget.bomb(f"claims a compression ratio above {MAX_RATIO}:1 (at {label})")
    return not budget.exhausted


def _charge(budget: Budget, step: int, total: int, compressed: int, label: str) -> bool:
    budget.expanded += step
    if budget.expanded > budget.max_bytes:
        budget.bomb(f"expands past {budget.max_bytes >> 20} MB (at {label})")
    elif total > RATIO_MIN_BYTES and total > MAX_RATIO * max(compressed, 1):
        budget.bomb(f"compression ratio above {MAX_RATIO}:1 (at {label})")
    return not budget.exhausted


def expand(data: bytes, label: str, budget: Budget, depth: int = 1) -> Iterator[tuple[str, bytes]]:
    """Files inside archive ``data`` (recursively); nothing if it is not an archive."""
    kind = archive_kind(data)
    if kind is None or budget.exhausted:
        return
    if depth > budget.max_depth:
        budget.bomb(f"archives nested deeper than {budget.max_depth} (at {label})")
        return
    try:
        if kind == "zip":
            members = _zip_members(data, label, budget)
        elif kind == "tar":
            members = _tar_members(data, label, budget)
        else:
            members = _stream_member(data, kind, label, budget)
        for path, content in members:
            yield path, content
            if archive_kind(content) is not None:
                yield from expand(content, path, budget, depth + 1)
    except (
        zipfile.BadZipFile,
        tarfile.TarError,
        zlib.error,
        lzma.LZMAError,
        OSError,
        EOFError,
        ValueError,
        NotImplementedError,
        RuntimeError,
        KeyError,
    ) as exc:
        budget.note("ARCHIVE_CORRUPT", 2.0, f"{label}: {type(exc).__name__}")


def _zip_members(data: bytes, label: str, budget: Budget) -> Iterator[tuple[str, bytes]]:
    # zipfile builds one object per central-directory entry before we could count them.
    if data.count(_ZIP_CENTRAL) > budget.max_members:
        budget.bomb(f"zip with more than {budget.max_members} entries ({label})")
        return
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            path = f"{label}/{info.filename}"
            if not budget.count_member(path):
                return
            if info.flag_bits & 0x1:
                budget.note("ARCHIVE_ENCRYPTED", 4.0, path)
                yield path, b""
                continue
            if not _claim(budget, info.file_size, info.compress_size, path):
                return
            with zf.open(info) as member:
                content = _drain(member, info.compress_size, path, budget)
            if content is None:
                return
            yield path, content


def _tar_members(data: bytes, label: str, budget: Budget) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for info in tf:
            if not info.isfile():
                continue
            path = f"{label}/{info.name}"
            if not budget.count_member(path):
                return
            if not _claim(budget, info.size, info.size, path):
                return
            member = tf.extractfile(info)
            if member is None:
                continue
            content = _drain(member, info.size, path, budget)
            if content is None:
                return
            yield path, content


def _stream_member(
    data: bytes, kind: str, label: str, budget: Budget
) -> Iterator[tuple[str, bytes]]:
    """The single file inside a gzip/bzip2/xz stream (concatenated members joined)."""
    path = f"{label}/{_strip_suffix(label.rsplit('/', 1)[-1])}"
    if not budget.count_member(path):
        return
    out = bytearray()
    pending = data
    while pending:
        dec = _decompressor(kind)
        buf = pending
        while True:
            chunk = dec.decompress(buf, CHUNK)
            out += chunk
            # Input consumed so far (zlib hands back what it has not read yet).
            consumed = len(data) - len(_tail(dec))
            if chunk and not _charge(budget, len(chunk), len(out), consumed, path):
                return
            if dec.eof:
                pending = dec.unused_data.lstrip(b"\0")
                break
            buf = _tail(dec)
            if not buf and not chunk and dec.needs_input:
                raise EOFError("truncated compressed stream")
        if kind != "gzip" and not pending.startswith(_BZIP2 if kind == "bzip2" else _XZ):
            break
    yield path, bytes(out)


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...
    @property
    def needs_input(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = ..., /) -> bytes: ...


class _GzipAdapter:
    """zlib's decompressobj with the bz2/lzma decompressor interface."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        self.needs_input = True

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def unused_data(self) -> bytes:
        return self._d.unused_data

    @property
    def unconsumed_tail(self) -> bytes:
        return self._d.unconsumed_tail

    def decompress(self, data: bytes, max_length: int = 0, /) -> bytes:
        out = self._d.decompress(data, max_length)
        self.needs_input = not self._d.unconsumed_tail
        return out


def _decompressor(kind: str) -> _Decompressor:
    if kind == "gzip":
        return _GzipAdapter()
    if kind == "bzip2":
        return bz2.BZ2Decompressor()
    return lzma.LZMADecompressor()


def _tail(dec: _Decompressor) -> bytes:
    """Input the decompressor still holds back (zlib) -- bz2/lzma keep it internally."""
    return getattr(dec, "unconsumed_tail", b"")


def _strip_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in (".tgz", ".tbz2", ".txz"):
        if lower.endswith(suffix):
            return name[: -len(suffix)] + ".tar"
    for suffix in (".gz", ".bz2", ".xz"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name + ".out"
