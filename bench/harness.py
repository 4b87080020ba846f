"""Benchmark plumbing shared by the bench scripts: sink, load, latency probe, RSS sampler.

Public names: ``mailwarden_config``, ``Sink``, ``run_source``, ``LatencyProbe``,
``RssSampler``, ``tree_pids``, ``cpu_seconds``, ``free_port``, ``wait_port``, ``percentile``.
Security: talks only to 127.0.0.1; runs Postfix's smtp-source/smtp-sink as argument lists,
never through a shell. Every loop is bounded by a count and a deadline.
"""

from __future__ import annotations

import os
import re
import smtplib
import socket
import subprocess
import threading
import time
from pathlib import Path

SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
_MESG = re.compile(rb"mesg=(\d+)")
CLK_TCK = os.sysconf("SC_CLK_TCK")
MAX_TREE = 10_000  # processes walked in one process tree


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {deadline}s")


def mailwarden_config(
    state: str, workers: int, port: int, sink_port: int, domain: str, extra: str = ""
) -> str:
    """The TOML of a benchmark gateway: one plain-SMTP listener on ``port``, ``domain``
    hosted and relayed to the sink on ``sink_port``; ``extra`` is appended (e.g. scanners)."""
    return f"""[gateway]
hostname = "mw.bench.test"
state_dir = "{state}/var"
workers = {workers}
hosted_domains = ["{domain}"]

[[listener]]
name = "smtp"
address = "127.0.0.1"
port = {port}
tls = "starttls"

[limits]
max_connections_per_client = 1000

[delivery]
tls_policy = "none"

[delivery.transports]
"{domain}" = "smtp:127.0.0.1:{sink_port}"
{extra}"""


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


class Sink:
    """Postfix's smtp-sink on a loopback port; records when the n-th message arrived."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.count = 0
        self.history: list[tuple[float, int]] = []  # (monotonic time, messages so far)
        self.proc = subprocess.Popen(
            [SMTP_SINK, "-u", "nobody", "-c", "-m", "1000", f"127.0.0.1:{port}", "1024"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        wait_port(port)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        tail = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            found = _MESG.findall(tail + chunk)
            tail = chunk[-32:]
            if found:
                self.count = int(found[-1])
                self.history.append((time.monotonic(), self.count))

    def reached(self, target: int) -> float | None:
        """When the sink had received ``target`` messages, or None if it has not yet."""
        for when, count in self.history:
            if count >= target:
                return when
        return None

    def wait(self, target: int, deadline: float, stall: float | None = None) -> float | None:
        """Wait until the sink holds ``target`` messages; None after ``deadline`` seconds, or
        after ``stall`` seconds without a new message (a refused message never arrives)."""
        end = time.monotonic() + deadline
        last_count, last_change = self.count, time.monotonic()
        while time.monotonic() < end:
            when = self.reached(target)
            if when is not None:
                return when
            now = time.monotonic()
            if self.count != last_count:
                last_count, last_change = self.count, now
            elif stall is not None and now - last_change > stall:
                return None
            time.sleep(0.1)
        return None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_source(
    port: int,
    messages: int,
    sessions: int,
    size: int,
    timeout: float,
    message_file: Path | None = None,
) -> float:
    """Run smtp-source against 127.0.0.1:port; return the seconds it took.

    Without ``message_file`` smtp-source generates ``size`` bytes of payload; with it, every
    message is that file (header and body, LF line ends; smtp-source adds CR and
    dot-stuffs)."""
    payload = ["-F", str(message_file)] if message_file is not None else ["-l", str(size)]
    start = time.monotonic()
    subprocess.run(
        [
            SMTP_SOURCE,
            "-s",
            str(sessions),
            *payload,
            "-m",
            str(messages),
            "-f",
            "sender@example.org",
            "-t",
            "rcpt@example.test",
            "-M",
            "client.example.org",
            f"127.0.0.1:{port}",
        ],
        check=True,
        timeout=timeout,
        stdout=subprocess.DEVNULL,
    )
    return time.monotonic() - start


class LatencyProbe:
    """A client that runs one transaction every ``interval`` seconds during the load and
    records MAIL FROM .. final 250 latency (the load itself comes from smtp-source)."""

    def __init__(
        self, port: int, interval: float = 0.05, limit: int = 5000, body: bytes | None = None
    ) -> None:
        self.port = port
        self.interval = interval
        self.limit = limit
        self.samples: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        # 10 KB like the load, in 76-character lines (RFC 5321 allows at most 998).
        self._body = body or b"Subject: probe\r\n\r\n" + (b"x" * 76 + b"\r\n") * 130

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.samples) < self.limit:
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=60) as c:
                    c.ehlo("probe.example.org")
                    t0 = time.monotonic()
                    c.sendmail("probe@example.org", ["rcpt@example.test"], self._body)
                    self.samples.append(time.monotonic() - t0)
            except (OSError, smtplib.SMTPException):
                self.errors += 1
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(70)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            data = Path(f"/proc/{pid}/task/{task}/children").read_text()
            out.extend(int(x) for x in data.split())
    except OSError:
        pass
    return out


def _pss_kib(pid: int) -> int:
    """Proportional set size: shared pages divided among the processes sharing them, so a
    tree of forked workers (Postfix's 100 smtpd) is not counted many times over."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pids(root_pid: int) -> list[int]:
    """``root_pid`` and its descendants alive now (at most ``MAX_TREE`` processes)."""
    seen, todo = [], [root_pid]
    while todo and len(seen) < MAX_TREE:
        pid = todo.pop()
        seen.append(pid)
        todo.extend(_children(pid))
    return seen


def _cpu_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime of ``pid`` (all its threads, plus the children it
    has reaped), in clock ticks; 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is the state (field 3)
    return sum(int(x) for x in fields[11:15])


def cpu_seconds(root_pid: int) -> float:
    """CPU seconds used so far by a process tree: the live processes' own time plus what
    the processes they reaped used (Postfix's master reaps its smtpd/cleanup processes,
    so their CPU stays in the total after they exit). Compare two readings."""
    return sum(_cpu_ticks(p) for p in tree_pids(root_pid)) / CLK_TCK


class RssSampler:
    """Samples the summed memory (PSS) of a process tree; keeps the peak (KiB)."""

    def __init__(self, root_pid: int, interval: float = 0.25) -> None:
        self.root_pid = root_pid
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = sum(_pss_kib(p) for p in tree_pids(self.root_pid))
            self.peak_kib = max(self.peak_kib, total)
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak_kib
