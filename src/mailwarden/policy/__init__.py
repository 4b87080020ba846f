"""Policy stage: decides who may send what, answering with ``core.types.Decision``.

Security: evaluates untrusted addresses and client identities.
"""
