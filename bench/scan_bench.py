"""Scan-stage benchmark: our own CPU per message for ClamAV, rspamd and the built-in scanners.

Starts a private clamd (the project's signature database) and a private rspamd (resolving
only through a loopback DNS server) exactly as the tests do (``tests/support/clamd.py``,
``tests/support/rspamd.py``), then sends N messages through the content hook the SMTP edge
uses (``ContentFilter.judge``: the ``VerdictEngine`` with its timeouts) with C concurrent
tasks, once per scanner alone and once with all three together, as the gateway runs them.

Printed per phase (median of ``--runs``): OUR process CPU per message (user + system of
this process, all threads, plus any scan pool worker processes it started -- never the
clamd/rspamd daemons, nor the loopback DNS server, which runs in a child process of its
own), split into user and system, and wall-clock messages per second.
Most messages are 10 KB ham; every ``--attach-every``-th carries an attachment (a PDF or a
zip). ``--big MB`` adds phases that scan one message of that size alone, also reporting the
longest event-loop stall meanwhile (how late a 2 ms timer fired: what other sessions wait).

    .venv/bin/python bench/scan_bench.py [--messages 2000] [--concurrency 16] [--runs 3]

Not a test: numbers are printed (and written to ``bench/results/scan-*.json``), never
asserted. Runs as root or as a user that may start clamd/rspamd (see tests/support).
Security: message content is generated here; the daemons listen on 127.0.0.1 and a socket in
a temporary directory only; loops are bounded by ``--messages``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import multiprocessing
import os
import random
import resource
import statistics
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from email import policy
from email.message import EmailMessage
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests.scan.messages import CLIENT_IP, HELO, RCPT, SENDER  # noqa: E402
from tests.support.clamd import Clamd, build_db  # noqa: E402
from tests.support.rspamd import LoopbackDNS, Rspamd  # noqa: E402

from mailwarden.core import events  # noqa: E402
from mailwarden.core.types import Direction, EnvelopeSnapshot  # noqa: E402
from mailwarden.scan import (  # noqa: E402
    BuiltinScanner,
    ClamdScanner,
    RspamdScanner,
    ScanSettings,
    VerdictEngine,
)
from mailwarden.scan.base import Scanner  # noqa: E402
from mailwarden.smtp.content import ContentFilter  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
TICK = 0.002  # seconds: the loop-stall probe's timer
ZONE = {  # the scan tests' zone: the sending host has PTR, A, MX and SPF
    ("10.2.0.192.in-addr.arpa", "PTR"): [f"{HELO}."],
    (HELO, "A"): [CLIENT_IP],
    ("example.org", "MX"): [f"10 {HELO}."],
    ("example.org", "A"): [CLIENT_IP],
    ("example.org", "TXT"): [f'"v=spf1 ip4:{CLIENT_IP} -all"'],
    ("example.edu", "MX"): ["10 mx.example.edu."],
    ("mx.example.edu", "A"): ["192.0.2.25"],
}
_VOCABULARY = """the of and to in is that for it as was with be by on not he this are or his
from at which but have an they you were her all she there would their we him been has when
who will more no if out so said what up its about into than them can only other new some
could time these two may then do first any my now such like our over seminar faculty
schedule laboratory student review committee budget meeting research"""
WORDS = _VOCABULARY.split()  # ham text is drawn from these


def _serve_dns(conn: Connection) -> None:
    """Child process: the loopback DNS server (its threads would otherwise bill us)."""
    server = LoopbackDNS(ZONE).start()
    conn.send(server.address)
    conn.recv()  # until the parent says stop (or dies)
    server.stop()


def start_dns() -> tuple[multiprocessing.Process, Connection, str]:
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("fork").Process(target=_serve_dns, args=(child,))
    proc.daemon = True
    proc.start()
    return proc, parent, str(parent.recv())


class NullSink:
    """Events are not part of the scan stage: dropped."""

    def write(self, event: events.Event) -> None:
        pass


def _text(rng: random.Random, size: int) -> str:
    out: list[str] = []
    length = 0
    line: list[str] = []
    while length < size:
        w = rng.choice(WORDS)
        line.append(w)
        length += len(w) + 1
        if len(line) >= 12:
            out.append(" ".join(line).capitalize() + ".")
            line = []
    out.append(" ".join(line))
    return "\n".join(out) + "\n"


def _base(i: int, subject: str) -> EmailMessage:
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = f"Alice Example <{SENDER}>"
    msg["To"] = f"Bob Example <{RCPT}>"
    msg["Subject"] = subject
    msg["Date"] = "Mon, 23 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = f"<{i}.bench@{HELO}>"
    return msg


def make_messages(n: int, attach_every: int, size: int, seed: int = 4) -> list[bytes]:
    """``n`` messages: ham of ``size`` bytes; every ``attach_every``-th with an attachment."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if attach_every and i % attach_every == attach_every - 1:
            msg = _base(i, f"Report {i}")
            msg.set_content(_text(rng, 2000))
            if (i // attach_every) % 2:
                pdf = b"%PDF-1.7\n" + rng.randbytes(20_000)
                msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="r.pdf")
            else:
                buf = io.BytesIO()
                with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                    zf.writestr("notes.txt", _text(rng, 8000))
                    zf.writestr("data.csv", _text(rng, 8000))
                msg.add_attachment(
                    buf.getvalue(), maintype="application", subtype="zip", filename="data.zip"
                )
        else:
            msg = _base(i, f"Minutes {i}")
            msg.set_content(_text(rng, size))
        out.append(msg.as_bytes(policy=policy.SMTP))
    return out


def big_message(megabytes: int) -> bytes:
    """One multipart message of about ``megabytes`` MB (a base64 attachment of random bytes)."""
    payload = os.urandom(megabytes * 1024 * 1024 * 3 // 4)
    enc = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return (
        b"From: a@example.org\r\nTo: b@example.edu\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n--B\r\n'
        b"Content-Type: text/plain\r\n\r\nSee attached.\r\n--B\r\n"
        b'Content-Type: application/octet-stream; name="d.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + enc + b"--B--\r\n"
    )


def _children_cpu(exclude: set[int]) -> float:
    """CPU seconds of our descendant processes (scan pool workers), daemons excluded."""
    me = os.getpid()
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        pid = int(entry)
        parents[pid] = int(fields[1])
        times[pid] = (int(fields[11]) + int(fields[12])) / TICKS
    total = 0.0
    for pid, cpu in times.items():
        p, ours = pid, False
        while p in parents and p not in exclude and p > 1:
            p = parents[p]
            if p == me:
                ours = True
                break
        if ours and pid not in exclude:
            total += cpu
    return total


@dataclass
class Phase:
    name: str
    messages: int
    cpu_ms: float  # our CPU per message (this process + pool workers)
    user_ms: float
    sys_ms: float
    workers_ms: float  # of cpu_ms, spent in scan pool worker processes
    per_s: float
    actions: dict[str, int]
    max_stall_ms: float = 0.0  # longest event-loop stall seen (big-message phases only)


async def run_phase(
    name: str,
    scanners: list[Scanner],
    settings: ScanSettings,
    messages: list[bytes],
    concurrency: int,
    exclude: set[int],
    watch_loop: bool = False,
) -> Phase:
    flt = ContentFilter(VerdictEngine(scanners, settings), None, "mailwarden.bench")
    snap = EnvelopeSnapshot(
        queue_id="BENCH",
        mail_from=SENDER,
        recipients=(RCPT,),
        received_at=time.time(),
        client_ip=CLIENT_IP,
        client_helo=HELO,
        direction=Direction.INBOUND,
        message_id="<bench@x>",
        size=0,
    )
    actions: Counter[str] = Counter()
    for raw in messages[: min(len(messages), 2 * concurrency)]:  # warm-up: connections, caches
        await flt.judge(snap, raw)
    queue = list(reversed(messages))

    async def worker() -> None:
        while queue:
            raw = queue.pop()
            verdict = await flt.judge(snap, raw)
            actions[verdict.action.value] += 1
            for s in verdict.symbols:
                if s.name.endswith("_FAIL"):
                    actions[s.name] += 1

    stall = 0.0

    async def ticker() -> None:
        """How late a 2 ms timer fires: what another session would wait for the loop."""
        nonlocal stall
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(TICK)
            stall = max(stall, loop.time() - t - TICK)

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    k0 = _children_cpu(exclude)  # reads /proc: outside the loop-stall window
    watcher = asyncio.ensure_future(ticker()) if watch_loop else None
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    if watcher is not None:
        watcher.cancel()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    k1 = _children_cpu(exclude)
    await flt.close()
    n = len(messages)
    user = (r1.ru_utime - r0.ru_utime) * 1000 / n
    system = (r1.ru_stime - r0.ru_stime) * 1000 / n
    workers = (k1 - k0) * 1000 / n
    return Phase(
        name,
        n,
        user + system + workers,
        user,
        system,
        workers,
        n / wall,
        dict(actions),
        stall * 1000,
    )


def _median(phases: list[Phase]) -> Phase:
    def med(attr: str) -> float:
        return statistics.median(getattr(p, attr) for p in phases)

    first = phases[0]
    return Phase(
        first.name,
        first.messages,
        med("cpu_ms"),
        med("user_ms"),
        med("sys_ms"),
        med("workers_ms"),
        med("per_s"),
        first.actions,
        med("max_stall_ms"),
    )


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, Any]], Any]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run  # type: ignore[no-any-return]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=int, default=10_000, help="bytes of a ham message")
    ap.add_argument("--attach-every", type=int, default=10)
    ap.add_argument("--big", type=int, default=0, help="MB of one extra large message phase")
    ap.add_argument(
        "--phases", default="clamav,rspamd,builtin,all", help="comma list of phases to run"
    )
    args = ap.parse_args()

    events.set_sink(NullSink())
    messages = make_messages(args.messages, args.attach_every, args.size)
    wanted = [k for k in args.phases.split(",") if k]
    run = _event_loop_runner()
    with tempfile.TemporaryDirectory(prefix="mw-scanbench-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        dns, dns_conn, dns_address = start_dns()
        clamd = Clamd(work / "clamd", build_db(work / "db", version=1))
        spamd = Rspamd(work / "rspamd", dns_address)
        try:
            clamd.start()
            spamd.start()
            daemons = (clamd.proc, spamd.proc, dns)
            exclude = {p.pid for p in daemons if p is not None and p.pid is not None}
            settings = ScanSettings.model_validate(
                {
                    "clamav": {"socket": clamd.address},
                    "rspamd": {"url": spamd.url, "max_connections": args.concurrency},
                }
            )

            def build(kind: str) -> list[Scanner]:
                out: list[Scanner] = []
                if kind in ("clamav", "all"):
                    out.append(ClamdScanner(settings.clamav))
                if kind in ("rspamd", "all"):
                    out.append(RspamdScanner(settings.rspamd))
                if kind in ("builtin", "all"):
                    out.append(BuiltinScanner(settings.builtin))
                return out

            results: list[Phase] = []
            for kind in wanted:
                runs = [
                    run(run_phase(kind, build(kind), settings, messages, args.concurrency, exclude))
                    for _ in range(args.runs)
                ]
                results.append(_median(runs))
                _print(results[-1])
            if args.big:
                raw = big_message(args.big)
                kinds = ("builtin", "all")
                for kind in kinds:
                    phases = [
                        run(
                            run_phase(
                                f"{kind} {args.big} MB",
                                build(kind),
                                settings,
                                [raw],
                                1,
                                exclude,
                                watch_loop=True,
                            )
                        )
                        for _ in range(args.runs)
                    ]
                    results.append(_median(phases))
                    _print(results[-1])
        finally:
            spamd.stop()
            clamd.stop()
            dns_conn.send("stop")
            dns.join(10)
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out_dir / f"scan-{stamp}.json").write_text(
        json.dumps({"args": vars(args), "phases": [asdict(p) for p in results]}, indent=2)
    )
    return 0


def _print(p: Phase) -> None:
    print(
        f"{p.name:16s} {p.cpu_ms:7.3f} ms CPU/msg (user {p.user_ms:.3f}, sys {p.sys_ms:.3f}, "
        f"pool {p.workers_ms:.3f})  {p.per_s:7.1f} msg/s  {p.actions}"
        + (f"  loop stall max {p.max_stall_ms:.1f} ms" if p.max_stall_ms else ""),
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
