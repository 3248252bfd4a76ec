"""threaded: blocking file work in one dedicated thread, in order, results on the reactor."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
