"""Built-in scanner: test strings in decoded parts, dangerous attachments, archives, MIME."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import tarfile

import pytest

from mailwarden.core.types import Symbol
from mailwarden.scan import Action, BuiltinScanner, VerdictEngine
from mailwarden.scan.builtin import scan_message
from tests.scan.messages import (
    ParseSpy,
    eicar,
    gtube,
    ham,
    plain,
    scan_input,
    with_attachment,
    zip_of,
)

ELF = b"\x7fELF\x02\x01\x01" + b"\0" * 57
PE = b"MZ\x90\x00" + b"\0" * 60


def names(symbols: list[Symbol]) -> list[str]:
    return sorted(s.name for s in symbols)


def tgz_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_ham_is_clean() -> None:
    assert scan_message(ham()) == []


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(plain(eicar()), id="plain"),
        pytest.param(with_attachment(eicar(), "e.com"), id="base64"),
        pytest.param(
            with_attachment(zip_of({"e.com": eicar()}), "e.zip", "application/zip"), id="zip"
        ),
        pytest.param(
            with_attachment(zip_of({"in.zip": zip_of({"e.txt": eicar()})}), "z.zip"),
            id="zip-in-zip",
        ),
        pytest.param(with_attachment(tgz_of({"d/e.txt": eicar()}), "e.tar.gz"), id="tgz"),
        pytest.param(with_attachment(gzip.compress(eicar()), "e.txt.gz"), id="gz"),
    ],
)
def test_eicar_found_in_decoded_content(raw: bytes) -> None:
    symbols = scan_message(raw)
    assert "BUILTIN_VIRUS" in names(symbols)
    v = asyncio.run(VerdictEngine([BuiltinScanner()]).judge(scan_input(raw)))
    assert v.action is Action.QUARANTINE


def test_eicar_base64_not_visible_in_raw() -> None:
    raw = with_attachment(eicar(), "e.com")
    assert eicar() not in raw  # so the detection above really came from decoding
    assert "BUILTIN_VIRUS" in names(scan_message(raw))


def test_gtube_rejects_without_rspamd() -> None:
    raw = with_attachment(gtube(), "note.txt", "text/plain")
    assert gtube() not in raw
    v = asyncio.run(VerdictEngine([BuiltinScanner()]).judge(scan_input(raw)))
    assert "GTUBE" in v.symbol_names and v.action is Action.REJECT


@pytest.mark.parametrize(
    ("data", "filename", "expected"),
    [
        (PE, "report.pdf", ["ATTACH_EXECUTABLE"]),
        (ELF, "photo.jpg", ["ATTACH_EXECUTABLE"]),
        (b"#!/bin/sh\nrm -rf ~\n", "run.txt", ["ATTACH_EXECUTABLE"]),
        (b"harmless", "setup.exe", ["ATTACH_DANGEROUS_NAME"]),
        (b"harmless", "invoice.pdf.exe", ["ATTACH_DANGEROUS_NAME", "ATTACH_DOUBLE_EXT"]),
        (b"harmless", "Invoice.PDF.js", ["ATTACH_DANGEROUS_NAME", "ATTACH_DOUBLE_EXT"]),
        (b"harmless", "a.vbs", ["ATTACH_DANGEROUS_NAME"]),
        (b"harmless", "x.hta", ["ATTACH_DANGEROUS_NAME"]),
        (b"harmless", "x.lnk", ["ATTACH_DANGEROUS_NAME"]),
        (b"PK-ish", "budget.xlsm", ["OFFICE_MACRO"]),
        (
            b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 100 + "_VBA_PROJECT".encode("utf-16-le"),
            "old.doc",
            ["OFFICE_MACRO"],
        ),
        (
            zip_of({"word/document.xml": b"<w/>", "word/vbaProject.bin": b"x"}),
            "a.docx",
            ["OFFICE_MACRO"],
        ),
        (
            zip_of({"tools/helper.exe": PE}),
            "tools.zip",
            ["ATTACH_DANGEROUS_NAME", "ATTACH_EXECUTABLE"],
        ),
        (b"%PDF-1.7 plain document", "paper.pdf", []),
        (zip_of({"word/document.xml": b"<w/>"}), "clean.docx", []),
    ],
)
def test_dangerous_attachments(data: bytes, filename: str, expected: list[str]) -> None:
    assert names(scan_message(with_attachment(data, filename))) == expected


def test_body_starting_with_shebang_is_not_an_attachment() -> None:
    assert scan_message(plain("#!/bin/sh is how a script starts\n")) == []


def test_encrypted_zip_member_flagged() -> None:
    z = bytearray(zip_of({"secret.doc": b"hidden content"}))
    # Set the "encrypted" flag bit in the local and central headers.
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = z.find(sig)
        z[i + off] |= 1
    assert "ARCHIVE_ENCRYPTED" in names(scan_message(with_attachment(bytes(z), "s.zip")))


def test_corrupt_zip_flagged_not_crashing() -> None:
    z = zip_of({"a.txt": b"hello world " * 100})
    broken = z[:40] + b"\xff" * 40 + z[80:]
    got = names(scan_message(with_attachment(broken, "b.zip")))
    assert "ARCHIVE_CORRUPT" in got


def test_member_count_limit() -> None:
    z = zip_of({f"f{i}.txt": b"x" for i in range(1100)})
    got = scan_message(with_attachment(z, "many.zip"))
    assert "ARCHIVE_BOMB" in names(got)
    assert "more than 1000" in next(s.detail for s in got if s.name == "ARCHIVE_BOMB")


def test_nesting_depth_limit() -> None:
    data = b"deep"
    for i in range(7):
        data = zip_of({f"l{i}.zip": data})
    got = scan_message(with_attachment(data, "deep.zip"))
    bomb = [s for s in got if s.name == "ARCHIVE_BOMB"]
    assert bomb and "nested deeper" in bomb[0].detail
    v = asyncio.run(
        VerdictEngine([BuiltinScanner()]).judge(scan_input(with_attachment(data, "d.zip")))
    )
    assert v.action is Action.QUARANTINE


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(
            b'From: a@b\r\nContent-Type: multipart/mixed; boundary="zz"\r\n\r\n'
            b"no boundary ever\r\n",
            id="missing-boundary",
        ),
        pytest.param(
            b"From: a@b\r\nContent-Type: multipart/mixed\r\n\r\nbody\r\n",
            id="multipart-without-boundary",
        ),
        pytest.param(
            b"From: a@b\r\nContent-Type: text/plain\r\nContent-Type: text/html\r\n\r\n<b>x</b>\r\n",
            id="duplicate-content-type",
        ),
        pytest.param(b"From: a@b\r\nSubject: x\0y\r\n\r\nbody\r\n", id="nul-in-header"),
        pytest.param(
            b"From: a@b\r\nX-Long: " + b"a" * 2000 + b"\r\n\r\nbody\r\n", id="long-header-line"
        ),
        pytest.param(b" continuation first\r\nFrom: a@b\r\n\r\nbody\r\n", id="continuation-first"),
    ],
)
def test_malformed_mime_is_a_symbol(raw: bytes) -> None:
    got = scan_message(raw)
    assert "MIME_MALFORMED" in names(got), got


@pytest.mark.parametrize("fast", [True, False])
def test_header_line_limit_is_998_octets_without_the_crlf(fast: bool) -> None:
    """RFC 5322 2.1.1: 998 octets plus CRLF is legal, one more is not (both paths)."""

    def message(n: int) -> bytes:
        line = b"X-Long: " + b"a" * (n - 8)
        return b"From: a@b\r\n" + line + b"\r\nSubject: s\r\n\r\nbody\r\n"

    assert "MIME_MALFORMED" not in names(scan_message(message(998), fast=fast))
    assert "MIME_MALFORMED" in names(scan_message(message(999), fast=fast))


def test_deep_mime_nesting_is_bounded() -> None:
    depth = 60
    raw = b'From: a@b\r\nContent-Type: multipart/mixed; boundary="b0"\r\n\r\n'
    for i in range(depth):
        raw += b'--b%d\r\nContent-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % (i, i + 1)
    raw += b"--b%d\r\nContent-Type: text/plain\r\n\r\nx\r\n" % depth
    for i in range(depth, -1, -1):
        raw += b"--b%d--\r\n" % i
    got = scan_message(raw)
    assert [s.detail for s in got if s.name == "MIME_MALFORMED"] == ["MimeNestingTooDeep(>20)"]


def test_bad_sha256_list() -> None:
    import hashlib

    from mailwarden.scan.settings import BuiltinSettings

    data = b"some specific payload"
    s = BuiltinScanner(BuiltinSettings(bad_sha256=[hashlib.sha256(data).hexdigest()]))
    got = asyncio.run(s.scan(scan_input(with_attachment(data, "x.bin"))))
    assert names(got) == ["BUILTIN_VIRUS"]


# --- the fast path: one text part, no MIME parser -------------------------------------------


def qp_text(body: bytes) -> bytes:
    """A quoted-printable text message whose soft line breaks split ``body`` in two."""
    half = len(body) // 2
    encoded = body[:half] + b"=\r\n" + body[half:]
    return (
        b"From: a@example.org\r\nTo: b@example.edu\r\nSubject: qp\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + encoded + b"\r\n"
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(plain(eicar()), ["BUILTIN_VIRUS"], id="eicar-plain"),
        pytest.param(qp_text(eicar().replace(b"=", b"=3D")), ["BUILTIN_VIRUS"], id="eicar-qp"),
        pytest.param(plain(gtube()), ["GTUBE"], id="gtube-plain"),
        pytest.param(qp_text(gtube()), ["GTUBE"], id="gtube-qp"),
        pytest.param(plain("MZ is how this text starts\n"), ["ATTACH_EXECUTABLE"], id="mz-body"),
        pytest.param(ham(), [], id="ham"),
    ],
)
def test_fast_path_catches_test_strings_without_the_parser(
    raw: bytes, expected: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailwarden.scan.mime import single_text_part

    assert single_text_part(raw) is not None
    spy = ParseSpy(monkeypatch)
    got = scan_message(raw)
    assert names(got) == expected and spy.calls == 0
    assert got == scan_message(raw, fast=False)  # the same findings, details and all


def test_qp_split_eicar_is_only_visible_decoded() -> None:
    raw = qp_text(eicar().replace(b"=", b"=3D"))
    assert eicar() not in raw
    assert "BUILTIN_VIRUS" in names(scan_message(raw))


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(with_attachment(b"harmless", "a.txt", "text/plain"), id="attachment"),
        pytest.param(with_attachment(eicar(), "e.com"), id="base64-attachment"),
        pytest.param(
            b"From: a@b\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; "
            b'filename="x.js"\r\n\r\nalert(1)\r\n',
            id="disposition",
        ),
        pytest.param(
            b'From: a@b\r\nContent-Type: text/plain; name="run.vbs"\r\n\r\nx\r\n', id="ct-name"
        ),
        pytest.param(
            b"From: a@b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + base64.b64encode(b"hello")
            + b"\r\n",
            id="base64-text",
        ),
        pytest.param(
            b"From: a@b\r\nContent-Type: text/plain\r\nContent-Type: text/html\r\n\r\nx\r\n",
            id="duplicate-ct",
        ),
        pytest.param(b" continuation first\r\nFrom: a@b\r\n\r\nbody\r\n", id="bad-header"),
        pytest.param(b"From: a@b\nSubject: bare LF\n\nbody\n", id="bare-lf"),
        pytest.param(b"From: a@b\r\nContent-Type: image/png\r\n\r\nx\r\n", id="not-text"),
    ],
)
def test_anything_but_one_plain_text_part_skips_the_text_fast_path(
    raw: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailwarden.scan.mime import simple_multipart, single_text_part

    assert single_text_part(raw) is None
    spy = ParseSpy(monkeypatch)
    got = scan_message(raw)
    # A simple multipart takes the multipart fast path instead (tests/scan/test_mime_fast.py).
    assert spy.calls == (0 if simple_multipart(raw) is not None else 1)
    assert got == scan_message(raw, fast=False)


def test_attachment_findings_through_the_multipart_fast_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = with_attachment(zip_of({"tools/helper.exe": PE}), "tools.zip")
    full = scan_message(raw, fast=False)
    spy = ParseSpy(monkeypatch)
    got = scan_message(raw)
    assert names(got) == ["ATTACH_DANGEROUS_NAME", "ATTACH_EXECUTABLE"]
    assert spy.calls == 0 and got == full
