"""A real ClamAV daemon for the tests, with the project's own signature database.

``build_db(dbdir, version=1, date=None)`` runs ``scripts/build-clamav-db.sh`` (``date`` is
anything ``date -d`` parses, e.g. ``"3 days ago"``). ``Clamd(workdir, dbdir, tcp=False)``
renders ``contrib/clamav/clamd.conf.in`` (Unix socket ``workdir/clamd.sock``, optionally
``TCPSocket`` on 127.0.0.1; ``stream_max`` sets ``StreamMaxLength``), ``start()`` runs
``/usr/sbin/clamd`` in the foreground and waits until it answers ``PING``; ``stop()``
terminates it and can be followed by ``start()`` again (the fail-closed tests stop clamd
mid-test). ``address`` is what the scanner connects to.

``FakeBrokenClamd`` (answers nonsense) and ``SilentListener`` (accepts, never answers) stand
in for faults the real clamd cannot be made to produce.

Security: clamd listens on a socket inside the test's directory and on 127.0.0.1 only;
teardown stops exactly the process this module started.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
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
        self, workdir: Path, dbdir: Path, *, tcp: bool = False, stream_max: str = "64M"
    ) -> None:
        self.workdir = Path(workdir)
        self.stream_max = stream_max
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
        assert "@" not in "".join(ln for ln in text.splitlines() if not ln.startswith("#")), (
            "unfilled placeholder in clamd.conf.in"
        )
        self.conf.write_text(text)

    def start(self) -> Clamd:
        self._render()
        if self.socket_path.exists():
            self.socket_path.unlink()
        self.proc = subprocess.Popen(
            [CLAMD, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "clamd.stderr", "ab"),  # noqa: SIM115
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
