"""The certificate signing request of an order (RFC 8555 section 7.4)."""

from __future__ import annotations

from collections.abc import Sequence

from acme import crypto_util


def make_csr_pem(key_pem: bytes, names: Sequence[str]) -> bytes:
    """A PEM CSR for ``names`` signed by ``key_pem`` (acme.crypto_util's, as certbot builds it)."""
    return crypto_util.make_csr(key_pem, list(names))


__all__ = ["make_csr_pem"]
