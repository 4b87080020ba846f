"""The built-in scanner: test signatures, dangerous attachments, archives, malformed MIME.

``BuiltinScanner(settings)`` is a ``Scanner`` named ``BUILTIN`` (the embedded default when no
daemon is configured, and always on as a second line). Per message it adds:

- ``BUILTIN_VIRUS`` -- the EICAR test string in the raw message or any decoded part or
  archive member, or a SHA-256 from ``bad_sha256`` (forced quarantine like any ``*_VIRUS``);
- ``GTUBE`` -- the GTUBE spam test string (score high enough to reject);
- ``ATTACH_EXECUTABLE`` -- a part or member that *is* a program by its magic bytes (PE/DOS
  ``MZ``, ELF, Mach-O, Java class, Windows shortcut, ``#!`` scripts), whatever its name;
- ``ATTACH_DANGEROUS_NAME`` -- a name ending in .exe .scr .js .vbs .bat .cmd .ps1 .jar .hta
  .lnk and friends; ``ATTACH_DOUBLE_EXT`` -- ``invoice.pdf.exe``-style names;
- ``OFFICE_MACRO`` -- macro-enabled Office files (.docm/.xlsm/.pptm..., OLE2 with a VBA
  project, OOXML with ``vbaProject.bin``);
- ``ARCHIVE_BOMB`` / ``ARCHIVE_ENCRYPTED`` / ``ARCHIVE_CORRUPT`` (``scan.archive``);
- ``MIME_MALFORMED`` -- structural defects (``scan.mime``).

Symbols of one name are reported once, with the places in the detail.

Cost: a message that byte checks show to be one text part without attachments
(``scan.mime.single_text_part``), or a simple well-formed multipart such as text + html or
text + base64 attachments (``scan.mime.simple_multipart``), skips the MIME parser -- its
parts get exactly the checks the parser's parts would get. Messages up to ``INLINE_MAX``
are scanned on the event loop, up to ``OFFLOAD_MIN`` in a thread, larger ones in a process
pool (``scan.offload``, started on first use, ``POOL_WORKERS`` processes), so a 30 MB
message never stalls the other sessions; its bytes reach the worker through a memfd that
a thread fills (no pickling on the loop's thread), pickled only where the worker cannot
open the memfd. A message whose pool broke under it (a worker died, or was killed because
another scan overran its time) is scanned again, once, alone; one that breaks the pool on
that retry too, or overruns its own time, is ``BUILTIN_FAIL``: the message is tempfailed,
never delivered unscanned.

Public names: ``BuiltinScanner``, ``scan_message``, ``DANGEROUS_EXTENSIONS``,
``INLINE_MAX``, ``OFFLOAD_MIN``.
Security: all content is hostile: only byte comparisons, hashing and bounded decompression,
nothing is executed; a large message is written only to an anonymous memfd (close-on-exec,
never on disk, closed after its scan), which the pool workers (our children, same user)
open read-only by its /proc path.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterable

from mailwarden.core.types import Symbol
from mailwarden.scan.archive import Budget, archive_kind, expand
from mailwarden.scan.base import ScanInput, clean_detail, fail_symbol
from mailwarden.scan.mime import MimeTree, SimpleTree, parse, simple_multipart, single_text_part
from mailwarden.scan.offload import POOL_WORKERS, PoolError, ScanPool
from mailwarden.scan.settings import BuiltinSettings

NAME = "BUILTIN"
INLINE_MAX = 256 * 1024  # messages up to this size are scanned on the event loop ...
OFFLOAD_MIN = 1024 * 1024  # ... above this in a worker process, in between in a thread
MAX_PLACES = 5  # places (part paths, file names) quoted per symbol

# Assembled at import so this source file itself carries neither test string.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*" + b"GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


DANGEROUS_EXTENSIONS = _words(
    "exe scr com pif cpl msi msp dll sys js jse vbs vbe wsf wsh wsc bat cmd ps1 psm1 "
    "jar hta lnk reg inf iso img vhd vhdx appx msix application gadget scf url chm"
)
MACRO_EXTENSIONS = _words("docm dotm xlsm xltm xlam xlsb pptm potm ppsm ppam sldm")
# Extensions a lure pretends to be before the real, dangerous one.
_LURE_EXTENSIONS = _words(
    "pdf doc docx xls xlsx ppt pptx txt rtf jpg jpeg png gif bmp zip rar mp3 mp4 htm "
    "html csv odt ods"
)
_OLE = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_VBA_STREAM = "_VBA_PROJECT".encode("utf-16-le")
_LNK = b"L\x00\x00\x00\x01\x14\x02\x00"
_MAGIC = (
    (b"MZ", "DOS/PE executable"),
    (b"\x7fELF", "ELF executable"),
    (b"\xfe\xed\xfa\xce", "Mach-O executable"),
    (b"\xfe\xed\xfa\xcf", "Mach-O executable"),
    (b"\xce\xfa\xed\xfe", "Mach-O executable"),
    (b"\xcf\xfa\xed\xfe", "Mach-O executable"),
    (b"\xca\xfe\xba\xbe", "Mach-O universal / Java class"),
    (_LNK, "Windows shortcut"),
    (b"#!", "script"),
)
SCORES = {
    "GTUBE": 100.0,
    "ATTACH_EXECUTABLE": 10.0,
    "ATTACH_DANGEROUS_NAME": 8.0,
    "ATTACH_DOUBLE_EXT": 6.0,
    "OFFICE_MACRO": 5.0,
    "MIME_MALFORMED": 3.0,
    "BUILTIN_VIRUS": 0.0,
}


class _Findings:
    """Symbols by name with their places (deduplicated)."""

    def __init__(self) -> None:
        self.places: dict[str, list[str]] = {}

    def add(self, name: str, place: str) -> None:
        places = self.places.setdefault(name, [])
        if place not in places:
            places.append(place)

    def symbols(self) -> list[Symbol]:
        out = []
        for name, places in self.places.items():
            detail = ", ".join(places[:MAX_PLACES])
            if len(places) > MAX_PLACES:
                detail += f" (+{len(places) - MAX_PLACES} more)"
            out.append(Symbol(name, SCORES.get(name, 0.0), clean_detail(detail)))
        return out


def _extensions(name: str) -> list[str]:
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip().strip(".").lower()
    return [e.strip() for e in base.split(".")[1:]]


def _check_name(name: str, place: str, found: _Findings) -> None:
    exts = _extensions(name)
    if not exts:
        return
    last = exts[-1]
    if last in DANGEROUS_EXTENSIONS:
        found.add("ATTACH_DANGEROUS_NAME", place)
        base = name.rsplit(".", 1)[0]
        if (len(exts) >= 2 and exts[-2] in _LURE_EXTENSIONS) or base.endswith("   "):
            found.add("ATTACH_DOUBLE_EXT", place)
    if last in MACRO_EXTENSIONS:
        found.add("OFFICE_MACRO", place)


def _check_content(
    data: bytes, place: str, found: _Findings, bad: frozenset[str], named: bool = True
) -> None:
    if EICAR in data:
        found.add("BUILTIN_VIRUS", f"EICAR-Test-File in {place}")
    if GTUBE in data:
        found.add("GTUBE", place)
    for magic, what in _MAGIC:
        # A message body that starts with "#!" is text about a script, not an attachment.
        if data.startswith(magic) and (named or magic != b"#!"):
            found.add("ATTACH_EXECUTABLE", f"{what}: {place}")
            break
    if data.startswith(_OLE) and _VBA_STREAM in data:
        found.add("OFFICE_MACRO", place)
    if bad and data and hashlib.sha256(data).hexdigest() in bad:
        found.add("BUILTIN_VIRUS", f"known-bad SHA-256 in {place}")


def _check_object(
    name: str | None, data: bytes, place: str, found: _Findings, bad: frozenset[str], budget: Budget
) -> None:
    """One part or archive member, and (for archives) everything inside it."""
    if name:
        _check_name(name, place, found)
        if name.rsplit("/", 1)[-1].lower() == "vbaproject.bin":
            found.add("OFFICE_MACRO", place)
    _check_content(data, place, found, bad, named=bool(name))
    if archive_kind(data) is None:
        return
    for path, content in expand(data, place, budget):
        leaf = path.rsplit("/", 1)[-1]
        _check_name(leaf, path, found)
        if leaf.lower() == "vbaproject.bin":
            found.add("OFFICE_MACRO", path)
        _check_content(content, path, found, bad)


def scan_message(raw: bytes, bad_sha256: Iterable[str] = (), *, fast: bool = True) -> list[Symbol]:
    """All built-in findings for one wire-format message (pure, CPU only).

    ``fast=False`` always runs the MIME parser (the tests compare both ways); otherwise the
    fast paths of ``scan.mime`` take the messages they can prove they read as it does."""
    bad = frozenset(bad_sha256)
    found = _Findings()
    budget = Budget()
    if EICAR in raw:
        found.add("BUILTIN_VIRUS", "EICAR-Test-File in message")
    if GTUBE in raw:
        found.add("GTUBE", "message")
    single = single_text_part(raw) if fast else None
    if single is not None:
        place = clean_detail(f"part {single.path} ({single.content_type})", 80)
        _check_object(None, single.payload, place, found, bad, budget)
        return found.symbols() + budget.findings
    tree: MimeTree | SimpleTree | None = simple_multipart(raw) if fast else None
    if tree is None:
        tree = parse(raw)
    for part in tree.parts():
        label = part.filename or f"part {part.path} ({part.content_type})"
        place = clean_detail(label, 80)
        _check_object(part.filename, part.payload, place, found, bad, budget)
    if tree.defects:
        found.add("MIME_MALFORMED", ", ".join(tree.defects[:MAX_PLACES]))
    return found.symbols() + budget.findings


class BuiltinScanner:
    """The ``BUILTIN`` scanner (pure Python, no daemon)."""

    name = NAME

    def __init__(
        self, settings: BuiltinSettings | None = None, pool_workers: int = POOL_WORKERS
    ) -> None:
        self.settings = settings or BuiltinSettings()
        self.timeout = self.settings.timeout
        self._bad = tuple(self.settings.bad_sha256)
        self.pool = ScanPool(pool_workers)

    async def scan(self, msg: ScanInput) -> list[Symbol]:
        raw = msg.raw
        try:
            if len(raw) <= INLINE_MAX:
                return scan_message(raw, self._bad)
            if len(raw) <= OFFLOAD_MIN:
                return await asyncio.to_thread(scan_message, raw, self._bad)
            return await self._scan_in_pool(raw)
        except PoolError as exc:
            return [fail_symbol(NAME, str(exc))]
        except (MemoryError, RecursionError, Exception) as exc:  # never raise (contract)
            return [fail_symbol(NAME, f"{type(exc).__name__}: {exc}")]

    async def _scan_in_pool(self, raw: bytes) -> list[Symbol]:
        """Scan in a worker process. The bytes go through a memfd written by a thread
        (the copy runs without the GIL) and the worker opens it by its /proc path, so
        the event loop never pickles the message; where that is not possible (no memfd,
        /proc not readable), they are pickled as before."""
        try:
            fd = os.memfd_create("mailwarden-scan", os.MFD_CLOEXEC)
        except (OSError, AttributeError):
            return await self.pool.run(scan_message, raw, self._bad)
        write = asyncio.get_running_loop().run_in_executor(None, _write_all, fd, raw)
        try:
            # Shielded: if the scan is cancelled (timeout) while the thread still
            # writes, the descriptor is closed only once the thread is done with it.
            await asyncio.shield(write)
            found = await self.pool.run(scan_memfd, f"/proc/{os.getpid()}/fd/{fd}", self._bad)
        finally:
            if write.done():
                os.close(fd)
            else:
                write.add_done_callback(lambda _: os.close(fd))
        if found is None:  # the worker could not open it
            return await self.pool.run(scan_message, raw, self._bad)
        return found

    async def aclose(self) -> None:
        await self.pool.aclose()


def _write_all(fd: int, raw: bytes) -> None:
    view = memoryview(raw)
    while view:
        view = view[os.write(fd, view) :]


def scan_memfd(path: str, bad_sha256: Iterable[str] = ()) -> list[Symbol] | None:
    """``scan_message`` of the bytes in the gateway's memfd at ``path`` (run in a pool
    worker); None if the file cannot be opened here (the caller then sends the bytes)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return scan_message(raw, bad_sha256)
