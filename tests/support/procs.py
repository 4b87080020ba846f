"""Stopping the daemons that the fixtures start.

``stop_group(proc, sig)`` signals the process group of a ``subprocess.Popen`` started with
``start_new_session=True`` (so a daemon's children go too), waits, and escalates to
SIGKILL after ``timeout`` seconds.

Security: signals only process groups that a fixture itself started, by their id.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

STOP_TIMEOUT = 20.0  # seconds a daemon gets to exit after SIGTERM before SIGKILL


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_group(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT
) -> int:
    """Signal ``proc``'s group with ``sig``, wait; SIGKILL the group if it lingers."""
    if proc.poll() is None:
        signal_group(proc, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            signal_group(proc, signal.SIGKILL)
            proc.wait(timeout)
    # Reap leftovers of the group (children that outlived the leader).
    signal_group(proc, signal.SIGKILL)
    return proc.returncode
