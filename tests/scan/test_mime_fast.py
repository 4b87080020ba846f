"""The multipart fast path of the MIME walk (``scan.mime.simple_multipart``).

Accepted shapes are compared with the full parse (``scan.mime.parse``): the same parts
(path, file name, content type, payload) in the same order, no defects, and the same
scanner findings with the fast path on and off -- while the parser is never called. Each
rejected shape is one change to a message the fast path accepts (``BASE``), so each test
shows that one check at work: the fast path answers None, and the scanner, which then
parses, reports what it reported before.
"""

from __future__ import annotations

import base64
import quopri

import pytest

from mailwarden.core.types import Symbol
from mailwarden.scan.builtin import scan_message
from mailwarden.scan.mime import FAST_NESTING, MAX_PARTS, Part, parse, simple_multipart
from tests.scan.messages import ParseSpy, eicar, with_attachment, zip_of

CSV = b"".join(b"HIST%d,%d,C%d,%d\n" % (200 + i, i % 4 + 1, 100 + 3 * i, 20 + i) for i in range(40))


def b64(data: bytes) -> bytes:
    """Base64 in 76-character CRLF lines, as mailers write it (no final line break)."""
    enc = base64.b64encode(data)
    return b"\r\n".join(enc[i : i + 76] for i in range(0, len(enc), 76))


def qp(data: bytes) -> bytes:
    return quopri.encodestring(data).replace(b"\n", b"\r\n")


def part(*fields: str, body: bytes = b"") -> bytes:
    """One body part: its header fields, the empty line, the (encoded) body."""
    return b"".join(f.encode("utf-8", "surrogateescape") + b"\r\n" for f in fields) + b"\r\n" + body


def multipart(
    *parts: bytes,
    boundary: str = "=_b1",
    ctype: str = "multipart/mixed",
    param: str | None = None,
    preamble: bytes = b"This is a multi-part message in MIME format.\r\n",
    epilogue: bytes = b"",
    close: bool = True,
    top: tuple[str, ...] = (),
) -> bytes:
    param = f'; boundary="{boundary}"' if param is None else param
    head = [
        "From: Alice Martin <alice@example.org>",
        "To: Bob <bob@example.edu>",
        "Subject: Draft minutes",
        "MIME-Version: 1.0",
        f"Content-Type: {ctype}{param}",
        *top,
    ]
    sep = b"--" + boundary.encode()
    body = preamble + b"".join(sep + b"\r\n" + p + b"\r\n" for p in parts)
    if close:
        body += sep + b"--\r\n" + epilogue
    return part(*head, body=body)


TEXT = part(
    "Content-Type: text/plain; charset=us-ascii",
    "Content-Transfer-Encoding: 7bit",
    body=b"Dear colleagues,\r\n\r\nplease find the minutes attached.\r\n",
)
CSV_PART = part(
    'Content-Type: text/csv; name="enrolment.csv"',
    "Content-Transfer-Encoding: base64",
    'Content-Disposition: attachment; filename="enrolment.csv"',
    body=b64(CSV),
)
BASE = multipart(TEXT, CSV_PART)  # the benchmark's shape: text/plain + a base64 CSV


def full_walk(raw: bytes) -> tuple[list[Part], list[str]]:
    tree = parse(raw)
    return list(tree.parts()), tree.defects


def fast_walk(raw: bytes) -> tuple[list[Part], list[str]] | None:
    tree = simple_multipart(raw)
    return None if tree is None else (list(tree.parts()), tree.defects)


def names(symbols: list[Symbol]) -> list[str]:
    return sorted(s.name for s in symbols)


# --- accepted: the fast path's parts are the parser's -----------------------------------------

NESTED = multipart(
    part(
        'Content-Type: multipart/alternative; boundary="alt-2"',
        body=b"--alt-2\r\n"
        + part("Content-Type: text/plain", body=b"plain")
        + b"\r\n--alt-2\r\n"
        + part("Content-Type: text/html", body=b"<p>html</p>")
        + b"\r\n--alt-2--\r\n",
    ),
    CSV_PART,
)

ACCEPTED = {
    "bench-shape": BASE,
    "stdlib-attachment": with_attachment(CSV, "enrolment.csv", "text/csv"),
    "alternative-qp": multipart(
        part(
            'Content-Type: text/plain; charset="UTF-8"',
            "Content-Transfer-Encoding: quoted-printable",
            body=qp("Lunch at noon? — Alice\n".encode() * 20),
        ),
        part(
            'Content-Type: text/html; charset="UTF-8"',
            "Content-Transfer-Encoding: quoted-printable",
            body=qp(b'<div dir="ltr">Lunch at noon?</div>\n' * 20),
        ),
        ctype="multipart/alternative",
        boundary="000000000000a1b2c3d4e5f6",
        preamble=b"",
    ),
    "quoted-boundary-specials": multipart(
        TEXT, CSV_PART, boundary="----=_Part_12 x'()+,./:?", preamble=b""
    ),
    "token-boundary": multipart(
        TEXT, CSV_PART, boundary="simple-b0und.ary", param="; boundary=simple-b0und.ary"
    ),
    "folded-content-type": multipart(
        TEXT, CSV_PART, param=';\r\n\tboundary="=_b1";\r\n charset=us-ascii'
    ),
    "spaces-around-equals": multipart(TEXT, CSV_PART, param=' ;  boundary = "=_b1"  '),
    "nested-alternative": NESTED,
    "blanks-after-delimiters": BASE.replace(b"--=_b1\r\n", b"--=_b1 \t \r\n").replace(
        b"--=_b1--\r\n", b"--=_b1--\t\r\n"
    ),
    "close-at-eof-no-crlf": multipart(TEXT, CSV_PART)[: -len(b"\r\n")],
    "epilogue-junk": multipart(TEXT, CSV_PART, epilogue=b"--=_b1\r\n\xff\0 junk\n\r--=_b1x"),
    "preamble-junk": multipart(TEXT, CSV_PART, preamble=b"pre\xe9amble\n\rwith -- lines\r\n"),
    "no-part-header": multipart(part(body=b"no header at all"), CSV_PART),
    "empty-body": multipart(part("Content-Type: text/plain"), CSV_PART),
    "name-from-content-type": multipart(
        TEXT, part('Content-Type: application/pdf; name=" minutes.pdf "', body=b"%PDF-1.4")
    ),
    "uppercase-param-and-cte": multipart(
        TEXT,
        part(
            "Content-Type: Application/Octet-Stream",
            "Content-Transfer-Encoding: BASE64",
            "Content-Disposition: ATTACHMENT; FILENAME=report.bin",
            body=b64(b"\0\1\2binary"),
        ),
    ),
    "eight-bit-subject-and-body": multipart(
        part(
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
            body="Grüße\rund CR\nund LF".encode(),
        ),
        top=("X-Note: caf\udce9",),
    ),
    "digest-with-types": multipart(TEXT, TEXT, ctype="multipart/digest"),
    "base64-padding": multipart(
        part("Content-Transfer-Encoding: base64", body=b64(b"a")),
        part("Content-Transfer-Encoding: base64", body=b64(b"ab")),
        part("Content-Transfer-Encoding: base64", body=b""),
    ),
}


@pytest.mark.parametrize("raw", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_accepted_shapes_give_the_parsers_parts(raw: bytes) -> None:
    fast = fast_walk(raw)
    assert fast is not None
    parts, defects = fast
    assert defects == []
    assert (parts, defects) == full_walk(raw)
    assert len(parts) >= 1


@pytest.mark.parametrize("raw", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_accepted_shapes_are_scanned_without_the_parser(
    raw: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = scan_message(raw, fast=False)
    spy = ParseSpy(monkeypatch)
    assert scan_message(raw) == expected
    assert spy.calls == 0


def test_the_bench_shape_in_detail() -> None:
    parts, _ = fast_walk(BASE) or ([], [])
    assert [(p.path, p.filename, p.content_type) for p in parts] == [
        ("1", None, "text/plain"),
        ("2", "enrolment.csv", "text/csv"),
    ]
    assert parts[0].payload == b"Dear colleagues,\r\n\r\nplease find the minutes attached.\r\n"
    assert parts[1].payload == CSV


def test_nested_parts_are_numbered_like_the_parser() -> None:
    parts, _ = fast_walk(NESTED) or ([], [])
    assert [p.path for p in parts] == ["1.1", "1.2", "2"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(with_attachment(eicar(), "e.txt"), ["BUILTIN_VIRUS"], id="eicar-base64"),
        pytest.param(
            with_attachment(b"MZ\x90\x00" + b"\0" * 60, "invoice.pdf.exe"),
            ["ATTACH_DANGEROUS_NAME", "ATTACH_DOUBLE_EXT", "ATTACH_EXECUTABLE"],
            id="double-extension",
        ),
        pytest.param(
            with_attachment(zip_of({"tools/helper.exe": b"MZ" + b"\0" * 62}), "tools.zip"),
            ["ATTACH_DANGEROUS_NAME", "ATTACH_EXECUTABLE"],
            id="zip",
        ),
    ],
)
def test_findings_through_the_fast_path(
    raw: bytes, expected: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert simple_multipart(raw) is not None
    full = scan_message(raw, fast=False)
    spy = ParseSpy(monkeypatch)
    got = scan_message(raw)
    assert names(got) == expected and spy.calls == 0
    assert got == full


# --- rejected: one change to BASE each; the full parse decides -----------------------------


def nest(depth: int) -> bytes:
    """``depth`` multipart levels, the innermost holding one text part."""
    inner = TEXT
    for level in range(depth - 1, 0, -1):
        b = f"lvl{level}".encode()
        inner = part(
            f'Content-Type: multipart/mixed; boundary="lvl{level}"',
            body=b"--" + b + b"\r\n" + inner + b"\r\n--" + b + b"--\r\n",
        )
    return multipart(inner)


def many_parts(n: int) -> bytes:
    return multipart(*[part(body=b"%d" % i) for i in range(n)])


CSV_B64 = b64(CSV)
REJECTED = {
    "lf-only": BASE.replace(b"\r\n", b"\n"),
    "one-bare-lf-line-end": BASE.replace(b"Subject: Draft minutes\r\n", b"Subject: Draft\n"),
    "missing-close-delimiter": multipart(TEXT, CSV_PART, close=False),
    "close-delimiter-first": BASE.replace(b"\r\n\r\nThis is", b"\r\n\r\n--=_b1--\r\nThis is"),
    "no-delimiter": multipart(close=False) + b"body\r\n",
    "open-delimiter-at-eof": multipart(TEXT, close=False) + b"--=_b1",
    "too-deep": nest(FAST_NESTING + 1),
    "message-rfc822-part": multipart(
        TEXT, part("Content-Type: message/rfc822", body=b"Subject: inner\r\n\r\nhi")
    ),
    "digest-part-without-type": multipart(part(body=b"Subject: x\r\n"), ctype="multipart/digest"),
    "rfc2231-filename": BASE.replace(
        b'filename="enrolment.csv"', b"filename*=utf-8''enrolment.csv"
    ),
    "rfc2231-boundary": BASE.replace(b'boundary="=_b1"', b'boundary*="=_b1"'),
    "rfc2231-continuation": BASE.replace(
        b'filename="enrolment.csv"', b'filename*0="enrol"; filename*1="ment.csv"'
    ),
    "encoded-word-filename": BASE.replace(
        b'filename="enrolment.csv"', b'filename="=?utf-8?B?ZW5yb2xtZW50LmNzdg==?="'
    ),
    "backslash-in-filename": BASE.replace(b'filename="enrolment.csv"', b'filename="en\\"rol.csv"'),
    "double-backslash-in-filename": BASE.replace(
        b'filename="enrolment.csv"', b'filename="a\\\\b.exe"'
    ),
    "angle-brackets-token-name": multipart(
        TEXT, part("Content-Type: application/octet-stream; name=<a.exe>", body=b"x")
    ),
    "angle-brackets-in-filename": BASE.replace(
        b'filename="enrolment.csv"', b'filename="<enrolment.csv>"'
    ),
    "eight-bit-filename": BASE.replace(b'filename="enrolment.csv"', b'filename="\xe9.csv"'),
    "eight-bit-content-type": BASE.replace(b"charset=us-ascii", b"charset=\xe9"),
    "filename-as-disposition": BASE.replace(b"attachment; filename=", b"filename; x="),
    "duplicate-filename-param": BASE.replace(
        b'filename="enrolment.csv"', b'filename="a.csv"; FILENAME="b.exe"'
    ),
    "comment-in-content-type": BASE.replace(b"charset=us-ascii", b"charset=us-ascii (plain)"),
    "bare-parameter": BASE.replace(b"charset=us-ascii", b"charset"),
    "trailing-semicolon": BASE.replace(b"charset=us-ascii", b"charset=us-ascii;"),
    "semicolon-in-quoted-boundary": multipart(TEXT, boundary="a;b"),
    "no-boundary": BASE.replace(b'; boundary="=_b1"', b""),
    "empty-boundary": multipart(TEXT, param='; boundary=""'),
    "base64-garbage": BASE.replace(CSV_B64[:8], CSV_B64[:4] + b"!" + CSV_B64[5:8]),
    "base64-blank": BASE.replace(CSV_B64[:8], CSV_B64[:4] + b" " + CSV_B64[5:8]),
    "base64-unpadded": multipart(
        TEXT, part("Content-Transfer-Encoding: base64", body=b64(b"ab").rstrip(b"="))
    ),
    "base64-data-after-padding": multipart(
        TEXT, part("Content-Transfer-Encoding: base64", body=b64(b"ab") + b"\r\nQUJD")
    ),
    "eight-bit-cte": BASE.replace(b"Encoding: base64", b"Encoding: b\xe4se64"),
    "base64-three-pads": multipart(
        TEXT, part("Content-Transfer-Encoding: base64", body=b"QUJD\r\nA===")
    ),
    "base64-cte-with-blank": BASE.replace(b"Encoding: base64", b"Encoding: base64 "),
    "folded-cte": BASE.replace(b"Encoding: base64", b"Encoding:\r\n base64"),
    "uuencode": multipart(
        TEXT, part("Content-Transfer-Encoding: x-uuencode", body=b"begin 644 a\r\n`\r\nend")
    ),
    "unknown-cte": BASE.replace(b"Encoding: 7bit", b"Encoding: x-custom"),
    "multipart-cte-base64": multipart(TEXT, top=("Content-Transfer-Encoding: base64",)),
    "duplicate-content-type": BASE.replace(
        b"Content-Type: text/csv;", b"Content-Type: text/plain\r\nContent-Type: text/csv;"
    ),
    "duplicate-cte": BASE.replace(
        b"Encoding: 7bit", b"Encoding: 7bit\r\nContent-Transfer-Encoding: 7bit"
    ),
    "duplicate-mime-version-in-part": BASE.replace(
        b"Encoding: 7bit", b"Encoding: 7bit\r\nMIME-Version: 1.0\r\nMime-Version: 1.0"
    ),
    "duplicate-disposition": BASE.replace(
        b"Content-Disposition: attachment;",
        b"Content-Disposition: inline\r\nContent-Disposition: attachment;",
    ),
    "duplicate-top-content-type": BASE.replace(
        b"MIME-Version: 1.0\r\n", b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n"
    ),
    "preamble-line-like-a-delimiter": multipart(TEXT, preamble=b"--=_b1x marks the spot\r\n"),
    "preamble-delimiter-after-bare-lf": multipart(TEXT, preamble=b"x\n"),
    "boundary-inside-a-part": multipart(
        part("Content-Type: text/plain", body=b"quoting:\r\n--=_b1-not really\r\nend")
    ),
    "boundary-after-bare-lf-in-a-part": multipart(
        part("Content-Type: text/plain", body=b"a\n--=_b1\r\nb"), CSV_PART
    ),
    "boundary-after-bare-cr-in-a-part": multipart(
        part("Content-Type: text/plain", body=b"a\r--=_b1\r\nb"), CSV_PART
    ),
    "delimiter-with-trailing-text": BASE.replace(
        b"--=_b1\r\nContent-Type: text/csv", b"--=_b1 x\r\nContent-Type: text/csv"
    ),
    "delimiter-ended-by-bare-cr": BASE.replace(
        b"--=_b1\r\nContent-Type: text/csv", b"--=_b1\rContent-Type: text/csv"
    ),
    "empty-part": BASE.replace(b"--=_b1--", b"--=_b1\r\n--=_b1--"),
    "part-without-empty-line": multipart(TEXT, b"Content-Type: text/plain"),
    "invalid-content-type": multipart(part("Content-Type: text/plain/x", body=b"x")),
    "content-type-without-subtype": multipart(part("Content-Type: text", body=b"x")),
    "part-starting-with-body": multipart(b"hello\r\n\r\nworld"),
    "continuation-first-in-part": multipart(b" folded\r\nX: y\r\n\r\nbody"),
    "top-header-line-999": BASE.replace(b"Subject: Draft minutes", b"Subject: " + b"x" * 990),
    "nul-in-top-header": BASE.replace(b"Subject: Draft", b"Subject: Dr\0ft"),
    "unix-from-line": b"From alice@example.org Mon Nov 23 10:00:00 2026\r\n" + BASE,
    "single-part": part("Content-Type: application/octet-stream", body=b"x"),
    "too-many-parts": many_parts(MAX_PARTS + 1),
    # MAX_PARTS + 1 leaves in two multiparts of fewer parts each
    "too-many-leaves-nested": multipart(
        *[
            part(
                f'Content-Type: multipart/mixed; boundary="in{n}"',
                body=b"".join(b"--in%d\r\n\r\n%d\r\n" % (n, i) for i in range(MAX_PARTS // 2 + n))
                + b"--in%d--\r\n" % n,
            )
            for n in range(2)
        ]
    ),
}


def test_the_base_message_is_accepted() -> None:
    assert simple_multipart(BASE) is not None
    assert simple_multipart(nest(FAST_NESTING)) is not None
    assert simple_multipart(many_parts(MAX_PARTS)) is not None


@pytest.mark.parametrize("raw", REJECTED.values(), ids=REJECTED.keys())
def test_rejected_shapes_get_the_full_parse(raw: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    assert raw != BASE
    assert simple_multipart(raw) is None
    expected = scan_message(raw, fast=False)
    spy = ParseSpy(monkeypatch)
    assert scan_message(raw) == expected
    assert spy.calls == 1
