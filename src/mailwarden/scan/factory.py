"""Build the scanners and the verdict engine from ``ScanSettings``; say what is running.

``build_scanners(settings, dns=None, hostname="")`` returns the configured backends: ClamAV
when ``clamav.socket`` is set, rspamd when ``rspamd.url`` is set, the built-in scanner
unless disabled, mail authentication (``scan.mailauth``) when ``mailauth.enabled`` and the
``[dns]`` section is given (it queries ``dns.nameservers``). ``build_engine(settings, ...)``
wraps them in a ``VerdictEngine``.
``scanning_notice(settings)`` is the line for ``mailwarden status`` and the startup banner
when virus scanning is limited to the built-in signatures (``None`` when ClamAV is on).

Public names: ``build_scanners``, ``build_engine``, ``scanner_labels``, ``scanning_notice``,
``LIMITED_NOTICE``.
Security: reads trusted settings only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailwarden.scan.base import Scanner
from mailwarden.scan.builtin import BuiltinScanner
from mailwarden.scan.clamav import ClamdScanner
from mailwarden.scan.rspamd import RspamdScanner
from mailwarden.scan.settings import ScanSettings
from mailwarden.scan.verdict import VerdictEngine

if TYPE_CHECKING:
    from mailwarden.config import DNSConfig

LIMITED_NOTICE = "virus scanning is limited (built-in signatures only)"


def build_scanners(
    settings: ScanSettings, dns: DNSConfig | None = None, hostname: str = ""
) -> list[Scanner]:
    scanners: list[Scanner] = []
    if settings.clamav.socket:
        scanners.append(ClamdScanner(settings.clamav))
    if settings.rspamd.url:
        scanners.append(RspamdScanner(settings.rspamd))
    if settings.builtin.enabled:
        scanners.append(BuiltinScanner(settings.builtin))
    if settings.mailauth.enabled and dns is not None:
        from mailwarden.scan.mailauth import MailAuthScanner  # pyspf, dkimpy: only when on

        scanners.append(
            MailAuthScanner(
                settings.mailauth,
                hostname or "localhost",
                dns.nameservers,
                dns.timeout,
                scan_timeout=settings.timeout,
            )
        )
    return scanners


def build_engine(
    settings: ScanSettings | None = None, dns: DNSConfig | None = None, hostname: str = ""
) -> VerdictEngine:
    settings = settings or ScanSettings()
    return VerdictEngine(build_scanners(settings, dns, hostname), settings)


def scanner_labels(settings: ScanSettings) -> list[str]:
    """One label per configured scanner, for the banner and ``mailwarden status``."""
    labels = []
    if settings.clamav.socket:
        labels.append(f"clamav ({settings.clamav.socket})")
    if settings.rspamd.url:
        labels.append(f"rspamd ({settings.rspamd.url})")
    if settings.builtin.enabled:
        labels.append("built-in (EICAR/GTUBE, attachments, archives, MIME)")
    if settings.mailauth.enabled:
        label = "mail authentication (SPF, DKIM, DMARC, ARC"
        if settings.mailauth.arc_trusted_sealers:
            label += "; trusted ARC sealers " + ", ".join(settings.mailauth.arc_trusted_sealers)
        if settings.mailauth.arc_seal:
            label += f"; ARC sealing as {settings.mailauth.arc_seal_domain}"
        labels.append(label + ")")
    return labels


def scanning_notice(settings: ScanSettings) -> str | None:
    """The warning to show when no real virus scanner is configured, else None."""
    if settings.clamav.socket:
        return None
    return LIMITED_NOTICE
