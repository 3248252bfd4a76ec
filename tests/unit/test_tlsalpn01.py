"""tls-alpn-01 (RFC 8737): the validation certificate, and HotSwapTLS serving it only to a
client that offers ``acme-tls/1`` alone for a name with a pending challenge.

Handshakes are real OpenSSL handshakes over memory BIOs (``tests.certs``), over TLS 1.3 and 1.2;
time comes from a ``Clock``.
"""

from __future__ import annotations

import datetime
import hashlib

import josepy as jose
import pytest
from acme import challenges, messages
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from synapse_acme import tls as tls_module
from synapse_acme.acme import tlsalpn
from synapse_acme.interfaces import IResponder
from synapse_acme.tls import HotSwapTLS
from synapse_acme.tlsalpn01 import TLSALPN01Responder
from tests.certs import TestCA, client_context, handshake, handshake_with, leaf_serial

NOW = datetime.datetime(2026, 11, 23, 12, 0, tzinfo=datetime.timezone.utc)
KEY_AUTHORIZATION = "token-abc.thumbprint-xyz"
VERSIONS = [None, SSL.TLS1_2_VERSION]


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA(now=NOW)


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(NOW.timestamp())
    return c


@pytest.fixture
def tls(clock: Clock) -> HotSwapTLS:
    return HotSwapTLS(clock=clock, default_key="main")


@pytest.fixture
def responder(tls: HotSwapTLS, clock: Clock) -> TLSALPN01Responder:
    return TLSALPN01Responder(tls=tls, clock=clock)


def validator_context(max_version: int | None = None) -> SSL.Context:
    """What a CA's validator uses: no chain verification (the certificate is self-signed);
    it checks the name and the extension itself."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    return ctx


def validate(
    tls: HotSwapTLS, sni: bytes | None, alpn: list[bytes] | None, max_version: int | None = None
) -> tuple[x509.Certificate, bytes]:
    """One handshake as a validator would make it: the leaf and the negotiated protocol."""
    client = handshake_with(tls, validator_context(max_version), sni, alpn)
    cert = client.get_peer_certificate(as_cryptography=True)
    assert cert is not None
    return cert, client.get_alpn_proto_negotiated()


def assert_validation_certificate(cert: x509.Certificate, name: str, key_auth: str) -> None:
    """RFC 8737 section 3, as a CA checks it."""
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [name]
    ext = cert.extensions.get_extension_for_oid(tlsalpn.ACME_IDENTIFIER_OID)
    assert ext.critical
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    digest = hashlib.sha256(key_auth.encode("ascii")).digest()
    assert ext.value.value == b"\x04\x20" + digest  # DER OCTET STRING of the SHA-256


# -- the protocol layer ------------------------------------------------------------------------


def test_an_offered_tls_alpn_01_challenge_is_recognised() -> None:
    body = messages.ChallengeBody.from_json(
        {"type": "tls-alpn-01", "url": "https://ca/c/1", "status": "pending", "token": "A" * 43}
    )
    # The library's view: unrecognised (acme 5 and later), or its own class (acme 4, the
    # declared minimum, still had one). Either way the issuer answers with ours.
    assert isinstance(body.chall, challenges.UnrecognizedChallenge) or (
        type(body.chall).__name__ == "TLSALPN01" and body.chall.typ == "tls-alpn-01"
    )
    chall = tlsalpn.recognise(body.chall)
    assert isinstance(chall, tlsalpn.TLSALPN01)
    assert isinstance(chall, challenges.KeyAuthorizationChallenge)
    key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    response, validation = chall.response_and_validation(key)
    assert response.to_partial_json() == {}  # RFC 8555: the POST body is {}
    assert validation == chall.key_authorization(key)
    http = messages.ChallengeBody.from_json(
        {"type": "http-01", "url": "https://ca/c/2", "status": "pending", "token": "B" * 43}
    )
    assert tlsalpn.recognise(http.chall) is http.chall


def test_validation_certificate(clock: Clock) -> None:
    cert, key = tlsalpn.validation_certificate("example.test", KEY_AUTHORIZATION, NOW)
    assert_validation_certificate(cert, "example.test", KEY_AUTHORIZATION)
    assert cert.issuer == cert.subject
    assert cert.not_valid_before_utc < NOW < cert.not_valid_after_utc
    assert cert.public_key() == key.public_key()


# -- HotSwapTLS: who gets what -----------------------------------------------------------------


@pytest.mark.parametrize("max_version", VERSIONS)
def test_acme_tls_1_only_gets_the_validation_certificate(
    tls: HotSwapTLS, responder: TLSALPN01Responder, ca: TestCA, max_version: int | None
) -> None:
    tls.set_bundle("main", ca.issue(["example.test", "www.example.test"]))
    responder.start_responding("www.example.test", "tok", KEY_AUTHORIZATION)
    cert, alpn = validate(tls, b"www.example.test", [b"acme-tls/1"], max_version)
    assert alpn == b"acme-tls/1"
    assert_validation_certificate(cert, "www.example.test", KEY_AUTHORIZATION)


@pytest.mark.parametrize("max_version", VERSIONS)
def test_every_other_handshake_gets_the_normal_certificate_during_the_challenge(
    tls: HotSwapTLS, responder: TLSALPN01Responder, ca: TestCA, max_version: int | None
) -> None:
    tls.set_bundle("main", ca.issue(["example.test"]))
    tls.set_bundle("other", ca.issue(["other.test"]))
    responder.start_responding("example.test", "t1", KEY_AUTHORIZATION)
    responder.start_responding("other.test", "t2", KEY_AUTHORIZATION)
    main, other = (leaf_serial(tls.current(k)) for k in ("main", "other"))  # type: ignore[arg-type]
    for sni, serial in ((b"example.test", main), (b"other.test", other)):
        # A normal client (verifying the chain as usual): h2, http/1.1, no ALPN, or
        # acme-tls/1 among others.
        for offer in ([b"h2", b"http/1.1"], [b"http/1.1"], None, [b"acme-tls/1", b"h2"]):
            r = handshake(tls, ca, sni, offer, max_version=max_version)
            assert r.serial == serial, (sni, offer)
            assert r.alpn == (b"" if offer is None else b"h2" if b"h2" in offer else b"http/1.1")
    # acme-tls/1 alone, but for a name without a challenge, or without SNI: normal certificate.
    tls.set_bundle("third", ca.issue(["third.test"]))
    cert, alpn = validate(tls, b"third.test", [b"acme-tls/1"], max_version)
    assert cert.serial_number == leaf_serial(tls.current("third"))  # type: ignore[arg-type]
    assert alpn == b""
    cert, _ = validate(tls, None, [b"acme-tls/1"], max_version)
    assert cert.serial_number == main


def test_after_stop_responding_the_validation_certificate_is_gone(
    tls: HotSwapTLS, responder: TLSALPN01Responder, ca: TestCA
) -> None:
    tls.set_bundle("main", ca.issue(["example.test"]))
    main = leaf_serial(tls.current("main"))  # type: ignore[arg-type]
    responder.start_responding("example.test", "tok", KEY_AUTHORIZATION)
    assert tls.challenge_names() == ["example.test"]
    responder.stop_responding("example.test", "other-token")  # not the one served: no change
    assert validate(tls, b"example.test", [b"acme-tls/1"])[1] == b"acme-tls/1"
    responder.stop_responding("example.test", "tok")
    assert tls.challenge_names() == []
    cert, alpn = validate(tls, b"example.test", [b"acme-tls/1"])
    assert (cert.serial_number, alpn) == (main, b"")
    responder.stop_responding("example.test", "tok")  # unknown now: not an error


def test_a_challenge_survives_certificate_swaps_and_serves_the_new_certificate(
    tls: HotSwapTLS, responder: TLSALPN01Responder, ca: TestCA
) -> None:
    tls.set_bundle("main", ca.issue(["example.test"]))
    responder.start_responding("example.test", "tok", KEY_AUTHORIZATION)
    tls.set_bundle("main", ca.issue(["example.test"]))  # a renewal lands meanwhile
    assert handshake(tls, ca, b"example.test", [b"h2"]).serial == leaf_serial(
        tls.current("main")  # type: ignore[arg-type]
    )
    assert validate(tls, b"example.test", [b"acme-tls/1"])[1] == b"acme-tls/1"


def test_first_issuance_with_nothing_served_yet(
    tls: HotSwapTLS, responder: TLSALPN01Responder
) -> None:
    """The first certificate of a server with no placeholder: the validation still works."""
    responder.start_responding("example.test", "tok", KEY_AUTHORIZATION)
    for version in VERSIONS:
        cert, alpn = validate(tls, b"example.test", [b"acme-tls/1"], version)
        assert alpn == b"acme-tls/1"
        assert_validation_certificate(cert, "example.test", KEY_AUTHORIZATION)


def test_wildcard_challenge_names_a_wildcard_cert_name_and_wildcards_are_refused(
    tls: HotSwapTLS, responder: TLSALPN01Responder, ca: TestCA
) -> None:
    tls.set_bundle("main", ca.issue(["example.test"]))
    tls.set_bundle("wild", ca.issue(["*.example.test"]))
    responder.start_responding("a.example.test", "tok", KEY_AUTHORIZATION)
    wild = leaf_serial(tls.current("wild"))  # type: ignore[arg-type]
    # the normal certificate of a name covered by a wildcard is the wildcard one
    assert handshake(tls, ca, b"a.example.test", [b"h2"]).serial == wild
    assert validate(tls, b"a.example.test", [b"acme-tls/1"])[1] == b"acme-tls/1"
    with pytest.raises(ValueError, match="wildcard"):
        responder.start_responding("*.example.test", "tok2", KEY_AUTHORIZATION)


def test_no_challenge_keeps_the_fast_path(
    tls: HotSwapTLS, responder: TLSALPN01Responder, ca: TestCA
) -> None:
    """One certificate and no challenge: no SNI callback, so a handshake runs no Python; a
    pending challenge installs one, and stopping it takes it away again."""
    tls.set_bundle("main", ca.issue(["example.test"]))

    def has_sni_callback() -> bool:
        dispatch = tls._snapshot.dispatch
        return dispatch._tlsext_servername_callback is not None  # type: ignore[attr-defined]

    assert not has_sni_callback()
    responder.start_responding("example.test", "tok", KEY_AUTHORIZATION)
    assert has_sni_callback()
    responder.stop_responding("example.test", "tok")
    assert not has_sni_callback()


def test_provides_the_responder_contract(responder: TLSALPN01Responder) -> None:
    assert verifyObject(IResponder, responder)
    assert responder.challenge_type == "tls-alpn-01"


def test_no_context_building_in_a_validation_handshake(
    tls: HotSwapTLS, responder: TLSALPN01Responder, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls.set_bundle("main", ca.issue(["example.test"]))
    responder.start_responding("example.test", "tok", KEY_AUTHORIZATION)
    ctx = client_context(ca)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("context building in the handshake path")

    monkeypatch.setattr(tls_module, "build_context", refuse)
    monkeypatch.setattr(tls_module, "_base_context", refuse)
    assert validate(tls, b"example.test", [b"acme-tls/1"])[1] == b"acme-tls/1"
    handshake_with(tls, ctx, b"example.test", [b"h2"])
