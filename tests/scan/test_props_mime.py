"""Property tests of the multipart fast path (``scan.mime.simple_multipart``): a differential
test against the stdlib MIME parser (``scan.mime.parse``).

Multipart messages are generated from choices that are each either clean (the shapes the
fast path is meant to take) or, in a "nasty" message, one time in 4, 16 or 64 nasty -- so a
nasty feature is often the only thing wrong with its message: boundaries (quoted, token,
folded, blank-padded, RFC 2231, duplicated, empty, equal to or a prefix of an outer one),
nested multiparts (past the fast path's depth, digests), part headers (duplicates, 8-bit,
comments, encoded words, RFC 2231, bare or repeated parameters, backslashes, folded or
blank-padded encodings), payloads in every transfer encoding (base64 good and broken,
quoted-printable, uuencode, raw bytes with bare CR and LF, lines that look like
delimiters), preambles and epilogues, blanks after delimiters, missing, repeated or
mangled delimiters, LF line ends; then the bytes are mutated. For every message:

- whenever ``simple_multipart`` answers, the full parse has no defect and the same parts:
  path, file name, content type and payload, in the same order;
- ``scan_message`` gives the same symbols with and without its fast paths.

A third property keeps the first honest: clean messages are all taken by the fast path,
so the comparison is not vacuous.
"""

from __future__ import annotations

import base64
import binascii
import quopri
from typing import TypeVar

from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from mailwarden.scan.builtin import EICAR, scan_message
from mailwarden.scan.mime import FAST_NESTING, parse, simple_multipart
from tests.support.properties import examples

T = TypeVar("T")
BCHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=?"


def chance(draw: st.DrawFn, nasty: int) -> bool:
    """Whether to go wrong here: never in a clean message (``nasty`` 0), else one in ``nasty``."""
    return nasty > 0 and draw(st.integers(0, nasty - 1)) == 0


def pick(draw: st.DrawFn, nasty: int, clean: st.SearchStrategy[T], bad: st.SearchStrategy[T]) -> T:
    """A clean choice, or now and then (see ``chance``) a nasty one."""
    return draw(bad if chance(draw, nasty) else clean)


PAYLOADS = st.one_of(
    st.binary(max_size=60),
    st.text(max_size=60).map(lambda t: t.encode("utf-8")),
    st.sampled_from(
        [
            b"Dear colleagues,\r\nplease see the attachment.\r\n",
            EICAR + b"$H+H*",
            b"MZ\x90\x00" + b"\0" * 20,
            b"line\r\n--B\r\nnot a part\r\n",
            b"a\rb\nc\r\n\r\n",
            b"=41=\r\nsoft break",
            b"",
        ]
    ),
)
CLEAN_BOUNDARIES = st.one_of(
    st.sampled_from(["B", "=_b1", "----=_Part_1_2.3", "000000000000a1b2c3", "x y"]),
    st.text(BCHARS, min_size=1, max_size=20),
)
NASTY_BOUNDARIES = st.one_of(
    st.sampled_from(["B-", "--", "B ", " B", "-", "a;b", "", 'a"b', "a\\b", "<b>", "\udce9"]),
    st.text(BCHARS + ' ;"\\<>\t', min_size=1, max_size=12),
)


def boundary_params(boundary: str) -> tuple[list[str], list[str]]:
    """Clean and nasty ways to announce ``boundary`` in a Content-Type."""
    clean = [
        f'; boundary="{boundary}"',
        f';\r\n\tboundary="{boundary}"',
        f' ;  BOUNDARY = "{boundary}" ; charset=us-ascii',
        f'; boundary="{boundary}  "',  # trailing blanks: get_boundary() drops them
    ]
    if all(c.isalnum() or c in "-_.=+'" for c in boundary):
        clean.append(f"; boundary={boundary}")
    nasty = [
        f"; boundary={boundary}",
        f'; boundary*="{boundary}"',
        f"; boundary*=us-ascii''{boundary}",
        f'; boundary*0="{boundary}"',
        f'; boundary="{boundary}"; boundary="other"',
        f'; charset=x (comment); boundary="{boundary}"',
        f'; boundary="{boundary}";',
        f'; boundary="{boundary}" (c)',
        f'; boundary="=?utf-8?q?{boundary}?="',
        "",
        '; boundary=""',
        f'; boundary="{boundary}\\"x"',
        "; boundary",
    ]
    return clean, nasty


CLEAN_TYPES = st.sampled_from(
    [
        "text/plain",
        "text/plain; charset=us-ascii",
        'text/html; charset="UTF-8"',
        "TEXT/Plain;\r\n\tcharset=utf-8",
        'application/pdf; name="minutes.pdf"',
        "image/png; name=logo.png",
        'application/octet-stream; name=" spaced.bin "',
        'application/zip; NAME="a.zip"; x-mac-type=0',
        'application/x-msdownload; name="invoice.pdf.exe"',
        "text/plain ; format=flowed ;\r\n delsp=yes",
    ]
)
NASTY_TYPES = st.one_of(
    st.sampled_from(
        [
            "text/plain/x",
            "text",
            "",
            "/",
            "text/plain (comment)",
            "text/plain; charset",
            "text/plain;",
            "text/plain;; charset=x",
            "application/octet-stream; name*=utf-8''a.exe",
            'application/octet-stream; name*0="a"; name*1=".exe"',
            'application/octet-stream; name="=?utf-8?q?a.exe?="',
            'application/octet-stream; name="a\\".exe"',
            'application/octet-stream; name="a\\\\b.exe"',
            'application/octet-stream; name="<a.exe>"',
            "application/octet-stream; name=<a.exe>",
            'application/octet-stream; name="caf\udce9.exe"',
            'application/octet-stream; name="a;b.exe"',
            'application/octet-stream; name="a.exe"; NAME="b.txt"',
            'application/octet-stream; name="a.exe',
            "message/rfc822",
            "message/delivery-status",
            "multipart/mixed",
            "multipart/mixed; boundary=zz",
            "text/pl\udce9in",
            "text/plain\x0b",
        ]
    ),
    st.text(max_size=20),
)
CLEAN_DISPOSITIONS = st.sampled_from(
    [
        None,
        "inline",
        "attachment",
        'attachment; filename="enrolment.csv"',
        "attachment; filename=report.pdf",
        'ATTACHMENT;\r\n FILENAME="invoice.pdf.exe"',
        'inline; filename=" x.txt "; size=42',
        'attachment; creation-date="Mon, 23 Nov 2026 10:00:00 +0000"; filename=a.js',
    ]
)
NASTY_DISPOSITIONS = st.one_of(
    st.sampled_from(
        [
            "filename",
            "FileName; x=1",
            'filename="a.exe"',
            "attachment; filename*=utf-8''a.exe",
            "attachment; filename*0=a; filename*1=.exe",
            'attachment; filename="=?utf-8?B?YS5leGU=?="',
            'attachment; filename="a.exe"; filename="b.txt"',
            'attachment; filename="a\\\\b.exe"',
            'attachment; filename="a\\b.exe"',
            'attachment; filename="caf\udce9.exe"',
            "attachment; filename",
            'attachment; filename="a.exe" (c)',
            'attachment; filename="<a.exe>"',
            "",
        ]
    ),
    st.text(max_size=20),
)
CLEAN_ENCODINGS = st.sampled_from(
    [None, "7bit", "8bit", "binary", "quoted-printable", "Quoted-Printable", "base64", "BASE64"]
)
NASTY_ENCODINGS = st.one_of(
    st.sampled_from(
        [
            "base64 ",
            "\r\n base64",
            "x-uuencode",
            "uuencode",
            "bogus",
            "",
            "7bit\r\n ",
            "b\udce9se64",
        ]
    ),
    st.text(max_size=10),
)
OTHER_FIELDS = st.sampled_from(
    [
        "Content-ID: <part1@example.org>",
        "Content-Description: caf\udce9",
        "X-Attachment-Id: f_1",
        "Content-Language: en",
        "X-Folded: one\r\n two",
    ]
)


def _fields(fields: list[str]) -> bytes:
    return b"".join(f.encode("utf-8", "surrogateescape") + b"\r\n" for f in fields)


def _encode(draw: st.DrawFn, nasty: int, payload: bytes, cte: str | None) -> bytes:
    name = (cte or "").strip().lower()
    if not chance(draw, nasty):
        payload = payload.replace(b"-", b"_")  # no line that looks like a delimiter
    if name == "quoted-printable":
        return quopri.encodestring(payload).replace(b"\n", b"\r\n")
    if name == "base64":
        enc = base64.b64encode(payload)
        width = draw(st.sampled_from([76, 64, 4, 1000]))
        newline = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
        body = newline.join(enc[i : i + width] for i in range(0, len(enc), width))
        if chance(draw, nasty):  # broken base64
            at = draw(st.integers(0, len(body)))
            bad = draw(st.sampled_from([b"!", b"=", b"==", b"A", b" ", b"\xff", b"\r", b"-"]))
            body = body[:at] + bad + body[at:]
        return body
    if "uu" in name:
        return b"begin 644 x\r\n" + binascii.b2a_uu(payload[:45]).replace(b"\n", b"\r\n") + b"`"
    return payload


@st.composite
def leaf(draw: st.DrawFn, nasty: int) -> bytes:
    fields: list[str] = []
    if draw(st.integers(0, 5)):  # mostly with a Content-Type
        fields.append(f"Content-Type: {pick(draw, nasty, CLEAN_TYPES, NASTY_TYPES)}")
    cte = pick(draw, nasty, CLEAN_ENCODINGS, NASTY_ENCODINGS)
    if cte is not None:
        fields.append(f"Content-Transfer-Encoding: {cte}")
    disposition = pick(draw, nasty, CLEAN_DISPOSITIONS, NASTY_DISPOSITIONS)
    if disposition is not None:
        fields.append(f"Content-Disposition: {disposition}")
    fields += draw(st.lists(OTHER_FIELDS, max_size=2))
    if fields and chance(draw, nasty):  # a repeated field
        fields.append(draw(st.sampled_from(fields)))
    fields = draw(st.permutations(fields))
    return _fields(fields) + b"\r\n" + _encode(draw, nasty, draw(PAYLOADS), cte)


@st.composite
def multipart_body(
    draw: st.DrawFn, nasty: int, depth: int, outer: tuple[str, ...]
) -> tuple[bytes, str]:
    """A multipart body and the Content-Type value that announces it."""
    # Clean: each level's boundary has its own prefix, so none is a prefix of another.
    boundary = f"d{depth}" + pick(draw, nasty, CLEAN_BOUNDARIES, NASTY_BOUNDARIES)
    if outer and chance(draw, nasty):  # equal to, or a prefix of, an outer one
        o = draw(st.sampled_from(outer))
        boundary = draw(st.sampled_from([o, o + "x", o[:-1] or o]))
    clean_params, nasty_params = boundary_params(boundary)
    param = pick(draw, nasty, st.sampled_from(clean_params), st.sampled_from(nasty_params))
    subtype = pick(
        draw,
        nasty,
        st.sampled_from(["mixed", "alternative", "related", "signed", "x-odd"]),
        st.sampled_from(["digest", "Digest", ""]),
    )
    sep = "--" + boundary.rstrip()
    children: list[bytes] = []
    for _ in range(pick(draw, nasty, st.integers(1, 3), st.integers(0, 4))):
        deeper = depth + 1 < FAST_NESTING or chance(draw, nasty)
        if deeper and draw(st.integers(0, 3)) == 0:
            inner, inner_ct = draw(multipart_body(nasty, depth + 1, (*outer, boundary)))
            fields = [f"Content-Type: {inner_ct}"]
            fields += pick(
                draw,
                nasty,
                st.sampled_from([[], ["Content-Transfer-Encoding: 7bit"]]),
                st.sampled_from([["Content-Transfer-Encoding: base64"], ["MIME-Version: 1"] * 2]),
            )
            children.append(_fields(fields) + b"\r\n" + inner)
        else:
            children.append(draw(leaf(nasty)))
    blanks = st.sampled_from(["", "", " ", "\t", " \t "])
    preamble = pick(
        draw,
        nasty,
        st.sampled_from([b"", b"This is a multi-part message in MIME format.\r\n", b"a\rb\nc\r\n"]),
        st.sampled_from(
            [f"{sep}x\r\n", f"{sep}--\r\n", "pre\n", "pre\r", "\n", "-" + sep + "\r\n"]
        ).map(lambda s: s.encode("utf-8", "surrogateescape")),
    )
    out = preamble
    for child in children:
        line = pick(
            draw,
            nasty,
            blanks.map(lambda b: sep + b + "\r\n"),
            st.sampled_from([sep + "--", sep + "x", "-" + sep, "--other", sep, sep + "\r"]).map(
                lambda s: s + "\r\n"
            )
            | st.just(sep + "\n")
            | st.just(sep + "\r\n" + sep + "\r\n"),  # a repeated delimiter
        )
        out += line.encode("utf-8", "surrogateescape") + child + b"\r\n"
    close = pick(
        draw,
        nasty,
        blanks.map(lambda b: sep + "--" + b),
        st.sampled_from(["", sep, sep + "-", sep + "--x", "--" + sep + "--"]),
    )
    out += close.encode("utf-8", "surrogateescape")
    if depth == 0:
        out += draw(
            st.sampled_from(
                [
                    b"\r\n",
                    b"\r\n",
                    b"\r\nepilogue\r\n",
                    b"",
                    b"\r\n--" + sep.encode("utf-8", "surrogateescape"),
                ]
            )
        )
    else:
        out += draw(st.sampled_from([b"\r\n", b"\r\nepi\r\n", b"\r\n\r\n"]))
    if chance(draw, nasty):
        out = out.replace(b"\r\n", b"\n")  # LF line ends
    return out, f"multipart/{subtype}{param}"


@st.composite
def multipart_message(draw: st.DrawFn, nasty: int) -> bytes:
    """A whole message: top header, then a multipart body (possibly nested)."""
    subject = draw(st.sampled_from(["minutes", "caf\udce9", "x" * 120]))
    fields = ["From: a@example.org", f"Subject: {subject}", "MIME-Version: 1.0"]
    fields += pick(
        draw,
        nasty,
        st.sampled_from([[], ["Content-Transfer-Encoding: 7bit"], ["X-Folded: a\r\n\tb"]]),
        st.sampled_from(
            [
                ["MIME-Version: 1.0"],
                ["Content-Transfer-Encoding: base64"],
                ["Content-Transfer-Encoding: 7bit "],
                ["Content-Type: text/plain"],
                ["Subject: " + "x" * 990],
                ["X-Nul: \0"],
            ]
        ),
    )
    body, ctype = draw(multipart_body(nasty, 0, ()))
    fields.append(f"Content-Type: {ctype}")
    head = _fields(draw(st.permutations(fields))) + b"\r\n"
    if chance(draw, nasty):
        head = b"From alice@example.org Mon Nov 23 10:00:00 2026\r\n" + head
    return head + body


SNIPPETS = [b"\r", b"\n", b"\0", b" ", b"\t", b":", b"\r\n", b"\r\n\r\n", b"\xff", b"-", b"--"]
SNIPPETS += [b"=", b'"', b";", b"\\", b"*", b"\r\n--d0B\r\n", b"\r\n--d0B--\r\n"]


@st.composite
def mutate(draw: st.DrawFn, raw: bytes) -> bytes:
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))):
        at = draw(st.integers(0, len(raw)))
        op = draw(st.sampled_from(["insert", "delete", "duplicate", "truncate", "crlf"]))
        if op == "insert":
            raw = raw[:at] + draw(st.sampled_from(SNIPPETS)) + raw[at:]
        elif op == "delete":
            raw = raw[:at] + raw[at + 1 :]
        elif op == "duplicate":
            end = draw(st.integers(at, min(len(raw), at + 40)))
            raw = raw[:end] + raw[at:end] + raw[end:]
        elif op == "crlf":  # the next line end becomes a bare LF or CR
            found = raw.find(b"\r\n", at)
            if found >= 0:
                raw = raw[:found] + draw(st.sampled_from([b"\n", b"\r"])) + raw[found + 2 :]
        else:
            raw = raw[:at]
    return raw


# Clean, or nasty one choice in 4, 16 or 64 (a nasty feature often alone), then mutated.
messages = st.sampled_from([0, 4, 16, 64]).flatmap(multipart_message).flatmap(mutate)

# Shapes worth a fixed place: a digest (its untyped parts are message/rfc822) nested in a
# mixed, boundaries that are prefixes of each other, a quoted boundary with trailing blanks.
NESTED_DIGEST = (
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\n"
    b"Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\nSubject: x\r\n\r\nhi\r\n"
    b"--d--\r\n\r\n--o--\r\n"
)
PREFIX_BOUNDARIES = (
    b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="B"\r\n\r\n--B\r\n'
    b'Content-Type: multipart/alternative; boundary="B-x"\r\n\r\n--B-x\r\n\r\none\r\n'
    b"--B-x--\r\n--B--\r\n"
)
BLANK_PADDED_BOUNDARY = (
    b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="B  "\r\n\r\n--B\r\n'
    b"\r\none\r\n--B  \r\n\r\ntwo\r\n--B--\r\n"
)


def walk_full(raw: bytes) -> tuple[list[tuple[str, str | None, str, bytes]], list[str]]:
    tree = parse(raw)
    return [(p.path, p.filename, p.content_type, p.payload) for p in tree.parts()], tree.defects


def walk_fast(raw: bytes) -> tuple[list[tuple[str, str | None, str, bytes]], list[str]] | None:
    tree = simple_multipart(raw)
    if tree is None:
        return None
    return [(p.path, p.filename, p.content_type, p.payload) for p in tree.parts()], tree.defects


@settings(max_examples=examples(600))
@given(raw=messages)
@example(raw=NESTED_DIGEST)
@example(raw=PREFIX_BOUNDARIES)
@example(raw=BLANK_PADDED_BOUNDARY)
def test_fast_path_parts_are_the_parsers_parts(raw: bytes) -> None:
    fast = walk_fast(raw)
    event(f"fast path taken: {fast is not None}")
    if fast is None:
        return
    assert fast == walk_full(raw)
    assert fast[1] == []


@settings(max_examples=examples(300))
@given(raw=messages)
@example(raw=NESTED_DIGEST)
@example(raw=PREFIX_BOUNDARIES)
def test_fast_path_gives_the_same_symbols(raw: bytes) -> None:
    assert scan_message(raw, fast=True) == scan_message(raw, fast=False)


@settings(max_examples=examples(200))
@given(raw=multipart_message(nasty=0))
@example(raw=BLANK_PADDED_BOUNDARY)
def test_clean_multiparts_take_the_fast_path(raw: bytes) -> None:
    fast = walk_fast(raw)
    assert fast is not None
    assert fast == (walk_full(raw)[0], [])
