"""Through the real gateway (segment log on, the default): mail whose delivery is under way
lives only in a segment file, and ``mailwarden queue list/show/hold/delete`` see and take
it. The downstream accepts TCP connections and never greets, so the first attempts hang.

Security: loopback only; the hanging server is closed in teardown.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.helpers import make_message
from tests.support.tmpdirs import poll

SLOW = "slow.example.edu"


class SilentServer:
    """Accepts connections on 127.0.0.1 and never says anything."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def _by_mid(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["message_id"]: r for r in rows}


def test_queue_commands_see_and_take_messages_in_a_segment(
    gateway_factory: Any, silent: SilentServer
) -> None:
    gw = gateway_factory(
        hosted={"example.edu": "maildir", SLOW: f"smtp:127.0.0.1:{silent.port}"},
        delivery={"connect_timeout": "60s", "connection_reuse": False},
    )
    mids = []
    for name in ("keep", "hold", "gone"):
        mid, msg = make_message("s@example.edu", [f"{name}@{SLOW}"])
        assert gw.send("s@example.edu", [f"{name}@{SLOW}"], msg) == {}
        mids.append(mid)
    keep, held, gone = mids
    poll(lambda: len(silent.conns) >= 3, 30, what="three deliveries hanging")
    log = gw.state_dir / "spool" / "w0" / "log"
    assert list(log.glob("*.seg")), "the messages are in a segment"
    assert not list((gw.state_dir / "spool" / "w0" / "active").iterdir())

    rows = _by_mid(gw.queue_list())
    assert set(rows) == set(mids)
    assert all(r["state"] == "active" for r in rows.values())
    assert rows[held]["pending"] == [f"hold@{SLOW}"]
    qid = {mid: rows[mid]["queue_id"] for mid in mids}

    info = json.loads(gw.cli("queue", "show", qid[held], "--json").stdout)
    assert info["state"] == "active" and f"Message-ID: {held}" in info["headers"]

    gw.cli("queue", "hold", qid[held])
    gw.cli("queue", "delete", qid[gone])
    rows = _by_mid(gw.queue_list())
    assert set(rows) == {keep, held}
    assert rows[held]["state"] == "hold" and rows[keep]["state"] == "active"

    # The downstream goes away: the hanging attempts end with a deferral. The kept
    # message is materialised into deferred/; the taken ones are not brought back.
    silent.close()
    poll(
        lambda: _by_mid(gw.queue_list()).get(keep, {}).get("state") == "deferred",
        90,
        what="the kept message deferred",
    )
    gw.wait_event(
        lambda e: e.get("event") == "queue.deferred" and e.get("message_id") == gone,
        90,
        what="the deleted message's attempt",
    )
    gw.wait_event(
        lambda e: e.get("event") == "queue.deferred" and e.get("message_id") == held,
        90,
        what="the held message's attempt",
    )
    rows = _by_mid(gw.queue_list())
    assert set(rows) == {keep, held}, rows
    assert rows[held]["state"] == "hold"

    # A restart recovers nothing more from the segment log.
    gw.stop()
    gw.start()
    rows = _by_mid(gw.queue_list())
    assert set(rows) == {keep, held} and rows[held]["state"] == "hold"
