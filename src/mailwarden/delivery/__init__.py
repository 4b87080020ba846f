"""Delivery stage: moves queued messages to their next hop (Maildir, LMTP, SMTP/MX).

The queue calls ``Router.destination(recipient)`` to group recipients, then
``Router.deliver(item)`` once per group. See ``delivery.base`` for the interface.
Security: talks to remote servers whose replies are untrusted.
"""
