"""An in-memory :class:`~synapse_acme.interfaces.IIssuer` for tests of what sits above the issuer.

It mints certificates from a caller-supplied CA object (anything with ``issue_cert(names, key,
not_before, not_after)`` and ``intermediate_pem``, e.g. ``tests/certs.py``'s ``TestCA``), so the
service, stores and TLS code are exercised with real certificates but without any network.
The real issuer is tested against the fake ACME server and against Pebble.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import attrs
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from synapse_acme import crypto
from synapse_acme.acme.ari import ari_cert_id
from synapse_acme.interfaces import IIssuer, IPreparingIssuer
from synapse_acme.model import CertificateBundle, RenewalWindow


@implementer(IIssuer)
@attrs.define(eq=False)
class FakeIssuer:
    """Issues at once (or when the test fires ``pending``), or fails as told.

    ``calls`` records ``(names, replaces)`` for every ``issue``; ``directory`` plays a CA's
    directory URL (for tests of several CAs); ``hold = True`` makes each
    issuance wait in ``pending`` until the test fires it with :meth:`release`.
    ``hold_renewal_info = True`` makes each ``renewal_info`` wait in ``pending_renewal_info``
    (a CA that never answers) until :meth:`release_renewal_info`. A held Deferred that is
    cancelled fails with ``cancel_error`` if set (as a real HTTP stack may report a cancelled
    request as a transport error), else with CancelledError.
    """

    ca: Any
    clock: IReactorTime
    lifetime: datetime.timedelta = datetime.timedelta(days=90)
    calls: list[tuple[tuple[str, ...], str | None]] = attrs.Factory(list)
    failures: list[BaseException] = attrs.Factory(list)
    hold: bool = False
    pending: list[tuple[defer.Deferred[CertificateBundle], CertificateBundle]] = attrs.Factory(list)
    windows: dict[str, RenewalWindow] = attrs.Factory(dict)
    renewal_info_calls: int = 0
    hold_renewal_info: bool = False
    pending_renewal_info: list[tuple[defer.Deferred[RenewalWindow | None], str]] = attrs.Factory(
        list
    )
    cancel_error: BaseException | None = None
    #: The CA's directory URL, recorded as ``issuer_directory`` in each bundle (None: none).
    directory: str | None = None
    #: The ``directory`` argument of every ``renewal_info`` call, in order.
    renewal_info_directories: list[str | None] = attrs.Factory(list)

    def _held(self) -> defer.Deferred[Any]:
        def cancelled(d: defer.Deferred[Any]) -> None:
            if self.cancel_error is not None:
                d.errback(self.cancel_error)

        return defer.Deferred(cancelled)

    def fail_next(self, *errors: BaseException) -> None:
        """The next ``len(errors)`` issuances fail with these, in order."""
        self.failures.extend(errors)

    def issue(
        self, names: Sequence[str], key_pem: bytes, replaces: str | None = None
    ) -> defer.Deferred[CertificateBundle]:
        self.calls.append((tuple(names), replaces))
        if self.failures:
            return defer.fail(self.failures.pop(0))
        now = crypto.now_from_clock(self.clock)
        key = serialization.load_pem_private_key(key_pem, password=None)
        cert = self.ca.issue_cert(
            list(names), key, now - datetime.timedelta(minutes=1), now + self.lifetime
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.ca.intermediate_pem
        bundle = CertificateBundle(
            key_pem=key_pem,
            chain_pem=chain,
            metadata={
                "names": list(names),
                "ari_cert_id": ari_cert_id(cert),
                "issued_at": now.isoformat(),
                **({"issuer_directory": self.directory} if self.directory is not None else {}),
            },
        )
        if self.hold:
            d: defer.Deferred[CertificateBundle] = self._held()
            self.pending.append((d, bundle))
            return d
        return defer.succeed(bundle)

    def release(self) -> None:
        """Fire every held issuance."""
        pending, self.pending = self.pending, []
        for d, bundle in pending:
            if not d.called:
                d.callback(bundle)

    def renewal_info(
        self, chain_pem: bytes, directory: str | None = None
    ) -> defer.Deferred[RenewalWindow | None]:
        self.renewal_info_calls += 1
        self.renewal_info_directories.append(directory)
        cert_id = ari_cert_id(crypto.parse_chain(chain_pem)[0])
        if self.hold_renewal_info:
            d: defer.Deferred[RenewalWindow | None] = self._held()
            self.pending_renewal_info.append((d, cert_id))
            return d
        return defer.succeed(self.windows.get(cert_id))

    def release_renewal_info(self) -> None:
        """Answer every held ``renewal_info`` (with the window in ``windows``, if any)."""
        pending, self.pending_renewal_info = self.pending_renewal_info, []
        for d, cert_id in pending:
            if not d.called:
                d.callback(self.windows.get(cert_id))


@implementer(IPreparingIssuer)
@attrs.define(eq=False)
class PreparingFakeIssuer(FakeIssuer):
    """A FakeIssuer that sets up its account ahead (``prepare``): each call waits in
    ``preparing`` until the test fires it; ``cancelled`` records the ones cancelled."""

    preparing: list[defer.Deferred[None]] = attrs.Factory(list)
    cancelled: list[defer.Deferred[None]] = attrs.Factory(list)

    def prepare(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred(self.cancelled.append)
        self.preparing.append(d)
        return d
