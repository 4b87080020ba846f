"""Fault injector: a PostgreSQL server that does not answer (packets dropped on the way).

A real PostgreSQL always answers: it accepts, refuses (``ALLOW_CONNECTIONS false``, too
many clients) or is gone (connection refused). A server behind a firewall that drops
packets, or on a host that vanished, answers nothing, and a client waits for its whole
connect timeout; that fault cannot be made with the real server, so this stands in for the
network path to it. ``PgBlackhole()`` listens on 127.0.0.1 (a free port):

- in the ``hole()`` mode (the default) every connection is accepted and never answered:
  what the client sends is kept, nothing comes back, the connection stays open until the
  client gives up;
- ``pass_through()`` forwards the connections held so far (with what they sent) and every
  new one to the real test server's Unix socket (``tests.support.postgres.SOCKET_DIR``),
  byte for byte both ways: the database is reachable from now on, and a connection attempt
  that was waiting completes;
- ``held()`` how many connections are held right now (accepted, unanswered, still open);
  ``accepted`` how many were accepted in all;
- ``url(role, dbname, password)`` a TCP SQLAlchemy URL to it, ``close()`` closes
  everything.

Security: listens on 127.0.0.1 only and forwards only to the local server's Unix socket;
the bytes it carries are the clients' and the server's, never interpreted.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable

from tests.support.ports import LOOPBACK, free_port
from tests.support.postgres import SOCKET_DIR

POLL = 0.05  # seconds between checks of a held connection for the mode switch
CHUNK = 65536


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` to ``dst`` until EOF or an error, then half-close ``dst``."""
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


class PgBlackhole:
    """See the module docstring."""

    def __init__(self, socket_dir: str = SOCKET_DIR) -> None:
        self.target = os.path.join(socket_dir, ".s.PGSQL.5432")
        self.port = free_port()
        self._listener = socket.create_server((LOOPBACK, self.port), backlog=64)
        self._listener.settimeout(POLL)
        self._passing = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._held: set[socket.socket] = set()
        self._sockets: list[socket.socket] = []
        self.accepted = 0
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    # -- the test's controls --------------------------------------------------------------
    def url(self, role: str, dbname: str, password: str = "", query: str = "") -> str:
        auth = f"{role}:{password}" if password else role
        tail = f"?{query}" if query else ""
        return f"postgresql+psycopg://{auth}@{LOOPBACK}:{self.port}/{dbname}{tail}"

    def hole(self) -> None:
        """Accept and never answer (only for connections made from now on)."""
        self._passing.clear()

    def pass_through(self) -> None:
        """Forward the held connections and every new one to the real server."""
        self._passing.set()

    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def close(self) -> None:
        self._stop.set()
        self._passing.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            socks = list(self._sockets)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        for t in list(self._threads):
            t.join(timeout=5)

    def __enter__(self) -> PgBlackhole:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- inside ---------------------------------------------------------------------------
    def _start(self, target: Callable[..., object], *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._sockets.append(conn)
            self._start(self._serve, conn)

    def _hold(self, conn: socket.socket) -> bytes | None:
        """Keep what the client sends until the mode is pass-through (the bytes so far) or
        the client gives up (None)."""
        kept = bytearray()
        conn.settimeout(POLL)
        with self._lock:
            self._held.add(conn)
        try:
            while not self._passing.is_set():
                try:
                    data = conn.recv(CHUNK)
                except TimeoutError:
                    continue
                except OSError:
                    return None
                if not data:  # the client's connect timeout: it closed
                    return None
                kept += data
        finally:
            with self._lock:
                self._held.discard(conn)
        return bytes(kept)

    def _serve(self, conn: socket.socket) -> None:
        kept = self._hold(conn)
        if kept is None or self._stop.is_set():
            with contextlib.suppress(OSError):
                conn.close()
            return
        conn.settimeout(None)
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with self._lock:
            self._sockets.append(upstream)
        try:
            upstream.connect(self.target)
            upstream.sendall(kept)
        except OSError:
            with contextlib.suppress(OSError):
                conn.close()
            return
        self._start(_pump, conn, upstream)
        _pump(upstream, conn)
