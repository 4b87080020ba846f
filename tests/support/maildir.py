"""Read messages from Maildir folders written by the gateway, Dovecot or Postfix.

``maildir_messages(dir)`` returns the raw bytes of every message in ``dir/new`` and
``dir/cur`` (sorted by file name, i.e. roughly by delivery); ``message_ids(dir)`` the
Message-ID header of each; ``parse(raw)`` an ``email.message.EmailMessage``.

Security: reads test-owned directories only.
"""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from pathlib import Path


def maildir_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    files: list[Path] = []
    for sub in ("new", "cur"):
        d = folder / sub
        if d.is_dir():
            files.extend(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
    return sorted(files, key=lambda p: p.name)


def maildir_messages(folder: Path) -> list[bytes]:
    out = []
    for p in maildir_files(folder):
        try:
            out.append(p.read_bytes())
        except FileNotFoundError:  # moved new -> cur meanwhile
            continue
    return out


def parse(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[return-value]


def header_value(raw: bytes, name: str) -> str | None:
    """One header of a raw message (unfolded, stripped), or None."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    value = msg.get(name)
    if value is None:
        return None
    return " ".join(str(value).split())


def message_ids(folder: Path) -> list[str]:
    ids = []
    for raw in maildir_messages(folder):
        mid = header_value(raw, "Message-ID")
        if mid:
            ids.append(mid)
    return ids


def body_of(raw: bytes) -> bytes:
    """The bytes after the header/body separator (CRLF or LF line endings)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = raw.find(sep)
        if i >= 0:
            return raw[i + len(sep) :]
    return b""


class MailboxReader:
    """Reading ``mail_root/<domain>/<localpart>/`` Maildirs, for fixtures that deliver there
    (the gateway's Maildir transport, Dovecot, a Postfix downstream). A subclass sets
    ``mail_root`` and names itself in ``mailbox_label`` (used in timeout messages)."""

    mail_root: Path
    mailbox_label = "Maildir"

    def maildir(self, address: str) -> Path:
        local, _, domain = address.lower().partition("@")
        return self.mail_root / domain / local

    def messages(self, address: str) -> list[bytes]:
        return maildir_messages(self.maildir(address))

    def wait_messages(self, address: str, count: int = 1, deadline: float = 60.0) -> list[bytes]:
        from tests.support.tmpdirs import poll

        return poll(
            lambda: m if len(m := self.messages(address)) >= count else None,
            deadline,
            what=f"{count} message(s) for {address} in {self.mailbox_label}",
        )
