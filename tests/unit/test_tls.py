"""HotSwapTLS: SNI selection, ALPN, atomic swaps and refusal of bad bundles, all in memory.

Handshakes run over pyOpenSSL memory BIO pairs (and once through Twisted's TLSMemoryBIOFactory
with ``twisted.test.iosim``), driven synchronously; time comes from a ``Clock``.
"""

from __future__ import annotations

import builtins
import datetime
import logging
import os
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IProtocolNegotiationFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from twisted.web.server import Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from synapse_acme import tls as tls_module
from synapse_acme.errors import BundleError, ListenError
from synapse_acme.interfaces import ICertificateConsumer
from synapse_acme.listeners import tls_listener, tls_server_endpoint
from synapse_acme.model import CertificateBundle
from synapse_acme.tls import HotSwapTLS, build_context
from tests.certs import TestCA, client_context, handshake, handshake_with, leaf_serial

NOW = datetime.datetime(2026, 11, 23, 12, 0, tzinfo=datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


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


# -- the contract ------------------------------------------------------------------------------


def test_provides_interfaces(tls: HotSwapTLS) -> None:
    assert verifyObject(IOpenSSLServerConnectionCreator, tls)
    assert verifyObject(ICertificateConsumer, tls)


# -- SNI selection -----------------------------------------------------------------------------


def test_sni_exact_wildcard_default(tls: HotSwapTLS, ca: TestCA) -> None:
    main = ca.issue(["example.test"])
    wild = ca.issue(["*.wild.example.test"])
    exact = ca.issue(["a.wild.example.test"])
    tls.set_bundle("main", main)
    tls.set_bundle("wild", wild)
    tls.set_bundle("exact", exact)

    assert handshake(tls, ca, b"example.test").serial == leaf_serial(main)
    # exact beats wildcard
    assert handshake(tls, ca, b"a.wild.example.test").serial == leaf_serial(exact)
    assert handshake(tls, ca, b"b.wild.example.test").serial == leaf_serial(wild)
    # SNI is case-insensitive
    assert handshake(tls, ca, b"B.Wild.Example.Test").serial == leaf_serial(wild)
    # wildcard covers exactly one label: deeper names and the bare parent get the default
    assert handshake(tls, ca, b"x.b.wild.example.test").serial == leaf_serial(main)
    assert handshake(tls, ca, b"wild.example.test").serial == leaf_serial(main)
    # unknown name and no SNI at all: default
    assert handshake(tls, ca, b"unknown.test").serial == leaf_serial(main)
    assert handshake(tls, ca, None).serial == leaf_serial(main)
    assert tls.names() == ["*.wild.example.test", "a.wild.example.test", "example.test"]
    assert tls.keys() == ["main", "wild", "exact"]
    assert tls.default() == "main"


def test_default_is_first_installed_until_configured_default_arrives(
    tls: HotSwapTLS, ca: TestCA
) -> None:
    other = ca.issue(["other.test"])
    tls.set_bundle("other", other)
    assert tls.default() == "other"
    assert handshake(tls, ca, None).serial == leaf_serial(other)
    main = ca.issue(["example.test"])
    tls.set_bundle("main", main)
    assert tls.default() == "main"
    assert handshake(tls, ca, None).serial == leaf_serial(main)
    assert handshake(tls, ca, b"other.test").serial == leaf_serial(other)


def test_no_certificate_fails_handshake_cleanly(tls: HotSwapTLS, ca: TestCA) -> None:
    with pytest.raises(SSL.Error):
        handshake(tls, ca, b"example.test")


def test_full_chain_is_sent_and_verifies(tls: HotSwapTLS, ca: TestCA) -> None:
    tls.set_bundle("main", ca.issue(["example.test"]))
    tls.set_bundle("b", ca.issue(["b.test"]))
    for sni in (b"example.test", b"b.test", None):  # also after the SNI context switch
        result = handshake(tls, ca, sni)
        assert [c.subject for c in result.chain] == [
            result.chain[0].subject,
            ca.intermediate.subject,
        ]


# -- ALPN --------------------------------------------------------------------------------------


def test_alpn_survives_sni_switch(tls: HotSwapTLS, ca: TestCA) -> None:
    tls.set_bundle("main", ca.issue(["example.test"]))
    tls.set_bundle("other", ca.issue(["other.test"]))
    # other.test is not the default: the connection switches context in the SNI callback
    assert handshake(tls, ca, b"other.test", [b"h2", b"http/1.1"]).alpn == b"h2"
    assert handshake(tls, ca, b"other.test", [b"http/1.1"]).alpn == b"http/1.1"
    assert handshake(tls, ca, b"example.test", [b"http/1.1", b"h2"]).alpn == b"h2"
    # no overlap: the handshake still succeeds, without a protocol
    assert handshake(tls, ca, b"other.test", [b"spdy/3"]).alpn == b""


def test_alpn_configurable(clock: Clock, ca: TestCA) -> None:
    tls = HotSwapTLS(clock=clock, alpn=[b"http/1.1"])
    tls.set_bundle("main", ca.issue(["example.test"]))
    assert handshake(tls, ca, b"example.test", [b"h2", b"http/1.1"]).alpn == b"http/1.1"


# -- protocol settings -------------------------------------------------------------------------


def test_tls13_and_tls12_aead_only(tls: HotSwapTLS, ca: TestCA) -> None:
    tls.set_bundle("main", ca.issue(["example.test"]))
    r13 = handshake(tls, ca, b"example.test")
    assert r13.version == "TLSv1.3"
    r12 = handshake(tls, ca, b"example.test", max_version=SSL.TLS1_2_VERSION)
    assert r12.version == "TLSv1.2"
    assert r12.cipher is not None
    assert r12.cipher.startswith("ECDHE-") and ("GCM" in r12.cipher or "CHACHA20" in r12.cipher)


def test_tls11_refused(tls: HotSwapTLS, ca: TestCA) -> None:
    tls.set_bundle("main", ca.issue(["example.test"]))
    with pytest.raises(SSL.Error):
        handshake(tls, ca, b"example.test", max_version=SSL.TLS1_1_VERSION)


def test_rsa_certificate(tls: HotSwapTLS, ca: TestCA) -> None:
    bundle = ca.issue(["example.test"], key_type="rsa-2048")
    tls.set_bundle("main", bundle)
    r12 = handshake(tls, ca, b"example.test", max_version=SSL.TLS1_2_VERSION)
    assert r12.serial == leaf_serial(bundle)
    assert r12.cipher is not None and r12.cipher.startswith("ECDHE-RSA-")


# -- swapping ----------------------------------------------------------------------------------


def test_swap_new_connections_get_new_cert_old_keep_theirs(tls: HotSwapTLS, ca: TestCA) -> None:
    old = ca.issue(["example.test"])
    other_old = ca.issue(["other.test"])
    tls.set_bundle("main", old)
    tls.set_bundle("other", other_old)
    before_main = tls.serverConnectionForTLS(None)  # accepted, ClientHello not yet received
    before_other = tls.serverConnectionForTLS(None)

    new = ca.issue(["example.test"])
    other_new = ca.issue(["other.test"])
    tls.certificate_changed("main", new)
    tls.certificate_changed("other", other_new)
    assert tls.current("main") is new

    assert handshake(tls, ca, b"example.test", server=before_main).serial == leaf_serial(old)
    assert handshake(tls, ca, b"other.test", server=before_other).serial == leaf_serial(other_old)
    assert handshake(tls, ca, b"example.test").serial == leaf_serial(new)
    assert handshake(tls, ca, b"other.test").serial == leaf_serial(other_new)
    assert handshake(tls, ca, None).serial == leaf_serial(new)


def test_established_connection_survives_swap(tls: HotSwapTLS, ca: TestCA) -> None:
    tls.set_bundle("main", ca.issue(["example.test"]))
    server = tls.serverConnectionForTLS(None)
    client = handshake_with(tls, client_context(ca), b"example.test", server=server)
    tls.set_bundle("main", ca.issue(["example.test"]))
    client.send(b"ping")
    server.bio_write(client.bio_read(65536))
    assert server.recv(100) == b"ping"


def test_remove(tls: HotSwapTLS, ca: TestCA) -> None:
    main, other = ca.issue(["example.test"]), ca.issue(["other.test"])
    tls.set_bundle("main", main)
    tls.set_bundle("other", other)
    tls.remove("other")
    tls.remove("never-there")
    assert tls.current("other") is None
    assert handshake(tls, ca, b"other.test").serial == leaf_serial(main)


def test_overlapping_names_longest_valid_wins(tls: HotSwapTLS, ca: TestCA) -> None:
    short = ca.issue(["shared.test"], not_after=NOW + 10 * DAY)
    long = ca.issue(["shared.test"], not_after=NOW + 80 * DAY)
    tls.set_bundle("main", ca.issue(["example.test"]))
    tls.set_bundle("long", long)
    tls.set_bundle("short", short)
    assert handshake(tls, ca, b"shared.test").serial == leaf_serial(long)


# -- no I/O in the handshake path --------------------------------------------------------------


def test_no_disk_io_or_context_building_during_handshakes(
    tls: HotSwapTLS, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls.set_bundle("main", ca.issue(["example.test"]))
    tls.set_bundle("wild", ca.issue(["*.example.test"]))
    client_ctxs = [client_context(ca) for _ in range(3)]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"I/O or context building in the handshake path: {args!r}")

    serials = []
    with monkeypatch.context() as patched:
        patched.setattr(builtins, "open", refuse)
        patched.setattr(os, "stat", refuse)
        patched.setattr(os, "open", refuse)
        patched.setattr(tls_module, "build_context", refuse)
        patched.setattr(tls_module, "_base_context", refuse)
        for ctx, sni in zip(client_ctxs, (b"example.test", b"a.example.test", None), strict=True):
            client = handshake_with(tls, ctx, sni)
            cert = client.get_peer_certificate(as_cryptography=True)
            serials.append(cert.serial_number if cert is not None else None)
    main, wild = (leaf_serial(tls.current(k)) for k in ("main", "wild"))  # type: ignore[arg-type]
    assert serials == [main, wild, main]


def test_contexts_are_switched_only_for_another_chain(tls: HotSwapTLS, ca: TestCA) -> None:
    """A connection starts on the shared context of the default certificate's chain, with the
    default's leaf and key set on it: a handshake for one of its names switches nothing, nor
    does one for another certificate of the same chain and key type (only the connection's
    leaf and key change, together); a certificate with another chain switches the context
    (which also takes the default's leaf and key off the connection)."""
    other_ca = TestCA(now=NOW, name="Other")
    tls.set_bundle("main", ca.issue(["a.example.test"]))
    tls.set_bundle("same", ca.issue(["b.example.test"]))
    tls.set_bundle("foreign", other_ca.issue(["c.example.test"]))
    ctx = SSL.Context(SSL.TLS_METHOD)  # two roots: this test checks chains itself

    def contexts(sni: bytes) -> tuple[SSL.Context, SSL.Context, list[x509.Certificate]]:
        server = tls.serverConnectionForTLS(None)
        start = server.get_context()
        client = handshake_with(tls, ctx, sni, server=server)
        chain = client.get_peer_cert_chain(as_cryptography=True)
        assert chain is not None
        return start, server.get_context(), chain

    def serial(key: str) -> int:
        return leaf_serial(tls.current(key))  # type: ignore[arg-type]

    start, end, chain = contexts(b"a.example.test")
    assert end is start and chain[0].serial_number == serial("main")
    start, end, chain = contexts(b"b.example.test")
    assert end is start and chain[0].serial_number == serial("same")
    assert chain[1] == ca.intermediate
    start, end, chain = contexts(b"c.example.test")
    assert end is not start and chain[0].serial_number == serial("foreign")
    assert [c.subject for c in chain] == [chain[0].subject, other_ca.intermediate.subject]
    # One certificate: every name gets it, from the context the connection started with.
    tls.remove("same")
    tls.remove("foreign")
    start, end, chain = contexts(b"b.example.test")
    assert end is start and chain[0].serial_number == serial("main")


# -- bad bundles are never swapped in ----------------------------------------------------------


def _mismatched_key(ca: TestCA) -> CertificateBundle:
    a, b = ca.issue(["example.test"]), ca.issue(["example.test"])
    return CertificateBundle(key_pem=b.key_pem, chain_pem=a.chain_pem, metadata=a.metadata)


def _out_of_order(ca: TestCA) -> CertificateBundle:
    good = ca.issue(["example.test"])
    leaf, inter = x509.load_pem_x509_certificates(good.chain_pem)
    pem = serialization.Encoding.PEM
    return CertificateBundle(
        key_pem=good.key_pem,
        chain_pem=leaf.public_bytes(pem) + ca.root_pem + inter.public_bytes(pem),
        metadata=good.metadata,
    )


def _wrong_intermediate(ca: TestCA) -> CertificateBundle:
    good = ca.issue(["example.test"])
    leaf = x509.load_pem_x509_certificates(good.chain_pem)[0]
    pem = serialization.Encoding.PEM
    return CertificateBundle(
        key_pem=good.key_pem,
        chain_pem=leaf.public_bytes(pem) + TestCA(now=NOW, name="Other").intermediate_pem,
    )


BAD = {
    "key mismatch": (_mismatched_key, "does not match"),
    "wrong names": (lambda ca: ca.issue(["evil.test"]), "does not cover"),
    "not yet valid": (
        lambda ca: ca.issue(["example.test"], not_before=NOW + DAY, not_after=NOW + 90 * DAY),
        "not valid before",
    ),
    "expired": (
        lambda ca: ca.issue(["example.test"], not_before=NOW - 90 * DAY, not_after=NOW - DAY),
        "expired",
    ),
    "chain out of order": (_out_of_order, "out of order"),
    "wrong intermediate": (_wrong_intermediate, "out of order or incomplete"),
    "garbage": (
        lambda ca: CertificateBundle(key_pem=b"nope", chain_pem=b"not a pem"),
        "does not parse",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_bundle_never_swapped_in(
    case: str, clock: Clock, ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    tls = HotSwapTLS(clock=clock, default_key="main", required_names={"main": ["example.test"]})
    good = ca.issue(["example.test"])
    tls.set_bundle("main", good)
    make, why = BAD[case]
    bad = make(ca)

    with pytest.raises(BundleError, match=why):
        tls.set_bundle("main", bad)
    with caplog.at_level(logging.ERROR, logger="synapse_acme.tls"):
        tls.certificate_changed("main", bad)  # the consumer path logs instead of raising
    assert tls.current("main") is good
    assert handshake(tls, ca, b"example.test").serial == leaf_serial(good)
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "refusing the new certificate for main" in record.getMessage()
    assert why in record.getMessage()
    assert "still serving serial" in record.getMessage()
    assert b"PRIVATE KEY" not in record.getMessage().encode()


def test_skew_tolerated(tls: HotSwapTLS, ca: TestCA) -> None:
    fresh = ca.issue(["example.test"], not_before=NOW + datetime.timedelta(minutes=2))
    tls.set_bundle("main", fresh)
    assert tls.current("main") is fresh


def test_metadata_names_required_without_config(tls: HotSwapTLS, ca: TestCA) -> None:
    bundle = ca.issue(["example.test"])
    lying = CertificateBundle(
        key_pem=bundle.key_pem,
        chain_pem=bundle.chain_pem,
        metadata={"names": ["example.test", "www.example.test"]},
    )
    with pytest.raises(BundleError, match=r"www\.example\.test"):
        tls.set_bundle("main", lying)


def test_expired_accepted_only_when_nothing_served(
    tls: HotSwapTLS, ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    expired = ca.issue(["example.test"], not_before=NOW - 90 * DAY, not_after=NOW - DAY)
    with caplog.at_level(logging.WARNING, logger="synapse_acme.tls"):
        tls.certificate_changed("main", expired)
    assert tls.current("main") is expired
    assert any("EXPIRED" in r.getMessage() for r in caplog.records)
    good = ca.issue(["example.test"])
    tls.set_bundle("main", good)
    with pytest.raises(BundleError, match="expired"):
        tls.set_bundle("main", expired)
    assert tls.current("main") is good


def test_validity_uses_the_clock(tls: HotSwapTLS, ca: TestCA, clock: Clock) -> None:
    tls.set_bundle("main", ca.issue(["example.test"]))
    later = ca.issue(["example.test"], not_before=NOW + 2 * DAY, not_after=NOW + 30 * DAY)
    with pytest.raises(BundleError):
        tls.set_bundle("main", later)
    clock.advance(3 * DAY.total_seconds())
    tls.set_bundle("main", later)
    assert tls.current("main") is later


def test_build_context_refuses_mismatch(ca: TestCA) -> None:
    with pytest.raises(BundleError):
        build_context(_mismatched_key(ca))


# -- through Twisted -------------------------------------------------------------------------


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.peer: x509.Certificate | None = None
        self.alpn: bytes | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.peer is None:
            self._record()

    def _record(self) -> None:
        peer = self.transport.getPeerCertificate()  # type: ignore[attr-defined]
        self.peer = peer.to_cryptography()
        self.alpn = self.transport.negotiatedProtocol  # type: ignore[attr-defined]


class _Hello(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"hello")  # type: ignore[union-attr]


def twisted_handshake(
    tls: HotSwapTLS, ca: TestCA, hostname: str, server_app: Factory | None = None
) -> _Recorder:
    client_options = optionsForClientTLS(
        hostname,
        trustRoot=Certificate.loadPEM(ca.root_pem),
        acceptableProtocols=[b"h2", b"http/1.1"],
    )
    recorder = _Recorder()
    io_clock = Clock()  # TLSMemoryBIOFactory coalesces writes with callLater(0)
    server_factory = TLSMemoryBIOFactory(
        tls, False, server_app or Factory.forProtocol(_Hello), clock=io_clock
    )
    client_factory = TLSMemoryBIOFactory(
        client_options, True, Factory.forProtocol(lambda: recorder), clock=io_clock
    )
    _client, _server, pump_ = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        clock=io_clock,
    )
    for _ in range(20):
        pump_.pump()
    return recorder


def test_through_twisted_tls_memory_bio(tls: HotSwapTLS, ca: TestCA) -> None:
    main, other = ca.issue(["example.test"]), ca.issue(["other.test"])
    tls.set_bundle("main", main)
    tls.set_bundle("other", other)
    got = twisted_handshake(tls, ca, "other.test")
    assert got.received == b"hello"
    assert got.peer is not None and got.peer.serial_number == leaf_serial(other)
    assert got.alpn == b"h2"
    renewed = ca.issue(["other.test"])
    tls.certificate_changed("other", renewed)
    got = twisted_handshake(tls, ca, "other.test")
    assert got.peer is not None and got.peer.serial_number == leaf_serial(renewed)


def test_tls_server_endpoint_wraps_plain_endpoints(tls: HotSwapTLS) -> None:
    reactor = MemoryReactor()
    endpoint = tls_server_endpoint(reactor, "tcp:8448:interface=127.0.0.1", tls)
    endpoint.listen(Factory.forProtocol(Protocol))
    [(port, factory, _backlog, interface)] = reactor.tcpServers
    assert (port, interface) == (8448, "127.0.0.1")
    assert isinstance(factory, TLSMemoryBIOFactory)
    with pytest.raises(ValueError):
        tls_server_endpoint(reactor, "ssl:8448", tls)


@implementer(IProtocolNegotiationFactory)
class _Http11OnlyFactory(Factory):
    protocol = _Hello

    def acceptableProtocols(self) -> list[bytes]:
        return [b"http/1.1"]


def test_alpn_never_picks_what_the_wrapped_factory_cannot_speak(
    tls: HotSwapTLS, ca: TestCA
) -> None:
    """A Site without the h2 library only speaks http/1.1: h2 must not be negotiated."""
    tls.set_bundle("main", ca.issue(["example.test"]))
    tls.set_bundle("other", ca.issue(["other.test"]))
    got = twisted_handshake(tls, ca, "other.test", _Http11OnlyFactory())
    assert got.received == b"hello"
    assert got.alpn == b"http/1.1"


def test_listener_service_binds_tls_on_start(tls: HotSwapTLS) -> None:
    reactor = MemoryReactor()
    service = tls_listener(reactor, "tcp:0:interface=127.0.0.1", tls)
    service.privilegedStartService()
    [(port, factory, _backlog, interface)] = reactor.tcpServers
    assert (port, interface) == (0, "127.0.0.1")
    assert isinstance(factory, TLSMemoryBIOFactory)
    assert isinstance(factory.wrappedFactory, Site)


def test_set_bundles_one_swap_bad_ones_left_out(tls: HotSwapTLS, ca: TestCA) -> None:
    good = {f"k{i}": ca.issue([f"n{i}.test"]) for i in range(3)}
    bad = _mismatched_key(ca)
    before = tls.serverConnectionForTLS(None)
    refused = tls.set_bundles({**good, "bad": bad})
    assert list(refused) == ["bad"]
    assert "does not match" in str(refused["bad"])
    assert tls.keys() == ["k0", "k1", "k2"]
    for i in range(3):
        assert handshake(tls, ca, f"n{i}.test".encode()).serial == leaf_serial(good[f"k{i}"])
    with pytest.raises(SSL.Error):  # created before the swap: still nothing to serve
        handshake(tls, ca, b"n0.test", server=before)


# -- no session resumption (docs/how-it-works.md, "TLS sessions") ------------------------------


def _exchange(server: SSL.Connection, client: SSL.Connection) -> None:
    """Application data both ways, so TLS 1.3's post-handshake tickets (if any) arrive."""
    client.send(b"ping")
    server.bio_write(client.bio_read(65536))
    assert server.recv(4) == b"ping"
    server.send(b"pong")
    client.bio_write(server.bio_read(65536))
    assert client.recv(4) == b"pong"


@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION])
def test_no_session_resumes_under_the_same_or_another_name(
    tls: HotSwapTLS, ca: TestCA, version: int
) -> None:
    tls.set_bundle("main", ca.issue(["a.example"]))
    tls.set_bundle("other", ca.issue(["b.example"]))
    ctx = client_context(ca, max_version=version)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
    server = tls.serverConnectionForTLS(None)
    first = handshake_with(tls, ctx, b"a.example", server=server)
    _exchange(server, first)
    session = first.get_session()
    assert session is not None
    for sni in (b"a.example", b"b.example"):
        server = tls.serverConnectionForTLS(None)
        server.set_accept_state()
        client = SSL.Connection(ctx, None)
        client.set_connect_state()
        client.set_tlsext_host_name(sni)
        client.set_session(session)
        from tests.certs import pump

        pump(server, client)
        assert not _reused(client) and not _reused(server), sni


def _reused(conn: SSL.Connection) -> bool:
    from OpenSSL._util import lib  # pyOpenSSL has no public call for this

    return bool(lib.SSL_session_reused(conn._ssl))  # type: ignore[attr-defined]


def test_a_systemd_tls_listener_without_its_socket_says_why(tls: HotSwapTLS) -> None:
    # TLS listeners go through the same endpoint parsing as the HTTP-01 one (listeners.py):
    # a systemd: socket that was not handed over is a ListenError naming the setting.
    service = tls_listener(
        MemoryReactor(),
        "systemd:domain=INET6:name=synapse-acme-tls",
        tls,
        setting="acme.tls_listen (systemd:domain=INET6:name=synapse-acme-tls)",
    )
    service.privilegedStartService()
    outcome: list[Any] = []
    service.when_listening().addBoth(outcome.append)
    [failure] = outcome
    assert failure.check(ListenError)
    text = str(failure.value)
    assert text.startswith(
        "could not open any TLS listener: systemd:domain=INET6:name=synapse-acme-tls "
        "(no listening socket inherited for"
    )
    assert "LISTEN_FDNAMES" in text and text.endswith(
        "These come from acme.tls_listen (systemd:domain=INET6:name=synapse-acme-tls)"
    )


# -- many certificates: parsed on first use, bounded cache, swaps that copy only what changed ---


def _counting_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the key of every certificate parsed for OpenSSL from now on."""
    loaded: list[str] = []
    real = tls_module._load_material

    def load(entry: Any, *args: Any) -> Any:
        loaded.append(entry.key)
        return real(entry, *args)

    monkeypatch.setattr(tls_module, "_load_material", load)
    return loaded


def test_loading_many_parses_only_the_default_until_a_handshake_needs_one(
    clock: Clock, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = _counting_loads(monkeypatch)
    tls = HotSwapTLS(clock=clock, default_key="k3")
    bundles = {f"k{i}": ca.issue([f"n{i}.test"]) for i in range(20)}
    assert tls.set_bundles(bundles) == {}
    assert loaded == ["k3"]
    assert handshake(tls, ca, b"n7.test").serial == leaf_serial(bundles["k7"])
    assert handshake(tls, ca, b"n7.test").serial == leaf_serial(bundles["k7"])
    assert handshake(tls, ca, None).serial == leaf_serial(bundles["k3"])
    assert loaded == ["k3", "k7"]  # parsed once, on its first handshake


def test_warm_up_parses_the_rest_in_slices_until_the_cache_is_full(
    clock: Clock, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = _counting_loads(monkeypatch)
    tls = HotSwapTLS(clock=clock, default_key="k0", cache_size=50)
    bundles = {f"k{i}": ca.issue([f"n{i}.test"]) for i in range(80)}
    tls.set_bundles(bundles)
    tls.set_bundle("k5", ca.issue(["n5.test"]))  # replaced before the warm-up reached it
    assert loaded == ["k0", "k5"]  # nothing else until the reactor turns

    def warm_ups() -> list[Any]:
        return [c for c in clock.getDelayedCalls() if c.func == tls._warm_some]

    [turn] = warm_ups()
    turn.cancel()
    tls._warming = None
    tls._warm_some()  # one reactor turn's slice, then it schedules the next one
    assert len(loaded) == 2 + tls_module._WARM_SLICE and len(warm_ups()) == 1
    clock.advance(0)
    assert clock.getDelayedCalls() == []
    assert len(tls._materials) == 50 and len(loaded) == 50
    assert loaded.count("k5") == 1  # the bundle replaced is never parsed
    loaded.clear()
    for i in range(1, 40):
        assert handshake(tls, ca, f"n{i}.test".encode()).serial == leaf_serial(
            tls.current(f"k{i}")  # type: ignore[arg-type]
        )
    assert loaded == []


def test_without_warm_up_nothing_waits_for_the_reactor(clock: Clock, ca: TestCA) -> None:
    tls = HotSwapTLS(clock=clock, default_key="k0", warm_up=False)
    tls.set_bundles({f"k{i}": ca.issue([f"n{i}.test"]) for i in range(5)})
    clock.advance(0)  # the default's own context only
    assert clock.getDelayedCalls() == [] and len(tls._materials) == 1 and not tls._cold


def test_eviction_under_a_tiny_cache_still_serves_the_right_certificate(
    clock: Clock, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = _counting_loads(monkeypatch)
    tls = HotSwapTLS(clock=clock, default_key="k0", cache_size=2)
    bundles = {f"k{i}": ca.issue([f"n{i}.test", f"*.w{i}.test"]) for i in range(6)}
    tls.set_bundles(bundles)
    for _ in range(2):
        for i in [1, 2, 3, 4, 5, 0, 3, 1]:
            for sni in (f"n{i}.test", f"x.w{i}.test"):
                result = handshake(tls, ca, sni.encode())
                assert result.serial == leaf_serial(bundles[f"k{i}"]), sni
                assert len(result.chain) == 2  # the intermediate travels with every leaf
    assert len(tls._materials) <= 2
    assert loaded.count("k1") > 1  # evicted and parsed again, and still right


def test_a_swap_of_one_of_many_leaves_the_others_untouched(
    clock: Clock, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = HotSwapTLS(clock=clock, default_key="k0")
    bundles = {f"k{i}": ca.issue([f"n{i}.test"]) for i in range(1000)}
    tls.set_bundles(bundles)
    for i in range(1, 6):
        handshake(tls, ca, f"n{i}.test".encode())
    before = tls._snapshot
    parsed = {i: tls._materials.get(tls._entries[f"k{i}"]) for i in range(1, 6)}

    renewed = ca.issue(["n3.test"])
    tls.set_bundle("k3", renewed)
    after = tls._snapshot
    # Only the changed name is new; the 1,000-name table itself is shared, not copied.
    assert after.exact.base is before.exact.base
    assert dict(after.exact.overlay) == {"n3.test": tls._entries["k3"]}
    assert before.exact.get("n3.test").serial == leaf_serial(bundles["k3"])  # type: ignore[union-attr]
    # The renewed certificate was parsed at installation; the others keep theirs.
    loaded = _counting_loads(monkeypatch)
    for i in range(1, 6):
        if i != 3:
            assert tls._materials.get(tls._entries[f"k{i}"]) is parsed[i]
    for i in range(1, 6):
        want = renewed if i == 3 else bundles[f"k{i}"]
        assert handshake(tls, ca, f"n{i}.test".encode()).serial == leaf_serial(want)
    assert loaded == []


def test_layered_map_keeps_old_versions_and_folds_its_overlay() -> None:
    entries = [object() for _ in range(3)]
    start = tls_module._Layered({"a": entries[0], "b": entries[1]})  # type: ignore[dict-item]
    changed = start.updated({"a": None, "c": entries[2]})  # type: ignore[dict-item]
    assert (start.get("a"), start.get("c")) == (entries[0], None)
    assert (changed.get("a"), changed.get("b"), changed.get("c")) == (None, *entries[1:])
    assert sorted(changed.names()) == ["b", "c"]
    big = changed
    for i in range(tls_module._OVERLAY_MAX + 1):
        big = big.updated({f"n{i}": entries[0]})  # type: ignore[dict-item]
    assert len(big.overlay) < tls_module._OVERLAY_MAX  # folded into a new base
    assert big.get("a") is None and big.get("b") is entries[1] and big.get("n0") is entries[0]
    assert changed.get("n0") is None and "n0" not in start.base  # older versions unchanged


def test_a_replacement_openssl_refuses_is_never_swapped_in(tls: HotSwapTLS, ca: TestCA) -> None:
    """RSA-1024 passes the bundle checks but not OpenSSL's security level: a replacement is
    parsed at installation, so it is refused there and the old certificate keeps serving."""
    good = ca.issue(["example.test"])
    tls.set_bundle("main", good)
    with pytest.raises(BundleError, match="ee key too small"):
        tls.set_bundle("main", ca.issue(["example.test"], key_type="rsa-1024"))
    assert tls.current("main") is good
    assert handshake(tls, ca, b"example.test").serial == leaf_serial(good)
    with pytest.raises(BundleError, match="ee key too small"):  # a new key alike, one at a time
        tls.set_bundle("weak", ca.issue(["weak.test"], key_type="rsa-1024"))
    assert tls.keys() == ["main"]


def test_a_new_certificate_openssl_refuses_in_a_bulk_load_serves_the_default_and_says_so(
    tls: HotSwapTLS, ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    main = ca.issue(["example.test"])
    tls.set_bundles({"main": main, "weak": ca.issue(["weak.test"], key_type="rsa-1024")})
    with caplog.at_level(logging.ERROR, logger="synapse_acme.tls"):
        assert handshake(tls, ca, b"weak.test").serial == leaf_serial(main)
        assert handshake(tls, ca, b"weak.test").serial == leaf_serial(main)
    refusals = [r.getMessage() for r in caplog.records if "cannot serve" in r.getMessage()]
    assert len(refusals) == 1 and "weak" in refusals[0] and "ee key too small" in refusals[0]


def test_cache_size_must_be_positive(clock: Clock) -> None:
    with pytest.raises(ValueError, match="cache_size"):
        HotSwapTLS(clock=clock, cache_size=0)


def test_a_new_ca_chain_gets_its_context_at_installation_not_in_a_handshake(
    tls: HotSwapTLS, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls.set_bundle("main", ca.issue(["example.test"]))
    other_ca = TestCA(now=NOW, name="Other")
    for key_type in ("ecdsa-p384", "rsa-2048"):
        tls.set_bundle(key_type, other_ca.issue([f"{key_type}.test"], key_type=key_type))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("context building in the handshake path")

    monkeypatch.setattr(tls_module, "_base_context", refuse)
    monkeypatch.setattr(tls_module, "build_context", refuse)
    ctx = SSL.Context(SSL.TLS_METHOD)  # trusts nothing: the test compares serials
    for key_type in ("ecdsa-p384", "rsa-2048"):
        client = handshake_with(tls, ctx, f"{key_type}.test".encode())
        cert = client.get_peer_certificate(as_cryptography=True)
        assert cert is not None and cert.serial_number == tls.serial(key_type)


def test_the_default_gets_its_own_context_after_the_swap_not_in_it(
    tls: HotSwapTLS, ca: TestCA, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Right after the default changes, connections get its leaf and key set on them; a reactor
    turn later they start on a context holding it, so creating one sets nothing. Every
    handshake gets the right certificate either way."""
    main, other = ca.issue(["a.example.test"]), ca.issue(["b.example.test"])
    tls.set_bundles({"main": main, "other": other})
    assert not tls._snapshot.default_set
    clock.advance(0)
    assert tls._snapshot.default_set

    tls.set_bundle("other", ca.issue(["b.example.test"]))  # not the default: kept
    assert tls._snapshot.default_set
    before = tls.serverConnectionForTLS(None)
    renewed = ca.issue(["a.example.test"])
    tls.set_bundle("main", renewed)  # the default: per connection until the next turn
    assert not tls._snapshot.default_set
    per_connection = tls.serverConnectionForTLS(None)
    clock.advance(0)
    assert tls._snapshot.default_set

    used: list[object] = []
    real_use = tls_module._use
    monkeypatch.setattr(tls_module, "_use", lambda c, m: (used.append(m), real_use(c, m)))
    assert handshake(tls, ca, b"a.example.test").serial == leaf_serial(renewed)
    assert handshake(tls, ca, None).serial == leaf_serial(renewed)
    assert used == []  # nothing set on those connections
    assert handshake(tls, ca, b"b.example.test").serial == tls.serial("other")
    assert len(used) == 1
    assert handshake(tls, ca, b"a.example.test", server=before).serial == leaf_serial(main)
    assert handshake(tls, ca, None, server=per_connection).serial == leaf_serial(renewed)
