"""ClamAV scanner against a real clamd with the project's signature database (CP-E4, SU-5).

Also the fail-closed cases (CP-E3): clamd stopped and restarted, a fake clamd answering
garbage, a listener that never answers, a stream over clamd's size limit, and a signature
database past its maximum age. The clamd-stopped and size-limit cases run both with pooled
sessions (the default) and with ``session_idle = 0``; the pool itself is tested in
test_clamav_sessions.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from mailwarden.core.events import MemorySink
from mailwarden.core.types import Direction
from mailwarden.scan import Action, BuiltinScanner, ClamdScanner, ScanSettings, VerdictEngine
from mailwarden.scan.clamav import ClamdError, parse_reply, parse_version
from mailwarden.scan.settings import ClamavSettings
from tests.scan.messages import eicar, ham, marker, plain, scan_input, with_attachment, zip_of
from tests.support.clamd import Clamd, FakeBrokenClamd, SilentListener, build_db

TESTFILES = Path("/usr/share/clamav-testfiles")
EXPECTED_TESTFILES = 44


_made: list[ClamdScanner] = []


def scanner(address: str, **kw: object) -> ClamdScanner:
    s = ClamdScanner(ClamavSettings(socket=address, **kw))  # type: ignore[arg-type]
    _made.append(s)
    return s


@pytest_asyncio.fixture(autouse=True)
async def _close_scanners() -> AsyncIterator[None]:
    """End the pooled clamd sessions of the test's scanners, as the gateway does."""
    yield
    while _made:
        await _made.pop().aclose()


def engine_for(*scanners: object, **kw: object) -> VerdictEngine:
    return VerdictEngine(list(scanners), ScanSettings(**kw))  # type: ignore[arg-type]


def names(symbols: list) -> list[str]:  # type: ignore[type-arg]
    return [s.name for s in symbols]


# --- detection -----------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: plain(eicar()), id="plain-body"),
        pytest.param(lambda: with_attachment(eicar(), "eicar.com"), id="base64-attachment"),
        pytest.param(
            lambda: with_attachment(
                zip_of({"x/eicar.com": eicar()}), "files.zip", "application/zip"
            ),
            id="inside-zip",
        ),
    ],
)
async def test_eicar_detected_and_quarantined(clamd: Clamd, make: Callable[[], bytes]) -> None:
    s = scanner(clamd.address)
    symbols = await s.scan(scan_input(make()))
    assert names(symbols) == ["CLAMAV_VIRUS"]
    assert "EICAR" in symbols[0].detail and symbols[0].detail.endswith("UNOFFICIAL")
    verdict = await engine_for(s).judge(scan_input(make()))
    assert verdict.action is Action.QUARANTINE
    assert verdict.control is not None and verdict.control.value == "CP-E4"


@pytest.mark.asyncio
async def test_eicar_outbound_is_su5(clamd: Clamd) -> None:
    verdict = await engine_for(scanner(clamd.address)).judge(
        scan_input(plain(eicar()), Direction.OUTBOUND)
    )
    assert verdict.action is Action.QUARANTINE
    assert verdict.control is not None and verdict.control.value == "SU-5"


def test_all_testfiles_present() -> None:
    if not TESTFILES.is_dir():
        pytest.skip("clamav-testfiles not installed")
    assert len([p for p in TESTFILES.iterdir() if p.is_file()]) == EXPECTED_TESTFILES


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "name", sorted(p.name for p in TESTFILES.iterdir()) if TESTFILES.is_dir() else []
)
async def test_clamav_testfile_in_mime_detected(clamd: Clamd, name: str) -> None:
    data = (TESTFILES / name).read_bytes()
    raw = with_attachment(data, name, subject=f"testfile {name}")
    symbols = await scanner(clamd.address).scan(scan_input(raw))
    assert names(symbols) == ["CLAMAV_VIRUS"], symbols
    assert symbols[0].detail.startswith("Mailwarden.Test.")


@pytest.mark.asyncio
async def test_project_signatures_ndb_and_ldb(clamd: Clamd) -> None:
    s = scanner(clamd.address)
    got = await s.scan(scan_input(with_attachment(b"data " + marker() + b" end", "a.bin")))
    assert [x.detail for x in got] == ["Mailwarden.Test.Marker-NDB.UNOFFICIAL"]
    a, b = b"MAILWARDEN-LOGICAL-" + b"PART-A", b"MAILWARDEN-LOGICAL-" + b"PART-B"
    both = await s.scan(scan_input(with_attachment(a + b"\n" + b, "two.txt", "text/plain")))
    assert [x.detail for x in both] == ["Mailwarden.Test.Logical-LDB.UNOFFICIAL"]
    one = await s.scan(scan_input(with_attachment(a + b"\n", "one.txt", "text/plain")))
    assert one == []


@pytest.mark.asyncio
async def test_ham_is_clean_over_unix_and_tcp(clamd: Clamd) -> None:
    for address in (clamd.address, clamd.tcp_address):
        assert await scanner(address).scan(scan_input(ham())) == []


@pytest.mark.asyncio
async def test_signature_status_reports_version_and_fresh_date(
    clamd: Clamd, events: MemorySink
) -> None:
    status = await scanner(clamd.address).signature_status()
    assert status.engine.startswith("ClamAV ")
    assert status.db_version == 4242
    assert status.age is not None and status.age < 3600
    assert not [e for e in events.events if e.name == "scan.signatures_stale"]


# --- fail closed (CP-E3) -------------------------------------------------------------------


SESSION_MODES = pytest.mark.parametrize(
    "session_idle", [10.0, 0.0], ids=["sessions", "connection-per-scan"]
)


@pytest.mark.asyncio
@SESSION_MODES
async def test_clamd_stopped_tempfails_then_recovers(
    clamd_factory: Callable[..., Clamd], session_idle: float
) -> None:
    c = clamd_factory()
    s = scanner(c.address, version_check_interval=0, session_idle=session_idle)
    engine = engine_for(s, BuiltinScanner())
    assert (await engine.judge(scan_input(ham()))).action is Action.ACCEPT
    c.stop()
    verdict = await engine.judge(scan_input(ham()))
    assert verdict.action is Action.TEMPFAIL
    assert "CLAMAV_FAIL" in verdict.symbol_names
    assert verdict.reply()[:2] == (451, "4.7.1")
    assert verdict.control is not None and verdict.control.value == "CP-E3"
    c.start()
    assert (await engine.judge(scan_input(ham()))).action is Action.ACCEPT
    assert (await engine.judge(scan_input(plain(eicar())))).action is Action.QUARANTINE


@pytest.mark.asyncio
@SESSION_MODES
async def test_clamd_stopped_after_version_check_still_fails(
    clamd_factory: Callable[..., Clamd], session_idle: float
) -> None:
    c = clamd_factory()
    # VERSION cached for 300 s: the INSTREAM itself must fail (a pooled session too)
    s = scanner(c.address, session_idle=session_idle)
    assert await s.scan(scan_input(ham())) == []
    c.stop()
    assert names(await s.scan(scan_input(ham()))) == ["CLAMAV_FAIL"]
    assert names(await s.scan(scan_input(plain(eicar())))) == ["CLAMAV_FAIL"]
    c.start()
    assert names(await s.scan(scan_input(plain(eicar())))) == ["CLAMAV_VIRUS"]


@pytest.mark.asyncio
@pytest.mark.parametrize("good_version", [True, False], ids=["instream-garbage", "version-garbage"])
async def test_garbage_reply_is_fail(good_version: bool) -> None:
    fake = FakeBrokenClamd(good_version=good_version).start()
    try:
        verdict = await engine_for(scanner(fake.address)).judge(scan_input(ham()))
    finally:
        fake.stop()
    assert fake.connections >= 1
    assert verdict.action is Action.TEMPFAIL
    assert verdict.symbol_names == ["CLAMAV_FAIL"]


@pytest.mark.asyncio
async def test_plausible_but_wrong_reply_is_fail() -> None:
    fake = FakeBrokenClamd(b"stream: something else entirely\0").start()
    try:
        symbols = await scanner(fake.address).scan(scan_input(ham()))
    finally:
        fake.stop()
    assert names(symbols) == ["CLAMAV_FAIL"]


@pytest.mark.asyncio
async def test_silent_daemon_times_out_as_fail() -> None:
    silent = SilentListener().start()
    try:
        s = scanner(silent.address, timeout=1.0)
        verdict = await engine_for(s).judge(scan_input(ham()))
    finally:
        silent.stop()
    assert verdict.action is Action.TEMPFAIL
    assert verdict.symbol_names == ["CLAMAV_FAIL"]
    assert "no answer" in verdict.symbols[0].detail


@pytest.mark.asyncio
@SESSION_MODES
async def test_stream_over_clamd_limit_is_fail(
    clamd_factory: Callable[..., Clamd], session_idle: float
) -> None:
    c = clamd_factory(stream_max="1M")
    raw = with_attachment(bytes(range(256)) * 8192, "big.bin")  # 2 MB, base64 ~2.7 MB
    symbols = await scanner(c.address, session_idle=session_idle).scan(scan_input(raw))
    assert names(symbols) == ["CLAMAV_FAIL"]
    # clamd answers "INSTREAM size limit exceeded" and closes; when its close overtakes the
    # upload, the socket reports the broken pipe before the reply can be read. Either way
    # the message is not scanned and must fail closed, which is what is asserted.
    detail = symbols[0].detail
    assert "size limit" in detail or "connection failed" in detail, detail


@pytest.mark.asyncio
async def test_old_signatures_fail_closed_with_event(
    tmp_path: Path, clamd_factory: Callable[..., Clamd], events: MemorySink
) -> None:
    db = build_db(tmp_path / "olddb", version=17, date="3 days ago")
    c = clamd_factory(db)
    assert "/17/" in c.version()
    s = scanner(c.address, max_signature_age=86400)
    verdict = await engine_for(s, BuiltinScanner()).judge(scan_input(ham()))
    assert verdict.action is Action.TEMPFAIL
    assert verdict.symbol_names == ["CLAMAV_FAIL"]
    assert "too old" in verdict.symbols[0].detail
    stale = [e for e in events.events if e.name == "scan.signatures_stale"]
    assert len(stale) == 1
    assert stale[0].fields["fail_closed"] is True
    assert 70 < stale[0].fields["age_hours"] < 74
    assert stale[0].fields["control"] == "SU-5"


@pytest.mark.asyncio
async def test_stale_but_within_max_age_alerts_and_scans(
    tmp_path: Path, clamd_factory: Callable[..., Clamd], events: MemorySink
) -> None:
    db = build_db(tmp_path / "olddb", version=18, date="30 hours ago")
    c = clamd_factory(db)
    s = scanner(c.address, max_signature_age=3 * 86400)
    assert names(await s.scan(scan_input(plain(eicar())))) == ["CLAMAV_VIRUS"]
    stale = [e for e in events.events if e.name == "scan.signatures_stale"]
    assert len(stale) == 1 and stale[0].fields["fail_closed"] is False


# --- protocol parsing ----------------------------------------------------------------------


def test_parse_version() -> None:
    now = time.mktime(time.strptime("Mon Nov 23 12:00:00 2026", "%a %b %d %H:%M:%S %Y"))
    st = parse_version("ClamAV 1.4.6/27450/Mon Nov 23 10:00:00 2026\0", now)
    assert (st.engine, st.db_version, st.age) == ("ClamAV 1.4.6", 27450, 7200.0)
    st = parse_version("ClamAV 1.0.0/1/Tue Nov  3 09:00:00 2026", now)
    assert st.db_version == 1 and st.age is not None and st.age > 86400 * 19
    assert parse_version("ClamAV 1.4.6", now).db_time is None
    for bad in ("", "PONG", "ClamAV 1.4.6/x/Mon Nov 23 10:00:00 2026", "ClamAV 1/2/yesterday"):
        with pytest.raises(ClamdError):
            parse_version(bad, now)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (b"stream: OK", []),
        (b"stream: Win.Test.EICAR_HDB-1 FOUND", ["CLAMAV_VIRUS"]),
        (b"stream: Heuristics.Phishing.Email.SpoofedDomain FOUND", ["CLAMAV_HEURISTIC"]),
        (b"INSTREAM size limit exceeded. ERROR", ["CLAMAV_FAIL"]),
        (b"stream: Can't allocate memory ERROR", ["CLAMAV_FAIL"]),
        (b"stream: two words FOUND", ["CLAMAV_FAIL"]),
        (b"stream:  FOUND", ["CLAMAV_FAIL"]),
        (b"\xff\xfe", ["CLAMAV_FAIL"]),
        (b"UNKNOWN COMMAND", ["CLAMAV_FAIL"]),
    ],
)
def test_parse_reply(reply: bytes, expected: list[str]) -> None:
    assert names(parse_reply(reply)) == expected
