"""Fixtures for SMTP edge tests: ``serve`` starts a real server on 127.0.0.1 port 0."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.smtp.harness import Running, make_config, tls_config


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(tls: str = "none", policy: Any = None, **limits: Any) -> Running:
        cfg = tls_config(tmp_path, **limits) if tls != "none" else make_config(tmp_path, **limits)
        running = Running(cfg, tls=tls, policy=policy)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
