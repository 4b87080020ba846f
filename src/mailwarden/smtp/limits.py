"""Protocol limits of the SMTP edge, as named constants (RFC 5321 section 4.5.3).

Limits that an operator tunes (message size, recipients, header size, timeouts, connection
counts) live in ``config.LimitsConfig``; the ones here are fixed by the protocol or guard the
server's own memory and CPU.

Public names: the constants below.
Security: these bound what an untrusted peer can make the server buffer or compute.
"""

from __future__ import annotations

# RFC 5321 4.5.3.1.4: a command line is at most 512 octets including the CRLF.
MAX_COMMAND_LINE = 512
# RFC 5321 4.5.3.1.4 lets each ESMTP extension raise the MAIL/RCPT limit (RFC 1870 SIZE +26,
# RFC 6152 BODY +16, RFC 6531 SMTPUTF8 +10, DSN ORCPT/ENVID up to 500). One allowance for all.
MAX_PARAMS_ALLOWANCE = 512
# The longest line buffered in command mode before it is refused as too long.
MAX_ESMTP_COMMAND_LINE = MAX_COMMAND_LINE + MAX_PARAMS_ALLOWANCE
# RFC 5321 4.5.3.1.6 / RFC 5322 2.1.1: a text line is 998 octets plus CRLF.
MAX_TEXT_LINE = 998 + 2
# RFC 5321 4.5.3.1.3: a reverse- or forward-path is at most 256 octets including <>.
MAX_PATH = 256
# RFC 5321 4.5.3.1.1 / 4.5.3.1.2: local part 64 octets, domain 255 octets.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
# The longest HELO/EHLO argument accepted (a domain name or address literal).
MAX_HELO = 255
# Seconds a policy check may take before it is answered with a tempfail (never an accept).
POLICY_TIMEOUT = 30.0
# Seconds a TLS handshake (STARTTLS or implicit) may take.
TLS_HANDSHAKE_TIMEOUT = 30.0
# Input buffered while the session waits on the queue or a policy check; past this the
# socket stops being read (back-pressure) until the session catches up.
MAX_PENDING_INPUT = 256 * 1024
# Upper bound, in seconds, of the interval between idle/data timeout sweeps.
MAX_SWEEP_INTERVAL = 5.0
# Lower bound of that interval (tests set tiny timeouts; never busy-loop).
MIN_SWEEP_INTERVAL = 0.05
# RFC 4954 4: an AUTH command line and each AUTH continuation line is at most 12288
# octets including the CRLF (a base64 SASL response is longer than a command line).
MAX_AUTH_LINE = 12288
# Verbs that show a web client or proxy speaking to the SMTP port: disconnect at once.
FORBIDDEN_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "USER"})
