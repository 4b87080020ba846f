"""A real rspamd for the tests, on loopback, resolving only through a loopback DNS server.

``Rspamd(workdir, dns_address)`` runs ``/usr/bin/rspamd -f`` with ``contrib/rspamd/rspamd.conf``
and ``--var`` settings (``LOCAL_CONFDIR`` = ``contrib/rspamd``, ``RUNDIR``/``LOGDIR`` in
``workdir``, ``DBDIR`` kept in ``CACHE_DIR`` between runs so the Hyperscan cache survives:
cold start ~11 s, warm < 1 s), ``MW_BIND`` = 127.0.0.1:free port, ``MW_DNS`` = the DNS server;
``start()`` waits until ``/ping`` answers ``pong``; ``stop()`` terminates it; ``url`` is what
the scanner posts to.

``LoopbackDNS`` is a minimal authoritative DNS server (dnspython, UDP and TCP, one thread
each) used when the delivery tests' ``tests/support/dnsserver.py`` is not available: it
answers from a dict of records and NXDOMAIN for everything else, so rspamd's DNSBL, SPF and
DKIM lookups finish at once instead of timing out.

Security: rspamd binds 127.0.0.1 only and has no resolver but ``LoopbackDNS``; as root it
runs as ``_rspamd``. Teardown stops exactly the processes this module started.
"""

from __future__ import annotations

import os
import socketserver
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from tests.support.ports import LOOPBACK, free_port
from tests.support.procs import stop_group
from tests.support.tmpdirs import owned_dir, traversable

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "contrib" / "rspamd" / "rspamd.conf"
LOCAL_CONFDIR = REPO / "contrib" / "rspamd"
RSPAMD = "/usr/bin/rspamd"
RUN_USER = "_rspamd"
CACHE_DIR = Path(os.environ.get("MAILWARDEN_RSPAMD_CACHE", "/var/tmp/mailwarden-test-rspamd"))
START_DEADLINE = 120.0  # a cold start compiles the Hyperscan cache (~11 s on 2 cores)


def rspamd_available() -> bool:
    return Path(RSPAMD).exists() and Path("/etc/rspamd/common.conf").exists()


# --- loopback DNS ------------------------------------------------------------------------

Records = dict[tuple[str, str], list[str]]  # (name., TYPE) -> ["rdata", ...]


def _answer(records: Records, wire: bytes) -> bytes | None:
    try:
        query = dns.message.from_wire(wire)
    except Exception:
        return None
    resp = dns.message.make_response(query)
    resp.flags |= dns.flags.AA
    if not query.question:
        resp.set_rcode(dns.rcode.FORMERR)
        return resp.to_wire()
    q = query.question[0]
    name = q.name.to_text().lower()
    rtype = dns.rdatatype.to_text(q.rdtype)
    found = records.get((name, rtype))
    if found:
        resp.answer.append(dns.rrset.from_text(name, 60, "IN", rtype, *found))
    elif not any(k[0] == name for k in records):
        resp.set_rcode(dns.rcode.NXDOMAIN)
    return resp.to_wire()


class LoopbackDNS:
    """Authoritative-for-everything DNS on 127.0.0.1 (UDP + TCP on the same port)."""

    def __init__(self, records: Records | None = None) -> None:
        self.records: Records = {
            (k[0].lower().rstrip(".") + ".", k[1].upper()): v for k, v in (records or {}).items()
        }
        self.queries = 0
        records_ref = self.records
        outer = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                outer.queries += 1
                reply = _answer(records_ref, data)
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        class Tcp(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                head = self.rfile.read(2)
                if len(head) < 2:
                    return
                data = self.rfile.read(int.from_bytes(head, "big"))
                outer.queries += 1
                reply = _answer(records_ref, data)
                if reply is not None:
                    self.wfile.write(len(reply).to_bytes(2, "big") + reply)

        for _ in range(20):
            port = free_port()
            try:
                self.udp = socketserver.ThreadingUDPServer((LOOPBACK, port), Udp)
            except OSError:
                continue
            try:
                self.tcp = socketserver.ThreadingTCPServer((LOOPBACK, port), Tcp)
            except OSError:
                self.udp.server_close()
                continue
            break
        else:
            raise RuntimeError("no free port for the loopback DNS server")
        self.udp.daemon_threads = self.tcp.daemon_threads = True
        self.port = port
        self._threads = [
            threading.Thread(target=s.serve_forever, daemon=True) for s in (self.udp, self.tcp)
        ]

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> LoopbackDNS:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        for s in (self.udp, self.tcp):
            s.shutdown()
            s.server_close()


# --- rspamd ------------------------------------------------------------------------------


class Rspamd:
    """A private rspamd normal worker on ``127.0.0.1:port``."""

    def __init__(self, workdir: Path, dns_address: str, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.dns_address = dns_address
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _dirs(self) -> tuple[Path, Path, Path]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        traversable(self.workdir)
        os.chmod(self.workdir, 0o755)
        run, log = self.workdir / "run", self.workdir / "log"
        if os.geteuid() == 0:
            for d in (run, log, CACHE_DIR):
                owned_dir(d, RUN_USER, 0o755)
        else:
            for d in (run, log, CACHE_DIR):
                d.mkdir(parents=True, exist_ok=True)
        return run, log, CACHE_DIR

    def command(self) -> list[str]:
        run, log, db = self._dirs()
        cmd = [RSPAMD, "-f", "-c", str(CONF)]
        if os.geteuid() == 0:
            cmd += ["-u", RUN_USER, "-g", RUN_USER]
        for key, value in {
            "LOCAL_CONFDIR": str(LOCAL_CONFDIR),
            "RUNDIR": str(run),
            "LOGDIR": str(log),
            "DBDIR": str(db),
            "MW_BIND": f"{LOOPBACK}:{self.port}",
            "MW_DNS": self.dns_address,
        }.items():
            cmd.append(f"--var={key}={value}")
        return cmd

    def start(self) -> Rspamd:
        cmd = self.command()
        self.proc = subprocess.Popen(
            cmd,
            stdout=open(self.workdir / "rspamd.stdout", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        end = time.monotonic() + START_DEADLINE
        while not self.ping():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"rspamd exited with {self.proc.returncode}\n{self.diagnostics()}"
                )
            if time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"rspamd did not answer /ping\n{self.diagnostics()}")
            time.sleep(0.1)
        return self

    def ping(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/ping", timeout=1) as resp:
                return bool(resp.read().strip() == b"pong")
        except (OSError, ValueError):
            return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None

    def diagnostics(self) -> str:
        out = []
        for f in (self.workdir / "rspamd.stdout", self.workdir / "log" / "rspamd.log"):
            if f.exists():
                out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)
