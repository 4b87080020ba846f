"""Config loading: the embedded default, strict validation, errors with key and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailwarden.config import (
    TransportSpec,
    check_config,
    default_config,
    load_config,
    parse_duration,
)
from mailwarden.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "mw.toml"
    p.write_text(text)
    return p


def test_embedded_default_is_the_documented_demo() -> None:
    cfg = default_config()
    assert cfg.gateway.hosted_domains == ["example.edu"]
    ports = {li.name: (li.address, li.port, li.tls, li.submission) for li in cfg.listener}
    assert ports == {
        "smtp": ("127.0.0.1", 2525, "starttls", False),
        "submission": ("127.0.0.1", 2587, "starttls", True),
        "smtps": ("127.0.0.1", 2465, "implicit", True),
    }
    assert cfg.delivery.transport_for("example.edu") == TransportSpec(kind="maildir")
    assert cfg.spool_path == Path("var/spool")
    assert cfg.queue.max_lifetime == 5 * 86400
    assert cfg.queue.delay_warning == 4 * 3600


def test_example_config_in_docs_is_valid() -> None:
    cfg, problems = check_config(ROOT / "docs" / "mailwarden.example.toml")
    assert problems == []
    assert cfg is not None and cfg.gateway.workers == 2


def test_unknown_key_is_an_error_with_its_line(tmp_path: Path) -> None:
    p = write(tmp_path, '[gateway]\nhostname = "a.example"\nhostnmae = "typo"\n')
    cfg, problems = check_config(p)
    assert cfg is None
    assert problems == [f"{p}:3: gateway.hostnmae: unknown key"]


def test_every_error_is_reported_with_key_and_line(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        '[gateway]\nworkers = 0\n\n[[listener]]\nname = "a"\nport = 70000\n'
        'address = "not-an-ip"\n\n[queue]\nmax_lifetime = "5 fortnights"\n',
    )
    cfg, problems = check_config(p)
    assert cfg is None
    joined = "\n".join(problems)
    assert f"{p}:2: gateway.workers:" in joined
    assert f"{p}:6: listener.0.port:" in joined
    assert f"{p}:7: listener.0.address:" in joined and "not an IP address" in joined
    assert f"{p}:10: queue.max_lifetime:" in joined and "not a duration" in joined
    assert len(problems) == 4


def test_toml_syntax_error_is_reported(tmp_path: Path) -> None:
    p = write(tmp_path, "[gateway\nhostname = 1\n")
    cfg, problems = check_config(p)
    assert cfg is None and len(problems) == 1 and "line 1" in problems[0]


def test_missing_file_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.toml")
    assert "cannot read" in str(err.value)


def test_hosted_domain_needs_a_transport(tmp_path: Path) -> None:
    p = write(tmp_path, '[gateway]\nhosted_domains = ["campus.example"]\n')
    cfg, problems = check_config(p)
    assert cfg is None
    assert "campus.example" in problems[0] and "loop" in problems[0]


def test_duplicate_listener_socket_is_an_error(tmp_path: Path) -> None:
    text = '[[listener]]\nname = "a"\nport = 2525\n\n[[listener]]\nname = "b"\nport = 2525\n'
    cfg, problems = check_config(write(tmp_path, text))
    assert cfg is None and "same address and port" in problems[0]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (300, 300.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("4h", 14400.0),
        ("5d", 432000.0),
        ("1w", 604800.0),
        ("1.5h", 5400.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "5x", "-1", True, "h"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("maildir", TransportSpec(kind="maildir")),
        ("maildir:/srv/mail", TransportSpec(kind="maildir", path="/srv/mail")),
        ("smtp:127.0.0.1:2526", TransportSpec(kind="smtp", host="127.0.0.1", port=2526)),
        ("smtp:[::1]:25", TransportSpec(kind="smtp", host="::1", port=25)),
        ("lmtp:127.0.0.1:24", TransportSpec(kind="lmtp", host="127.0.0.1", port=24)),
        ("lmtp:unix:/run/dovecot/lmtp", TransportSpec(kind="lmtp", path="/run/dovecot/lmtp")),
        ("mx", TransportSpec(kind="mx")),
        ("discard", TransportSpec(kind="discard")),
    ],
)
def test_transport_specs_round_trip(text: str, expected: TransportSpec) -> None:
    spec = TransportSpec.parse(text)
    assert spec == expected
    assert TransportSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("bad", ["pigeon:x", "smtp:host", "smtp:host:99999", "mx:foo", "smtp"])
def test_bad_transport_specs(bad: str) -> None:
    with pytest.raises(ValueError):
        TransportSpec.parse(bad)


def test_bad_transport_in_file_names_the_key(tmp_path: Path) -> None:
    p = write(tmp_path, '[delivery.transports]\n"example.edu" = "smtp:nowhere"\n')
    cfg, problems = check_config(p)
    assert cfg is None
    assert problems[0].startswith(f"{p}:2: delivery.transports.example.edu:")
