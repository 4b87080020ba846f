"""SMTP edge benchmark: mailwarden's own asyncio protocol versus aiosmtpd, same run.

Issue 2 lets the SMTP edge be our own protocol or aiosmtpd >= 1.4.6, "whichever wins the
benchmark". This isolates the edge: each server runs alone in a child process on uvloop,
accepts mail for one domain and hands every message to a sink that keeps nothing (no
queue, no delivery, no scanning), while Postfix's ``smtp-source`` sends N messages of SIZE
bytes over S concurrent sessions (a new connection per message). Printed per edge: msg/s
and the child's CPU per message (user + system, from /proc), which is the steadier figure
on a shared box.

    .venv/bin/python bench/edge_bench.py [--messages 5000] [--sessions 50] [--runs 3]

mailwarden's edge runs with its default policy (hosted-domain check at RCPT), its event
log (to a temporary file), the Received header and the smuggling checks; aiosmtpd runs
with a handler that accepts recipients of the same domain and returns ``250`` at the end
of DATA. Needs ``aiosmtpd`` (``pip install 'aiosmtpd>=1.4.6'``; ``make bench`` does).
Security: loopback only; bounded loops; child processes run from argument lists.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import free_port, run_source, wait_port
from tests.support.procs import stop_group

DOMAIN = "example.test"
TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads, from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        stat = fh.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def serve_mailwarden(port: int, state: str) -> None:
    """Child: mailwarden's SmtpServer with a sink that keeps nothing."""
    import asyncio
    import socket

    import uvloop

    from mailwarden.config import ListenerConfig, default_config
    from mailwarden.core.events import JsonLinesSink, set_sink
    from mailwarden.core.types import EnvelopeSnapshot
    from mailwarden.policy.engine import Policy
    from mailwarden.smtp.server import SmtpServer

    class NullSink:
        async def enqueue(self, snapshot: EnvelopeSnapshot, data: bytes) -> None:
            return None

    cfg = default_config(
        gateway={"hostname": "mw.bench.test", "state_dir": state, "hosted_domains": [DOMAIN]},
        limits={"max_connections_per_client": 1000},
        delivery={"transports": {DOMAIN: "discard"}},
    )
    set_sink(JsonLinesSink(os.path.join(state, "events.jsonl")))
    listener = ListenerConfig(name="smtp", address="127.0.0.1", port=port, tls="none")

    async def main() -> None:
        server = SmtpServer(cfg, listener, ssl_context=None, sink=NullSink(), policy=Policy(cfg))
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(1024)
        sock.setblocking(False)
        await server.start(sock)
        await asyncio.Event().wait()

    uvloop.run(main())


def serve_aiosmtpd(port: int, state: str) -> None:
    """Child: aiosmtpd's SMTP protocol with a handler that keeps nothing."""
    import asyncio

    import uvloop
    from aiosmtpd.smtp import SMTP, Envelope, Session

    class Handler:
        async def handle_RCPT(
            self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
        ) -> str:
            if not address.lower().endswith("@" + DOMAIN):
                return "554 5.7.1 Relay access denied"
            envelope.rcpt_tos.append(address)
            return "250 OK"

        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            return "250 2.0.0 OK"

    handler = Handler()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(
            lambda: SMTP(handler, hostname="aio.bench.test", enable_SMTPUTF8=True),
            host="127.0.0.1",
            port=port,
            backlog=1024,
            reuse_address=True,
        )
        await asyncio.Event().wait()

    uvloop.run(main())


def measure(edge: str, n: int, sessions: int, size: int) -> tuple[float, float]:
    """(messages/second, CPU milliseconds per message) of one edge."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as state:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", edge, "--port", str(port), "--state", state],
            start_new_session=True,
        )
        try:
            wait_port(port)
            run_source(port, 200, 20, size, timeout=120)  # warm-up
            cpu0 = _cpu_seconds(proc.pid)
            took = run_source(port, n, sessions, size, timeout=600)
            cpu = _cpu_seconds(proc.pid) - cpu0
        finally:
            stop_group(proc, timeout=10)
    return n / took, cpu * 1000 / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--size", type=int, default=10_240)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--serve", choices=["mailwarden", "aiosmtpd"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        {"mailwarden": serve_mailwarden, "aiosmtpd": serve_aiosmtpd}[args.serve](
            args.port, args.state
        )
        return 0
    results: dict[str, list[tuple[float, float]]] = {"mailwarden": [], "aiosmtpd": []}
    load0 = os.getloadavg()[0]
    for i in range(args.runs):
        for edge in results:
            rate, cpu = measure(edge, args.messages, args.sessions, args.size)
            results[edge].append((rate, cpu))
            print(f"run {i + 1} {edge:<10} {rate:7.0f} msg/s  {cpu:6.3f} ms CPU/msg", flush=True)
    print(f"\nmedians ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"load {load0:.1f} -> {os.getloadavg()[0]:.1f}):")  # fmt: skip
    med = {
        e: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v))
        for e, v in results.items()
    }
    for edge, (rate, cpu) in med.items():
        print(f"  {edge:<10} {rate:7.0f} msg/s  {cpu:6.3f} ms CPU/msg")
    mw, aio = med["mailwarden"], med["aiosmtpd"]
    print(f"  ratio mailwarden/aiosmtpd: rate {mw[0] / aio[0]:.2f}x, CPU {mw[1] / aio[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
