"""Plain value types shared by the modules (no behaviour beyond parsing what they hold)."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

import attrs


@attrs.frozen
class CertificateBundle:
    """A private key and the certificate chain issued for it, as stored and served.

    ``chain_pem`` holds the leaf first, then the intermediates, PEM-encoded.
    ``metadata`` is JSON-serialisable; known keys: ``names`` (list, canonical order),
    ``issuer_directory`` (URL), ``order_url``, ``certificate_url``, ``ari_cert_id``
    (RFC 9773 CertID), ``issued_at`` (ISO-8601 UTC), ``placeholder`` (bool, a self-signed
    stand-in written so a homeserver can start).
    """

    key_pem: bytes = attrs.field(repr=False)  # never print key material
    chain_pem: bytes
    metadata: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class RenewalWindow:
    """An ARI (RFC 9773) suggested window, with the time to ask again."""

    start: datetime.datetime
    end: datetime.datetime
    retry_after: float | None = None  # seconds, from the response's Retry-After
    explanation_url: str | None = None


@attrs.frozen
class CertificateSpec:
    """One certificate the service manages: its names (first is the subject CN) and key type."""

    names: tuple[str, ...]
    key_type: str = "ecdsa-p256"  # "ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096"
