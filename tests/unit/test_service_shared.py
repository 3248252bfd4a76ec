"""The service on a store shared by several processes: the issuance lock, the re-check after
taking it, the lease kept while ordering, and following what the others saved.

Each "process" is an AcmeService with its own FakeIssuer, on its own handle of one MemoryStore
(the same contract as the PostgreSQL store), all on one Clock.
"""

from __future__ import annotations

import datetime

from twisted.internet.task import Clock
from twisted.python.failure import Failure

from synapse_acme import crypto
from synapse_acme.model import CertificateBundle, CertificateSpec
from synapse_acme.names import names_key
from synapse_acme.service import AcmeService, Coordination, LeaseLost
from synapse_acme.testing.issuer import FakeIssuer
from synapse_acme.testing.store import MemoryStore
from tests.certs import TestCA
from tests.deferreds import outcome_of, result_of

START = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=datetime.timezone.utc)
NAMES = ("matrix.example.test",)
KEY = names_key(NAMES)
LEASE = 30.0
POLL = 1.0


class Process:
    """One process on the shared store."""

    def __init__(self, world: World, holder: str) -> None:
        self.store = world.store.another_handle()
        self.issuer = FakeIssuer(ca=world.ca, clock=world.clock)
        self.changes: list[CertificateBundle] = []
        self.service = AcmeService(
            [CertificateSpec(names=NAMES)],
            self.store,
            self.issuer,
            world.clock,
            check_interval=600.0,
            check_jitter=0.0,
            coordination=Coordination(self.store, holder, lease_seconds=LEASE, wait_poll=POLL),
        )

    def start(self) -> None:
        self.service.startService()

    def serial(self) -> str | None:
        bundle = self.service.current(KEY)
        return crypto.leaf_serial_hex(bundle.chain_pem) if bundle is not None else None


class World:
    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(START.timestamp())
        self.ca = TestCA(now=START)
        self.store = MemoryStore(clock=self.clock)

    def issued_first(self, *processes: Process) -> None:
        """Start ``processes``; the first one issues the first certificate, all serve it."""
        processes[0].start()
        self.clock.advance(0)
        assert processes[0].serial() is not None
        for p in processes[1:]:
            p.start()
        self.clock.advance(0)

    def stored_serial(self) -> str | None:
        bundle = result_of(self.store.load(KEY))
        return crypto.leaf_serial_hex(bundle.chain_pem) if bundle is not None else None


def test_processes_asked_together_order_once_and_all_adopt_the_result() -> None:
    w = World()
    a, b, c = Process(w, "a"), Process(w, "b"), Process(w, "c")
    w.issued_first(a, b, c)
    assert len(a.issuer.calls) == 1 and b.issuer.calls == [] and c.issuer.calls == []
    assert a.serial() == b.serial() == c.serial()
    old = a.serial()

    a.issuer.hold = True
    results = [p.service.renew(KEY, force=True) for p in (a, b, c)]
    w.clock.advance(0)
    assert len(a.issuer.calls) == 2  # a took the lock and ordered
    w.clock.advance(POLL * 3)  # b and c wait: no order while another process holds the lock
    assert b.issuer.calls == [] and c.issuer.calls == []
    assert [r.called for r in results] == [False, False, False]

    a.issuer.release()
    w.clock.advance(POLL)
    new = w.stored_serial()
    assert new is not None and new != old
    for p, r in zip((a, b, c), results, strict=True):
        [(key, bundle)] = result_of(r)
        assert key == KEY and crypto.leaf_serial_hex(bundle.chain_pem) == new
        assert p.serial() == new
    assert b.issuer.calls == [] and c.issuer.calls == []
    assert result_of(w.store.acquire(KEY, "z", LEASE)) is True  # a released the lock


def test_after_taking_the_lock_a_newer_stored_certificate_is_adopted_not_ordered() -> None:
    w = World()
    a, b = Process(w, "a"), Process(w, "b")
    w.issued_first(a, b)
    # a renews; b misses the notification (it does not subscribe here) and still serves the old.
    w.clock.advance(60)
    result_of(a.service.renew(KEY, force=True))
    assert a.serial() != b.serial()
    # A forced renewal at b: the lock is free, but the store has a newer certificate than the
    # one b had when it decided; b adopts it instead of ordering a third.
    [(_, bundle)] = result_of(b.service.renew(KEY, force=True))
    assert b.issuer.calls == []
    assert b.serial() == a.serial() == crypto.leaf_serial_hex(bundle.chain_pem)


def test_a_request_answered_by_a_certificate_issued_since_orders_nothing() -> None:
    """Asked at once, one process picks its request up only after another finished, and has
    already adopted the new certificate: that answers its request (no second order); a
    request made after the certificate was issued still orders."""
    w = World()
    a, b = Process(w, "a"), Process(w, "b")
    w.issued_first(a, b)
    w.clock.advance(60)
    asked_at = w.clock.seconds()
    w.clock.advance(0.2)
    result_of(a.service.renew(KEY, force=True, requested_at=asked_at))
    result_of(b.service.store_changed(KEY))  # the notification came before b's request
    assert a.serial() == b.serial() == w.stored_serial()
    before = w.stored_serial()
    [(_, bundle)] = result_of(b.service.renew(KEY, force=True, requested_at=asked_at))
    assert b.issuer.calls == [] and crypto.leaf_serial_hex(bundle.chain_pem) == before
    w.clock.advance(5)
    result_of(b.service.renew(KEY, force=True, requested_at=w.clock.seconds()))
    assert len(b.issuer.calls) == 1 and w.stored_serial() != before


def test_lost_lease_stops_the_order_and_saves_nothing() -> None:
    w = World()
    a = Process(w, "a")
    w.issued_first(a)
    saves = w.store.saves
    a.issuer.hold = True
    d = a.service.renew(KEY, force=True)
    w.clock.advance(LEASE / 3)  # renewed once, still held
    assert result_of(w.store.acquire(KEY, "b", LEASE)) is False
    # The lease disappears (as when the holder was cut off for longer than the lease).
    result_of(w.store.release(KEY, "a"))
    w.clock.advance(LEASE / 3)
    [(_, failure)] = result_of(d)
    assert isinstance(failure, Failure) and failure.check(LeaseLost)
    a.issuer.release()  # the CA's late answer changes nothing
    w.clock.advance(0)
    assert w.store.saves == saves
    status = a.service.status_of(KEY)
    assert status.last_error_type == "LeaseLost" and not status.unsaved


def test_a_certificate_left_unsaved_never_replaces_a_newer_one_saved_meanwhile() -> None:
    w = World()
    a, b = Process(w, "a"), Process(w, "b")
    w.issued_first(a, b)
    w.clock.advance(60)
    a.store.fail_next_save()  # a orders, and its save fails: the bundle is kept unsaved
    [(_, failure)] = result_of(a.service.renew(KEY, force=True))
    assert isinstance(failure, Failure) and a.service.status_of(KEY).unsaved
    w.clock.advance(5)  # well before a's own retry (its back-off is about a minute)
    result_of(b.service.renew(KEY, force=True))  # b renews meanwhile (a's was never stored)
    newer = w.stored_serial()
    assert newer == b.serial()
    calls = len(a.issuer.calls)
    [(_, bundle)] = result_of(a.service.renew(KEY, force=True))  # a's retry: save or adopt
    assert crypto.leaf_serial_hex(bundle.chain_pem) == newer == a.serial() == w.stored_serial()
    assert len(a.issuer.calls) == calls and not a.service.status_of(KEY).unsaved


def test_a_dead_holder_blocks_for_one_lease_then_another_process_orders() -> None:
    w = World()
    a = Process(w, "a")
    w.issued_first(a)
    old = a.serial()
    # "dead" took the lock and died without renewing or releasing it.
    assert result_of(w.store.acquire(KEY, "dead", LEASE)) is True
    d = a.service.renew(KEY, force=True)
    w.clock.advance(LEASE - POLL)
    assert not d.called and len(a.issuer.calls) == 1
    w.clock.advance(POLL * 2)
    [(_, bundle)] = result_of(d)
    assert len(a.issuer.calls) == 2 and a.serial() != old
    assert w.stored_serial() == crypto.leaf_serial_hex(bundle.chain_pem)


def test_holder_that_fails_lets_the_waiting_process_order() -> None:
    w = World()
    a, b = Process(w, "a"), Process(w, "b")
    w.issued_first(a, b)
    a.issuer.hold = True
    da = a.service.renew(KEY, force=True)
    db = b.service.renew(KEY, force=True)
    w.clock.advance(0)
    a.issuer.pending[0][0].errback(RuntimeError("the CA said no"))
    w.clock.advance(POLL)
    assert isinstance(result_of(da)[0][1], Failure)
    [(_, bundle)] = result_of(db)
    assert len(b.issuer.calls) == 1 and isinstance(bundle, CertificateBundle)


def test_change_notification_and_periodic_check_adopt_another_process_certificate() -> None:
    w = World()
    a, b, c = Process(w, "a"), Process(w, "b"), Process(w, "c")
    w.issued_first(a, b, c)
    b.store.subscribe(lambda key: b.service.store_changed(key))
    w.clock.advance(60)
    result_of(a.service.renew(KEY, force=True))
    assert b.serial() == a.serial()  # by notification, at once
    assert c.serial() != a.serial()  # c does not listen ...
    w.clock.advance(600)  # ... its periodic check re-reads the store
    assert c.serial() == a.serial()
    assert b.issuer.calls == [] and c.issuer.calls == []


def test_an_older_or_equal_stored_certificate_is_never_adopted() -> None:
    w = World()
    a, b = Process(w, "a"), Process(w, "b")
    w.issued_first(a, b)
    older = a.service.current(KEY)
    w.clock.advance(60)
    result_of(a.service.renew(KEY, force=True))
    result_of(b.service.store_changed(KEY))
    newer = b.serial()
    assert older is not None and crypto.leaf_serial_hex(older.chain_pem) != newer
    result_of(w.store.save(KEY, older))  # e.g. a restored backup
    result_of(b.service.store_changed(KEY))
    assert b.serial() == newer
    assert outcome_of(b.service.store_changed("not-managed-here")) is None
