"""Fault injector: a PostgreSQL server that does not answer (packets dropped on the way),
or a connected one that stops answering (the path stalls).

A real PostgreSQL always answers: it accepts, refuses (``ALLOW_CONNECTIONS false``, too
many clients) or is gone (connection refused), and a statement it runs ends or is
cancelled. A server behind a firewall that drops packets, or on a host that vanished,
answers nothing, and a client waits for its whole connect timeout; a proxy (or a network
path) that stops forwarding in the middle of a session leaves the client's bytes
acknowledged by the kernel and its query unanswered, with no timeout of the server's or of
TCP's ever firing. Those faults cannot be made with the real server, so this stands in for
the network path to it. ``PgBlackhole()`` listens on 127.0.0.1 (a free port):

- in the ``hole()`` mode (the default) every connection is accepted and never answered:
  what the client sends is kept, nothing comes back, the connection stays open until the
  client gives up;
- ``pass_through()`` forwards the connections held so far (with what they sent) and every
  new one to the real test server's Unix socket (``tests.support.postgres.SOCKET_DIR``),
  byte for byte both ways: the database is reachable from now on, a connection attempt
  that was waiting completes, and a stalled path (below) flows again;
- ``stall()`` the path stops: the forwarded connections stay open, but no byte is
  forwarded in either direction. What a side sends is acknowledged by the kernel (it waits
  in the injector's socket buffers) and kept, in order, until ``pass_through()`` forwards
  it: a query made meanwhile is answered only then, the client waits for that answer. A
  connection made during the stall is held as in ``hole()`` mode;
  ``stall(existing_only=True)`` stalls only the connections forwarded so far and forwards
  new ones (a path whose old flows are black-holed while new ones get through: a lost NAT
  or conntrack entry, a failover; after a ``stall()`` of either kind, the stalled flows
  stay dead and new connections get through again);
  ``stall(after_login=True)`` stalls the connections forwarded so far and lets every new
  one log in, then stalls it as soon as the server has said it is ready for queries (the
  first ``ReadyForQuery`` message): a client gets connected, and its first statement is
  never answered (a proxy or a server that stops answering just after the handshake);
- ``held()`` how many connections are held right now (accepted, unanswered, still open);
  ``stalled()`` how many directions of forwarded connections hold bytes right now because
  of a stall (a client's query waiting to reach the server counts one); ``accepted`` how
  many connections were accepted in all;
- ``url(role, dbname, password)`` a TCP SQLAlchemy URL to it, ``close()`` closes
  everything.

Security: listens on 127.0.0.1 only and forwards only to the local server's Unix socket;
the bytes it carries are the clients' and the server's, never interpreted (the
``after_login`` mode only looks for the five fixed bytes that start a ``ReadyForQuery``
message in what the server sends).
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
# The server's ReadyForQuery message: type "Z", length 5 (then the transaction status): the
# end of a login, and of every statement after it.
READY = b"Z\x00\x00\x00\x05"


class PgBlackhole:
    """See the module docstring."""

    def __init__(self, socket_dir: str = SOCKET_DIR) -> None:
        self.target = os.path.join(socket_dir, ".s.PGSQL.5432")
        self.port = free_port()
        self._listener = socket.create_server((LOOPBACK, self.port), backlog=64)
        self._listener.settimeout(POLL)
        self._passing = threading.Event()
        self._flowing = threading.Event()  # cleared by stall(): new connections are held
        self._flowing.set()
        self._after_login = False  # stall(after_login=True): new connections stall once ready
        self._paths: list[threading.Event] = []  # per forwarded connection, cleared by stall()
        self._waiting = 0  # pumps holding a chunk because of a stall
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
        """Forward the held connections and every new one to the real server; a stalled
        path flows again (what it kept first)."""
        self._passing.set()
        with self._lock:
            self._after_login = False
            self._flowing.set()
            for path in self._paths:
                path.set()

    def stall(self, *, existing_only: bool = False, after_login: bool = False) -> None:
        """No byte is forwarded either way on the connections forwarded so far until
        ``pass_through()``: a query sent now is acknowledged and not answered. New
        connections are held (the default), forwarded (``existing_only``: the old flows
        stay stalled for good) or forwarded through their login and stalled then
        (``after_login``)."""
        self._passing.set()
        with self._lock:
            self._after_login = after_login
            if existing_only or after_login:
                self._flowing.set()
            else:
                self._flowing.clear()
            for path in self._paths:
                path.clear()

    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def stalled(self) -> int:
        with self._lock:
            return self._waiting

    def close(self) -> None:
        self._stop.set()
        self.pass_through()  # release every held or stalled connection before closing
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
        """Keep what the client sends until the mode is pass-through, not stalled (the bytes
        so far) or the client gives up (None)."""
        kept = bytearray()
        conn.settimeout(POLL)
        with self._lock:
            self._held.add(conn)
        try:
            while not (self._passing.is_set() and self._flowing.is_set()):
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
        flowing = threading.Event()  # this connection's path (stall() clears it)
        with self._lock:
            self._sockets.append(upstream)
            if self._flowing.is_set():  # (a full stall() since _hold: held as it says)
                flowing.set()
            self._paths.append(flowing)
        try:
            upstream.connect(self.target)
            upstream.sendall(kept)
        except OSError:
            with contextlib.suppress(OSError):
                conn.close()
            return
        self._start(self._pump, conn, upstream, flowing)
        self._pump(upstream, conn, flowing, login=True)

    def _logged_in(self, flowing: threading.Event) -> None:
        """The server said it is ready for queries: in the ``after_login`` mode the path
        stalls now, before the client can send its first statement."""
        with self._lock:
            if self._after_login:
                flowing.clear()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        flowing: threading.Event,
        *,
        login: bool = False,
    ) -> None:
        """Copy ``src`` to ``dst`` until EOF or an error, then half-close ``dst``; while the
        path is stalled, a chunk read waits here (and what follows in the kernel's buffer).
        ``login``: the server's side, watched for the end of the login until it is seen."""
        tail = b""  # the end of the previous chunk (READY may straddle two)
        try:
            while data := src.recv(CHUNK):
                if not flowing.is_set():
                    with self._lock:
                        self._waiting += 1
                    try:
                        flowing.wait()
                    finally:
                        with self._lock:
                            self._waiting -= 1
                if login:
                    if READY in tail + data:
                        login = False
                        self._logged_in(flowing)  # before the client has the message
                    tail = data[-(len(READY) - 1) :]
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
