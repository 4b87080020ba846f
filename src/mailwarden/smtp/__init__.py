"""SMTP edge: the ESMTP server protocol, TLS, limits, trace headers.

Security: every byte here comes from an untrusted network peer.
"""
