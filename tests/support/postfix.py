"""Private Postfix instances for the tests: a downstream departmental server and an
upstream campus relay, each with its own config, queue, data and log directories.

``PostfixInstance(workdir, role, ...)`` renders ``contrib/postfix/main.cf.in`` plus the role
file (``downstream.cf.in`` or ``upstream.cf.in``) and ``master.cf.in``, with a free loopback
port and a self-signed certificate for STARTTLS. ``start()`` runs
``postfix -c CONFIG_DIR start-fg`` (a root-started master, ``mail_owner = postfix``, in its
own process group) and waits for the SMTP greeting; ``stop()`` runs ``postfix -c DIR stop``
and kills any leftover of the group. An instance can be stopped and started again with the
same directories and port (a downstream that is down, then up).

- ``downstream(workdir, domains, users)``: accepts mail for ``domains`` on 127.0.0.1:port
  and stores it with virtual(8) in ``mail_root/DOMAIN/USER/{new,cur}``; unknown users get
  550 at RCPT. ``messages(addr)`` / ``wait_messages(addr, n)`` read them; ``transport`` is
  the mailwarden transport string (``smtp:127.0.0.1:PORT``).
- ``upstream(workdir, relay_port)``: relays everything it gets to ``[127.0.0.1]:relay_port``.
  ``send()`` injects through its smtpd with smtplib, ``sendmail()`` with
  ``sendmail -C DIR``; ``queue()`` is ``postqueue -c DIR -j`` parsed; ``flush()`` is
  ``postqueue -f``; ``wait_queue_empty()`` polls.

Security: every instance listens on 127.0.0.1 only and uses no DNS (see main.cf.in); the
process group it starts is the only thing ``stop()`` signals.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import smtplib
import ssl
import subprocess
from pathlib import Path

from tests.support.maildir import MailboxReader
from tests.support.ports import LOOPBACK, free_port, wait_closed, wait_greeting, wait_port
from tests.support.procs import stop_group
from tests.support.tmpdirs import owned_dir, poll, traversable

REPO = Path(__file__).resolve().parents[2]
CONTRIB = REPO / "contrib" / "postfix"
START_DEADLINE = 60.0  # seconds for `postfix check` + master + first greeting
MAIL_USER = "nobody"  # virtual(8) stores downstream mail as this user


def postfix_available() -> bool:
    return shutil.which("postfix") is not None and Path("/usr/lib/postfix/sbin/master").exists()


def render(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return text


def make_self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """A self-signed EC certificate and key for ``hostname`` in ``directory``."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    if not cert.exists():
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "30",
                "-subj",
                f"/CN={hostname}",
                "-addext",
                f"subjectAltName=DNS:{hostname}",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
        )
        os.chmod(key, 0o644)  # a throw-away test key, read by smtpd and by the tests
    return cert, key


class PostfixInstance(MailboxReader):
    """One private Postfix: ``role`` is ``"downstream"`` or ``"upstream"``."""

    def __init__(
        self,
        workdir: Path,
        role: str,
        *,
        port: int | None = None,
        hostname: str | None = None,
        domains: list[str] | None = None,
        users: list[str] | None = None,
        relay_port: int | None = None,
        extra_main: dict[str, str] | None = None,
    ) -> None:
        if role not in ("downstream", "upstream"):
            raise ValueError(f"unknown role {role!r}")
        if role == "upstream" and relay_port is None:
            raise ValueError("an upstream instance needs relay_port")
        self.workdir = Path(workdir)
        self.role = role
        self.mailbox_label = f"Postfix {role}"
        self.host = LOOPBACK
        self.port = port or free_port()
        self.hostname = hostname or f"{role}.postfix.test"
        self.domains = [d.lower() for d in (domains or [])]
        self.users = [u.lower() for u in (users or [])]
        self.relay_port = relay_port
        self.extra_main = dict(extra_main or {})
        self.config_dir = self.workdir / "etc"
        self.queue_dir = self.workdir / "spool"
        self.data_dir = self.workdir / "data"
        self.log_dir = self.workdir / "log"
        self.mail_root = self.workdir / "mail"
        self.proc: subprocess.Popen[bytes] | None = None
        self._prepared = False

    # Setup ----------------------------------------------------------------------------
    @property
    def transport(self) -> str:
        """The mailwarden transport string that delivers to this instance."""
        return f"smtp:{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.log_dir / "maillog"

    def _prepare(self) -> None:
        if self._prepared:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        traversable(self.workdir)
        self.config_dir.mkdir(exist_ok=True)
        os.chmod(self.config_dir, 0o755)
        self.queue_dir.mkdir(exist_ok=True)
        os.chmod(self.queue_dir, 0o755)  # root-owned; Postfix makes its subdirectories
        owned_dir(self.data_dir, "postfix", 0o700)
        owned_dir(self.log_dir, "postfix", 0o755)
        cert, key = make_self_signed(self.config_dir, self.hostname)
        values = {
            "CONFIG_DIR": str(self.config_dir),
            "QUEUE_DIR": str(self.queue_dir),
            "DATA_DIR": str(self.data_dir),
            "LOG_DIR": str(self.log_dir),
            "HOSTNAME": self.hostname,
            "PORT": str(self.port),
            "CERT_FILE": str(cert),
            "KEY_FILE": str(key),
        }
        if self.role == "downstream":
            owned_dir(self.mail_root, MAIL_USER, 0o755)
            pw = pwd.getpwnam(MAIL_USER)
            mailbox_map = self.config_dir / "vmailbox"
            lines = []
            for user in self.users:
                local, _, domain = user.partition("@")
                lines.append(f"{user} {domain}/{local}/")
            mailbox_map.write_text("\n".join(lines) + "\n")
            os.chmod(mailbox_map, 0o644)
            values |= {
                "DOMAINS": ", ".join(self.domains),
                "MAIL_ROOT": str(self.mail_root),
                "MAILBOX_MAP": str(mailbox_map),
                "MAIL_UID": str(pw.pw_uid),
                "MAIL_GID": str(pw.pw_gid),
            }
        else:
            values["RELAY_PORT"] = str(self.relay_port)
        main = render((CONTRIB / "main.cf.in").read_text(), values)
        main += "\n" + render((CONTRIB / f"{self.role}.cf.in").read_text(), values)
        if self.extra_main:
            main += "\n# test overrides\n"
            main += "".join(f"{k} = {v}\n" for k, v in self.extra_main.items())
        (self.config_dir / "main.cf").write_text(main)
        master = render((CONTRIB / "master.cf.in").read_text(), values)
        (self.config_dir / "master.cf").write_text(master)
        for name in ("main.cf", "master.cf"):
            os.chmod(self.config_dir / name, 0o644)
        self._prepared = True

    # Life cycle -----------------------------------------------------------------------
    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postfix", "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def start(self) -> PostfixInstance:
        self._prepare()
        # Create queue subdirectories and fix ownership (quietly; the log says the rest).
        self._postfix("set-permissions", check=False)
        self._postfix("check", check=False)
        self.proc = subprocess.Popen(
            ["postfix", "-c", str(self.config_dir), "start-fg"],
            stdout=open(self.workdir / "master.out", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_port(self.port, self.host, START_DEADLINE, self.proc)
            wait_greeting(self.port, self.host, START_DEADLINE, "SMTP")
        except Exception as exc:
            self.stop()
            raise RuntimeError(
                f"postfix ({self.role}) did not start: {exc}\n{self.diagnostics()}"
            ) from exc
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """``postfix -c DIR stop``, then kill whatever of this instance is left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._postfix("stop", check=False)
        stop_group(self.proc, timeout=20)
        self.proc = None
        wait_closed(self.port, self.host, deadline=20)

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def diagnostics(self) -> str:
        out = []
        for f in (self.workdir / "master.out", self.log_file):
            if f.exists():
                out.append(f"--- {f}\n{f.read_text(errors='replace')[-6000:]}")
        return "\n".join(out)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    # Injecting mail -------------------------------------------------------------------
    def send(
        self,
        sender: str,
        recipients: list[str],
        message: bytes,
        *,
        starttls: bool = False,
    ) -> dict[str, tuple[int, bytes]]:
        """Submit ``message`` through this instance's smtpd; return refused recipients."""
        with smtplib.SMTP(self.host, self.port, local_hostname="client.test", timeout=30) as c:
            c.ehlo()
            if starttls:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                c.starttls(context=ctx)
                c.ehlo()
            return c.sendmail(sender, recipients, message)

    def sendmail(self, sender: str, recipients: list[str], message: bytes) -> None:
        """Inject ``message`` with ``sendmail -C CONFIG_DIR`` (postdrop + pickup)."""
        subprocess.run(
            [
                "/usr/sbin/sendmail",
                "-C",
                str(self.config_dir),
                "-f",
                sender,
                "-i",
                "--",
                *recipients,
            ],
            input=message,
            check=True,
            capture_output=True,
            timeout=60,
        )

    # Queue ----------------------------------------------------------------------------
    def queue(self) -> list[dict[str, object]]:
        """The queue as ``postqueue -j`` reports it (one dict per message)."""
        res = subprocess.run(
            ["postqueue", "-c", str(self.config_dir), "-j"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if res.returncode != 0:
            raise RuntimeError(f"postqueue -j failed: {res.stderr.strip()}")
        return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]

    def flush(self) -> None:
        subprocess.run(
            ["postqueue", "-c", str(self.config_dir), "-f"],
            capture_output=True,
            timeout=60,
            check=False,
        )

    def wait_queue_empty(self, deadline: float = 120.0) -> None:
        poll(
            lambda: self.queue() == [],
            deadline,
            interval=0.5,
            what=f"empty queue of postfix {self.role}",
        )

    # Reading delivered mail (downstream) ----------------------------------------------


def downstream(
    workdir: Path, domains: list[str], users: list[str], port: int | None = None, **kw: object
) -> PostfixInstance:
    """A departmental server for ``domains`` with the given mailbox ``users``."""
    return PostfixInstance(workdir, "downstream", port=port, domains=domains, users=users, **kw)  # type: ignore[arg-type]


def upstream(
    workdir: Path, relay_port: int, port: int | None = None, **kw: object
) -> PostfixInstance:
    """A campus server that relays all mail to ``[127.0.0.1]:relay_port``."""
    return PostfixInstance(workdir, "upstream", port=port, relay_port=relay_port, **kw)  # type: ignore[arg-type]
