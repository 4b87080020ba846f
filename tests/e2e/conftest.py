"""Fixtures of the end-to-end tests: the scanning daemons of ``tests/scan/conftest.py``
(real clamd and rspamd on loopback, the loopback DNS server they use) for the gateway tests
that run the verdict pipeline.

Security: every daemon listens on 127.0.0.1 (or a socket in the test's directory) only.
"""

from tests.scan.conftest import (  # noqa: F401  (re-exported fixtures)
    clamd,
    clamd_db,
    clamd_factory,
    dns_server,
    rspamd,
    rspamd_factory,
)
