"""The PostgreSQL store's batched read (``load_many``, IBatchLoad) against a real PostgreSQL:
what it gives for each key is exactly what ``load`` gives (bundle, None, or the StoreError),
and AcmeService starts over it with every certificate served. Needs Debian's ``postgresql``:
without it these tests fail, never skip."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.task import Clock

from synapse_acme.errors import StoreError
from synapse_acme.interfaces import IBatchLoad
from synapse_acme.model import CertificateSpec
from synapse_acme.names import names_key
from synapse_acme.pgstore import KeyRing, PostgresBackend
from synapse_acme.service import AcmeService
from synapse_acme.testing.issuer import FakeIssuer
from synapse_acme.testing.postgres import InlineDatabase, PostgresServer
from tests.certs import TestCA
from tests.deferreds import failure_of, result_of
from tests.unit.test_store_contract import bundle


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


class CountingDatabase(InlineDatabase):
    """InlineDatabase counting its transactions (one per round trip to the server)."""

    interactions = 0

    def interaction(self, f: Any) -> Any:
        self.interactions += 1
        return super().interaction(f)


@pytest.fixture
def backend(postgres: PostgresServer) -> Iterator[PostgresBackend]:
    handle = PostgresBackend(
        CountingDatabase(postgres.create_database()), Clock(), KeyRing((os.urandom(32),))
    )
    result_of(handle.setup())
    yield handle
    result_of(handle.close())


def test_load_many_gives_what_load_gives_in_one_query(backend: PostgresBackend) -> None:
    assert IBatchLoad.providedBy(backend)
    for n, key in enumerate(("a.example", "b.example", "c.example"), start=1):
        result_of(backend.save(key, bundle(n)))
    # c's sealed key copied from a's row: it does not decrypt (the row is named)
    result_of(
        backend.database.interaction(
            lambda cur: cur.execute(
                "UPDATE synapse_acme_certificates SET key_sealed = (SELECT key_sealed FROM "
                "synapse_acme_certificates WHERE key = 'a.example') WHERE key = 'c.example'"
            )
        )
    )
    keys = ["a.example", "b.example", "c.example", "missing.example", "../escape"]
    db = backend.database
    assert isinstance(db, CountingDatabase)
    before = db.interactions
    got = result_of(backend.load_many(keys))
    assert db.interactions == before + 1
    assert set(got) == set(keys)
    assert got["a.example"] == bundle(1) == result_of(backend.load("a.example"))
    assert got["b.example"] == bundle(2) == result_of(backend.load("b.example"))
    assert got["missing.example"] is None is result_of(backend.load("missing.example"))
    for key, why in (("c.example", "does not decrypt"), ("../escape", "unsafe store key")):
        err = got[key]
        assert isinstance(err, StoreError) and why in str(err)
        assert str(failure_of(backend.load(key), StoreError)) == str(err)
    assert result_of(backend.load_many([])) == {}


def test_service_starts_over_it_in_batches(postgres: PostgresServer, backend: Any) -> None:
    ca = TestCA()
    clock = Clock()
    clock.advance(ca.now.timestamp())
    issuer = FakeIssuer(ca=ca, clock=clock)
    specs = [CertificateSpec(names=(f"n{i}.example.test",)) for i in range(450)]
    for spec in specs:
        issued: list[Any] = []
        issuer.issue(spec.names, bundle(1).key_pem).addCallback(issued.append)
        result_of(backend.save(names_key(spec.names), issued[0]))
    issuer.calls.clear()
    db = backend.database
    before = db.interactions
    service = AcmeService(specs, backend, issuer, clock, check_jitter=0.0)
    service.startService()
    assert db.interactions - before == 3  # 450 certificates, 200 per batch
    assert all(s.has_certificate and not s.placeholder for s in service.status())
    clock.advance(0)
    assert issuer.calls == []  # every one served from the store, none due
    result_of(service.stopService())


def test_chain_digests_are_the_stored_chains_in_one_query(backend: PostgresBackend) -> None:
    """The periodic look of database mode: the server hashes the chains, nothing is decrypted,
    a key without a bundle is absent, and a save changes its key's digest only."""
    result_of(backend.save("a.example", bundle(1)))
    result_of(backend.save("b.example", bundle(2)))
    db = backend.database
    assert isinstance(db, CountingDatabase)
    before = db.interactions
    digests = result_of(backend.chain_digests(["a.example", "b.example", "none.example"]))
    assert db.interactions == before + 1
    assert digests == {
        key: hashlib.sha256(result_of(backend.load(key)).chain_pem).hexdigest()
        for key in ("a.example", "b.example")
    }
    result_of(backend.save("b.example", bundle(3)))
    after = result_of(backend.chain_digests(["a.example", "b.example"]))
    assert after["a.example"] == digests["a.example"]
    assert after["b.example"] == hashlib.sha256(bundle(3).chain_pem).hexdigest()
    assert after["b.example"] != digests["b.example"]
    failure_of(backend.chain_digests(["../escape"]), StoreError)
