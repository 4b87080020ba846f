"""DKIM signing of outbound mail, and the keys it uses.

``DkimSigner(settings, key_root)`` signs a message (rsa-sha256, relaxed/relaxed, the
header fields of ``[dkim] headers`` that are present) with the key of its From domain:
``key_root/<domain>/<selector>.key`` (PEM, PKCS#1, mode 0600; ``key_root`` is
``state_dir/dkim``). ``signature(message)`` returns the ``DKIM-Signature`` field to
prepend, or ``None`` when the domain is not enabled or has no key (event ``dkim.unsigned``
names the reason once per domain and process). Keys are read on first use and again when
the file changes, so a key made by ``mailwarden dkim keygen`` is used without a restart.
The content hook calls it at end of DATA for OUTBOUND messages, after every header edit
and before the message is queued, so retries send the same signed bytes.

``generate_key(domain, selector, root, bits, force)`` writes a new key (``cryptography``)
and returns its path and the DNS TXT record to publish (``dns_record``).

``KeyStore(root, report)`` reads those keys (checked 0600, cached until the file changes);
the ARC sealer (``scan.arcseal``) uses it too.

Public names: ``DkimSigner``, ``KeyStore``, ``generate_key``, ``dns_record``, ``key_path``,
``KeyExists``, ``MIN_KEY_BITS``, ``MAX_KEY_BITS``, ``present_fields``.
Security: the message is client data (its From domain chooses the key: only the
configured, enabled domains with a key on disk are signed, and the policy stage already
checked that the client may send for that domain); private keys are created 0600 in a
0700 directory and never logged. Signing runs in a thread for large messages.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailwarden.core.events import emit
from mailwarden.scan.mailauth import from_domains
from mailwarden.scan.settings import DkimSettings

MIN_KEY_BITS = 1024  # RFC 8301: verifiers refuse shorter keys
MAX_KEY_BITS = 4096  # a TXT record of a longer key does not fit comfortably in DNS
THREAD_THRESHOLD = 256 * 1024  # bytes: larger messages are hashed and signed off the loop
KEY_MODE = 0o600
DIR_MODE = 0o700
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


class KeyExists(Exception):
    """A key file is already there (use ``--force`` to replace it)."""


def key_path(root: Path, domain: str, selector: str) -> Path:
    domain = domain.lower().rstrip(".")
    selector = selector.lower()
    if not all(_LABEL.match(x) for x in domain.split(".")) or not _LABEL.match(selector):
        raise ValueError(f"bad domain or selector: {domain!r} {selector!r}")
    return root / domain / f"{selector}.key"


def dns_record(domain: str, selector: str, private_pem: bytes) -> str:
    """The zone-file line publishing the public half of ``private_pem``."""
    key = serialization.load_pem_private_key(private_pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA key")
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    p = base64.b64encode(der).decode("ascii")
    text = f"v=DKIM1; k=rsa; p={p}"
    # Character-strings hold at most 255 bytes: split, the resolver joins them again.
    chunks = " ".join(f'"{text[i : i + 250]}"' for i in range(0, len(text), 250))
    return f"{selector}._domainkey.{domain}. IN TXT {chunks}"


def generate_key(
    domain: str, selector: str, root: Path, bits: int = 2048, force: bool = False
) -> tuple[Path, str]:
    """Create ``root/<domain>/<selector>.key`` (0600); return (path, DNS record)."""
    if not MIN_KEY_BITS <= bits <= MAX_KEY_BITS:
        raise ValueError(f"--bits must be between {MIN_KEY_BITS} and {MAX_KEY_BITS}")
    path = key_path(root, domain, selector)
    if path.exists() and not force:
        raise KeyExists(f"{path} exists; use --force to replace it (and update DNS)")
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,  # PKCS#1, what dkimpy reads
        serialization.NoEncryption(),
    )
    for d in (root, path.parent):
        d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, KEY_MODE)
    try:
        os.fchmod(fd, KEY_MODE)
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path, dns_record(path.parent.name, selector, pem)


class KeyStore:
    """The private keys under ``root`` (``root/<domain>/<selector>.key``), read on first
    use and again when the file changes; a key readable by others is refused and
    reported through ``report(domain, reason)``."""

    def __init__(self, root: Path, report: Callable[[str, str], None]) -> None:
        self.root = root
        self._report = report
        self._keys: dict[tuple[str, str], tuple[float, bytes]] = {}  # -> (mtime, PEM)

    def get(self, domain: str, selector: str) -> bytes | None:
        """The PEM of the key, or ``None`` (no such file, unreadable, too open)."""
        try:
            path = key_path(self.root, domain, selector)
            st = path.stat()
        except (OSError, ValueError):
            return None
        cached = self._keys.get((domain, selector))
        if cached is not None and cached[0] == st.st_mtime:
            return cached[1]
        if st.st_mode & 0o077:
            self._report(domain, f"key {path} is readable by others (chmod 600)")
            return None
        try:
            pem = path.read_bytes()
        except OSError:
            return None
        self._keys[(domain, selector)] = (st.st_mtime, pem)
        return pem


def present_fields(message: bytes, wanted: Sequence[bytes]) -> list[bytes]:
    """The names of ``wanted`` (lower case) that occur in the header of ``message``:
    signing an absent field would forbid adding it later."""
    present = {
        m.group(1).lower()
        for m in re.finditer(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:", message[: _end(message)], re.M)
    }
    return [h for h in wanted if h in present]


class DkimSigner:
    """Signs outbound messages with the key of their From domain."""

    def __init__(self, settings: DkimSettings, key_root: Path) -> None:
        self.settings = settings
        self.root = key_root
        self._reported: set[tuple[str, str]] = set()
        self._store = KeyStore(key_root, self._unsigned)
        self._headers = [h.encode("ascii") for h in settings.headers]

    def _unsigned(self, domain: str, reason: str) -> None:
        if (domain, reason) not in self._reported and len(self._reported) < 1024:
            self._reported.add((domain, reason))
            emit("dkim.unsigned", domain=domain, reason=reason)

    def _key(self, domain: str, selector: str) -> bytes | None:
        return self._store.get(domain, selector)

    def _prepare(self, message: bytes) -> tuple[str, str, bytes] | None:
        if not self.settings.sign:
            return None
        end = message.find(b"\r\n\r\n")
        domains = from_domains(message if end < 0 else message[: end + 2])
        if not domains or len(set(domains)) != 1:
            return None
        domain = domains[0]
        if not self.settings.enabled_for(domain):
            return None
        selector = self.settings.selector_for(domain)
        pem = self._key(domain, selector)
        if pem is None:
            if self.settings.domains:  # listed but no key: the operator should know
                self._unsigned(domain, f"no key {selector}.key under {self.root / domain}")
            return None
        return domain, selector, pem

    def _sign(self, message: bytes, domain: str, selector: str, pem: bytes) -> bytes | None:
        include = present_fields(message, self._headers)
        try:
            sig: bytes = dkim.sign(
                message,
                selector.encode("ascii"),
                domain.encode("ascii"),
                pem,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=include,
            )
        except dkim.DKIMException as exc:
            self._unsigned(domain, f"signing failed: {exc}")
            return None
        return sig

    async def signature(self, message: bytes) -> bytes | None:
        """The ``DKIM-Signature`` field (CRLF-terminated) for ``message``, or ``None``."""
        prepared = self._prepare(message)
        if prepared is None:
            return None
        if len(message) > THREAD_THRESHOLD:
            return await asyncio.to_thread(self._sign, message, *prepared)
        return self._sign(message, *prepared)


def _end(message: bytes) -> int:
    end = message.find(b"\r\n\r\n")
    return len(message) if end < 0 else end + 2
