"""Retry policy: exponential backoff, maximum lifetime, delay warning (pure functions).

The wait after attempt ``n`` (1-based) is ``min_backoff * 2**(n-1)``, capped at
``max_backoff`` (Postfix's ``minimal_backoff_time``/``maximal_backoff_time``). A message
older than ``max_lifetime`` is returned to its sender after its next failed attempt; a
delay warning is sent once when a message is older than ``delay_warning`` (0 disables).

Public names: ``backoff``, ``expired``, ``warning_due``, ``MAX_BACKOFF_EXPONENT``.
Security: none (arithmetic on configuration values and timestamps).
"""

from __future__ import annotations

from mailwarden.config import QueueConfig

MAX_BACKOFF_EXPONENT = 32  # 2**32 * min_backoff is beyond any max_backoff; avoids overflow


def backoff(cfg: QueueConfig, attempts: int) -> float:
    """Seconds to wait after ``attempts`` failed attempts (``attempts >= 1``)."""
    exponent = min(max(attempts, 1) - 1, MAX_BACKOFF_EXPONENT)
    wait = cfg.min_backoff * float(2**exponent)
    return float(max(cfg.min_backoff, min(wait, cfg.max_backoff)))


def expired(cfg: QueueConfig, received_at: float, now: float) -> bool:
    """True once the message has been queued for ``max_lifetime`` or longer."""
    return now - received_at >= cfg.max_lifetime


def warning_due(cfg: QueueConfig, received_at: float, now: float, warned: bool) -> bool:
    """True if the one delay warning should be sent now."""
    return cfg.delay_warning > 0 and not warned and now - received_at >= cfg.delay_warning
