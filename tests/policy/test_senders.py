"""Registered senders end to end: an unregistered campus host is told how to register
(SU-1); ``mailwarden senders add`` makes it a registered server within the refresh
interval, limited to its domains; an off-campus address cannot be registered (SU-3);
``senders list/remove``."""

from __future__ import annotations

import json
from typing import Any

from tests.policy.helpers import session
from tests.support.gateway import Gateway
from tests.support.tmpdirs import poll

CAMPUS_HOST = "127.0.0.70"
POLICY = {"campus_networks": ["127.0.0.1/32", "127.0.0.64/26"], "registry_refresh": 0.2}


def _rcpt(port: int, source: str, sender: str, rcpt: str = "x@outside.example") -> str:
    c = session(port, source, f"<{sender}>")
    try:
        return c.cmd(f"RCPT TO:<{rcpt}>")
    finally:
        c.close()


def test_register_a_campus_server(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory(extra={"policy": POLICY})
    port = gw.smtp_port
    # SU-1: a campus host that is not registered is told how to register.
    reply = _rcpt(port, CAMPUS_HOST, "a@lab.example.edu")
    assert reply.startswith(f"554 5.7.1 Relay access denied: {CAMPUS_HOST} is not a registered")
    assert "mailwarden senders add" in reply and reply.endswith("(SU-1)")
    # Off campus: the plain relay refusal (SU-6), no registration hint.
    assert _rcpt(port, "127.0.0.200", "a@lab.example.edu") == (
        "554 5.7.1 Relay access denied (SU-6)"
    )
    # Inbound mail from the campus host is fine.
    assert _rcpt(port, CAMPUS_HOST, "a@lab.example.edu", "u@example.edu").startswith("250")

    res = gw.cli(
        "senders",
        "add",
        CAMPUS_HOST,
        "--name",
        "lab-list",
        "--domain",
        "lab.example.edu",
        "--by",
        "iso",
        "--json",
    )
    added = json.loads(res.stdout)
    assert added["network"] == f"{CAMPUS_HOST}/32" and added["domains"] == ["lab.example.edu"]

    poll(
        lambda: _rcpt(port, CAMPUS_HOST, "a@lab.example.edu").startswith("250 2.1.5"),
        30,
        what="the new registration to reach the gateway",
    )
    # Only its own domains.
    assert _rcpt(port, CAMPUS_HOST, "a@example.edu").startswith("553 5.7.1")

    listed = [json.loads(x) for x in gw.cli("senders", "list", "--json").stdout.splitlines()]
    assert {(s["network"], s["source"]) for s in listed} == {
        ("127.0.0.1/32", "config"),
        (f"{CAMPUS_HOST}/32", "database"),
    }
    assert "lab-list" in gw.cli("senders", "list").stdout

    # SU-3: an address outside the campus networks is refused with a clear message.
    res = gw.cli("senders", "add", "192.0.2.7", "--name", "x", "--domain", "x.example", check=False)
    assert res.returncode == 2
    assert "not inside the campus networks" in res.stderr and "SU-3" in res.stderr
    res = gw.cli(
        "senders", "add", "127.0.0.0/24", "--name", "x", "--domain", "x.example", check=False
    )
    assert res.returncode == 2 and "SU-3" in res.stderr
    assert gw.cli("senders", "remove", "127.0.0.1", check=False).returncode == 3  # config

    gw.cli("senders", "remove", CAMPUS_HOST)
    poll(
        lambda: "not a registered" in _rcpt(port, CAMPUS_HOST, "a@lab.example.edu"),
        30,
        what="the removal to reach the gateway",
    )
    assert gw.cli("senders", "remove", CAMPUS_HOST, check=False).returncode == 3


def test_relay_from_campus(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory(extra={"policy": POLICY | {"relay_from_campus": True}})
    assert _rcpt(gw.smtp_port, CAMPUS_HOST, "a@anything.example").startswith("250 2.1.5")
    assert _rcpt(gw.smtp_port, "127.0.0.200", "a@example.edu").startswith("554 5.7.1")


def test_off_campus_sender_in_config_is_a_config_error(tmp_path: Any) -> None:
    gw = Gateway(tmp_path / "gw", extra={"policy": {"senders": {"192.0.2.1": []}}})
    res = gw.cli("config", "check", check=False)
    assert res.returncode == 2
    assert "policy" in res.stderr and "SU-3" in res.stderr
