"""Events: one JSON object per line, hostile values escaped and clipped."""

from __future__ import annotations

import json
from pathlib import Path

from mailwarden.core import events
from mailwarden.core.events import MAX_FIELD, Event, JsonLinesSink, MemorySink


def test_event_line_escapes_control_characters() -> None:
    line = Event("smtp.reject", {"helo": "evil\r\nforged: line\x00", "n": 3}).to_line()
    assert line.endswith("\n") and line.count("\n") == 1
    data = json.loads(line)
    assert data["event"] == "smtp.reject"
    assert data["helo"] == "evil\r\nforged: line\x00"
    assert data["n"] == 3 and "ts" in data and "node" in data


def test_long_values_are_clipped_and_none_dropped() -> None:
    data = Event("x", {"big": "a" * (MAX_FIELD + 10), "gone": None, "raw": b"\xff"}).to_json()
    assert len(data["big"]) < MAX_FIELD + 20 and data["big"].endswith("[truncated]")
    assert "gone" not in data
    assert data["raw"] == "\\xff"


def test_json_lines_sink_appends(tmp_path: Path) -> None:
    path = tmp_path / "log" / "events.jsonl"
    sink = JsonLinesSink(str(path))
    sink.write(Event("a", {"k": 1}))
    sink.write(Event("b", {"k": 2}))
    sink.close()
    names = [json.loads(x)["event"] for x in path.read_text().splitlines()]
    assert names == ["a", "b"]


def test_emit_goes_to_the_current_sink_and_never_raises() -> None:
    mem = MemorySink()
    old = events.get_sink()
    events.set_sink(mem)
    try:
        events.emit("queue.enqueued", queue_id="Q1")
        assert [e.name for e in mem.events] == ["queue.enqueued"]

        class Broken:
            def write(self, event: Event) -> None:
                raise OSError("disk full")

        events.set_sink(Broken())
        events.emit("still.fine")  # must not raise
    finally:
        events.set_sink(old)


def test_sink_batches_within_one_loop_iteration(tmp_path: Path) -> None:
    import asyncio

    path = tmp_path / "events.jsonl"
    sink = JsonLinesSink(str(path))

    async def main() -> tuple[int, int]:
        for i in range(3):
            sink.write(Event("e", {"i": i}))
        before = len(path.read_text().splitlines())  # still pending in the buffer
        await asyncio.sleep(0)  # the loop runs the scheduled flush
        await asyncio.sleep(0)
        return before, len(path.read_text().splitlines())

    before, after = asyncio.run(main())
    assert (before, after) == (0, 3)
    sink.close()


def test_sink_writes_at_once_outside_a_loop_and_past_the_byte_limit(tmp_path: Path) -> None:
    import asyncio

    path = tmp_path / "events.jsonl"
    sink = JsonLinesSink(str(path))
    sink.write(Event("no.loop"))
    assert len(path.read_text().splitlines()) == 1

    async def main() -> int:
        big = "x" * (events.MAX_FIELD - 10)
        n = events.FLUSH_BYTES // len(big) + 2
        for _ in range(n):
            sink.write(Event("big", {"v": big}))
        return len(path.read_text().splitlines())  # no await: only the size forced a write

    assert asyncio.run(main()) > 1
    sink.close()
    assert all(json.loads(x) for x in path.read_text().splitlines())


def test_close_writes_what_is_pending(tmp_path: Path) -> None:
    import asyncio

    path = tmp_path / "events.jsonl"
    sink = JsonLinesSink(str(path))

    async def main() -> None:
        sink.write(Event("pending"))
        sink.close()

    asyncio.run(main())
    assert [json.loads(x)["event"] for x in path.read_text().splitlines()] == ["pending"]


def test_timestamps_are_rfc3339_milliseconds_and_follow_the_clock() -> None:
    import json as _json

    first = _json.loads(Event("a", {}, ts=1_700_000_000.1234).to_line())["ts"]
    same_ms = _json.loads(Event("b", {}, ts=1_700_000_000.1239).to_line())["ts"]
    later = _json.loads(Event("c", {}, ts=1_700_000_001.5).to_line())["ts"]
    assert first == same_ms == "2023-11-14T22:13:20.123+00:00"
    assert later == "2023-11-14T22:13:21.500+00:00"


def test_clip_keeps_scalars_and_subclasses_of_str() -> None:
    from enum import StrEnum

    class Kind(StrEnum):
        A = "a"

    data = Event("x", {"n": 3, "f": 1.5, "b": True, "k": Kind.A, "t": ("x" * 5000, 1)}).to_json()
    assert data["n"] == 3 and data["f"] == 1.5 and data["b"] is True and data["k"] == "a"
    assert data["t"][0].endswith("[truncated]") and data["t"][1] == 1


def test_lines_escape_control_characters_and_never_lose_an_event() -> None:
    import json as _json

    line = Event("x", {"helo": 'evil\r\n{"event":"forged"}\x00', "u": "é\u2028"}).to_bytes()
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and b"\r" not in line
    assert _json.loads(line)["helo"] == 'evil\r\n{"event":"forged"}\x00'
    # Values orjson refuses still give one parseable line (json fallback, ASCII only).
    for odd in (2**70, "lone \udc80 surrogate"):
        fallback = Event("y", {"v": odd}).to_bytes()
        assert fallback.endswith(b"\n") and fallback.count(b"\n") == 1
        assert _json.loads(fallback)["v"] == odd
