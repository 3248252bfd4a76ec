"""The ``tls-alpn-01`` challenge (RFC 8737): its message type and its validation certificate.

certbot's ``acme`` library dropped its TLS-ALPN-01 classes, so an authorization offering one
decodes as ``UnrecognizedChallenge``; :func:`recognise` turns that into :class:`TLSALPN01`
(a key-authorization challenge like ``http-01``) without registering anything in the
library's global type table.

The validation certificate is what a TLS server presents to a client that offers only the
``acme-tls/1`` protocol: self-signed, one dNSName (the identifier), and the critical
``id-pe-acmeIdentifier`` extension holding the SHA-256 of the key authorization as a DER
OCTET STRING (RFC 8737 section 3).
"""

from __future__ import annotations

import datetime
import hashlib
from typing import Any

import josepy as jose
from acme import challenges
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CHALLENGE_TYPE = "tls-alpn-01"
#: The only protocol a validation client offers, and the only one answered with the
#: validation certificate.
ALPN_PROTOCOL = b"acme-tls/1"
#: id-pe-acmeIdentifier (RFC 8737 section 6.1).
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")

# The CA validates within minutes of the answer going live; the margin before covers clock skew.
_VALIDITY_BEFORE = datetime.timedelta(days=1)
_VALIDITY_AFTER = datetime.timedelta(days=7)


class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """The (empty) response that tells the CA to validate, as for ``http-01``."""

    typ = CHALLENGE_TYPE


class TLSALPN01(challenges.KeyAuthorizationChallenge):
    """RFC 8737 ``tls-alpn-01``: the responder needs only the key authorization."""

    response_cls = TLSALPN01Response
    typ = CHALLENGE_TYPE

    def validation(self, account_key: jose.JWK, **unused_kwargs: Any) -> str:
        """The key authorization; the responder turns it into the validation certificate."""
        return str(self.key_authorization(account_key))


def recognise(chall: challenges.Challenge) -> challenges.Challenge:
    """``chall``, or a :class:`TLSALPN01` for a ``tls-alpn-01`` challenge: unrecognised by
    current ``acme`` releases, or the older releases' own class (acme < 5 still had one,
    whose response builds a certificate through pyOpenSSL APIs that are gone); ours either way,
    so every supported ``acme`` release answers it the same."""
    if isinstance(chall, TLSALPN01):
        return chall
    if isinstance(chall, challenges.UnrecognizedChallenge):
        jobj = chall.jobj
    elif getattr(chall, "typ", None) == CHALLENGE_TYPE:
        jobj = chall.to_partial_json()
    else:
        return chall
    if jobj.get("type", CHALLENGE_TYPE) != CHALLENGE_TYPE:
        return chall
    # from_json would look the type up in the library's table (missing it, or finding its own).
    return TLSALPN01(**TLSALPN01.fields_from_json(jobj))


def acme_identifier_value(key_authorization: str) -> bytes:
    """The extension's value: the DER OCTET STRING of SHA-256(key authorization)."""
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    return bytes([0x04, len(digest)]) + digest


def validation_certificate(
    identifier: str, key_authorization: str, now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh self-signed validation certificate for ``identifier`` and its P-256 key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "synapse-acme tls-alpn-01")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _VALIDITY_BEFORE)
        .not_valid_after(now + _VALIDITY_AFTER)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(identifier)]), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(
                ACME_IDENTIFIER_OID, acme_identifier_value(key_authorization)
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


__all__ = [
    "ACME_IDENTIFIER_OID",
    "ALPN_PROTOCOL",
    "CHALLENGE_TYPE",
    "TLSALPN01",
    "TLSALPN01Response",
    "acme_identifier_value",
    "recognise",
    "validation_certificate",
]
