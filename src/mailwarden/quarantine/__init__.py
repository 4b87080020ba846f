"""Quarantine (issue 4): messages a verdict held, kept durably and never delivered.

``Quarantine(cfg.quarantine_path, cfg.quarantine)`` stores (``hold``), lists, shows,
releases (to the spool, virus entries only with ``force``), deletes and expires held
messages; ``QuarantineIndex`` is the SQLite index behind it; ``render.summarize`` is the
safe view ``mailwarden quarantine show`` prints.

Public names: ``Quarantine``, ``QuarantineIndex``, ``Entry``, ``Held``, ``QuarantineError``,
``UnknownQuarantineId``, ``ReleaseProtected``, ``AlreadyReleased``, ``HELD``, ``RELEASED``,
``VIRUS``, ``SPAM``.
Security: holds hostile messages; see each module's ``Security`` line.
"""

from mailwarden.quarantine.index import HELD, RELEASED, SPAM, VIRUS, Entry, QuarantineIndex
from mailwarden.quarantine.store import (
    AlreadyReleased,
    Held,
    Quarantine,
    QuarantineError,
    ReleaseProtected,
    UnknownQuarantineId,
)

__all__ = [
    "HELD",
    "RELEASED",
    "SPAM",
    "VIRUS",
    "AlreadyReleased",
    "Entry",
    "Held",
    "Quarantine",
    "QuarantineError",
    "QuarantineIndex",
    "ReleaseProtected",
    "UnknownQuarantineId",
]
