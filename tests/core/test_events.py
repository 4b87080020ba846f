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
