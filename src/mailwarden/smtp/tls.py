"""TLS for the SMTP edge: the server context, a self-signed certificate on first run, and
what was negotiated.

Public names: ``ensure_certificate``, ``server_context``, ``tls_info``.
Security: writes the private key with mode 0600 (created with that mode, never widened);
the context refuses protocol versions below ``[tls] min_version``, compression and
renegotiation. Peer data is only the TLS handshake, parsed by OpenSSL.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path
from typing import Any

from mailwarden.config import Config
from mailwarden.core.types import TLSInfo

CERT_LIFETIME_DAYS = 825  # validity of the self-signed certificate (CA/B baseline maximum)
# TLS 1.2 suites: forward secret AEAD only (TLS 1.3 suites are always AEAD).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


def _write_private(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_certificate(cert_path: Path, key_path: Path, hostname: str) -> bool:
    """Create a self-signed certificate and key for ``hostname`` unless both files exist.

    Returns True if they were generated. The key file is mode 0600.
    """
    if cert_path.exists() and key_path.exists():
        return False
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName(hostname),
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_LIFETIME_DAYS))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(key_path, key_pem, 0o600)
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return True


def server_context(cfg: Config) -> ssl.SSLContext:
    """The server-side SSL context for every TLS listener.

    With no certificate configured, the self-signed pair under ``state_dir/tls`` is created
    if needed; a configured certificate that is missing is an error (``OSError``).
    """
    if not cfg.tls.cert_file and not cfg.tls.key_file:
        ensure_certificate(cfg.cert_path, cfg.key_path, cfg.gateway.hostname)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if cfg.tls.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.load_cert_chain(str(cfg.cert_path), str(cfg.key_path))
    return ctx


def tls_info(ssl_object: Any) -> TLSInfo:
    """What an ``ssl.SSLObject``/``SSLSocket`` negotiated."""
    cipher = ssl_object.cipher() or ("unknown", "", None)
    return TLSInfo(version=str(ssl_object.version()), cipher=str(cipher[0]), bits=cipher[2])
