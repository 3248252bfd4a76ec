"""A bundle is validated several times in a process's life (store, service, TLS map); the
costly checks run once per exact pair of bytes (crypto._VerifiedPairs), the names and dates
on every call. And at start-up the service hands the TLS map what it read in batches
(ICertificateBatchConsumer), so the map swaps once per batch and leaves OpenSSL's parsing
to its background warm-up."""

from __future__ import annotations

import datetime
from collections.abc import Iterator, Mapping

import attrs
import pytest
from cryptography import x509
from twisted.internet.task import Clock
from zope.interface import implementer

from synapse_acme import crypto
from synapse_acme import service as service_mod
from synapse_acme.errors import BundleError
from synapse_acme.interfaces import ICertificateBatchConsumer
from synapse_acme.model import CertificateBundle, CertificateSpec
from synapse_acme.names import names_key
from synapse_acme.service import AcmeService
from synapse_acme.testing.issuer import FakeIssuer
from synapse_acme.testing.store import MemoryStore
from synapse_acme.tls import HotSwapTLS
from tests.certs import TestCA, client_context, handshake_with
from tests.deferreds import outcome_of
from tests.unit.test_service import Recorder

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.timezone.utc)


@pytest.fixture(autouse=True)
def fresh_memo() -> Iterator[None]:
    crypto.forget_verified()
    yield
    crypto.forget_verified()


@pytest.fixture
def ca() -> TestCA:
    return TestCA(now=NOW)


def _count_signature_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = crypto.check_chain_order

    def counting(chain: list[x509.Certificate]) -> None:
        calls[0] += 1
        real(chain)

    monkeypatch.setattr(crypto, "check_chain_order", counting)
    return calls


def test_the_costly_checks_run_once_per_pair_of_bytes(
    ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_signature_checks(monkeypatch)
    bundle = ca.issue(["a.example.test"])
    for _ in range(3):
        crypto.validate_bundle(bundle, ["a.example.test"], NOW)
    assert calls == [1]
    # equal bytes in another object: the same pair
    crypto.validate_bundle(attrs.evolve(bundle, metadata={"other": 1}), None, NOW)
    assert calls == [1]
    # another pair: checked
    crypto.validate_bundle(ca.issue(["b.example.test"]), None, NOW)
    assert calls == [2]


def test_a_remembered_pair_still_gets_its_names_and_dates_checked(ca: TestCA) -> None:
    bundle = ca.issue(["a.example.test"], not_after=NOW + datetime.timedelta(days=1))
    crypto.validate_bundle(bundle, ["a.example.test"], NOW)
    with pytest.raises(BundleError, match=r"does not cover b\.example\.test"):
        crypto.validate_bundle(bundle, ["b.example.test"], NOW)
    with pytest.raises(BundleError, match="expired"):
        crypto.validate_bundle(bundle, None, NOW + datetime.timedelta(days=2))
    with pytest.raises(BundleError, match="not valid before"):
        crypto.validate_bundle(bundle, None, NOW - datetime.timedelta(days=1))


def test_changed_bytes_are_checked_again_and_refused(ca: TestCA) -> None:
    good = ca.issue(["a.example.test"])
    other = ca.issue(["a.example.test"])
    crypto.validate_bundle(good, None, NOW)
    crypto.validate_bundle(other, None, NOW)
    # each half of a remembered pair, with the other's half: a new pair, refused
    with pytest.raises(BundleError, match="private key does not match"):
        crypto.validate_bundle(attrs.evolve(good, key_pem=other.key_pem), None, NOW)
    stranger = TestCA(now=NOW, name="Stranger")
    leaf_pem = good.chain_pem[: -len(ca.intermediate_pem)]
    spliced = attrs.evolve(good, chain_pem=leaf_pem + stranger.intermediate_pem)
    with pytest.raises(BundleError, match="not signed by the next certificate"):
        crypto.validate_bundle(spliced, None, NOW)
    # a refusal is not remembered as a pass
    with pytest.raises(BundleError):
        crypto.validate_bundle(spliced, None, NOW)


def test_the_memory_is_bounded_least_recently_used_first_out() -> None:
    pairs = crypto._VerifiedPairs(limit=3)
    digests = [crypto._VerifiedPairs.digest(b"c%d" % i, b"k") for i in range(4)]
    for d in digests[:3]:
        pairs.add(d)
    assert digests[0] in pairs  # used: now the most recent
    pairs.add(digests[3])
    assert digests[1] not in pairs
    assert all(d in pairs for d in (digests[0], digests[2], digests[3]))
    # the two halves are told apart: moving bytes from the chain to the key is another pair
    assert crypto._VerifiedPairs.digest(b"ab", b"c") != crypto._VerifiedPairs.digest(b"a", b"bc")


@implementer(ICertificateBatchConsumer)
class BatchRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []

    def certificates_loaded(self, bundles: Mapping[str, CertificateBundle]) -> None:
        self.batches.append(list(bundles))


def test_start_up_hands_a_batch_consumer_batches_and_the_others_one_by_one(
    ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_mod, "STORE_LOAD_BATCH", 2)
    clock = Clock()
    clock.advance(NOW.timestamp())
    store = MemoryStore()
    names = [(f"n{i}.example.test",) for i in range(5)]
    keys = [names_key(n) for n in names]
    for key, n in zip(keys, names, strict=True):
        outcome_of(store.save(key, ca.issue(list(n))))
    # one entry is unusable (for other names): left out, never stopping the others
    outcome_of(store.save(keys[2], ca.issue(["other.example.test"])))
    service = AcmeService(
        [CertificateSpec(names=n) for n in names],
        store,
        FakeIssuer(ca=ca, clock=clock),
        clock,
        check_jitter=0.0,
    )
    many, one = BatchRecorder(), Recorder()
    service.add_consumer(many)
    service.add_consumer(one)
    service.startService()
    assert many.batches == [keys[0:2], keys[3:5]]
    assert many.changes == []
    assert [k for k, _ in one.changes] == keys[0:2] + keys[3:5]
    # later changes come one by one, to both (the damaged one is issued anew)
    clock.advance(0)
    assert many.changes and many.changes[-1][0] == keys[2]
    assert one.changes[-1][0] == keys[2]
    service.stopService()


def test_the_tls_map_serves_a_start_up_batch_after_one_swap() -> None:
    ca = TestCA()  # the client checks the dates on the real clock
    clock = Clock()
    clock.advance(ca.now.timestamp())
    tls = HotSwapTLS(clock=clock, default_key="k0")
    swaps = [0]
    tls.on_swap = lambda: swaps.__setitem__(0, swaps[0] + 1)
    bundles = {f"k{i}": ca.issue([f"n{i}.example.test"]) for i in range(4)}
    bundles["bad"] = attrs.evolve(ca.issue(["bad.example.test"]), key_pem=bundles["k1"].key_pem)
    tls.certificates_loaded(bundles)
    assert swaps == [1]
    assert tls.current("bad") is None
    client = client_context(ca)
    for i in range(4):
        peer = handshake_with(tls, client, f"n{i}.example.test".encode()).get_peer_certificate()
        assert peer is not None
        assert crypto.certificate_names(peer.to_cryptography()) == [f"n{i}.example.test"]
