"""A real Dovecot LMTP server on 127.0.0.1 for the tests, run unprivileged.

``DovecotLMTP(workdir, users=[...])`` renders ``contrib/dovecot/dovecot-lmtp.conf.in`` with
a free port, a passwd-file of the given addresses and a Maildir root under ``workdir``;
``start()`` runs ``runuser -u nobody -- dovecot -c FILE -F`` and waits for the LMTP greeting;
``stop()`` terminates it. ``messages(address)`` returns the raw messages delivered to one
user (``mail_root/domain/localpart/{new,cur}``), ``wait_messages(address, n)`` polls for them.

Security: Dovecot runs as ``nobody``, listens on 127.0.0.1 only, and knows only the users
it is given (an unknown recipient is refused at RCPT with 550).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path

from tests.support.maildir import MailboxReader
from tests.support.ports import LOOPBACK, free_port, wait_greeting, wait_port
from tests.support.procs import stop_group
from tests.support.tmpdirs import owned_dir, traversable

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "contrib" / "dovecot" / "dovecot-lmtp.conf.in"
RUN_USER = "nobody"
START_DEADLINE = 30.0


def dovecot_available() -> bool:
    return shutil.which("dovecot") is not None and Path("/usr/lib/dovecot/lmtp").exists()


def render(template: str, values: dict[str, str]) -> str:
    """Fill ``@KEY@`` placeholders; raise if any is left."""
    for key, value in values.items():
        template = template.replace(f"@{key}@", value)
    body = "\n".join(ln for ln in template.splitlines() if not ln.lstrip().startswith("#"))
    left = sorted(set(re.findall(r"@[A-Z_]+@", body)))
    if left:
        raise ValueError(f"unfilled placeholders: {left}")
    return template


class DovecotLMTP(MailboxReader):
    """A private Dovecot instance speaking LMTP on ``127.0.0.1:port``."""

    mailbox_label = "Dovecot"

    def __init__(self, workdir: Path, users: list[str], port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.users = [u.lower() for u in users]
        self.port = port or free_port()
        self.host = LOOPBACK
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_dir = self.workdir / "run"
        self.state_dir = self.workdir / "state"
        self.mail_root = self.workdir / "mail"
        self.users_file = self.workdir / "users"
        self.log_path = self.workdir / "dovecot.log"
        self.conf = self.workdir / "dovecot.conf"

    @property
    def transport(self) -> str:
        """The mailwarden transport string for this server."""
        return f"lmtp:{self.host}:{self.port}"

    def _prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        traversable(self.workdir)
        os.chmod(self.workdir, 0o755)
        for d in (self.base_dir, self.state_dir, self.mail_root):
            owned_dir(d, RUN_USER, 0o755)
        pw = pwd.getpwnam(RUN_USER)
        lines = []
        for user in self.users:
            local, _, domain = user.partition("@")
            home = self.mail_root / domain / local
            lines.append(f"{user}::{pw.pw_uid}:{pw.pw_gid}::{home}::")
        self.users_file.write_text("\n".join(lines) + "\n")
        os.chmod(self.users_file, 0o644)
        self.log_path.touch()
        if os.geteuid() == 0:
            os.chown(self.log_path, pw.pw_uid, pw.pw_gid)
        text = render(
            TEMPLATE.read_text(),
            {
                "BASE_DIR": str(self.base_dir),
                "STATE_DIR": str(self.state_dir),
                "LOG_PATH": str(self.log_path),
                "ADDRESS": self.host,
                "PORT": str(self.port),
                "MAIL_ROOT": str(self.mail_root),
                "USERS_FILE": str(self.users_file),
                "RUN_USER": RUN_USER,
            },
        )
        self.conf.write_text(text)
        os.chmod(self.conf, 0o644)

    def start(self) -> DovecotLMTP:
        self._prepare()
        cmd = ["dovecot", "-c", str(self.conf), "-F"]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", RUN_USER, "--", *cmd]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "dovecot.stderr", "wb"),  # noqa: SIM115
            start_new_session=True,
        )
        try:
            wait_port(self.port, self.host, START_DEADLINE, self.proc)
            wait_greeting(self.port, self.host, START_DEADLINE, "LMTP")
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"dovecot did not start: {exc}\n{self.diagnostics()}") from exc
        return self

    def diagnostics(self) -> str:
        out = []
        for f in (self.workdir / "dovecot.stderr", self.log_path):
            if f.exists():
                out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None

    def __enter__(self) -> DovecotLMTP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Reading delivered mail ------------------------------------------------------------
