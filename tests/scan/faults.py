"""Fault injectors for the scan pool tests: functions a pool worker runs in place of the
real scan, to break the pool on purpose (test-only, never used by the gateway).

- ``kill_own_worker(raw, bad)``: SIGKILLs the worker process that runs it, as the OOM
  killer would; it never returns.
- ``hang_until_killed(started, raw, bad)``: creates the file ``started``, then sleeps until
  its worker is killed (a scan that overruns its time).
- ``hang(*args)``: sleeps until its worker is killed (in place of ``scan_memfd``).
- ``scan_when_released(gate, raw, bad)``: waits until the file ``gate`` exists, then
  returns the real ``scan_message(raw, bad)``: an innocent scan still in the pool when a
  pool-mate breaks it.

They are module-level functions so that the ``spawn`` workers can unpickle them.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from mailwarden.core.types import Symbol
from mailwarden.scan.builtin import scan_message

GIVE_UP = 120.0  # seconds a worker waits for a file before it gives up (not a measurement)


def kill_own_worker(raw: bytes, bad: tuple[str, ...]) -> list[Symbol]:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("still alive after SIGKILL")


def _wait_for(path: str) -> None:
    deadline = time.monotonic() + GIVE_UP
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


def hang_until_killed(started: str, raw: bytes, bad: tuple[str, ...]) -> list[Symbol]:
    Path(started).touch()
    time.sleep(GIVE_UP)
    raise AssertionError("a hung scan was never killed")


def scan_when_released(gate: str, raw: bytes, bad: tuple[str, ...]) -> list[Symbol]:
    _wait_for(gate)
    return scan_message(raw, bad)


def hang(*args: object) -> list[Symbol]:
    time.sleep(GIVE_UP)
    raise AssertionError("a hung scan was never killed")
