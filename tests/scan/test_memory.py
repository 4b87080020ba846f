"""Bounded memory: a 1 GB zip bomb and a 30 MB message, each scanned in a fresh process.

The 30 MB message is also scanned the way the gateway does it, through the built-in
scanner's process pool: the gateway process grows by at most about one copy of the message
(the memfd it hands to the worker lives in the page cache; where the memfd cannot be
used, the pickled argument), and the pool worker stays within the same bound as a direct
scan.

Peak RSS growth (``ru_maxrss``) of the built-in scan is compared against a bound; time is
never asserted. Inputs are built here, written to a file and read by the child in one piece,
so the child's high-water mark before the scan is just the message.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MIB = 1024
BOMB_BYTES = 1 << 30  # 1 GiB of zeros, ~1 MB compressed
BOMB_GROWTH_LIMIT_KIB = 48 * MIB  # far below the 100 MB expansion budget, let alone 1 GiB
BIG_MESSAGE = 30 * 1024 * 1024
BIG_GROWTH_LIMIT_KIB = 8 * 30 * MIB  # a small constant times the message size


POOL_PARENT_LIMIT_KIB = 3 * 30 * MIB  # the message once more, pickled for the worker
WORKER_BASE_KIB = 128 * MIB  # a fresh interpreter with the scanner imported (~70 MiB), slack


def measure(path: Path, *flags: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'src'}:{REPO}")
    out = subprocess.run(
        [sys.executable, "-m", "tests.scan.memcheck", str(path), *flags],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return dict(json.loads(out.stdout.decode().strip().splitlines()[-1]))


def mime_with(attachment_b64_lines: list[bytes], filename: str, ctype: str) -> bytes:
    head = (
        b"From: a@example.org\r\nTo: b@example.edu\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="BOUND"\r\n\r\n--BOUND\r\n'
        b"Content-Type: text/plain\r\n\r\nSee attached.\r\n--BOUND\r\n"
        b"Content-Type: " + ctype.encode() + b'; name="' + filename.encode() + b'"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="' + filename.encode() + b'"\r\n\r\n'
    )
    return head + b"\r\n".join(attachment_b64_lines) + b"\r\n--BOUND--\r\n"


def b64_lines(data: bytes) -> list[bytes]:
    enc = base64.b64encode(data)
    return [enc[i : i + 76] for i in range(0, len(enc), 76)]


def test_zip_bomb_is_a_verdict_with_bounded_memory(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.zip"
    chunk = b"\0" * (1 << 20)
    with (
        zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf,
        zf.open("zeros.bin", "w", force_zip64=True) as member,
    ):
        for _ in range(BOMB_BYTES // len(chunk)):
            member.write(chunk)
    assert bomb.stat().st_size < 5 * 1024 * 1024
    msg = tmp_path / "bomb.eml"
    msg.write_bytes(mime_with(b64_lines(bomb.read_bytes()), "invoice.zip", "application/zip"))
    result = measure(msg)
    assert [n for n, _ in result["symbols"] if n == "ARCHIVE_BOMB"] == ["ARCHIVE_BOMB"]
    assert result["growth_kib"] < BOMB_GROWTH_LIMIT_KIB, result


def test_gzip_bomb_is_a_verdict_with_bounded_memory(tmp_path: Path) -> None:
    import zlib

    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = b"\0" * (1 << 20)
    parts = [comp.compress(chunk) for _ in range(BOMB_BYTES // len(chunk))]
    gz = b"".join(parts) + comp.flush()
    assert len(gz) < 5 * 1024 * 1024
    msg = tmp_path / "gzbomb.eml"
    msg.write_bytes(mime_with(b64_lines(gz), "logs.txt.gz", "application/gzip"))
    result = measure(msg)
    bomb = [d for n, d in result["symbols"] if n == "ARCHIVE_BOMB"]
    assert bomb and "ratio" in bomb[0], result
    assert result["growth_kib"] < BOMB_GROWTH_LIMIT_KIB, result


def test_30mb_message_scanned_with_bounded_memory(tmp_path: Path) -> None:
    payload = os.urandom(BIG_MESSAGE * 3 // 4 - 4096)  # base64 makes it ~30 MB
    msg = tmp_path / "big.eml"
    msg.write_bytes(mime_with(b64_lines(payload), "data.bin", "application/octet-stream"))
    del payload
    result = measure(msg)
    assert result["size"] >= BIG_MESSAGE - 100_000
    assert result["symbols"] == []
    assert result["growth_kib"] < BIG_GROWTH_LIMIT_KIB, result


def test_30mb_message_in_the_scan_pool_with_bounded_memory(tmp_path: Path) -> None:
    payload = os.urandom(BIG_MESSAGE * 3 // 4 - 4096)
    msg = tmp_path / "big.eml"
    msg.write_bytes(mime_with(b64_lines(payload), "data.bin", "application/octet-stream"))
    del payload
    result = measure(msg, "--pool")
    assert result["size"] >= BIG_MESSAGE - 100_000
    assert result["symbols"] == []
    assert result["growth_kib"] < POOL_PARENT_LIMIT_KIB, result
    assert result["worker_kib"] < WORKER_BASE_KIB + BIG_GROWTH_LIMIT_KIB, result
