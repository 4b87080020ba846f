"""Small SMTP helpers for the policy tests against the real gateway."""

from __future__ import annotations

from tests.smtp.harness import RawClient


def session(port: int, source: str, sender: str = "<a@outside.example>") -> RawClient:
    """Connected, EHLO and MAIL FROM done (asserting both succeed)."""
    c = RawClient(port, source=source)
    assert c.greeting.startswith("220"), c.greeting
    assert c.cmd("EHLO client.test").startswith("250")
    reply = c.cmd(f"MAIL FROM:{sender}")
    assert reply.startswith("250"), reply
    return c


def greeting(port: int, source: str) -> str:
    c = RawClient(port, source=source)
    try:
        return c.greeting
    finally:
        c.close()
