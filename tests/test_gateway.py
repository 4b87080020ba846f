"""The gateway process model: banner, prefork workers, signals, worker restart.

Real ``mailwarden serve`` subprocesses on loopback ports.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.support.gateway import Gateway
from tests.support.ports import LOOPBACK, wait_closed
from tests.support.tmpdirs import poll


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        out.extend(int(x) for x in Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def test_banner_says_where_it_listens_and_where_mail_goes(tmp_path: Path) -> None:
    gw = Gateway(tmp_path).start()
    try:
        out = gw.output()
        assert f"smtp        127.0.0.1:{gw.smtp_port}  STARTTLS, inbound" in out
        assert f"smtps       127.0.0.1:{gw.smtps_port}  implicit TLS, submission" in out
        assert "example.edu -> Maildir under" in out
        assert "generated a self-signed certificate" in out
    finally:
        gw.stop()


def test_sigterm_stops_every_worker_cleanly(tmp_path: Path) -> None:
    gw = Gateway(tmp_path, workers=2).start()
    assert gw.proc is not None
    parent = gw.proc.pid
    workers = _children(parent)
    assert len(workers) == 2
    # The listening sockets are the supervisor's: the port answers before every worker has
    # started. A worker still starting up when SIGTERM comes simply exits (it has nothing
    # to finish); this test is about workers that are running.
    poll(lambda: len(gw.events("gateway.worker_started")) == 2, 60, what="both workers started")
    assert gw.send("a@example.org", ["u@example.edu"], b"Subject: x\r\n\r\nhi\r\n") == {}
    code = gw.stop()
    assert code == 0  # exited by itself on SIGTERM, not killed by the fixture's fallback
    for pid in workers:
        assert not _alive(pid)
    starts = gw.events("gateway.worker_stopped")
    assert len(starts) == 2


def test_killed_supervisor_leaves_no_worker_behind(tmp_path: Path) -> None:
    gw = Gateway(tmp_path, workers=2).start()
    assert gw.proc is not None
    workers = _children(gw.proc.pid)
    os.kill(gw.proc.pid, signal.SIGKILL)  # only the parent: the workers must follow
    gw.proc.wait(30)
    for pid in workers:
        poll(lambda pid=pid: not _alive(pid), 30, what=f"worker {pid} to exit")
    wait_closed(gw.smtp_port, LOOPBACK, deadline=30)
    gw.proc = None
    gw.start()  # the ports are free again and the spool is picked up
    try:
        assert gw.send("a@example.org", ["u@example.edu"], b"Subject: y\r\n\r\nhi\r\n") == {}
        gw.wait_messages("u@example.edu", 1)
    finally:
        gw.stop()


def test_a_crashed_worker_is_restarted(tmp_path: Path) -> None:
    gw = Gateway(tmp_path, workers=2).start()
    try:
        assert gw.proc is not None
        victim = _children(gw.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        gw.wait_event(
            lambda e: e["event"] == "gateway.worker_died" and e["pid"] == victim,
            what="worker_died event",
        )
        poll(
            lambda: len(_children(gw.proc.pid)) == 2 if gw.proc else False,
            30,
            what="a replacement worker",
        )
        for i in range(4):
            assert (
                gw.send("a@example.org", ["u@example.edu"], f"Subject: {i}\r\n\r\nhi\r\n".encode())
                == {}
            )
        gw.wait_messages("u@example.edu", 4)
    finally:
        gw.stop()
