"""Blocking file work off the reactor thread, for hosts whose reactor must never wait on a disk.

The file store, the exporter and the status file write a few KiB each and fsync them. Inside a
homeserver that must not happen on the reactor thread: an fsync on a busy or failing disk can
take seconds, and every federation request waits behind it. The standalone ``synapse-acme run``
does the same: with many certificates issued at once, each save's fsync held up the requests of
every other issuance (and the challenge listener). So that work runs in
:class:`BlockingRunner`'s one dedicated thread; a one-shot command (``issue``, ``renew``), which
waits for every write anyway, keeps it on the reactor thread.

One thread, not a pool, keeps the guarantees the code was written with: operations run one at a
time, in the order they were submitted (a save is durable before the export that follows it
starts; two exports never interleave), exactly as they did on the reactor thread. Results and
errors come back as Deferreds fired on the reactor thread.

Certificate saves are grouped (:class:`ThreadedStore`): when a save's turn comes, it takes every
save waiting behind it too, and :meth:`~synapse_acme.store.FileStore.save_many` makes them
durable with one disk flush. A burst of renewals (many certificates at once) then costs a few
flushes instead of one per certificate. A save is thus done at its place in the queue or
earlier, never later, so whatever waited for it still finds it done.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from threading import Thread
from typing import Any, TypeVar

import attrs
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from synapse_acme.interfaces import ICertificateStore, IStoreAdmin
from synapse_acme.model import CertificateBundle
from synapse_acme.store import FileStore

_T = TypeVar("_T")


class _DaemonThreadPool(ThreadPool):
    """Its thread never keeps a process alive on its own: a host that exits without shutting
    its reactor down (a test, a crash) is not hung by it. Normal shutdown still waits for the
    work (:meth:`BlockingRunner.stop`), and every write is atomic anyway (temp file, rename)."""

    @staticmethod
    def threadFactory(*args: Any, **kwargs: Any) -> Thread:  # type: ignore[override]
        return Thread(*args, daemon=True, **kwargs)


class BlockingRunner:
    """Runs blocking callables in one dedicated thread, in submission order.

    ``reactor`` delivers the results (``IReactorFromThreads``). :meth:`start` before use;
    :meth:`stop` waits for the work already submitted, then ends the thread.
    """

    def __init__(self, reactor: IReactorFromThreads, name: str = "synapse-acme-io") -> None:
        self._reactor = reactor
        self._pool = _DaemonThreadPool(minthreads=1, maxthreads=1, name=name)

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        self._pool.stop()

    def __call__(self, f: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
        """A Deferred firing (on the reactor thread) with ``f(*args)`` run in the thread."""
        return threads.deferToThreadPool(self._reactor, self._pool, f, *args)  # type: ignore[arg-type]


def _fire_saves(results: list[tuple[defer.Deferred[None], Failure | None]]) -> None:
    for d, failure in results:
        if failure is None:
            d.callback(None)
        else:
            d.errback(failure)


def run_now(f: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
    """The runner for hosts where blocking is fine: run at once, the result as a Deferred."""
    return defer.maybeDeferred(f, *args)


Runner = Callable[..., "defer.Deferred[Any]"]


def _result_of(d: defer.Deferred[_T]) -> _T:
    """The result of a Deferred that has already fired (raising its failure)."""
    box: list[Any] = []
    d.addBoth(box.append)
    if not box:
        raise RuntimeError("expected a Deferred that had already fired")
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]  # type: ignore[no-any-return]


@implementer(ICertificateStore, IStoreAdmin)
@attrs.define(eq=False)
class ThreadedStore:
    """An :class:`~synapse_acme.interfaces.ICertificateStore` whose calls run ``inner``'s
    (synchronously answering) methods in ``runner``'s thread. Same contract, same errors."""

    inner: FileStore  # its Deferreds have fired when its methods return, as _result_of needs
    runner: Runner
    # Saves submitted and not yet taken by the thread: (key, bundle, its Deferred).
    _waiting: list[tuple[str, CertificateBundle, defer.Deferred[None]]] = attrs.field(
        factory=list, init=False
    )
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def load(self, key: str) -> defer.Deferred[CertificateBundle | None]:
        return self.runner(lambda: _result_of(self.inner.load(key)))

    def save(self, key: str, bundle: CertificateBundle) -> defer.Deferred[None]:
        """Saved in the runner's thread, together with every other save waiting there when
        its turn comes (group commit: :meth:`FileStore.save_many`, one disk flush for all).
        So a save happens at its place in the runner's queue or earlier, never later; each
        keeps its own result."""
        done: defer.Deferred[None] = defer.Deferred()
        with self._lock:
            self._waiting.append((key, bundle, done))
        self.runner(self._save_waiting).addCallback(_fire_saves)
        return done

    def _save_waiting(self) -> list[tuple[defer.Deferred[None], Failure | None]]:
        """In the runner's thread: save what is waiting (nothing, if an earlier call took it)."""
        with self._lock:
            batch, self._waiting = self._waiting, []
        if not batch:
            return []
        try:
            errors = _result_of(self.inner.save_many([(k, b) for k, b, _ in batch]))
        except Exception:
            failure = Failure()  # a bug, but every save still gets its answer
            return [(d, failure) for _, _, d in batch]
        return [
            (d, None if e is None else Failure(e))
            for (_, _, d), e in zip(batch, errors, strict=True)
        ]

    def keys(self) -> defer.Deferred[list[str]]:
        return self.runner(lambda: _result_of(self.inner.keys()))
