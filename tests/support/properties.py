"""Hypothesis settings for the property tests (``tests/**/test_props_*.py``).

tests/conftest.py registers the profiles and loads one (``HYPOTHESIS_PROFILE``, default
``mailwarden``):

- ``mailwarden``: derandomized -- every run tries the same examples, so the suite stays
  deterministic -- no example database (failures are not replayed from disk), no deadline
  (the box is shared with benchmarks; a slow example is not a failure), and each test's
  ``examples(n)`` as written.
- ``fuzz``: random examples, ``FUZZ_SCALE`` times as many, failures remembered in
  ``.hypothesis/`` (Hypothesis' own cache directory; it git-ignores itself) -- for a
  longer local hunt:
  ``HYPOTHESIS_PROFILE=fuzz pytest tests/smtp/test_props_protocol.py``.

A test states its budget with ``@settings(max_examples=examples(n))``; budgets are chosen
so that all property tests together take about 20 s of CPU (about 10 s of a two-worker
run). ``split_at`` and ``cut_points`` cut a byte stream into the chunks a parser receives
(chunk invariance).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

DEFAULT_PROFILE = "mailwarden"
FUZZ_SCALE = 20


def register_profiles() -> None:
    common = {
        "deadline": None,
        "print_blob": True,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    }
    settings.register_profile(DEFAULT_PROFILE, derandomize=True, database=None, **common)
    settings.register_profile(
        "fuzz", database=DirectoryBasedExampleDatabase(".hypothesis/examples"), **common
    )


def active_profile() -> str:
    return os.environ.get("HYPOTHESIS_PROFILE", DEFAULT_PROFILE)


def examples(n: int) -> int:
    """The number of examples a test runs under the active profile (``n`` by default)."""
    return n * FUZZ_SCALE if active_profile() == "fuzz" else n


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo ``len(data) + 1``, in any order)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a] or [data]


def cut_points(max_cuts: int = 12) -> st.SearchStrategy[list[int]]:
    """Offsets for ``split_at``; shrinks towards fewer cuts."""
    return st.lists(st.integers(min_value=0), max_size=max_cuts)
