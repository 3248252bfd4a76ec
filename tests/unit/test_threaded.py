"""threaded: blocking file work in one dedicated thread, in order, results on the reactor."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from zope.interface.verify import verifyObject

from synapse_acme.errors import StoreError
from synapse_acme.interfaces import ICertificateStore, IStoreAdmin
from synapse_acme.store import FileStore
from synapse_acme.threaded import BlockingRunner, ThreadedStore
from tests.certs import TestCA
from tests.deferreds import failure_of, result_of


class ThreadedReactor:
    """Just what deferToThreadPool needs: callFromThread, run when the test pumps."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.Queue()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.calls.put((f, args))

    def pump(self, n: int) -> None:
        for _ in range(n):
            f, args = self.calls.get(timeout=10)
            f(*args)


@pytest.fixture
def runner() -> Any:
    reactor = ThreadedReactor()
    r = BlockingRunner(reactor)  # type: ignore[arg-type]
    r.start()
    yield r, reactor
    r.stop()


def test_work_runs_in_one_other_thread_in_order(runner: Any) -> None:
    r, reactor = runner
    seen: list[tuple[int, int]] = []
    ds = [r(lambda i=i: seen.append((i, threading.get_ident())) or i) for i in range(20)]
    reactor.pump(20)
    assert [result_of(d) for d in ds] == list(range(20))
    assert [i for i, _ in seen] == list(range(20))  # submission order
    threads = {t for _, t in seen}
    assert len(threads) == 1 and threading.get_ident() not in threads


def test_threaded_store_keeps_the_contract_off_the_reactor_thread(
    runner: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r, reactor = runner
    store = ThreadedStore(FileStore(str(tmp_path / "store")), r)
    assert verifyObject(ICertificateStore, store)
    fsync_threads: list[int] = []

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        fsync_threads.append(threading.get_ident())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    bundle = TestCA().issue(["a.example"])
    d = store.save("a.example", bundle)
    reactor.pump(1)
    assert result_of(d) is None
    assert fsync_threads and threading.get_ident() not in fsync_threads
    d = store.load("a.example")
    reactor.pump(1)
    assert result_of(d) == bundle
    d = store.keys()
    reactor.pump(1)
    assert result_of(d) == ["a.example"]
    d = store.load("../escape")
    reactor.pump(1)
    assert isinstance(failure_of(d, StoreError), StoreError)  # failures, as before
    # the same contracts as the store it wraps, checked method by method
    assert verifyObject(ICertificateStore, store) and verifyObject(IStoreAdmin, store)


def test_saves_waiting_in_the_thread_are_grouped_and_each_gets_its_result(
    runner: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r, reactor = runner
    ca, other = TestCA(), TestCA(name="Other")
    inner = FileStore(str(tmp_path / "store"))
    store = ThreadedStore(inner, r)
    batches: list[list[str]] = []
    real = FileStore._save_many

    def recording(self: FileStore, items: Any) -> Any:
        batches.append([k for k, _ in items])
        return real(self, items)

    monkeypatch.setattr(FileStore, "_save_many", recording)
    gate, entered = threading.Event(), threading.Event()
    blocker = r(lambda: (entered.set(), gate.wait(10)))  # keeps the thread busy meanwhile
    assert entered.wait(10)
    keys = [f"k{i}.example" for i in range(5)]
    bundles = {k: ca.issue([k]) for k in keys}
    bad = attrs.evolve(ca.issue(["k2.example"]), key_pem=other.issue(["x"]).key_pem)
    ds = {k: store.save(k, bad if k == "k2.example" else bundles[k]) for k in keys}
    later = r(lambda: "after")  # submitted after the saves: runs after them
    gate.set()
    reactor.pump(1 + len(keys) + 1)  # the blocker, one call per save, the later call
    assert result_of(blocker)
    assert result_of(later) == "after"
    assert batches == [keys]  # one group, in submission order
    for k, d in ds.items():
        if k == "k2.example":
            assert "does not belong" in str(failure_of(d, StoreError))
        else:
            assert result_of(d) is None
            assert result_of(inner.load(k)) == bundles[k]
    assert result_of(inner.load("k2.example")) is None


def test_a_save_on_its_own_is_not_held_back(runner: Any, tmp_path: Path) -> None:
    r, reactor = runner
    bundle = TestCA().issue(["a.example"])
    store = ThreadedStore(FileStore(str(tmp_path / "store")), r)
    d = store.save("a.example", bundle)
    reactor.pump(1)
    assert result_of(d) is None
    d2 = store.load("a.example")
    reactor.pump(1)
    assert result_of(d2) == bundle
