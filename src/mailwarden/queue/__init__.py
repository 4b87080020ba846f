"""Queue stage: durable spool, retry scheduler, delivery status notifications.

Security: stores untrusted message bytes verbatim; parses its own spool files strictly and
moves anything unparsable to ``corrupt/``.
"""
