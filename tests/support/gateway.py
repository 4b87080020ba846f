"""The real mailwarden gateway as a subprocess, for end-to-end tests.

``Gateway(workdir, hosted={"example.edu": "maildir"}, ...)`` writes a TOML config (schema:
src/mailwarden/config.py) with free loopback ports and ``state_dir = workdir/state``, and
``start()`` runs ``python -m mailwarden serve -c FILE`` in its own process group, then waits
until every listener greets (``220``; through TLS for the implicit-TLS one). Then:

- ``stop()`` SIGTERM (graceful), ``kill()`` SIGKILL of the whole group (crash), ``restart()``
  starts it again with the same config, ports and state;
- ``send(...)`` one message with smtplib (plain, ``starttls=True`` or ``implicit_tls=True``);
- ``events(name=None)`` the parsed lines of ``state_dir/log/events.jsonl``;
- ``maildir(addr)`` / ``messages(addr)`` / ``wait_messages(addr, n)`` the gateway's own
  Maildir delivery (``state_dir/mail/<domain>/<localpart>/{new,cur}``);
- ``cli(*args)`` runs ``mailwarden ARGS -c FILE``; ``queue_list()`` parses
  ``mailwarden queue list --json``; ``flush()``; ``wait_queue_empty()``.

Listeners: ``smtp`` (STARTTLS offered), ``submission`` (STARTTLS, submission) and ``smtps``
(implicit TLS). ``[dns] nameservers`` always points at a loopback port (a test's
``DNSServer`` or an unused port), never the system resolver.

Security: the gateway binds 127.0.0.1 only; teardown signals only the process group this
fixture started.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.support.maildir import MailboxReader
from tests.support.ports import LOOPBACK, free_port, wait_closed, wait_port
from tests.support.procs import signal_group, stop_group
from tests.support.tmpdirs import poll

START_DEADLINE = 60.0  # seconds until all listeners greet
STOP_DEADLINE = 40.0  # seconds for a graceful stop (shutdown_grace + worker exit)
CLI_TIMEOUT = 120.0  # seconds for one `mailwarden queue ...` command

# Quick retry schedule for tests (the defaults are minutes).
TEST_QUEUE = {
    "min_backoff": "1s",
    "max_backoff": "3s",
    "scan_interval": "0.5s",
}


def client_tls_context() -> ssl.SSLContext:
    """A client context that accepts the gateway's self-signed certificate."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: dict[str, Any]) -> str:
    """Serialise the config dict: tables of scalars, one level of sub-tables (e.g.
    ``delivery.transports``), and arrays of tables (``listener``)."""
    out: list[str] = []
    for section, body in cfg.items():
        if isinstance(body, list):
            for item in body:
                out.append(f"[[{section}]]")
                out += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
                out.append("")
            continue
        out.append(f"[{section}]")
        subs = {k: v for k, v in body.items() if isinstance(v, dict)}
        out += [f"{k} = {_toml_value(v)}" for k, v in body.items() if k not in subs]
        out.append("")
        for name, sub in subs.items():
            out.append(f"[{section}.{name}]")
            out += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in sub.items()]
            out.append("")
    return "\n".join(out)


class Gateway(MailboxReader):
    """One mailwarden gateway process with its config and state directory."""

    mailbox_label = "the gateway's Maildir"

    def __init__(
        self,
        workdir: Path,
        *,
        hosted: dict[str, str] | None = None,
        workers: int = 1,
        hostname: str = "mailwarden.test",
        nameserver: str | None = None,
        queue: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
        delivery: dict[str, Any] | None = None,
        gateway: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.workdir / "state"
        self.config_file = self.workdir / "mailwarden.toml"
        self.hosted = dict(hosted or {"example.edu": "maildir"})
        self.hostname = hostname
        self.smtp_port, self.submission_port, self.smtps_port = (free_port() for _ in range(3))
        self.nameserver = nameserver or f"127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        gw = {
            "hostname": hostname,
            "state_dir": str(self.state_dir),
            "hosted_domains": list(self.hosted),
            "workers": workers,
        } | dict(gateway or {})
        dlv: dict[str, Any] = {"transports": dict(self.hosted), "tls_policy": "may"}
        dlv |= dict(delivery or {})
        self.config: dict[str, Any] = {
            "gateway": gw,
            "listener": [
                {"name": "smtp", "address": LOOPBACK, "port": self.smtp_port, "tls": "starttls"},
                {
                    "name": "submission",
                    "address": LOOPBACK,
                    "port": self.submission_port,
                    "tls": "starttls",
                    "submission": True,
                },
                {
                    "name": "smtps",
                    "address": LOOPBACK,
                    "port": self.smtps_port,
                    "tls": "implicit",
                    "submission": True,
                },
            ],
            "delivery": dlv,
            "dns": {"nameservers": [self.nameserver], "timeout": "2s"},
            "queue": TEST_QUEUE | dict(queue or {}),
            "limits": {"shutdown_grace": "5s"} | dict(limits or {}),
        }
        for key, value in (extra or {}).items():
            self.config[key] = value
        self.write_config()

    # Config -----------------------------------------------------------------------------
    def write_config(self) -> Path:
        self.config_file.write_text(to_toml(self.config))
        return self.config_file

    @property
    def events_file(self) -> Path:
        return self.state_dir / "log" / "events.jsonl"

    @property
    def mail_root(self) -> Path:
        return self.state_dir / "mail"

    @property
    def cert_file(self) -> Path:
        return self.state_dir / "tls" / "cert.pem"

    # Life cycle -------------------------------------------------------------------------
    def serve_command(self) -> list[str]:
        """The command that runs the gateway in the foreground."""
        return [sys.executable, "-m", "mailwarden", "serve", "-c", str(self.config_file)]

    def start(self) -> Gateway:
        self.starts += 1
        log = self.workdir / f"serve-{self.starts}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            self.serve_command(),
            stdout=open(log, "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            env=env,
            start_new_session=True,
        )
        try:
            for port in (self.smtp_port, self.submission_port):
                wait_port(port, LOOPBACK, START_DEADLINE, self.proc)
                self._read_banner(port, implicit=False)
            wait_port(self.smtps_port, LOOPBACK, START_DEADLINE, self.proc)
            self._read_banner(self.smtps_port, implicit=True)
        except Exception as exc:
            out = self.output()
            self.kill()
            raise RuntimeError(f"mailwarden serve did not start: {exc}\n{out}") from exc
        return self

    def _read_banner(self, port: int, implicit: bool) -> bytes:
        end = time.monotonic() + START_DEADLINE
        last: Exception | None = None
        while time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}")
            try:
                with socket.create_connection((LOOPBACK, port), timeout=10) as raw:
                    sock: socket.socket = raw
                    if implicit:
                        sock = client_tls_context().wrap_socket(raw)
                    banner = sock.recv(1024)
                    if banner.startswith(b"220"):
                        sock.sendall(b"QUIT\r\n")
                        return banner
                    last = RuntimeError(f"banner {banner!r}")
            except OSError as exc:
                last = exc
            time.sleep(0.1)
        raise TimeoutError(f"no 220 banner on port {port}: {last}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM the gateway (graceful: 421 to sessions), wait, SIGKILL leftovers."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        code = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                code = None
        stop_group(proc, signal.SIGKILL, timeout=STOP_DEADLINE)
        self._wait_ports_closed()
        return code

    def kill(self) -> None:
        """SIGKILL the whole process group at once (parent and workers): a crash."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        signal_group(proc, signal.SIGKILL)
        proc.wait(STOP_DEADLINE)
        self._wait_ports_closed()

    def _wait_ports_closed(self) -> None:
        for port in (self.smtp_port, self.submission_port, self.smtps_port):
            wait_closed(port, LOOPBACK, deadline=STOP_DEADLINE)

    def restart(self, *, crash: bool = False) -> Gateway:
        self.kill() if crash else self.stop()
        return self.start()

    def output(self) -> str:
        """Everything the gateway printed (all runs), for failure messages."""
        parts = []
        for i in range(1, self.starts + 1):
            f = self.workdir / f"serve-{i}.log"
            if f.exists():
                parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)

    # Talking SMTP -----------------------------------------------------------------------
    def smtp(
        self, port: int | None = None, *, implicit_tls: bool = False, timeout: float = 60
    ) -> smtplib.SMTP:
        """A connected smtplib client (caller does EHLO/STARTTLS)."""
        if implicit_tls:
            return smtplib.SMTP_SSL(
                LOOPBACK,
                port or self.smtps_port,
                local_hostname="client.test",
                timeout=timeout,
                context=client_tls_context(),
            )
        return smtplib.SMTP(
            LOOPBACK, port or self.smtp_port, local_hostname="client.test", timeout=timeout
        )

    def send(
        self,
        sender: str,
        recipients: list[str],
        message: bytes,
        *,
        starttls: bool = False,
        implicit_tls: bool = False,
        port: int | None = None,
    ) -> dict[str, tuple[int, bytes]]:
        """Send one message; return the refused recipients (smtplib semantics)."""
        with self.smtp(port, implicit_tls=implicit_tls) as c:
            c.ehlo()
            if starttls:
                c.starttls(context=client_tls_context())
                c.ehlo()
            return c.sendmail(sender, recipients, message)

    # Events -----------------------------------------------------------------------------
    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Parsed events, optionally only those whose name equals or starts with ``name``."""
        if not self.events_file.exists():
            return []
        out = []
        for line in self.events_file.read_text(errors="replace").splitlines():
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:  # a line cut by SIGKILL
                continue
            if name is None or ev.get("event") == name or ev.get("event", "").startswith(name):
                out.append(ev)
        return out

    def wait_event(self, predicate: Any, deadline: float = 60.0, what: str = "") -> dict:
        return poll(
            lambda: next((e for e in self.events() if predicate(e)), None),
            deadline,
            interval=0.2,
            what=what or "an event",
        )

    # The gateway's own Maildir delivery -------------------------------------------------

    # Queue CLI --------------------------------------------------------------------------
    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``mailwarden ARGS -c CONFIG`` as the operator would run it."""
        res = subprocess.run(
            [sys.executable, "-m", "mailwarden", *args, "-c", str(self.config_file)],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            cwd=self.workdir,
        )
        if check and res.returncode != 0:
            raise RuntimeError(
                f"mailwarden {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
            )
        return res

    def queue_list(self) -> list[dict[str, Any]]:
        """Queued messages from ``mailwarden queue list --json``: one JSON object per
        message per line, like ``postqueue -j`` (a single JSON array is accepted too)."""
        out = self.cli("queue", "list", "--json").stdout.strip()
        if not out:
            return []
        if out.startswith("["):
            return list(json.loads(out))
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def flush(self) -> None:
        self.cli("queue", "flush")

    def wait_queue_empty(self, deadline: float = 120.0) -> None:
        poll(
            lambda: self.queue_list() == [],
            deadline,
            interval=0.5,
            what="the gateway's queue to empty",
        )
