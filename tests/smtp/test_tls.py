"""STARTTLS (RFC 3207), the injection defence, implicit TLS, certificates, swaks interop."""

from __future__ import annotations

import shutil
import smtplib
import ssl
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from mailwarden.smtp.tls import ensure_certificate, server_context
from tests.smtp.harness import RawClient, Running, client_context, make_config

Serve = Callable[..., Running]
MSG = b"Subject: tls\r\n\r\nHello over TLS\r\n"


def test_ensure_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    assert ensure_certificate(cert, key, "mx.test.example") is True
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"BEGIN CERTIFICATE" in cert.read_bytes()
    before = cert.read_bytes()
    assert ensure_certificate(cert, key, "mx.test.example") is False
    assert cert.read_bytes() == before
    ctx = ssl.create_default_context(cafile=str(cert))
    assert ctx.cert_store_stats()["x509"] == 1


def test_server_context_min_version(tmp_path: Path) -> None:
    cfg = make_config(tmp_path).model_copy(deep=True)
    ctx = server_context(cfg)  # generates the self-signed pair on demand
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert cfg.key_path.exists()
    cfg13 = make_config(tmp_path)
    cfg13 = cfg13.model_copy(
        update={"tls": cfg13.tls.model_copy(update={"min_version": "TLSv1.3"})}
    )
    assert server_context(cfg13).minimum_version == ssl.TLSVersion.TLSv1_3


def test_starttls_with_smtplib(serve: Serve) -> None:
    srv = serve(tls="starttls")
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as c:
        c.ehlo("client.example")
        code, _ = c.starttls(context=client_context())
        assert code == 220
        c.ehlo("client.example")
        assert not c.has_extn("starttls")  # not offered twice
        assert c.sendmail("a@b.example", ["u@example.edu"], MSG) == {}
    _, data = srv.sink.items[0]
    assert b"with ESMTPS id" in data
    assert b"(version=TLSv1.3 cipher=" in data
    tls = srv.named("smtp.tls")
    assert tls and tls[0].fields["version"] == "TLSv1.3"


def test_starttls_resets_session(serve: Serve) -> None:
    srv = serve(tls="starttls")
    c = RawClient(srv.port)
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@b.example>").startswith("250")
    assert c.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
    c.starttls()
    # HELO and the transaction are forgotten (RFC 3207 4.2).
    assert c.cmd("RCPT TO:<u@example.edu>").startswith("503 5.5.1")
    assert c.cmd("MAIL FROM:<a@b.example>") == "503 5.5.1 Error: send HELO/EHLO first"
    assert "STARTTLS" not in c.cmd("EHLO client.example")
    assert c.cmd("STARTTLS").startswith("503 5.5.1")


def test_bytes_pipelined_behind_starttls_are_dropped(serve: Serve) -> None:
    srv = serve(tls="starttls")
    c = RawClient(srv.port)
    c.cmd("EHLO client.example")
    # The classic injection: commands in the same packet as STARTTLS (CVE-2011-0411).
    c.send(
        b"STARTTLS\r\nEHLO evil.example\r\nMAIL FROM:<evil@attacker.example>\r\n"
        b"RCPT TO:<u@example.edu>\r\n"
    )
    assert c.reply() == "220 2.0.0 Ready to start TLS"
    assert c.rest == b""  # nothing answered the injected commands in plaintext
    c.starttls()
    # Had the injected EHLO/MAIL survived, RCPT would be accepted.
    assert c.cmd("RCPT TO:<u@example.edu>").startswith("503 5.5.1")
    assert c.cmd("NOOP") == "250 2.0.0 Ok"


def test_plaintext_after_starttls_breaks_handshake_not_session(serve: Serve) -> None:
    srv = serve(tls="starttls")
    c = RawClient(srv.port)
    c.cmd("EHLO client.example")
    assert c.cmd("STARTTLS").startswith("220")
    c.send(b"MAIL FROM:<evil@attacker.example>\r\n")  # plaintext where TLS is expected
    assert c.closed()
    assert srv.sink.items == []


def test_implicit_tls(serve: Serve) -> None:
    srv = serve(tls="implicit")
    with smtplib.SMTP_SSL("127.0.0.1", srv.port, timeout=10, context=client_context()) as c:
        c.ehlo("client.example")
        assert not c.has_extn("starttls")
        assert c.sendmail("a@b.example", ["u@example.edu"], MSG) == {}
    _snap, data = srv.sink.items[0]
    assert b"with ESMTPS id" in data and b"cipher=" in data
    connect = srv.named("smtp.connect")[0]
    assert connect.fields["tls"] == "TLSv1.3"


SWAKS = shutil.which("swaks")


@pytest.mark.skipif(SWAKS is None, reason="swaks is not installed")
@pytest.mark.parametrize("extra", [["--tls"], ["--pipeline"], ["--tls", "--pipeline"]])
def test_swaks_interop(serve: Serve, extra: list[str]) -> None:
    srv = serve(tls="starttls")
    assert SWAKS is not None
    proc = subprocess.run(
        [
            SWAKS,
            "--server",
            f"127.0.0.1:{srv.port}",
            "--to",
            "u@example.edu",
            "--from",
            "sender@client.example",
            "--helo",
            "client.example",
            "--header",
            "Subject: swaks test",
            "--timeout",
            "10",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "250 2.0.0 Ok: queued as" in proc.stdout
    snap, data = srv.sink.items[0]
    assert snap.recipients == ("u@example.edu",)
    assert b"Subject: swaks test" in data
    if "--tls" in extra:
        assert b"with ESMTPS" in data


@pytest.mark.skipif(SWAKS is None, reason="swaks is not installed")
def test_swaks_relay_refused(serve: Serve) -> None:
    srv = serve()
    assert SWAKS is not None
    proc = subprocess.run(
        [
            SWAKS,
            "--server",
            f"127.0.0.1:{srv.port}",
            "--to",
            "x@elsewhere.example",
            "--from",
            "sender@client.example",
            "--local-interface",
            "127.0.0.66",  # off campus (127.0.0.1 is the default registered server)
            "--timeout",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "554 5.7.1 Relay access denied (SU-6)" in proc.stdout
    assert srv.sink.items == []
