"""A real ClamAV daemon for the tests, with the project's own signature database.

``build_db(dbdir, version=1, date=None)`` runs ``scripts/build-clamav-db.sh`` (``date`` is
anything ``date -d`` parses, e.g. ``"3 days ago"``). ``Clamd(workdir, dbdir, tcp=False)``
renders ``contrib/clamav/clamd.conf.in`` (Unix socket ``workdir/clamd.sock``, optionally
``TCPSocket`` on 127.0.0.1; ``stream_max`` sets ``StreamMaxLength``, ``read_timeout``
``ReadTimeout``, after which clamd ends an idle IDSESSION), ``start()`` runs
``/usr/sbin/clamd`` in the foreground and waits until it answers ``PING``; ``stop()``
terminates it and can be followed by ``start()`` again (the fail-closed tests stop clamd
mid-test). ``address`` is what the scanner connects to.

``FakeBrokenClamd`` (answers nonsense), ``SilentListener`` (accepts, never answers),
``StallingListener`` (accepts, reads nothing until released) and ``FakeSessionClamd`` (speaks
IDSESSION, answers what a test tells it to, e.g. a wrong request number) stand in for faults
the real clamd cannot be made to produce. ``Relay`` forwards 127.0.0.1 connections to a
clamd and counts them, and can cut them (clamd or the network closing a session).

Security: clamd listens on a socket inside the test's directory and on 127.0.0.1 only;
teardown stops exactly the process this module started.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.ports import LOOPBACK, free_port
from tests.support.procs import stop_group

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "contrib" / "clamav" / "clamd.conf.in"
BUILD_SCRIPT = REPO / "scripts" / "build-clamav-db.sh"
CLAMD = "/usr/sbin/clamd"
START_DEADLINE = 60.0  # seconds for clamd to load the database and answer PING


def clamd_available() -> bool:
    return Path(CLAMD).exists() and shutil.which("sigtool") is not None


def build_db(dbdir: Path, version: int = 1, date: str | None = None) -> Path:
    """Build ``dbdir/daily.cud`` from ``contrib/clamav/sigs``; return ``dbdir``."""
    args = [str(BUILD_SCRIPT), str(dbdir), str(version)]
    if date:
        args.append(date)
    subprocess.run(args, check=True, capture_output=True)
    return dbdir


def _ask(address: str, command: bytes, timeout: float = 5.0) -> bytes:
    if address.startswith("/"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: str | tuple[str, int] = address
    else:
        host, _, port = address.rpartition(":")
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (host, int(port))
    with s:
        s.settimeout(timeout)
        s.connect(target)
        s.sendall(b"z" + command + b"\0")
        buf = b""
        while b"\0" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    return buf.rstrip(b"\0")


class Clamd:
    """A private clamd on a Unix socket (and optionally 127.0.0.1:port)."""

    def __init__(
        self,
        workdir: Path,
        dbdir: Path,
        *,
        tcp: bool = False,
        stream_max: str = "64M",
        read_timeout: int | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.stream_max = stream_max
        self.read_timeout = read_timeout
        self.dbdir = Path(dbdir)
        self.socket_path = self.workdir / "clamd.sock"
        self.port = free_port() if tcp else None
        self.conf = self.workdir / "clamd.conf"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """Unix socket path (the scanner's default way in)."""
        return str(self.socket_path)

    @property
    def tcp_address(self) -> str:
        assert self.port is not None, "started without tcp=True"
        return f"{LOOPBACK}:{self.port}"

    def _render(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        tcp = f"TCPSocket {self.port}\nTCPAddr {LOOPBACK}" if self.port else ""
        text = TEMPLATE.read_text()
        for key, value in {
            "DBDIR": str(self.dbdir),
            "SOCKET": str(self.socket_path),
            "RUNDIR": str(self.workdir),
            "TCP": tcp,
            "STREAM_MAX": self.stream_max,
        }.items():
            text = text.replace(f"@{key}@", value)
        if self.read_timeout is not None:
            text, n = re.subn(
                r"^ReadTimeout \d+$", f"ReadTimeout {self.read_timeout}", text, flags=re.M
            )
            assert n == 1, "no ReadTimeout line in clamd.conf.in"
        assert "@" not in "".join(ln for ln in text.splitlines() if not ln.startswith("#")), (
            "unfilled placeholder in clamd.conf.in"
        )
        self.conf.write_text(text)

    def start(self) -> Clamd:
        self._render()
        if self.socket_path.exists():
            self.socket_path.unlink()
        with open(self.workdir / "clamd.stderr", "ab") as stderr:  # clamd keeps its own copy
            self.proc = subprocess.Popen(
                [CLAMD, "-c", str(self.conf)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        end = time.monotonic() + START_DEADLINE
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"clamd exited with {self.proc.returncode}\n{self.diagnostics()}"
                )
            try:
                if _ask(self.address, b"PING", 1.0) == b"PONG":
                    break
            except OSError:
                pass
            if time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"clamd did not answer PING\n{self.diagnostics()}")
            time.sleep(0.05)
        return self

    def version(self) -> str:
        return _ask(self.address, b"VERSION").decode()

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def diagnostics(self) -> str:
        out = []
        for f in (self.workdir / "clamd.stderr", self.workdir / "clamd.log"):
            if f.exists():
                out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)


class _ThreadServer:
    """A tiny threaded TCP server on 127.0.0.1 for fault injection."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> _ThreadServer:
        self._thread.start()
        return self

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        for c in self._held:
            c.close()


class FakeBrokenClamd(_ThreadServer):
    """Reads a command and answers ``reply`` (nonsense by default), then closes.

    With ``good_version=True`` a ``VERSION`` command gets a well-formed, fresh answer, so
    the nonsense reaches the INSTREAM reply parser rather than the VERSION parser.
    """

    def __init__(
        self, reply: bytes = b"\x01\xffGARBAGE 42 ?? \x00", *, good_version: bool = True
    ) -> None:
        super().__init__()
        self.reply = reply
        self.good_version = good_version

    def handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                first = conn.recv(65536)
                if self.good_version and first.startswith(b"zVERSION"):
                    now = time.strftime("%a %b %d %H:%M:%S %Y", time.localtime())
                    conn.sendall(f"ClamAV 1.4.6/99/{now}".encode() + b"\0")
                else:
                    conn.sendall(self.reply)
            except OSError:
                pass


class SilentListener(_ThreadServer):
    """Accepts connections and reads, but never answers (a hung daemon)."""

    def handle(self, conn: socket.socket) -> None:
        self._held.append(conn)
        conn.settimeout(0.2)
        while not self._stop.is_set():
            try:
                if not conn.recv(65536):
                    return
            except TimeoutError:
                continue
            except OSError:
                return


class StallingListener(_ThreadServer):
    """Accepts connections and reads nothing until ``release()``; then reads to the end.

    ``endings`` gets one entry per connection once released: ``"eof"`` (the client closed
    it) or ``"reset"`` (the client aborted it); ``received`` the bytes read from each.
    """

    def __init__(self) -> None:
        super().__init__()
        self.released = threading.Event()
        self.endings: list[str] = []
        self.received: list[int] = []

    def release(self) -> None:
        self.released.set()

    def handle(self, conn: socket.socket) -> None:
        self._held.append(conn)
        self.released.wait(30)
        conn.settimeout(5)
        total = 0
        try:
            while data := conn.recv(65536):
                total += len(data)
            self.endings.append("eof")
        except ConnectionResetError:
            self.endings.append("reset")
        except OSError as exc:
            self.endings.append(f"error {exc}")
        self.received.append(total)


Answer = Callable[[int, int, bytes], bytes | None]


def numbered_ok(conn: int, request: int, data: bytes) -> bytes | None:
    """What clamd answers a clean INSTREAM inside a session."""
    return b"%d: stream: OK\0" % request


class FakeSessionClamd(_ThreadServer):
    """A fake clamd that speaks IDSESSION and answers each INSTREAM with ``answer``.

    ``answer(connection, request, data)`` (both numbered from 1, connections counted with
    the ``VERSION`` ones) returns the bytes to send: closed after them unless they end with
    NUL, closed without a word for ``None``. ``requests`` records every
    ``(connection, request, data)`` received. ``VERSION`` gets a fresh, well-formed answer.
    """

    def __init__(self, answer: Answer = numbered_ok) -> None:
        super().__init__()
        self.answer = answer
        self.requests: list[tuple[int, int, bytes]] = []
        self._lock = threading.Lock()
        self._accepted = 0

    def handle(self, conn: socket.socket) -> None:
        with self._lock:
            self._accepted += 1
            number = self._accepted
        buf = bytearray()

        def need(n: int) -> bytes:
            while len(buf) < n:
                chunk = conn.recv(65536)
                if not chunk:
                    raise EOFError
                buf.extend(chunk)
            out = bytes(buf[:n])
            del buf[:n]
            return out

        def command() -> bytes:
            while b"\0" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    raise EOFError
                buf.extend(chunk)
            end = buf.index(b"\0")
            out = bytes(buf[:end])
            del buf[: end + 1]
            return out

        with conn:
            conn.settimeout(10)
            session, request = False, 0
            try:
                while True:
                    cmd = command()
                    if cmd == b"zIDSESSION":
                        session = True
                        continue
                    if cmd == b"zEND":
                        return
                    request += 1
                    prefix = b"%d: " % request if session else b""
                    if cmd == b"zVERSION":
                        now = time.strftime("%a %b %d %H:%M:%S %Y", time.localtime())
                        conn.sendall(prefix + f"ClamAV 1.4.6/99/{now}".encode() + b"\0")
                    elif cmd == b"zINSTREAM":
                        data = bytearray()
                        while size := struct.unpack(">I", need(4))[0]:
                            data += need(size)
                        with self._lock:
                            self.requests.append((number, request, bytes(data)))
                        out = self.answer(number, request, bytes(data))
                        if out is None:
                            return
                        conn.sendall(out)
                        if not out.endswith(b"\0"):
                            return
                    else:
                        conn.sendall(prefix + b"UNKNOWN COMMAND\0")
                        return
                    if not session:
                        return
            except (EOFError, OSError):
                return


class Relay:
    """Forwards connections from 127.0.0.1:port to ``target`` (a clamd), counting them.

    ``first_bytes`` holds the start of what each client sent first (so a test can tell
    IDSESSION connections from VERSION ones); ``cut()`` closes every connection now (an
    idle session clamd or the network ended); with ``drop_requests`` set, a connection that
    already carried a reply is closed without a word as soon as the client sends anything
    more (a session that died while idle, found out only when used); with ``refuse`` set,
    new connections are closed at once. ``accepted`` counts every connection accepted.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        self.first_bytes: list[bytes] = []
        self._replied: list[bool] = []
        self.drop_requests = False
        self.refuse = False
        self.accepted = 0
        self._live: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def sessions(self) -> int:
        """Connections that started with ``zIDSESSION``."""
        return sum(1 for b in self.first_bytes if b.startswith(b"zIDSESSION"))

    def instreams(self) -> int:
        """Connections that started with an INSTREAM outside a session."""
        return sum(1 for b in self.first_bytes if b.startswith(b"zINSTREAM"))

    def live(self) -> int:
        with self._lock:
            return len(self._live)

    def start(self) -> Relay:
        self._thread.start()
        return self

    def _upstream(self) -> socket.socket:
        if self.target.startswith("/"):
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            up.connect(self.target)
        else:
            host, _, port = self.target.rpartition(":")
            up = socket.create_connection((host, int(port)))
        return up

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self.refuse:
                client.close()
                continue
            try:
                up = self._upstream()
            except OSError:
                client.close()
                continue
            pair = (client, up)
            with self._lock:
                self._live.append(pair)
            index = len(self.first_bytes)
            self.first_bytes.append(b"")
            self._replied.append(False)
            threading.Thread(target=self._pump, args=(pair, True, index), daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, False, index), daemon=True).start()

    def _pump(self, pair: tuple[socket.socket, socket.socket], outbound: bool, index: int) -> None:
        src, dst = pair if outbound else pair[::-1]
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not outbound:
                    self._replied[index] = True
                elif not self.first_bytes[index]:
                    self.first_bytes[index] = data[:16]
                elif self.drop_requests and self._replied[index]:
                    break  # close without forwarding: the request is lost
                dst.sendall(data)
        except OSError:
            pass
        self._close(pair)

    def _close(self, pair: tuple[socket.socket, socket.socket]) -> None:
        with self._lock:
            if pair not in self._live:
                return
            self._live.remove(pair)
        for s in pair:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def cut(self) -> None:
        with self._lock:
            pairs = list(self._live)
        for pair in pairs:
            self._close(pair)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        self.cut()
