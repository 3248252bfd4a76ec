"""A tiny certificate authority for tests: a root, an intermediate, and leaves on demand.

Also: one-call in-memory TLS handshakes against a server connection creator
(:func:`handshake`), so tests can say which certificate a client saw for an SNI name.

Tests need real chains (leaf -> intermediate -> root) with chosen names, validity and key
types, without touching the network or a real CA. Everything is built in memory with
``cryptography``::

    ca = TestCA()
    bundle = ca.issue(["a.example.test", "*.b.example.test"])
    ca.root_pem          # trust this in a TLS client
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from OpenSSL.crypto import X509

from synapse_acme.model import CertificateBundle
from synapse_acme.testing.certificates import ca_certificate

_PEM = serialization.Encoding.PEM


def make_key(key_type: str = "ecdsa-p256") -> CertificateIssuerPrivateKeyTypes:
    """A private key of one of the project's key types (``ecdsa-p256``, ``rsa-2048``, ...)."""
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type.startswith("rsa-"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise ValueError(f"unknown key type {key_type!r}")


def key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    """Unencrypted PKCS8 PEM of ``key``."""
    return key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "synapse-acme tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


class TestCA:
    """A root and an intermediate CA that issue leaf bundles (chain: leaf, intermediate).

    ``now`` anchors the default validity windows; pass the time your test's clock shows.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, now: datetime.datetime | None = None, name: str = "Test") -> None:
        self.now = now or datetime.datetime.now(datetime.timezone.utc)
        start = self.now - datetime.timedelta(days=365)
        end = self.now + datetime.timedelta(days=3650)
        self.root_key = make_key("ecdsa-p256")
        root_name = _name(f"{name} Root CA")
        self.root = ca_certificate(root_name, self.root_key, root_name, self.root_key, start, end)
        self.intermediate_key = make_key("ecdsa-p256")
        self.intermediate = ca_certificate(
            _name(f"{name} Intermediate CA"),
            self.intermediate_key,
            root_name,
            self.root_key,
            start,
            end,
        )

    @property
    def root_pem(self) -> bytes:
        return self.root.public_bytes(_PEM)

    @property
    def intermediate_pem(self) -> bytes:
        return self.intermediate.public_bytes(_PEM)

    def issue_cert(
        self,
        names: Sequence[str],
        key: CertificateIssuerPrivateKeyTypes,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        serial: int | None = None,
    ) -> x509.Certificate:
        """A leaf for ``names`` (SANs; the first is the CN) over ``key``'s public key."""
        nb = not_before if not_before is not None else self.now - datetime.timedelta(hours=1)
        na = not_after if not_after is not None else self.now + datetime.timedelta(days=90)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.intermediate.subject)
            .public_key(key.public_key())
            .serial_number(serial if serial is not None else x509.random_serial_number())
            .not_valid_before(nb)
            .not_valid_after(na)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.intermediate_key.public_key()  # type: ignore[arg-type]
                ),
                False,
            )
            .sign(self.intermediate_key, hashes.SHA256())
        )

    def issue(
        self,
        names: Sequence[str],
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        key_type: str = "ecdsa-p256",
        serial: int | None = None,
    ) -> CertificateBundle:
        """A bundle (key, leaf + intermediate) for ``names``.

        Defaults: valid from an hour before ``self.now`` for 90 days, a fresh ECDSA P-256 key.
        """
        key = make_key(key_type)
        leaf = self.issue_cert(names, key, not_before, not_after, serial)
        return CertificateBundle(
            key_pem=key_pem(key),
            chain_pem=leaf.public_bytes(_PEM) + self.intermediate_pem,
            metadata={"names": list(names)},
        )


def leaf_serial(bundle: CertificateBundle) -> int:
    """The serial number of a bundle's leaf (to tell certificates apart in assertions)."""
    return x509.load_pem_x509_certificates(bundle.chain_pem)[0].serial_number


# -- in-memory TLS handshakes --------------------------------------------------------------------


class HandshakeResult:
    """What a client saw in a handshake: leaf serial, ALPN, chain, version, cipher."""

    def __init__(self, client: SSL.Connection) -> None:
        cert = client.get_peer_certificate(as_cryptography=True)
        assert cert is not None
        self.serial: int = cert.serial_number
        self.alpn: bytes = client.get_alpn_proto_negotiated()
        self.chain: list[x509.Certificate] = client.get_peer_cert_chain(as_cryptography=True) or []
        self.version: str = client.get_protocol_version_name()
        self.cipher: str | None = client.get_cipher_name()


def client_context(ca: TestCA, max_version: int | None = None) -> SSL.Context:
    """A pyOpenSSL client context trusting only ``ca``'s root, verifying the peer."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.get_cert_store().add_cert(X509.from_cryptography(ca.root))  # type: ignore[union-attr]
    ctx.set_verify(SSL.VERIFY_PEER, lambda *a: bool(a[-1]))
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    return ctx


def pump(server: SSL.Connection, client: SSL.Connection) -> None:
    """Move bytes between two memory-BIO connections until both finished the handshake."""
    done = {"s": False, "c": False}
    for _ in range(50):
        for tag, conn in (("c", client), ("s", server)):
            if not done[tag]:
                try:
                    conn.do_handshake()
                    done[tag] = True
                except SSL.WantReadError:
                    pass
        for src, dst in ((client, server), (server, client)):
            try:
                data = src.bio_read(65536)
            except SSL.WantReadError:
                continue
            dst.bio_write(data)
        if done["s"] and done["c"]:
            return
    raise AssertionError("handshake did not finish")


def handshake(
    creator: Any,
    ca: TestCA,
    sni: bytes | None,
    alpn: list[bytes] | None = None,
    server: SSL.Connection | None = None,
    max_version: int | None = None,
) -> HandshakeResult:
    """One complete in-memory handshake against an ``IOpenSSLServerConnectionCreator``.

    ``server`` lets a test create the server side early (e.g. before a certificate swap).
    Raises ``OpenSSL.SSL.Error`` if the handshake fails.
    """
    client = handshake_with(creator, client_context(ca, max_version), sni, alpn, server)
    return HandshakeResult(client)


def handshake_with(
    creator: Any,
    client_ctx: SSL.Context,
    sni: bytes | None,
    alpn: list[bytes] | None = None,
    server: SSL.Connection | None = None,
) -> SSL.Connection:
    """:func:`handshake` with a client context made once by the caller (loops, benchmarks);
    returns the client side of the finished handshake."""
    if server is None:
        server = creator.serverConnectionForTLS(None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    if sni is not None:
        client.set_tlsext_host_name(sni)
    if alpn:
        client.set_alpn_protos(alpn)
    pump(server, client)
    return client
