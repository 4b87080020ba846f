"""Temporary directories that unprivileged daemons (Postfix, Dovecot as nobody) can use.

pytest's ``tmp_path`` lives under ``/tmp/pytest-of-USER`` with mode 0700, which a daemon
running as ``postfix`` or ``nobody`` cannot traverse. ``traversable(path)`` adds the search
bit (o+x, not read) to every directory from ``path`` up to ``/tmp`` so a daemon can reach a
directory it is given by name; ``owned_dir(path, user)`` creates a directory owned by
``user``; ``poll(fn)`` waits for a condition with a deadline.

Security: only loosens traversal (x, never r or w) of the test's own temporary directories.
"""

from __future__ import annotations

import os
import pwd
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def traversable(path: Path) -> Path:
    """Give ``path`` and its parents up to (not including) ``/`` the o+x bit; return path."""
    path = Path(path).resolve()
    for p in [path, *path.parents]:
        if p == Path("/") or str(p) in ("/tmp", "/var/tmp"):
            break
        try:
            mode = p.stat().st_mode
            if not mode & stat.S_IXOTH:
                os.chmod(p, stat.S_IMODE(mode) | stat.S_IXOTH | stat.S_IXGRP)
        except PermissionError:
            pass
    return path


def owned_dir(path: Path, user: str, mode: int = 0o755) -> Path:
    """Create ``path`` (and parents), owned by ``user``, reachable by everyone."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pw = pwd.getpwnam(user)
    if os.geteuid() == 0:
        os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, mode)
    traversable(path)
    return path


def poll(fn: Callable[[], T], deadline: float = 60.0, interval: float = 0.1, what: str = "") -> T:
    """Call ``fn`` until it returns something truthy; return it. TimeoutError after deadline."""
    end = time.monotonic() + deadline
    last: T = fn()
    while not last:
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {deadline} s waiting for {what or fn}")
        time.sleep(interval)
        last = fn()
    return last
