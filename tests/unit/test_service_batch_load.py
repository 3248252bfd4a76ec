"""AcmeService on a store that reads in batches (IBatchLoad, as the PostgreSQL store does), at
start and in database mode's periodic re-read: the same outcome as key by key, in
STORE_LOAD_BATCH keys per read, with a damaged entry or an unreadable batch reported per
certificate and never stopping the others.
(The real PostgreSQL store: tests/integration/test_pgstore_batch.py.)"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import attrs
import pytest
from twisted.internet import defer
from zope.interface import implementer

from synapse_acme import service as service_mod
from synapse_acme.errors import StoreError
from synapse_acme.interfaces import IBatchLoad, ICertificateStore
from synapse_acme.model import CertificateBundle, CertificateSpec
from synapse_acme.names import names_key
from synapse_acme.service import AcmeService, Coordination
from synapse_acme.testing.issuer import FakeIssuer
from synapse_acme.testing.store import MemoryStore
from tests.deferreds import outcome_of
from tests.unit.test_service import Recorder, World

SPECS = tuple((f"n{i}.example.test",) for i in range(5))


@implementer(ICertificateStore, IBatchLoad)
@attrs.define
class BatchStore:
    """A MemoryStore that also reads in batches, recording each batch; ``damaged`` keys come
    back as a StoreError, ``fail_batches`` makes that many reads fail as a whole."""

    inner: MemoryStore
    batches: list[list[str]] = attrs.Factory(list)
    damaged: set[str] = attrs.Factory(set)
    fail_batches: int = 0
    digest_reads: int = 0

    def load(self, key: str) -> defer.Deferred[CertificateBundle | None]:
        raise AssertionError("the service must read a batch store in batches")

    def save(self, key: str, bundle: CertificateBundle) -> defer.Deferred[None]:
        return self.inner.save(key, bundle)

    def load_many(
        self, keys: Sequence[str]
    ) -> defer.Deferred[dict[str, CertificateBundle | StoreError | None]]:
        self.batches.append(list(keys))
        if self.fail_batches:
            self.fail_batches -= 1
            return defer.fail(StoreError("PostgreSQL store: connection refused"))
        out: dict[str, CertificateBundle | StoreError | None] = {}
        for key in keys:
            if key in self.damaged:
                out[key] = StoreError(f"the private key of {key} does not decrypt")
            else:
                out[key] = outcome_of(self.inner.load(key))
        return defer.succeed(out)

    def chain_digests(self, keys: Sequence[str]) -> defer.Deferred[dict[str, str]]:
        self.digest_reads += 1
        out = {}
        for key in keys:
            bundle = outcome_of(self.inner.load(key))
            if bundle is not None:
                out[key] = hashlib.sha256(bundle.chain_pem).hexdigest()
        return defer.succeed(out)


def _filled() -> World:
    """A first process that issued a certificate for every spec into its MemoryStore."""
    first = World(specs=SPECS)
    first.start()
    assert all(outcome_of(first.store.load(names_key(n))) is not None for n in SPECS)
    return first


def _second(store: ICertificateStore, first: World) -> tuple[AcmeService, FakeIssuer, Recorder]:
    """Another process starting on the same store, at the same time."""
    issuer = FakeIssuer(ca=first.ca, clock=first.clock)
    specs = [CertificateSpec(names=n) for n in SPECS]
    service = AcmeService(specs, store, issuer, first.clock, check_jitter=0.0)
    consumer = Recorder()
    service.add_consumer(consumer)
    return service, issuer, consumer


def test_loads_in_batches_with_the_same_outcome(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_mod, "STORE_LOAD_BATCH", 2)
    first = _filled()
    batch = BatchStore(first.store)
    service, issuer, consumer = _second(batch, first)
    service.startService()
    keys = [names_key(n) for n in SPECS]
    assert batch.batches == [keys[0:2], keys[2:4], keys[4:5]]
    for key in keys:
        assert service.current(key) == first.service.current(key)
    assert [k for k, _ in consumer.changes] == keys
    first.clock.advance(0)
    assert issuer.calls == []  # nothing due: all were served from the store


def test_a_damaged_entry_or_a_failed_batch_is_reported_per_certificate(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(service_mod, "STORE_LOAD_BATCH", 2)
    first = _filled()
    keys = [names_key(n) for n in SPECS]
    batch = BatchStore(first.store, damaged={keys[4]}, fail_batches=1)
    service, issuer, _ = _second(batch, first)
    with caplog.at_level(logging.ERROR):
        service.startService()
    # the first batch could not be read: both certificates say so; the others are served
    for key in keys[0:2]:
        assert service.current(key) is None
        assert f"Cannot read the stored certificate for {key}: PostgreSQL store" in caplog.text
    for key in keys[2:4]:
        assert service.current(key) == first.service.current(key)
    assert service.current(keys[4]) is None
    assert f"{keys[4]}: the private key of {keys[4]} does not decrypt" in caplog.text
    first.clock.advance(0)  # what could not be read is issued, as when read key by key
    assert sorted(names for names, _ in issuer.calls) == [SPECS[0], SPECS[1], SPECS[4]]


def test_the_shared_store_safety_net_reads_in_batches(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Database mode's periodic check re-reads the store for what other processes saved: it
    looks at the chains' digests and loads only what changed, in batches, adopting the newer
    certificate and keeping the served one on a damaged row."""
    monkeypatch.setattr(service_mod, "STORE_LOAD_BATCH", 2)
    first = _filled()
    keys = [names_key(n) for n in SPECS]
    batch = BatchStore(first.store)
    issuer = FakeIssuer(ca=first.ca, clock=first.clock)
    service = AcmeService(
        [CertificateSpec(names=n) for n in SPECS],
        batch,
        issuer,
        first.clock,
        check_interval=600.0,
        check_jitter=0.0,
        coordination=Coordination(first.store, "second"),
    )
    service.startService()
    first.clock.advance(0)  # the first check (nothing newer yet)
    served = {key: service.current(key) for key in keys}
    batch.batches.clear()
    first.clock.advance(600)  # an idle check: one look at the digests, nothing loaded
    assert batch.batches == [] and batch.digest_reads >= 2
    first.clock.advance(60)
    for key in (keys[1], keys[3], keys[4]):
        renewed = outcome_of(first.service.renew(key, force=True))
        assert [k for k, _ in renewed] == [key]
    batch.damaged = {keys[3]}
    with caplog.at_level(logging.WARNING):
        first.clock.advance(600)  # the next check: only what changed, in batches
    assert batch.batches == [[keys[1], keys[3]], [keys[4]]]
    assert service.current(keys[1]) == first.service.current(keys[1]) != served[keys[1]]
    assert service.current(keys[4]) == first.service.current(keys[4]) != served[keys[4]]
    assert service.current(keys[3]) == served[keys[3]]  # kept: the row could not be read
    assert f"Cannot read the changed certificate for {keys[3]}" in caplog.text
    for key in (keys[0], keys[2]):
        assert service.current(key) == served[key]
    assert issuer.calls == []
