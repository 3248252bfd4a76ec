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
from synapse_acme.testing.pebble import free_port as _free_port


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark everything under tests/integration/ ``integration`` (``-m "not integration"``)."""
    root = Path(__file__).parent / "integration"
    for item in items:
        if root in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _preflight_through_pebble(monkeypatch: pytest.MonkeyPatch) -> None:
    """Configs written by ``PebbleCA.write_acme_config`` probe the way Pebble validates: its
    DNS stub as the resolver, its ``http_port`` as the port (the preflight is on by default
    and would otherwise look the test names up in this host's DNS, on port 80). A test that
    passes its own ``preflight`` keeps it. (Belongs in write_acme_config itself; kept here
    while synapse_acme/testing/pebble.py is being changed elsewhere.)"""
    original = PebbleCA.write_acme_config

    def write(self: PebbleCA, directory: Any, names: Any, **kwargs: Any) -> Any:
        kwargs.setdefault(
            "preflight", {"port": self.http_port, "resolver": f"127.0.0.1:{self.dns_port}"}
        )
        return original(self, directory, names, **kwargs)

    monkeypatch.setattr(PebbleCA, "write_acme_config", write)


@pytest.fixture
def free_port() -> Callable[[], int]:
    """A function returning a loopback TCP port that was free a moment ago."""
    return _free_port


@pytest.fixture
def pebble_factory(tmp_path: Path) -> Iterator[Callable[..., PebbleCA]]:
    """Start PebbleCA instances with custom options; all are stopped after the test.

    ``pebble_factory(http_port=..., env=..., validity=..., blocklist=..., eab=...)``; ``http_port``
    defaults to a free port (where Pebble's validator will dial for HTTP-01).
    """
    started: list[PebbleCA] = []
    counter = itertools.count()

    def make(**kwargs: Any) -> PebbleCA:
        kwargs.setdefault("http_port", _free_port())
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
    ca = PebbleCA(str(workdir), http_port=_free_port())
    ca.start()
    try:
        yield ca
    finally:
        ca.stop()
