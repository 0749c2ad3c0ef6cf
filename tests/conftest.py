"""Shared fixtures: a running appliance per test, torn down without leftovers."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from appliance import Appliance  # noqa: E402


@pytest.fixture
def make_appliance(tmp_path: Path) -> Iterator[Callable[..., Appliance]]:
    """Build (not start) appliances with config overrides, stopped at teardown."""
    made: list[Appliance] = []

    def make(**overrides: dict) -> Appliance:
        root = tmp_path / f"a{len(made)}"
        root.mkdir()
        a = Appliance(root, **overrides)
        made.append(a)
        return a

    yield make
    for a in made:
        a.kill_all()


@pytest.fixture
def appliance(make_appliance: Callable[..., Appliance]) -> Appliance:
    return make_appliance().start()
