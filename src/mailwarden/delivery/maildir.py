"""Local delivery into Maildir folders: ``DIR/<domain>/<localpart>/{tmp,new,cur}``.

``MaildirTransport(root).deliver(item)`` writes one file per recipient, with
``Return-Path:`` and ``Delivered-To:`` prepended and LF line ends (the Maildir convention):
write into ``tmp/`` under a unique name, fsync, rename into ``new/``, fsync the directory
(the durability contract: a DELIVERED result means the file is on disk).
``mailbox_path(root, address)`` maps an address to its folder (or raises ``AddressError``).

Public names: ``MaildirTransport``, ``mailbox_path``, ``safe_localpart``.
Security: recipient addresses are untrusted and become path components: the domain must be
a plain DNS name, the local part is lower-cased and every byte outside ``[a-z0-9._+=-]`` is
percent-encoded (so ``/``, NUL, ``%`` and non-ASCII never reach the file system raw), a
leading dot is encoded (no ``.``/``..``/hidden folders), and the final path is checked to
lie inside the root. Files are created with O_EXCL and mode 0600; symlinks are not followed
for the message file.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import socket
import time
from pathlib import Path

from mailwarden.core.types import RecipientResult
from mailwarden.delivery.address import domain_of, result, split_envelope
from mailwarden.delivery.base import DeliveryItem
from mailwarden.errors import AddressError

MAX_LOCALPART = 64  # octets (RFC 5321 4.5.3.1.1); longer local parts are refused
MAX_DOMAIN = 253  # characters of a DNS name
FILE_MODE = 0o600  # message files: readable by the mail owner only
DIR_MODE = 0o700  # Maildir folders
_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789._+=-")
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9-]{1,63}$")
_counter = itertools.count()


def safe_localpart(localpart: str) -> str:
    """Lower-case ``localpart`` and percent-encode anything unsafe in a file name."""
    raw = localpart.lower().encode("utf-8")
    if not raw or len(raw) > MAX_LOCALPART:
        raise AddressError(f"local part of {localpart!r} is empty or too long")
    out = []
    for i, byte in enumerate(raw):
        if byte in _SAFE and not (i == 0 and byte == ord(".")):
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def mailbox_path(root: Path, address: str) -> Path:
    """The Maildir folder of ``address`` under ``root``; ``AddressError`` if unsafe."""
    localpart, at, _ = address.rpartition("@")
    domain = domain_of(address)
    if not at or not _DOMAIN.match(domain):
        raise AddressError(f"recipient {address!r} has no usable domain")
    if localpart.startswith('"') and localpart.endswith('"') and len(localpart) >= 2:
        localpart = localpart[1:-1]
    folder = root / domain / safe_localpart(localpart)
    # Belt and braces: the encoding above cannot produce "/" or "..", check anyway.
    if os.path.commonpath([os.path.abspath(folder), os.path.abspath(root)]) != os.path.abspath(
        root
    ):
        raise AddressError(f"recipient {address!r} maps outside the mail root")
    return folder


def _unique_name() -> str:
    """A Maildir file name: time, microseconds, pid, counter, random, host (maildir(5))."""
    now = time.time()
    host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
    rand = os.urandom(4).hex()
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_counter)}R{rand}.{host}"


def _ensure_maildir(folder: Path) -> None:
    created = False
    for sub in ("tmp", "new", "cur"):
        path = folder / sub
        if not path.is_dir():
            path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            created = True
    if created:
        # Make the new directory entries durable too.
        for d in (folder, folder.parent, folder.parent.parent):
            _fsync_dir(d)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_one(folder: Path, data: bytes) -> Path:
    """tmp -> fsync -> rename to new -> fsync dir. Returns the final path."""
    _ensure_maildir(folder)
    name = _unique_name()
    tmp = folder / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    final = folder / "new" / f"{name},S={len(data)}"
    os.rename(tmp, final)
    _fsync_dir(folder / "new")
    return final


def _to_lf(message: bytes) -> bytes:
    return message.replace(b"\r\n", b"\n")


class MaildirTransport:
    """Writes each recipient's copy into its Maildir under ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    async def deliver(self, item: DeliveryItem) -> list[RecipientResult]:
        good, results = split_envelope(item, "maildir")
        if not good:
            return results
        body = _to_lf(item.message)
        return_path = f"Return-Path: <{item.mail_from}>\n".encode()
        for rcpt in good:
            try:
                folder = mailbox_path(self.root, rcpt)
            except AddressError as exc:
                results.append(result(rcpt, 550, "5.1.3", str(exc), "maildir"))
                continue
            data = return_path + f"Delivered-To: {rcpt}\n".encode() + body
            try:
                path = await asyncio.to_thread(_write_one, folder, data)
            except OSError as exc:
                # Full disk, quota, permissions: the operator can fix it; retry later.
                results.append(
                    result(
                        rcpt,
                        451,
                        "4.3.0",
                        f"cannot write to Maildir {folder}: {exc.strerror or exc}",
                        "maildir",
                    )
                )
                continue
            results.append(result(rcpt, 250, "2.0.0", f"delivered to maildir as {path.name}",
                                  "maildir"))  # fmt: skip
        order = {r: i for i, r in enumerate(item.recipients)}
        return sorted(results, key=lambda r: order.get(r.recipient, 0))
