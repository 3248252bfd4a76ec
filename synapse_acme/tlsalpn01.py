"""The ``tls-alpn-01`` challenge responder (RFC 8737): answered on the TLS port itself.

The CA connects to port 443 of the name, sends the name as SNI and offers only the
``acme-tls/1`` protocol; the hot-swapping connection creator (:class:`synapse_acme.tls.HotSwapTLS`)
that already serves the name's certificate answers with the validation certificate this
responder builds, and every other handshake is untouched. So a server that owns its TLS port
(the standalone runner's ``tls_listen``, or Synapse's ``tls: true`` listeners with the module)
needs no port 80 and no proxy rule.
"""

from __future__ import annotations

import logging

import attrs
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from synapse_acme import crypto
from synapse_acme.acme.tlsalpn import CHALLENGE_TYPE, validation_certificate
from synapse_acme.interfaces import IResponder
from synapse_acme.tls import HotSwapTLS

logger = logging.getLogger(__name__)


@implementer(IResponder)
@attrs.define
class TLSALPN01Responder:
    """Answers ``tls-alpn-01`` challenges through ``tls`` (which must be what the CA reaches on
    port 443 of the name). One challenge per name at a time: a newer one replaces the older,
    and stopping a token that is no longer the one served for its name changes nothing."""

    challenge_type = CHALLENGE_TYPE
    tls: HotSwapTLS
    clock: IReactorTime
    _tokens: dict[str, str] = attrs.field(factory=dict, init=False)  # name -> token served

    def start_responding(self, identifier: str, token: str, key_authorization: str) -> None:
        """Serve the validation certificate for ``identifier`` from now on.

        Raises ValueError for a wildcard identifier: RFC 8737 section 3 forbids tls-alpn-01
        for them (a CA never offers it; this catches a misbehaving one clearly).
        """
        name = identifier.lower().rstrip(".")
        if name.startswith("*."):
            raise ValueError(f"tls-alpn-01 cannot validate a wildcard name ({identifier})")
        now = crypto.now_from_clock(self.clock)
        certificate, key = validation_certificate(name, key_authorization, now)
        self.tls.set_challenge(name, certificate, key)
        self._tokens[name] = token
        logger.debug("Answering the tls-alpn-01 challenge for %s (token %s)", name, token)

    def stop_responding(self, identifier: str, token: str) -> None:
        """Stop serving the validation certificate for ``identifier`` if ``token`` is the one
        served; anything else is not an error."""
        name = identifier.lower().rstrip(".")
        if self._tokens.get(name) != token:
            return
        del self._tokens[name]
        self.tls.remove_challenge(name)
        logger.debug("Stopped answering the tls-alpn-01 challenge for %s", name)


__all__ = ["TLSALPN01Responder"]
