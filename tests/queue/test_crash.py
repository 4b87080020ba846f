"""SIGKILL at a random moment during enqueues: every ledgered message survives intact."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailwarden.queue.spool import QueueState, Spool
from tests.queue.crash_enqueuer import body_for

ROOT = Path(__file__).resolve().parents[2]
MIN_LEDGERED = 50  # wait for at least this many acknowledged messages before the kill


def _ledger(path: Path) -> list[str]:
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    return [ln.decode() for ln in lines[:-1] if ln]  # last element: torn or empty


@pytest.mark.parametrize("mode", ["files", "segment"])
def test_sigkill_during_enqueue_loses_nothing(tmp_path: Path, mode: str) -> None:
    root, ledger = tmp_path / "spool", tmp_path / "ledger"
    for _round in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.queue.crash_enqueuer", str(root), str(ledger), mode],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            start = len(_ledger(ledger))
            deadline = time.monotonic() + 60
            while len(_ledger(ledger)) < start + MIN_LEDGERED:
                assert proc.poll() is None, "enqueuer died on its own"
                assert time.monotonic() < deadline, "enqueuer made no progress"
                time.sleep(0.01)
            time.sleep(random.uniform(0, 0.3))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        spool = Spool(root, "w0")
        spool.recover()
        present = set(spool.ids(QueueState.ACTIVE))
        acknowledged = _ledger(ledger)
        missing = [q for q in acknowledged if q not in present]
        assert not missing, f"{len(missing)} acknowledged messages lost"
        for qid in acknowledged:
            msg = spool.load(qid, QueueState.ACTIVE)
            assert spool.read_data(msg) == body_for(qid)
            assert msg.pending == ("a@example.edu", "b@example.edu")
        # Unacknowledged but complete files are fine (killed between rename and ledger).
        for qid in present - set(acknowledged):
            spool.read_data(spool.load(qid, QueueState.ACTIVE))
        assert os.listdir(spool.dir(QueueState.INCOMING)) == []
        assert not list((root / "w0" / "log").glob("*.seg"))  # all materialised
        assert spool.ids(QueueState.CORRUPT) == []  # a torn tail is not corruption
