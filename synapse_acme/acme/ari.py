"""ACME Renewal Information (RFC 9773): the CertID that names a certificate to its CA."""

from __future__ import annotations

import base64

from cryptography import x509

from synapse_acme.errors import BundleError


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def ari_cert_id(cert: x509.Certificate) -> str:
    """RFC 9773 CertID: base64url(AKI keyIdentifier) "." base64url(DER serial number octets)."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    except x509.ExtensionNotFound:
        raise BundleError("certificate has no Authority Key Identifier; no ARI CertID") from None
    key_id = aki.value.key_identifier
    if key_id is None:
        raise BundleError("certificate's Authority Key Identifier has no keyIdentifier")
    serial = cert.serial_number
    # DER INTEGER content octets: big-endian two's complement, minimal, positive.
    length = serial.bit_length() // 8 + 1
    return f"{_b64url(key_id)}.{_b64url(serial.to_bytes(length, 'big'))}"


__all__ = ["ari_cert_id"]
