"""Plain value types shared by the modules (no behaviour beyond parsing what they hold)."""

from __future__ import annotations

import datetime
import json
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
    """One certificate the service manages: its names (first is the subject CN), key type and
    the challenge types to prove them with (preferred first; ``None``: the configured default)."""

    names: tuple[str, ...]
    key_type: str = "ecdsa-p256"  # "ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096"
    challenges: tuple[str, ...] | None = None  # e.g. ("tls-alpn-01", "http-01")


@attrs.frozen
class AccountRecord:
    """What the store remembers of the ACME account: that it exists, where, and whose key."""

    url: str  # the account URL (the JWS ``kid``)
    directory: str  # the CA's directory URL
    thumbprint: str  # RFC 7638 thumbprint of the account key (synapse_acme.account.key_thumbprint)

    def to_json(self) -> bytes:
        return (json.dumps(attrs.asdict(self), indent=2, sort_keys=True) + "\n").encode("utf-8")
