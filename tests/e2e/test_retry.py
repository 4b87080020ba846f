"""End to end: retry, flush, expiry and restart recovery with a downstream that is down.

- retry: the downstream Postfix is down -> the message is deferred (an event says so);
  Postfix starts; ``mailwarden queue flush`` -> delivered (the backoff is an hour, so only
  the flush can have caused it).
- expiry: tiny ``max_lifetime`` and nothing listening -> a DSN to the sender; a message from
  the null sender expires without any bounce.
- restart: messages deferred, gateway stopped (SIGTERM), downstream started, gateway started
  again -> every message delivered.

Security: loopback only.
"""

from __future__ import annotations

from tests.e2e.helpers import dsn_parts, is_deferred, make_message
from tests.support.maildir import header_value
from tests.support.ports import free_port
from tests.support.tmpdirs import poll

DEPT = "dept.example.edu"


def _deferred_for(gw, mid: str) -> bool:
    """A ``queue.deferred`` event (docs/events.md) names this message."""
    return any(is_deferred(e) and e.get("message_id") == mid for e in gw.events())


def test_retry_then_flush_delivers(gateway_factory, postfix_factory):
    down = postfix_factory.downstream([DEPT], [f"gina@{DEPT}"], start=False)
    gw = gateway_factory(
        hosted={"example.edu": "maildir", DEPT: down.transport},
        queue={"min_backoff": "1h", "max_backoff": "1h"},
        delivery={"connect_timeout": "5s"},
    )
    mid, msg = make_message("s@example.edu", [f"gina@{DEPT}"])
    assert gw.send("s@example.edu", [f"gina@{DEPT}"], msg) == {}
    poll(lambda: _deferred_for(gw, mid), 60, what="a deferred event")
    queued = gw.queue_list()
    assert len(queued) == 1, queued

    down.start()
    gw.flush()
    [raw] = down.wait_messages(f"gina@{DEPT}", 1, deadline=60)
    assert header_value(raw, "Message-ID") == mid
    gw.wait_queue_empty()
    assert not gw.messages("s@example.edu"), "no DSN after a successful retry"


def test_expiry_sends_dsn_to_sender_never_to_null_sender(gateway_factory):
    dead = free_port()  # nothing listens here
    gw = gateway_factory(
        hosted={"example.edu": "maildir", DEPT: f"smtp:127.0.0.1:{dead}"},
        queue={"max_lifetime": "3s", "min_backoff": "1s", "max_backoff": "1s", "delay_warning": 0},
        delivery={"connect_timeout": "2s"},
    )
    sender = "henry@example.edu"
    mid, msg = make_message(sender, [f"ian@{DEPT}"])
    assert gw.send(sender, [f"ian@{DEPT}"], msg) == {}
    # A bounce-like message from the null sender: it may expire, but is never bounced.
    null_mid, null_msg = make_message("", [f"ian@{DEPT}"], subject="from <>")
    assert gw.send("", [f"ian@{DEPT}"], null_msg) == {}

    dsns = poll(
        lambda: [m for m in gw.messages(sender) if b"multipart/report" in m],
        90,
        what="an expiry DSN",
    )
    raw = dsns[0]
    _, blocks = dsn_parts(raw)
    rcpt = [b for b in blocks[1:] if f"ian@{DEPT}" in b.get("Final-Recipient", "").lower()]
    assert rcpt and rcpt[0].get("Action", "").strip().lower() == "failed"
    assert rcpt[0].get("Status", "").strip()[:2] in ("4.", "5.")
    assert mid.encode() in raw
    gw.wait_queue_empty(deadline=90)
    assert len([m for m in gw.messages(sender) if b"multipart/report" in m]) == 1
    # Nothing was ever addressed to the null sender: no DSN names the null message as
    # anything but attached content, and no mailbox other than the sender's got mail.
    boxes = [p for p in gw.mail_root.glob("*/*") if p.is_dir()]
    assert [p.name for p in boxes] == ["henry"], boxes
    assert null_mid.encode() not in raw
    # The events agree: both expired, only the real sender's got a DSN.
    expired = {e.get("message_id"): e for e in gw.events("queue.expired")}
    assert set(expired) == {mid, null_mid}, list(expired)
    assert expired[mid].get("dsn_queue_id")
    assert not expired[null_mid].get("dsn_queue_id"), "no bounce to the null sender"


def test_restart_recovers_deferred_mail(gateway_factory, postfix_factory):
    down = postfix_factory.downstream([DEPT], [f"jo@{DEPT}", f"kim@{DEPT}"], start=False)
    gw = gateway_factory(
        hosted={"example.edu": "maildir", DEPT: down.transport},
        delivery={"connect_timeout": "5s"},
    )
    mids = []
    for i in range(5):
        mid, msg = make_message(
            "s@example.edu", [f"jo@{DEPT}", f"kim@{DEPT}"], subject=f"restart {i}"
        )
        assert gw.send("s@example.edu", [f"jo@{DEPT}", f"kim@{DEPT}"], msg) == {}
        mids.append(mid)
    poll(lambda: sum(1 for e in gw.events() if is_deferred(e)) >= 1, 60, what="deferred events")
    gw.stop()
    down.start()
    gw.start()
    for r in (f"jo@{DEPT}", f"kim@{DEPT}"):
        got = down.wait_messages(r, len(mids), deadline=90)
        assert sorted(header_value(m, "Message-ID") for m in got) == sorted(mids)
    gw.wait_queue_empty()
