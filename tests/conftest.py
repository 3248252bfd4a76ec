"""Shared pytest fixtures: a real Pebble ACME server for integration tests.

Kept minimal on purpose; test modules define their own fixtures. A missing ``pebble`` binary makes
the tests that use these fixtures *error* (never skip), so CI cannot pass without a real CA.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from synapse_acme.testing.pebble import PebbleCA


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark everything under tests/integration/ ``integration`` (``-m "not integration"``)."""
    root = Path(__file__).parent / "integration"
    for item in items:
        if root in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def pebble_factory(tmp_path: Path) -> Iterator[Callable[..., PebbleCA]]:
    """Start PebbleCA instances with custom options; all are stopped after the test.

    ``pebble_factory(http_port=..., env=..., validity=..., blocklist=..., eab=...)``; without
    ``http_port`` (where Pebble's validator dials for HTTP-01) each reserves one until it stops
    (see :class:`PebbleCA`).
    """
    started: list[PebbleCA] = []
    counter = itertools.count()

    def make(**kwargs: Any) -> PebbleCA:
        ca = PebbleCA(str(tmp_path / f"pebble-{next(counter)}"), **kwargs)
        started.append(ca)
        return ca.start()

    try:
        yield make
    finally:
        for ca in reversed(started):
            ca.stop()


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PebbleCA]:
    """One default Pebble per test module (Pebble's default 5% badNonce rate is kept).

    Serve HTTP-01 on ``pebble.http_port``; names resolve to 127.0.0.1.
    """
    workdir = tmp_path_factory.mktemp("pebble")
    ca = PebbleCA(str(workdir))  # reserves its http_port until it stops
    ca.start()
    try:
        yield ca
    finally:
        ca.stop()
