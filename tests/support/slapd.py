"""A real OpenLDAP ``slapd`` on 127.0.0.1 for the LDAP authentication tests.

``Slapd(workdir, users={"alice": "pw", ...})`` writes a ``slapd.conf`` (mdb database under
``workdir/db``, suffix ``dc=example,dc=edu``), loads the base entries, a search service
account and one ``inetOrgPerson`` per user under ``ou=people`` with ``slapadd`` (passwords as
``{SSHA}`` hashes made by ``slappasswd``; ``aliases={"alice": ["a.smith@example.edu"]}`` adds
``mailAlternateAddress`` values from a small test schema, ``mailrecipient.schema``), and
``start()`` runs
``slapd -h ldap://127.0.0.1:PORT/ -f slapd.conf -d 0`` in its own process group, waiting until
an anonymous root-DSE search answers. ``stop()`` terminates it; ``start()`` again restarts it
on the same port with the same data.

The ACL lets anonymous clients only *authenticate* (bind) against ``userPassword``; only
the service account (``SEARCH_DN`` / ``SEARCH_PASSWORD``) may search, which is how a campus
directory is usually set up.

Security: listens on 127.0.0.1 only; its files live in the test's own directory; teardown
stops only the process group this fixture started.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.support.ports import LOOPBACK, free_port, wait_port
from tests.support.procs import stop_group

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
SLAPPASSWD = "/usr/sbin/slappasswd"
SCHEMA_DIR = Path("/etc/ldap/schema")
START_DEADLINE = 30.0  # seconds until slapd answers a search
SUFFIX = "dc=example,dc=edu"
PEOPLE = f"ou=people,{SUFFIX}"
SEARCH_DN = f"cn=mailwarden,ou=services,{SUFFIX}"
SEARCH_PASSWORD = "search-secret-1"
# mailAlternateAddress as campus directories have it (Sun/iPlanet OIDs), test use only.
MAIL_RECIPIENT_SCHEMA = """\
attributetype ( 2.16.840.1.113730.3.1.13 NAME 'mailAlternateAddress'
  EQUALITY caseIgnoreIA5Match SUBSTR caseIgnoreIA5SubstringsMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.26{256} )
objectclass ( 2.16.840.1.113730.3.2.3 NAME 'mailRecipient' SUP top AUXILIARY
  MAY mailAlternateAddress )
"""


def slapd_available() -> bool:
    return (
        all(Path(p).exists() for p in (SLAPD, SLAPADD, SLAPPASSWD))
        and (SCHEMA_DIR / "inetorgperson.schema").exists()
    )


def ssha(password: str) -> str:
    """``{SSHA}`` hash of ``password`` made by ``slappasswd`` (password via a file, not argv)."""
    return (
        subprocess.run(
            [SLAPPASSWD, "-h", "{SSHA}", "-T", "/dev/stdin"],
            input=password.encode(),
            capture_output=True,
            check=True,
            timeout=30,
        )
        .stdout.decode()
        .strip()
    )


class Slapd:
    """A private slapd with an mdb database of test users."""

    def __init__(
        self,
        workdir: Path,
        users: dict[str, str],
        port: int | None = None,
        aliases: dict[str, list[str]] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.users = dict(users)
        self.aliases = {k: list(v) for k, v in (aliases or {}).items()}
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = self.workdir / "slapd.conf"
        self.db = self.workdir / "db"
        self.log = self.workdir / "slapd.log"
        self._loaded = False

    @property
    def url(self) -> str:
        return f"ldap://{LOOPBACK}:{self.port}/"

    def _write_conf(self) -> None:
        schemas = ("core", "cosine", "nis", "inetorgperson")
        lines = [f"include {SCHEMA_DIR / s}.schema" for s in schemas]
        extra = self.workdir / "mailrecipient.schema"
        extra.write_text(MAIL_RECIPIENT_SCHEMA)
        lines += [
            f"include {extra}",
            f"pidfile {self.workdir / 'slapd.pid'}",
            f"argsfile {self.workdir / 'slapd.args'}",
            "modulepath /usr/lib/ldap",
            "moduleload back_mdb",
            "database mdb",
            "maxsize 16777216",
            f'suffix "{SUFFIX}"',
            f'rootdn "cn=admin,{SUFFIX}"',
            f"directory {self.db}",
            "access to attrs=userPassword",
            "  by anonymous auth",
            "  by * none",
            "access to *",
            f'  by dn.exact="{SEARCH_DN}" read',
            "  by anonymous auth",
            "  by * none",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _ldif(self) -> str:
        entries = [
            f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\n"
            "o: Example University\ndc: example\n",
            f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
            f"dn: ou=services,{SUFFIX}\nobjectClass: organizationalUnit\nou: services\n",
            f"dn: {SEARCH_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
            f"cn: mailwarden\nuserPassword: {ssha(SEARCH_PASSWORD)}\n",
        ]
        for uid, password in self.users.items():
            aliases = self.aliases.get(uid, [])
            extra = "objectClass: mailRecipient\n" if aliases else ""
            extra += "".join(f"mailAlternateAddress: {a}\n" for a in aliases)
            entries.append(
                f"dn: uid={uid},{PEOPLE}\nobjectClass: inetOrgPerson\n{extra}uid: {uid}\n"
                f"cn: {uid}\nsn: {uid}\nmail: {uid}@example.edu\n"
                f"userPassword: {ssha(password)}\n"
            )
        return "\n".join(entries)

    def _load(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.db.exists():
            shutil.rmtree(self.db)
        self.db.mkdir()
        self._write_conf()
        ldif = self.workdir / "base.ldif"
        ldif.write_text(self._ldif())
        res = subprocess.run(
            [SLAPADD, "-f", str(self.conf), "-l", str(ldif)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if res.returncode != 0:
            raise RuntimeError(f"slapadd failed: {res.stderr}")
        self._loaded = True

    def start(self) -> Slapd:
        if not self._loaded:
            self._load()
        self.proc = subprocess.Popen(
            [SLAPD, "-h", self.url, "-f", str(self.conf), "-d", "0"],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "ab"),  # noqa: SIM115
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_port(self.port, LOOPBACK, START_DEADLINE, self.proc)
            self._wait_answers()
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"slapd did not start: {exc}\n{self.diagnostics()}") from exc
        return self

    def _wait_answers(self) -> None:
        """An anonymous LDAPv3 bind request answered with success means slapd is serving."""
        # BindRequest(messageID 1, version 3, name "", simple "") in BER.
        request = bytes.fromhex("300c020101600702010304008000")
        end = time.monotonic() + START_DEADLINE
        while True:
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=5) as s:
                    s.sendall(request)
                    if s.recv(64)[:1] == b"\x30":
                        return
            except OSError:
                pass
            if time.monotonic() > end:
                raise TimeoutError("slapd does not answer a bind")
            time.sleep(0.1)

    def diagnostics(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None

    def __enter__(self) -> Slapd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
