"""Crash test: SIGKILL the gateway in the middle of a load; after a restart every message
that got ``250`` reaches every recipient, and duplicates stay within a stated bound.

Load: ``THREADS`` smtplib clients, each sending up to ``PER_THREAD`` messages with unique
Message-IDs to the same ``RECIPIENTS`` (hosted on the gateway's Maildir). A ledger records
each Message-ID whose DATA got ``250``; messages whose DATA was sent without a reply (the
kill) are recorded as "in doubt": they may or may not arrive, but nothing else may.

Duplicate bound: a recipient may get a message twice only if the gateway had written it
(the Maildir file renamed into ``new/``) but not yet recorded that durably when it was
killed. The test reads the events the killed gateway wrote (each is one ``write`` before
the kill, so none is lost) and checks, per recipient:

1. no message whose ``queue.removed`` event (emitted only after the durable removal) was
   written before the kill is delivered twice: completed work is never repeated;
2. the number of duplicates is at most ``in_flight``: the messages with a ``delivery.result``
   ``delivered`` event for that recipient but no ``queue.removed`` before the kill
   (delivered, completion not yet recorded), plus ``DELIVERY_CONCURRENCY * workers``
   deliveries that may have been inside the transport (file written, event not yet);
3. nothing arrives three times (one kill, one repeat at most).

Security: loopback only; loops are bounded in count and in time (``LOAD_DEADLINE``).
"""

from __future__ import annotations

import collections
import contextlib
import smtplib
import threading
import time

import pytest

from tests.e2e.helpers import make_message
from tests.support.maildir import header_value, maildir_messages
from tests.support.tmpdirs import poll

THREADS = 8
PER_THREAD = 60  # at most 480 messages in all
RECIPIENTS = ["r1@example.edu", "r2@example.edu", "r3@example.edu"]
KILL_AFTER = 120  # acknowledged messages before the SIGKILL
DELIVERY_CONCURRENCY = 4
LOAD_DEADLINE = 120.0  # seconds the load may run in all


class Load:
    """The client threads and the ledger."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.acked: set[str] = set()
        self.in_doubt: set[str] = set()
        self.refused: set[str] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(THREADS)
        ]
        self.errors: list[str] = []

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join(LOAD_DEADLINE)

    def _run(self, index: int) -> None:
        end = time.monotonic() + LOAD_DEADLINE
        client: smtplib.SMTP | None = None
        for n in range(PER_THREAD):
            if self.stop.is_set() or time.monotonic() > end:
                break
            mid, msg = make_message(
                "load@other.test",
                RECIPIENTS,
                message_id=f"<crash-{index}-{n}@load.test>",
                body=f"message {index}/{n}\r\n".encode() * 20,
            )
            try:
                if client is None:
                    client = smtplib.SMTP(
                        "127.0.0.1", self.port, timeout=30, local_hostname="load.test"
                    )
                    client.ehlo()
                client.mail("load@other.test")
                for r in RECIPIENTS:
                    code, resp = client.rcpt(r)
                    if code != 250:
                        raise smtplib.SMTPRecipientsRefused({r: (code, resp)})
                with self.lock:
                    self.in_doubt.add(mid)  # from here on the message may have been queued
                code, resp = client.data(msg)
                with self.lock:
                    if code == 250:
                        self.in_doubt.discard(mid)
                        self.acked.add(mid)
                    else:
                        self.in_doubt.discard(mid)
                        self.refused.add(mid)
                        client.rset()
            except (OSError, smtplib.SMTPException) as exc:
                # The kill: this session is gone. Stop this thread (the gateway is down).
                with self.lock:
                    self.errors.append(f"{index}/{n}: {exc!r}")
                if client is not None:
                    with contextlib.suppress(OSError):
                        client.close()
                return
        if client is not None:
            try:
                client.quit()
            except (OSError, smtplib.SMTPException):
                client.close()


def _mailbox_ids(gw, rcpt: str) -> list[str]:
    return [header_value(raw, "Message-ID") or "?" for raw in maildir_messages(gw.maildir(rcpt))]


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_during_load_loses_nothing(gateway_factory, workers):
    gw = gateway_factory(
        hosted={"example.edu": "maildir"},
        workers=workers,
        queue={"delivery_concurrency": DELIVERY_CONCURRENCY},
    )
    load = Load(gw.smtp_port)
    load.start()
    poll(
        lambda: len(load.acked) >= KILL_AFTER or not any(t.is_alive() for t in load.threads),
        LOAD_DEADLINE,
        interval=0.01,
        what=f"{KILL_AFTER} acknowledged messages",
    )
    gw.kill()  # SIGKILL parent and workers at once, mid-load
    load.stop.set()
    load.join()
    assert len(load.acked) >= KILL_AFTER, (len(load.acked), load.errors[:5])

    killed_events = gw.events()  # everything the killed gateway wrote
    gw.start()
    # Wait until the queue is empty, then until every acknowledged message is there.
    gw.wait_queue_empty(deadline=180)
    for rcpt in RECIPIENTS:
        poll(
            lambda r=rcpt: load.acked <= set(_mailbox_ids(gw, r)),
            60,
            what=f"every acknowledged message in {rcpt}'s mailbox",
        )

    completed = {
        _bare(e.get("message_id")) for e in killed_events if e.get("event") == "queue.removed"
    }
    report = []
    for rcpt in RECIPIENTS:
        ids = [_bare(m) for m in _mailbox_ids(gw, rcpt)]
        counts = collections.Counter(ids)
        acked = {_bare(m) for m in load.acked}
        in_doubt = {_bare(m) for m in load.in_doubt}
        missing = acked - set(counts)
        unexpected = set(counts) - acked - in_doubt
        dups = {m: c for m, c in counts.items() if c > 1}
        delivered_unrecorded = {
            _bare(e.get("message_id"))
            for e in killed_events
            if e.get("event") == "delivery.result"
            and e.get("recipient") == rcpt
            and e.get("status") == "delivered"
        } - completed
        in_flight = len(delivered_unrecorded) + DELIVERY_CONCURRENCY * workers
        report.append(
            f"{rcpt}: {len(ids)} files, {len(counts)} ids, {len(dups)} duplicated "
            f"(bound {in_flight})"
        )
        assert not missing, f"{rcpt} lost {len(missing)} acked messages: {sorted(missing)[:5]}"
        assert not unexpected, f"{rcpt} got messages never sent: {sorted(unexpected)[:5]}"
        assert all(c == 2 for c in dups.values()), f"{rcpt}: a message arrived 3+ times: {dups}"
        redone = set(dups) & completed
        assert not redone, f"{rcpt}: completed before the kill, delivered again: {redone}"
        assert len(dups) <= in_flight, (
            f"{rcpt}: {len(dups)} duplicates exceed the in-flight bound {in_flight}: {dups}"
        )
    print(
        f"crash test (workers={workers}): {len(load.acked)} acknowledged, "
        f"{len(load.in_doubt)} in doubt; " + "; ".join(report)
    )


def _bare(message_id: object) -> str:
    """A Message-ID without angle brackets or spaces, for comparing events and headers."""
    return str(message_id or "").strip().strip("<>")
