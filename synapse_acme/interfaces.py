"""The contracts between synapse_acme's parts, and nothing else.

Every implementation is an ``attrs`` class declared with ``@implementer``; in-memory
fakes live in :mod:`synapse_acme.testing` and pass the same contract tests as the real ones.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ICertificateStore(Interface):
    """Where certificate bundles live between runs, keyed by :func:`synapse_acme.names.names_key`.

    A bundle is written whole or not at all: a reader never sees a certificate without its key.
    Only intact bundles go in and come out (:func:`synapse_acme.store.check_intact`: the chain
    is complete PEM blocks signed in order, the key matches the leaf).
    """

    def load(key):  # type: ignore[no-untyped-def]
        """Deferred firing with the :class:`~synapse_acme.model.CertificateBundle` stored
        under ``key``, or ``None`` if there is none. Fails with StoreError naming the file if
        it is unreadable or damaged (never a damaged bundle)."""

    def save(key, bundle):  # type: ignore[no-untyped-def]
        """Deferred firing with ``None`` once ``bundle`` is durably stored under ``key``
        (replacing what was there atomically). Fails with StoreError (also for a bundle that
        is not intact); the old bundle survives."""

    def keys():  # type: ignore[no-untyped-def]
        """Deferred firing with a sorted list of the keys that hold a bundle."""

    def delete(key):  # type: ignore[no-untyped-def]
        """Deferred firing with ``None`` once ``key``'s bundle is gone (no error if absent)."""


class IResponder(Interface):
    """Answers one kind of ACME challenge (txacme's shape)."""

    challenge_type = Attribute("The ACME challenge type it answers, e.g. ``'http-01'``.")

    def start_responding(identifier, token, key_authorization):  # type: ignore[no-untyped-def]
        """Start answering the challenge ``token`` for ``identifier`` with ``key_authorization``
        (the exact body to serve). Returns ``None`` or a Deferred firing with ``None`` once
        the answer is live."""

    def stop_responding(identifier, token):  # type: ignore[no-untyped-def]
        """Stop answering ``token``. Returns ``None`` or a Deferred firing with ``None``.
        Must not fail when the token is unknown."""


class IIssuer(Interface):
    """Obtains certificates from one ACME CA (one full RFC 8555 issuance per call)."""

    def issue(names, key_pem, replaces=None):  # type: ignore[no-untyped-def]
        """Order a certificate for ``names`` (sequence of str; the first is the CN), with
        a CSR signed by ``key_pem``. ``replaces`` is the ARI CertID of the certificate
        being renewed, or ``None``. Deferred firing with a
        :class:`~synapse_acme.model.CertificateBundle` (``key_pem`` as given, the full chain,
        and metadata), or failing with AcmeError / AcmeProtocolError / AcmeTransportError /
        ChallengeFailed."""

    def renewal_info(chain_pem):  # type: ignore[no-untyped-def]
        """Deferred firing with a :class:`~synapse_acme.model.RenewalWindow` if the CA
        offers ARI (``renewalInfo`` in its directory) for the leaf of ``chain_pem``, else
        ``None``. Never fails because the CA lacks ARI."""


class ICertificateConsumer(Interface):
    """Something that serves certificates and wants to know when one changes
    (the hot-swapping TLS creator, the Synapse glue, the file exporter)."""

    def certificate_changed(key, bundle):  # type: ignore[no-untyped-def]
        """``bundle`` is now the certificate for ``key``. Called on the reactor thread;
        must not block. A consumer that raises is logged and does not stop the others."""
