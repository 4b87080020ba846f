"""Maildir delivery: layout, content, durability steps and hostile local parts."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from tests.delivery.conftest import MESSAGE, make_cfg, make_item
from tests.support.maildir import maildir_files

from mailwarden.core.types import DeliveryStatus
from mailwarden.delivery.maildir import mailbox_path, safe_localpart
from mailwarden.delivery.router import Router
from mailwarden.errors import AddressError


def _all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.mark.asyncio
async def test_maildir_layout_and_content(tmp_path: Path) -> None:
    router = Router(make_cfg(tmp_path))
    assert router.destination("Bob@Example.EDU") == "maildir"
    item = make_item(router, ["Bob@Example.EDU", "carol@example.edu"])
    results = await router.deliver(item)
    assert [r.status for r in results] == [DeliveryStatus.DELIVERED] * 2
    assert [r.recipient for r in results] == ["Bob@Example.EDU", "carol@example.edu"]
    assert all(r.remote_host == "maildir" and r.code == 250 for r in results)

    root = tmp_path / "mail" / "example.edu"
    for user in ("bob", "carol"):
        for sub in ("tmp", "new", "cur"):
            assert (root / user / sub).is_dir()
        assert os.listdir(root / user / "tmp") == []  # renamed, nothing left behind
    [bob] = maildir_files(root / "bob")
    assert bob.parent.name == "new"
    raw = bob.read_bytes()
    assert b"\r" not in raw  # LF line ends on disk
    lines = raw.split(b"\n")
    assert lines[0] == b"Return-Path: <alice@sender.test>"
    assert lines[1] == b"Delivered-To: Bob@Example.EDU"
    assert raw.endswith(MESSAGE.replace(b"\r\n", b"\n"))
    assert b"\n.a line that starts with a dot\n" in raw  # not dot-stuffed
    assert stat.S_IMODE(bob.stat().st_mode) == 0o600
    assert bob.name.endswith(f",S={len(raw)}")
    await router.close()


@pytest.mark.asyncio
async def test_maildir_unique_names(tmp_path: Path) -> None:
    router = Router(make_cfg(tmp_path))
    for _ in range(20):
        results = await router.deliver(make_item(router, ["bob@example.edu"]))
        assert results[0].status == DeliveryStatus.DELIVERED
    files = maildir_files(tmp_path / "mail" / "example.edu" / "bob")
    assert len({f.name for f in files}) == 20


@pytest.mark.asyncio
async def test_maildir_explicit_directory(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    router = Router(make_cfg(tmp_path, transports={"dept.example.edu": f"maildir:{target}"}))
    item = make_item(router, ["x@dept.example.edu"])
    assert item.destination == f"maildir:{target}"
    results = await router.deliver(item)
    assert results[0].status == DeliveryStatus.DELIVERED
    assert len(maildir_files(target / "dept.example.edu" / "x")) == 1
    assert not (tmp_path / "mail").exists()


@pytest.mark.parametrize(
    "localpart",
    ["../../etc", "..", ".", "a/b", "a/../../b", ".hidden", "a\\b", "%2e%2e", "ünïcode", '"a b"'],
)
def test_hostile_local_parts_stay_inside_root(tmp_path: Path, localpart: str) -> None:
    root = tmp_path / "mail"
    folder = mailbox_path(root, f"{localpart}@example.edu")
    assert folder.parent == root / "example.edu"
    name = folder.name
    assert "/" not in name and "\0" not in name
    assert not name.startswith(".")
    assert all(c.isascii() for c in name)


def test_localpart_encoding_is_injective() -> None:
    assert safe_localpart("a/b") != safe_localpart("a%2Fb")
    assert safe_localpart("Bob") == "bob"
    assert safe_localpart("first.last+tag") == "first.last+tag"


@pytest.mark.parametrize("address", ["bob@../../etc", "bob@exa/mple.edu", "bob", "@example.edu"])
def test_bad_domains_refused(tmp_path: Path, address: str) -> None:
    with pytest.raises(AddressError):
        mailbox_path(tmp_path, address)


@pytest.mark.asyncio
async def test_traversal_never_writes_outside_root(tmp_path: Path) -> None:
    root = tmp_path / "state" / "mail"
    router = Router(make_cfg(tmp_path / "state"))
    rcpts = ["../../../escaped@example.edu", "..@example.edu", ".@example.edu", "a/b@example.edu"]
    results = await router.deliver(make_item(router, rcpts))
    assert [r.status for r in results] == [DeliveryStatus.DELIVERED] * 4
    outside = [p for p in _all_files(tmp_path) if root not in p.parents]
    assert outside == []
    assert len(_all_files(root)) == 4


@pytest.mark.asyncio
async def test_control_characters_refused(tmp_path: Path) -> None:
    router = Router(make_cfg(tmp_path))
    rcpts = ["bob@example.edu", "eve\r\nX-Injected: 1@example.edu", "nul\0@example.edu"]
    results = await router.deliver(make_item(router, rcpts))
    assert results[0].status == DeliveryStatus.DELIVERED
    for r in results[1:]:
        assert r.status == DeliveryStatus.BOUNCED
        assert r.enhanced == "5.1.3"
    files = _all_files(tmp_path / "mail")
    assert len(files) == 1
    assert b"X-Injected" not in files[0].read_bytes()


@pytest.mark.asyncio
async def test_unsafe_sender_bounces_everything(tmp_path: Path) -> None:
    router = Router(make_cfg(tmp_path))
    item = make_item(router, ["bob@example.edu"], sender="a@b\r\nRCPT TO:<x@y>")
    [r] = await router.deliver(item)
    assert r.status == DeliveryStatus.BOUNCED and r.enhanced == "5.1.7"
    assert _all_files(tmp_path) == []


@pytest.mark.asyncio
async def test_unwritable_root_defers(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    router = Router(make_cfg(tmp_path, transports={"example.edu": f"maildir:{blocker}"}))
    [r] = await router.deliver(make_item(router, ["bob@example.edu"]))
    assert r.status == DeliveryStatus.DEFERRED
    assert r.code == 451
