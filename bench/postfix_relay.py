"""A private Postfix instance configured as a plain relay, the benchmark's peer.

It accepts mail for one relay domain on a loopback port and forwards it to
``[127.0.0.1]:nexthop_port`` with Postfix's defaults otherwise (fsync before 250, default
concurrency), from its own config/queue/data directories so the system Postfix is untouched.
``milters`` (e.g. ``["inet:127.0.0.1:11332"]``) adds ``smtpd_milters`` with the settings a
filtering relay uses: ``milter_default_action = tempfail`` (fail closed: a milter that is
down or times out gets the client a 4xx), protocol 6, and the macros rspamd's milter needs.

Public names: ``PostfixRelay``.
Security: loopback only; no DNS (``smtp_dns_support_level = disabled``); chroot off.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"
SYSTEM_MASTER_CF = Path("/etc/postfix/master.cf")


class PostfixRelay:
    def __init__(
        self,
        root: Path,
        *,
        port: int,
        nexthop_port: int,
        relay_domain: str,
        milters: list[str] | None = None,
    ) -> None:
        self.root = root.resolve()
        self.conf = self.root / "etc"
        self.port = port
        self.nexthop_port = nexthop_port
        self.relay_domain = relay_domain
        self.milters = list(milters or [])

    def _milter_cf(self) -> str:
        if not self.milters:
            return ""
        return f"""smtpd_milters = {", ".join(self.milters)}
non_smtpd_milters =
milter_default_action = tempfail
milter_protocol = 6
milter_mail_macros = i {{mail_addr}} {{client_addr}} {{client_name}} {{auth_authen}}
"""

    def _main_cf(self) -> str:
        r = self.root
        return f"""compatibility_level = 3.6
queue_directory = {r}/spool
data_directory = {r}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = pf.bench.test
mydomain = bench.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = {self.relay_domain}
transport_maps = inline:{{ {self.relay_domain}=smtp:[127.0.0.1]:{self.nexthop_port} }}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtp_dns_support_level = disabled
alias_maps =
alias_database =
local_recipient_maps =
biff = no
maillog_file = {r}/log/maillog
maillog_file_prefixes = {r}/log
{self._milter_cf()}"""

    def _master_cf(self) -> str:
        out = []
        for line in SYSTEM_MASTER_CF.read_text().splitlines():
            fields = line.split()
            if line and not line[0].isspace() and not line.startswith("#") and len(fields) >= 8:
                if fields[0] == "smtp" and fields[1] == "inet":
                    fields[0] = f"127.0.0.1:{self.port}"
                fields[4] = "n"  # chroot off: the private queue is not a chroot jail
                line = " ".join(fields)
            out.append(line)
        return "\n".join(out) + "\n"

    def start(self) -> None:
        self.conf.mkdir(parents=True, exist_ok=True)
        for sub in ("log", "spool", "data"):
            (self.root / sub).mkdir(exist_ok=True)
        self.root.chmod(0o755)  # mkdtemp makes 0700; the postfix user must traverse it
        shutil.chown(self.root / "data", user="postfix")
        (self.conf / "main.cf").write_text(self._main_cf())
        (self.conf / "master.cf").write_text(self._master_cf())
        subprocess.run([POSTFIX, "-c", str(self.conf), "check"], check=True)
        subprocess.run(
            [POSTFIX, "-c", str(self.conf), "start"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def master_pid(self, deadline: float = 10.0) -> int:
        pidfile = self.root / "spool" / "pid" / "master.pid"
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if pidfile.exists():
                m = re.search(r"\d+", pidfile.read_text())
                if m:
                    return int(m.group())
            time.sleep(0.05)
        raise TimeoutError("Postfix master did not write its pid file")

    def stop(self) -> None:
        subprocess.run(
            [POSTFIX, "-c", str(self.conf), "stop"],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
