"""AcmeClient against the fake RFC 8555 server (synapse_acme.testing.acme_server), in memory."""

from __future__ import annotations

import base64
import datetime
from typing import Any

import josepy as jose
import pytest
from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock

from synapse_acme import crypto
from synapse_acme.acme.ari import ari_cert_id
from synapse_acme.acme.client import AcmeClient
from synapse_acme.acme.csr import make_csr_pem
from synapse_acme.acme.transport import JWSTransport
from synapse_acme.errors import AccountRefused, AcmeError, ConfigError
from synapse_acme.testing.acme_server import FakeAcmeServer
from tests.deferreds import result_of

START = 1_800_000_000.0


class World:
    """A fake CA, a client for it, and a way to run a Deferred to its end."""

    def __init__(self, **server_kw: Any) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.server = FakeAcmeServer(self.clock, **server_kw)
        self.stub = StubTreq(self.server.resource)
        self.key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
        self.transport = JWSTransport(
            self.stub,  # type: ignore[arg-type]
            self.clock,
            self.key,
            self.server.directory_url,
        )
        self.client = AcmeClient(self.transport)

    def run(self, d: defer.Deferred[Any]) -> Any:
        for _ in range(1000):
            self.stub.flush()
            if d.called:
                break
            self.clock.advance(0.1)
        return result_of(d)

    def register(self) -> str:
        url: str = self.run(self.client.register(("mailto:a@example.test",), True))
        return url


def test_register_creates_then_finds_the_account() -> None:
    w = World()
    url = w.register()
    assert url in w.server.accounts
    assert w.client.account_url == url
    assert w.register() == url
    assert len(w.server.accounts) == 1


def test_register_refuses_without_terms_agreement() -> None:
    w = World(terms_of_service="https://acme.test/terms")
    with pytest.raises(ConfigError) as err:
        w.run(w.client.register((), False))
    assert err.value.path == "acme.terms_of_service_agreed"
    assert "https://acme.test/terms" in str(err.value)
    assert not w.server.accounts
    assert w.run(w.client.register((), True)) in w.server.accounts


def test_register_with_external_account_binding() -> None:
    hmac = b"0123456789abcdef0123456789abcdef"
    w = World(require_eab={"kid-1": hmac})
    b64 = base64.urlsafe_b64encode(hmac).decode().rstrip("=")
    url = w.run(w.client.register((), True, ("kid-1", b64)))
    assert url in w.server.accounts


def test_register_without_eab_when_required_is_config_error() -> None:
    w = World(require_eab={"kid-1": b"k" * 32})
    with pytest.raises(ConfigError) as err:
        w.run(w.client.register((), True))
    assert err.value.path == "acme.eab"


def test_register_with_wrong_eab_key_names_the_setting() -> None:
    w = World(require_eab={"kid-1": b"k" * 32})
    wrong = base64.urlsafe_b64encode(b"x" * 32).decode()
    with pytest.raises(AccountRefused) as err:
        w.run(w.client.register((), True, ("kid-1", wrong), "acme.issuers[1].eab"))
    assert err.value.path == "acme.issuers[1].eab"
    assert "'kid-1'" in str(err.value) and wrong not in str(err.value)
    assert isinstance(err.value.problem, AcmeError) and err.value.problem.status is not None
    assert err.value.problem.code in str(err.value)
    assert not w.server.accounts


def test_new_order_with_profile_and_authorizations() -> None:
    w = World(profiles={"shortlived": 6 * 86400})
    w.register()
    order = w.run(w.client.new_order(["a.example.test", "b.example.test"], profile="shortlived"))
    assert order.url in w.server.orders
    assert order.body.status == messages.STATUS_PENDING
    assert order.body.profile == "shortlived"
    assert len(order.body.authorizations) == 2
    authz = w.run(w.client.get_authorization(order.body.authorizations[0]))
    assert authz.body.identifier.value in ("a.example.test", "b.example.test")
    assert {c.chall.typ for c in authz.body.challenges} >= {"http-01"}


def test_unknown_profile_is_typed_error() -> None:
    w = World(profiles={"classic": 90 * 86400})
    w.register()
    with pytest.raises(AcmeError) as err:
        w.run(w.client.new_order(["a.example.test"], profile="nope"))
    assert err.value.code == "invalidProfile"


def test_rejected_identifier() -> None:
    w = World(blocked_names={"blocked.example.test"})
    w.register()
    with pytest.raises(AcmeError) as err:
        w.run(w.client.new_order(["blocked.example.test"]))
    assert err.value.code == "rejectedIdentifier"


def test_replaces_is_not_sent_to_a_ca_without_ari() -> None:
    w = World(ari=False)
    w.register()
    order = w.run(w.client.new_order(["a.example.test"], replaces="AAAA.BBBB"))
    assert w.server.orders[order.url].replaces is None


def test_requests_before_register_are_refused() -> None:
    w = World()
    with pytest.raises(RuntimeError, match="register"):
        w.run(w.client.new_order(["a.example.test"]))


def _issue(w: World, names: list[str]) -> tuple[Any, bytes]:
    """Walk one order by hand with the client's primitives (the issuer's job, spelled out)."""
    order = w.run(w.client.new_order(names))
    for url in order.body.authorizations:
        authz = w.run(w.client.get_authorization(url))
        challb = next(c for c in authz.body.challenges if c.chall.typ == "http-01")
        w.run(w.client.answer_challenge(challb.uri))
    key_pem = crypto.generate_private_key_pem()
    csr = x509.load_pem_x509_csr(make_csr_pem(key_pem, names))
    for _ in range(10):
        order = w.run(w.client.get_order(order.url))
        if order.body.status == messages.STATUS_READY:
            break
        w.clock.advance(1)
    order = w.run(w.client.finalize(order, csr.public_bytes(serialization.Encoding.DER)))
    for _ in range(10):
        if order.body.status == messages.STATUS_VALID:
            break
        w.clock.advance(1)
        order = w.run(w.client.get_order(order.url))
    return order, key_pem


def test_manual_flow_download_chain_with_alternates_and_ari() -> None:
    w = World()
    w.register()
    order, _key_pem = _issue(w, ["a.example.test"])
    assert order.body.status == messages.STATUS_VALID
    chain, alternates = w.run(w.client.download_chain(order.body.certificate))
    certs = crypto.parse_chain(chain)
    assert crypto.certificate_names(certs[0]) == ["a.example.test"]
    assert len(alternates) == 1
    alt_chain, _ = w.run(w.client.download_chain(alternates[0]))
    assert alt_chain != chain
    assert crypto.parse_chain(alt_chain)[0] == certs[0]

    window = w.run(w.client.renewal_info(ari_cert_id(certs[0])))
    assert window is not None
    assert window.start < window.end
    assert window.start.tzinfo is not None
    assert window.retry_after == w.server.ari_retry_after
    assert crypto.not_before(certs[0]) <= window.start <= crypto.not_after(certs[0])
    now = datetime.datetime.fromtimestamp(START, tz=datetime.timezone.utc)
    assert window.end > now


def test_renewal_info_is_none_without_ari() -> None:
    w = World(ari=False)
    assert w.run(w.client.renewal_info("AAAA.BBBB")) is None
