"""Temporary directories that unprivileged daemons (Postfix, Dovecot as nobody) can use.

pytest's ``tmp_path`` lives under ``/tmp/pytest-of-USER`` with mode 0700, which a daemon
running as ``postfix`` or ``nobody`` cannot traverse; and every pytest session (another
developer's, an xdist worker) resets that directory to 0700 when it starts, so loosening it
is a race. ``daemon_workdir(link)`` therefore makes a fresh ``/tmp/mw-*`` directory (0755,
short paths for Unix sockets) and leaves a symlink to it at ``link`` inside ``tmp_path``;
``remove_workdir(link)`` deletes both. ``traversable(path)`` adds the search bit (o+x, not
read) to ``path`` and its parents up to ``/tmp``; ``owned_dir(path, user)`` creates a
directory owned by ``user``; ``poll(fn)`` waits for a condition with a deadline.

Security: only loosens traversal (x, never r or w) of the test's own temporary directories.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
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


def daemon_workdir(link: Path, prefix: str = "mw-") -> Path:
    """A new 0755 directory under /tmp for a daemon's files, linked from ``link``."""
    real = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(real, 0o755)
    link = Path(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(real)
    return real


def remove_workdir(link: Path) -> None:
    """Delete the directory ``link`` points to (made by ``daemon_workdir``) and the link."""
    link = Path(link)
    if link.is_symlink():
        real = link.resolve()
        if str(real).startswith("/tmp/mw-"):
            shutil.rmtree(real, ignore_errors=True)
        link.unlink()


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
