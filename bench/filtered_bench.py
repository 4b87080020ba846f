"""Filtered-pipeline benchmark (issue 4): mailwarden + ClamAV + rspamd versus Postfix with
the same rspamd (milter, rspamd's ``proxy`` worker) and the same clamd (``clamav-milter``).

One clamd (``contrib/clamav/clamd.conf.in``, the project's signature database, scan cache
off: see ``BenchClamd``) and one rspamd (``contrib/rspamd``, fuzzy_check and the antivirus
module off, resolving only through a loopback DNS server; ``bench/conf/rspamd-filtered.conf``
adds the proxy worker) serve both systems. Postfix (``bench/postfix_relay.py``) has
``smtpd_milters`` = rspamd's proxy worker and Debian's ``clamav-milter`` (OnInfected Reject,
OnFail Defer, ``milter_default_action = tempfail``); mailwarden (2 workers, ``src/`` as
committed at HEAD unless ``--code worktree``) has ``[scan.clamav]`` and ``[scan.rspamd]``
plus its built-in scanners.

Per system and run: a sanity check (a message with the project's ClamAV test marker and a
GTUBE message must be refused, or the virus quarantined: proof that both filters are in the
path), a warm-up, then ``smtp-source`` sends N copies of a realistic 10 KB ham message
(committee minutes, multipart with a CSV attachment; rspamd scores it 0.3, no action) over
S sessions to the system, which relays them to ``smtp-sink``. Printed: accepted and
end-to-end messages/second, p50/p99 latency of a probe client, peak PSS, and CPU per message
(utime + stime from ``/proc``, including reaped children) of the system's own process tree
and of each daemon (clamd, rspamd, clamav-milter) during the measured load.

    .venv/bin/python bench/filtered_bench.py [--messages 5000] [--sessions 50] [--runs 1]
        [--workers 1] [--only mailwarden|postfix|floor] [--compare REV]

A third system, ``floor`` (``bench/floor_gateway.py``), does only the network exchanges of
the pipeline in Python with no queue, log or checks: the lower bound of a Python gateway's
own CPU at the same rate. ``--compare REV`` also runs mailwarden's ``src/`` at git
revision REV in every run, for an A/B under the same conditions.

Results go to stdout and ``bench/results/filtered-*.json``.
Security: loopback only (every daemon binds 127.0.0.1; rspamd's resolver is the loopback
DNS server, never the system one); bounded loops; child processes from argument lists.
"""

from __future__ import annotations

import argparse
import base64
import email.utils
import json
import os
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.postfix_relay import PostfixRelay
from harness import (
    LatencyProbe,
    RssSampler,
    Sink,
    cpu_seconds,
    free_port,
    mailwarden_config,
    percentile,
    run_source,
    wait_port,
)
from tests.support import rspamd as rspamd_support
from tests.support.clamd import Clamd, build_db, clamd_available
from tests.support.dnsserver import DNSServer
from tests.support.procs import stop_group
from tests.support.tmpdirs import owned_dir

ROOT = Path(__file__).resolve().parent.parent
RSPAMD_CONF = ROOT / "bench" / "conf" / "rspamd-filtered.conf"
CLAMAV_MILTER = "/usr/sbin/clamav-milter"
MILTER_USER = "clamav"
RELAY_DOMAIN = "example.test"
STALL = 60.0  # seconds without a new message at the sink before a phase is given up
DAEMONS = ("clamd", "rspamd", "clamav-milter")
# rspamd's compiled Hyperscan cache, kept between bench runs (cold start ~11 s) and apart
# from the tests' cache, which test runs may clean while a benchmark is going.
RSPAMD_CACHE = Path(
    os.environ.get("MAILWARDEN_BENCH_RSPAMD_CACHE", "/var/tmp/mailwarden-bench-rspamd")
)

# The sending side's DNS as the loopback server answers it. The top-level zones make every
# other name under them NXDOMAIN (not listed, no record) at once instead of REFUSED.
ZONES = {
    "example.org": {
        "@": {"MX": ["10 client"], "A": ["127.0.0.1"], "TXT": ['"v=spf1 ip4:127.0.0.1 -all"']},
        "client": {"A": ["127.0.0.1"]},
        "_dmarc": {"TXT": ['"v=DMARC1; p=none"']},
    },
    "example.test": {"@": {"MX": ["10 mx"]}, "mx": {"A": ["127.0.0.1"]}},
    "org": {},
    "com": {},
    "net": {},
    "test": {},
    "arpa": {},
}
VIRUS_MARKER = "MAILWARDEN-TEST-MALWARE-MARKER-5f0c2a"  # contrib/clamav/sigs/daily.ndb
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


# --- the messages --------------------------------------------------------------------------


def ham_message(size: int = 10_240) -> bytes:
    """A plain campus message of about ``size`` bytes (LF line ends): committee minutes in
    text/plain and a small CSV attachment in base64. Same bytes for both systems."""
    topics = [
        ("Course catalogue", "the descriptions for the spring term are due on 5 December"),
        ("Room bookings", "the seminar rooms in building C are closed for painting in January"),
        ("Exam timetable", "the draft timetable has two clashes in the second week"),
        ("Library hours", "the reading room stays open until ten during the exam period"),
        ("Lab safety", "every new teaching assistant attends the induction before term"),
        ("Student feedback", "the response rate rose to 41 percent after the reminder"),
        ("Thesis deadlines", "the graduate office accepts submissions until the end of May"),
        ("Budget", "the travel allowance for conferences is unchanged for next year"),
    ]
    rows = ["course,section,room,enrolled"]
    rows += [f"HIST{200 + i},{i % 4 + 1},C{100 + i * 3},{20 + i * 7 % 40}" for i in range(60)]
    csv = base64.encodebytes(("\n".join(rows) + "\n").encode()).decode()
    signature = ["Kind regards,", "Alice Martin", "Faculty Office, room B2.14, extension 4417"]
    lines = ["Dear colleagues,", "", "please find below the draft minutes of Thursday's"]
    lines += ["meeting. Corrections are welcome until Friday noon.", ""]
    n = 0
    body_target = size - len(csv) - 900  # headers, MIME parts and signature take the rest
    while sum(len(x) + 1 for x in lines) < body_target and n < 200:
        title, point = topics[n % len(topics)]
        n += 1
        lines += [
            f"{n}. {title}",
            "",
            f"The committee noted that {point}. After a short discussion it was agreed",
            "that the secretary will circulate a revised version to the department heads",
            "and that any remaining questions go to the next meeting, which is planned",
            f"for week {n % 12 + 2} in the usual room.",
            "",
        ]
    text = "\n".join(lines + signature) + "\n"
    boundary = "=_mw_bench_minutes_0001"
    head = [
        "From: Alice Martin <alice.martin@example.org>",
        "To: Curriculum Committee <rcpt@example.test>",
        "Subject: Draft minutes of the curriculum committee meeting",
        f"Date: {email.utils.formatdate(localtime=False)}",
        f"Message-ID: <minutes.{int(time.time())}@example.org>",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/mixed; boundary="{boundary}"',
        "",
        "This is a multi-part message in MIME format.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Transfer-Encoding: 7bit",
        "",
    ]
    tail = [
        f"--{boundary}",
        'Content-Type: text/csv; name="enrolment.csv"',
        "Content-Transfer-Encoding: base64",
        'Content-Disposition: attachment; filename="enrolment.csv"',
        "",
        csv.rstrip("\n"),
        f"--{boundary}--",
        "",
    ]
    return ("\n".join(head) + "\n" + text + "\n".join(tail)).encode()


def _crlf(message: bytes) -> bytes:
    return message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _test_message(subject: str, line: str) -> bytes:
    return _crlf(
        (
            "From: sender@example.org\nTo: rcpt@example.test\n"
            f"Subject: {subject}\nDate: {email.utils.formatdate()}\n"
            f"Message-ID: <{subject.replace(' ', '.')}.{time.time_ns()}@example.org>\n\n"
            f"Test message.\n{line}\n"
        ).encode()
    )


def sanity(port: int) -> dict[str, str]:
    """Send a ClamAV-detected and a GTUBE message; both must be refused (or, for the virus,
    quarantined): proof that clamd and rspamd are in the system's path."""
    replies: dict[str, str] = {}
    for name, msg in (
        ("virus", _test_message("clamav marker", VIRUS_MARKER)),
        ("gtube", _test_message("gtube", GTUBE)),
    ):
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
            c.ehlo("client.example.org")
            c.mail("sender@example.org")
            c.rcpt("rcpt@example.test")
            code, text = c.data(msg)
        reply = f"{code} {text.decode(errors='replace')}"
        replies[name] = reply
        # A 4xx would be a filter failing closed, not a verdict.
        if not (code >= 500 or (name == "virus" and code == 250 and "quarantined" in reply)):
            raise RuntimeError(f"sanity: the {name} message was not refused: {reply}")
    return replies


# --- the shared daemons --------------------------------------------------------------------


class BenchRspamd(rspamd_support.Rspamd):
    """The tests' rspamd (same config and user) with the bench's proxy-worker overlay and
    its own Hyperscan cache directory."""

    def __init__(self, workdir: Path, dns_address: str) -> None:
        super().__init__(workdir, dns_address)
        self.proxy_port = free_port()

    def command(self) -> list[str]:
        rspamd_support.CACHE_DIR = RSPAMD_CACHE  # the support module reads it when called
        cmd = super().command()
        cmd[cmd.index(str(rspamd_support.CONF))] = str(RSPAMD_CONF)
        return [*cmd, f"--var=MW_PROXY_BIND=127.0.0.1:{self.proxy_port}"]

    def start(self) -> BenchRspamd:
        super().start()
        wait_port(self.proxy_port, 60)
        return self


class BenchClamd(Clamd):
    """The tests' clamd (contrib/clamav/clamd.conf.in, the project's signatures); with
    ``cache=False`` its scan cache is off. smtp-source sends the same bytes every time and
    Postfix does not show its own Received: field to milters, so clamav-milter's stream is
    identical for every message and clamd answers it from its cache (measured: 0.6 versus
    4.4 ms of clamd CPU per 10 KB message), while mailwarden's stream carries its unique
    Received: field and is scanned in full. Real mail is unique; without the cache both
    sides pay for a real scan."""

    def __init__(self, workdir: Path, dbdir: Path, *, cache: bool) -> None:
        super().__init__(workdir, dbdir, tcp=True)
        self.cache = cache

    def _render(self) -> None:
        super()._render()
        if not self.cache:
            with self.conf.open("a") as f:
                f.write("\n# bench/filtered_bench.py: every message is scanned in full\n")
                f.write("DisableCache yes\n")


class ClamavMilter:
    """Debian's clamav-milter on 127.0.0.1:port, scanning through ``clamd`` (HOST:PORT):
    infected -> reject (5xx), clamd unreachable or failing -> defer (4xx)."""

    def __init__(self, workdir: Path, clamd_address: str) -> None:
        self.workdir = owned_dir(workdir, MILTER_USER, 0o755)
        self.clamd_address = clamd_address
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def milter(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def start(self) -> ClamavMilter:
        conf = self.workdir / "clamav-milter.conf"
        conf.write_text(
            f"""MilterSocket inet:{self.port}@127.0.0.1
ClamdSocket tcp:{self.clamd_address}
User {MILTER_USER}
Foreground yes
PidFile {self.workdir}/clamav-milter.pid
TemporaryDirectory {self.workdir}
LogFile {self.workdir}/clamav-milter.log
LogTime yes
LogInfected Basic
OnClean Accept
OnInfected Reject
OnFail Defer
RejectMsg Virus found: %v
AddHeader Replace
MaxFileSize 64M
ReadTimeout 120
"""
        )
        self.proc = subprocess.Popen(
            [CLAMAV_MILTER, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "clamav-milter.stderr", "ab"),  # noqa: SIM115
            start_new_session=True,
        )
        wait_port(self.port, 30)
        if self.proc.poll() is not None:
            raise RuntimeError(f"clamav-milter exited with {self.proc.returncode}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None


@dataclass
class Daemons:
    dns: DNSServer
    clamd: Clamd
    rspamd: BenchRspamd
    milter: ClamavMilter

    def pids(self) -> dict[str, int]:
        out = {}
        for name, proc in (
            ("clamd", self.clamd.proc),
            ("rspamd", self.rspamd.proc),
            ("clamav-milter", self.milter.proc),
        ):
            assert proc is not None and proc.poll() is None, f"{name} is not running"
            out[name] = proc.pid
        return out


def start_daemons(work: Path, clamd_cache: bool = False) -> Daemons:
    if not clamd_available() or not rspamd_support.rspamd_available():
        raise SystemExit("clamd/sigtool or rspamd missing: run scripts/install-deps.sh")
    if not Path(CLAMAV_MILTER).exists():
        raise SystemExit("clamav-milter missing: run scripts/install-deps.sh")
    dns = DNSServer(ZONES).start()
    started: list[object] = [dns]
    try:
        db = build_db(work / "clamdb", version=1)
        clamd = BenchClamd(work / "clamd", db, cache=clamd_cache).start()
        started.append(clamd)
        spamd = BenchRspamd(work / "rspamd", dns.nameserver).start()
        started.append(spamd)
        milter = ClamavMilter(work / "milter", clamd.tcp_address).start()
        return Daemons(dns, clamd, spamd, milter)
    except BaseException:
        for d in reversed(started):
            d.stop()  # type: ignore[attr-defined]
        raise


# --- one measured phase --------------------------------------------------------------------


@dataclass
class Result:
    system: str
    measured: int  # load + probe messages inside the CPU window
    accepted_per_s: float
    end_to_end_per_s: float
    p50_ms: float
    p99_ms: float
    peak_pss_mib: float
    own_cpu_ms: float  # the system's own process tree, per message
    daemon_cpu_ms: dict[str, float] = field(default_factory=dict)  # per message
    load_before: float = 0.0
    load_after: float = 0.0
    sanity: dict[str, str] = field(default_factory=dict)
    probe_errors: int = 0  # probe transactions that failed (a 4xx/5xx or a dropped link)
    verdicts: int | None = None  # mailwarden: scan.verdict events with an rspamd action


@dataclass
class Load:
    work: Path  # phases make their directories in here
    code: Path | None  # a src/ directory to run mailwarden from (None: the installed one)
    n: int
    sessions: int
    warmup: int
    ham: Path
    deadline: float


def _measure(
    system: str, port: int, root_pid: int, daemons: Daemons, sink: Sink, load: Load
) -> Result:
    replies = sanity(port)
    if load.warmup:
        run_source(port, load.warmup, min(10, load.sessions), 0, load.deadline, load.ham)
        if sink.wait(load.warmup, load.deadline, STALL) is None:
            raise RuntimeError(f"{system}: warm-up: the sink got {sink.count}/{load.warmup}")
    base = sink.count
    pids = {system: root_pid, **daemons.pids()}
    load_before = os.getloadavg()[0]
    cpu0 = {k: cpu_seconds(v) for k, v in pids.items()}
    pss = RssSampler(root_pid)
    probe = LatencyProbe(port, body=_crlf(load.ham.read_bytes()))
    t0 = time.monotonic()
    probe.start()
    took = run_source(port, load.n, load.sessions, 0, load.deadline, load.ham)
    probe.stop()
    measured = load.n + len(probe.samples)
    done = sink.wait(base + measured, load.deadline, STALL)
    peak = pss.stop()
    if done is None:
        raise RuntimeError(f"{system}: the sink got {sink.count - base} of {measured}")
    time.sleep(1.0)  # let the last delivery's bookkeeping (queue file removal) finish
    cpu1 = {k: cpu_seconds(v) for k, v in pids.items()}
    per_msg = {k: (cpu1[k] - cpu0[k]) * 1000 / measured for k in pids}
    return Result(
        system=system,
        measured=measured,
        accepted_per_s=load.n / took,
        end_to_end_per_s=load.n / (done - t0),
        p50_ms=percentile(probe.samples, 50) * 1000,
        p99_ms=percentile(probe.samples, 99) * 1000,
        peak_pss_mib=peak / 1024,
        own_cpu_ms=per_msg[system],
        daemon_cpu_ms={k: per_msg[k] for k in DAEMONS},
        load_before=load_before,
        load_after=os.getloadavg()[0],
        sanity=replies,
        probe_errors=probe.errors,
    )


def _count_verdicts(state_dir: Path) -> int:
    """scan.verdict events that carry an rspamd action (so rspamd answered for them)."""
    total = 0
    for log in sorted(state_dir.glob("**/events*.jsonl"))[:16]:
        with log.open(errors="replace") as f:
            for line in f:
                if '"scan.verdict"' in line and "RSPAMD_ACTION_" in line:
                    total += 1
    return total


def run_mailwarden(
    daemons: Daemons, load: Load, workers: int, system: str = "mailwarden"
) -> Result:
    tmp = tempfile.mkdtemp(prefix="mw-", dir=str(load.work))  # removed with load.work
    sink_port, port = free_port(), free_port()
    cfg = Path(tmp) / "mailwarden.toml"
    scanners = f"""
[scan.clamav]
socket = "{daemons.clamd.tcp_address}"

[scan.rspamd]
url = "{daemons.rspamd.url}"
"""
    cfg.write_text(mailwarden_config(tmp, workers, port, sink_port, RELAY_DOMAIN, scanners))
    sink = Sink(sink_port)
    env = dict(os.environ)
    if load.code is not None:
        env["PYTHONPATH"] = str(load.code)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailwarden", "serve", "-c", str(cfg)],
        stdout=subprocess.DEVNULL,
        cwd=tmp,
        env=env,
        start_new_session=True,  # stop_group stops its workers too
    )
    try:
        wait_port(port)
        result = _measure(system, port, proc.pid, daemons, sink, load)
        result.verdicts = _count_verdicts(Path(tmp) / "var")
        return result
    finally:
        stop_group(proc, timeout=30)
        sink.stop()


def run_floor(daemons: Daemons, load: Load) -> Result:
    """``bench/floor_gateway.py`` (the network exchanges alone, no queue: a lower bound for
    a Python gateway's own CPU) against the same daemons and the same load."""
    sink_port, port = free_port(), free_port()
    sink = Sink(sink_port)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench" / "floor_gateway.py"),
            f"--port={port}",
            f"--clamd={daemons.clamd.tcp_address}",
            f"--rspamd={daemons.rspamd.url}",
            f"--relay=127.0.0.1:{sink_port}",
        ],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_port(port)
        return _measure("floor", port, proc.pid, daemons, sink, load)
    finally:
        stop_group(proc, timeout=30)
        sink.stop()


def run_postfix(daemons: Daemons, load: Load) -> Result:
    tmp = tempfile.mkdtemp(prefix="pf-", dir=str(load.work))  # removed with load.work
    sink_port, port = free_port(), free_port()
    sink = Sink(sink_port)
    relay = PostfixRelay(
        Path(tmp),
        port=port,
        nexthop_port=sink_port,
        relay_domain=RELAY_DOMAIN,
        milters=[f"inet:127.0.0.1:{daemons.rspamd.proxy_port}", daemons.milter.milter],
    )
    relay.start()
    try:
        wait_port(port)
        return _measure("postfix", port, relay.master_pid(), daemons, sink, load)
    except Exception:
        maillog = Path(tmp) / "log" / "maillog"
        if maillog.exists():
            print("--- postfix maillog (tail)", file=sys.stderr)
            print(maillog.read_text(errors="replace")[-4000:], file=sys.stderr)
        raise
    finally:
        relay.stop()
        sink.stop()


# --- main ----------------------------------------------------------------------------------


def _git(*args: str) -> str:
    res = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else ""


def export_head(dest: Path, rev: str = "HEAD") -> Path:
    """``src/`` as committed at ``rev``, unpacked under ``dest``: the measured code does not
    change when someone edits the working tree during the run."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "src"],
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "src"


def _median(results: list[Result]) -> Result:
    def med(attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in results))

    first = results[0]
    return Result(
        system=first.system,
        measured=int(med("measured")),
        accepted_per_s=med("accepted_per_s"),
        end_to_end_per_s=med("end_to_end_per_s"),
        p50_ms=med("p50_ms"),
        p99_ms=med("p99_ms"),
        peak_pss_mib=med("peak_pss_mib"),
        own_cpu_ms=med("own_cpu_ms"),
        daemon_cpu_ms={
            k: float(statistics.median(r.daemon_cpu_ms[k] for r in results)) for k in DAEMONS
        },
        load_before=med("load_before"),
        load_after=med("load_after"),
    )


def _line(r: Result) -> str:
    d = r.daemon_cpu_ms
    return (
        f"{r.system:<10} n={r.measured} accept {r.accepted_per_s:6.0f}/s  "
        f"e2e {r.end_to_end_per_s:6.0f}/s  "
        f"p50 {r.p50_ms:6.1f} ms  p99 {r.p99_ms:7.1f} ms  pss {r.peak_pss_mib:5.0f} MiB  "
        f"cpu/msg own {r.own_cpu_ms:.2f} ms, clamd {d['clamd']:.2f}, rspamd {d['rspamd']:.2f}, "
        f"milter {d['clamav-milter']:.2f}  (load {r.load_before:.1f}->{r.load_after:.1f})"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=5_000)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=200, help="messages before measuring")
    ap.add_argument("--size", type=int, default=10_240, help="ham message bytes (about)")
    ap.add_argument("--workers", type=int, default=2, help="mailwarden worker processes")
    ap.add_argument("--deadline", type=float, default=600.0, help="seconds per phase")
    ap.add_argument(
        "--only",
        choices=["mailwarden", "postfix", "floor"],
        default=None,
        help="one system (default: postfix, mailwarden and the floor)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument(
        "--compare",
        metavar="REV",
        help="also run mailwarden's src/ at git revision REV in every run (an A/B in one run)",
    )
    ap.add_argument(
        "--clamd-cache",
        action="store_true",
        help="leave clamd's scan cache on (it then favours Postfix, see BenchClamd)",
    )
    ap.add_argument(
        "--code",
        choices=["head", "worktree"],
        default="head",
        help="run mailwarden's src/ as committed at HEAD (default) or the working tree",
    )
    args = ap.parse_args()
    head = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--", "src"))
    code_desc = (
        f"{head} (HEAD)"
        if args.code == "head"
        else f"{head} + working tree" + (" (src/ modified)" if dirty else "")
    )

    # On the repository's disk like relay_bench (fsync costs what it costs there).
    work = Path(tempfile.mkdtemp(prefix="filtered-", dir=str(ROOT / "bench")))
    os.chmod(work, 0o755)  # clamav-milter (user clamav) and rspamd must traverse it
    runs: dict[str, list[Result]] = {"mailwarden": [], "postfix": [], "floor": []}
    if args.compare:
        runs[f"mw@{args.compare}"] = []
    try:
        ham = work / "ham.eml"
        ham.write_bytes(ham_message(args.size))
        code = export_head(work / "code") if args.code == "head" else None
        other = export_head(work / "compare", args.compare) if args.compare else None
        load = Load(work, code, args.messages, args.sessions, args.warmup, ham, args.deadline)
        print(f"mailwarden code: {code_desc}")
        print(f"ham message: {ham.stat().st_size} bytes; uptime load {os.getloadavg()}")
        daemons = start_daemons(work, args.clamd_cache)
        print(
            f"rspamd normal {daemons.rspamd.url}, proxy milter 127.0.0.1:"
            f"{daemons.rspamd.proxy_port}; clamd {daemons.clamd.tcp_address}; "
            f"clamav-milter {daemons.milter.milter}",
            flush=True,
        )
        try:
            for i in range(args.runs):
                for system in runs:
                    if args.only and system != args.only and not system.startswith("mw@"):
                        continue
                    if system == "mailwarden":
                        r = run_mailwarden(daemons, load, args.workers)
                    elif other is not None and system.startswith("mw@"):
                        r = run_mailwarden(daemons, replace(load, code=other), args.workers, system)
                    elif system == "floor":
                        r = run_floor(daemons, load)
                    else:
                        r = run_postfix(daemons, load)
                    runs[system].append(r)
                    print(f"run {i + 1} {_line(r)}", flush=True)
                    print(f"      sanity: {r.sanity}; probe errors: {r.probe_errors}", flush=True)
                    if r.verdicts is not None:
                        print(f"      scan.verdict events with an rspamd action: {r.verdicts}")
        finally:
            daemons.milter.stop()
            daemons.rspamd.stop()
            daemons.clamd.stop()
            daemons.dns.stop()
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    medians = {k: _median(v) for k, v in runs.items() if v}
    print("\nmedians:")
    for r in medians.values():
        print(f"  {_line(r)}")
    if "mailwarden" in medians and "postfix" in medians:
        mw, pf = medians["mailwarden"], medians["postfix"]
        print(
            f"  ratio mailwarden/postfix: accept {mw.accepted_per_s / pf.accepted_per_s:.2f}x"
            f", end-to-end {mw.end_to_end_per_s / pf.end_to_end_per_s:.2f}x"
            f"; own CPU/msg {mw.own_cpu_ms / pf.own_cpu_ms:.2f}x"
        )
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"filtered-{stamp}.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "mailwarden_code": code_desc,
                "runs": {k: [asdict(r) for r in v] for k, v in runs.items()},
                "medians": {k: asdict(v) for k, v in medians.items()},
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
