"""Several CAs behind one :class:`~synapse_acme.interfaces.IIssuer`: ``acme.issuers``.

Every issuance walks the list from the first CA: a CA that refuses the certificate for good
hands over to the next at once; one that fails in a way that may pass is asked again on the
service's next attempts, and hands over only once its failures in a row for that certificate
reach the budget (:func:`synapse_acme.policy.hands_over`). A success clears the count of every
CA for that certificate, so the next renewal starts again at the first CA with a full budget.
Each CA is its own :class:`~synapse_acme.acme.issuer.AcmeIssuer` with its own account.

The issued bundle's metadata says who issued it: ``issuer_directory`` (set by that CA's
issuer) and ``issuer_fallbacks``, how many CAs were passed over for it (0: the first CA).
ARI windows (``renewal_info``) are asked of the CA that issued the certificate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from synapse_acme import policy
from synapse_acme.interfaces import IIssuer, IPreparingIssuer
from synapse_acme.model import CertificateBundle, RenewalWindow
from synapse_acme.names import canonical_names, names_key

logger = logging.getLogger(__name__)


@attrs.frozen
class NamedIssuer:
    """One CA of the list: its directory URL (what bundle metadata records as
    ``issuer_directory``) and the issuer that talks to it."""

    url: str
    issuer: IIssuer


@implementer(IPreparingIssuer)
@attrs.define
class FallbackIssuer:
    """Asks ``issuers`` in order (see the module docstring). ``budget``: failures in a row
    that may pass before a CA hands over (:data:`~synapse_acme.policy.FALLBACK_AFTER_FAILURES`;
    1 for a one-shot command, which never retries)."""

    issuers: Sequence[NamedIssuer]
    budget: int = policy.FALLBACK_AFTER_FAILURES
    # (certificate key, CA index) -> failures in a row that may pass
    _failures: dict[tuple[str, int], int] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        if not self.issuers:
            raise ValueError("FallbackIssuer needs at least one issuer")
        if self.budget < 1:
            raise ValueError(f"budget must be at least 1, got {self.budget}")

    def failures(self, names: Sequence[str], index: int) -> int:
        """The failures in a row that may pass of CA ``index`` for the certificate ``names``."""
        return self._failures.get((names_key(canonical_names(names)), index), 0)

    # -- IIssuer ----------------------------------------------------------------------------

    def issue(
        self, names: Sequence[str], key_pem: bytes, replaces: str | None = None
    ) -> Deferred[CertificateBundle]:
        """See :meth:`IIssuer.issue`: the first CA that issues; failing with the error of the
        last CA asked. ``replaces`` goes only to the CA that issued the old certificate."""
        return Deferred.fromCoroutine(self._issue(tuple(names), key_pem, replaces))

    def prepare(self) -> Deferred[None]:
        """See :meth:`IPreparingIssuer.prepare`: the first CA's account, which every issuance
        asks first. With another CA behind it, its failure is not this issuer's: ``issue`` may
        still get the certificate from the next CA (and asks the first again on its own), so
        it is logged and fired as None."""
        first = self.issuers[0]
        if not IPreparingIssuer.providedBy(first.issuer):
            return Deferred.fromCoroutine(_none())
        d: Deferred[None] = first.issuer.prepare()
        if len(self.issuers) > 1:
            d.addErrback(_prepare_failed, first.url)
        return d

    def renewal_info(
        self, chain_pem: bytes, directory: str | None = None
    ) -> Deferred[RenewalWindow | None]:
        """See :meth:`IIssuer.renewal_info`: asked of the CA whose URL is ``directory`` (None,
        or a CA no longer listed: nobody, since another CA knows nothing of it)."""
        for named in self.issuers:
            if named.url == directory:
                return named.issuer.renewal_info(chain_pem, directory)
        return Deferred.fromCoroutine(_none())

    async def _issue(
        self, names: tuple[str, ...], key_pem: bytes, replaces: str | None
    ) -> CertificateBundle:
        key = names_key(canonical_names(names))
        last = len(self.issuers) - 1
        for index, named in enumerate(self.issuers):
            try:
                # RFC 9773's replaces is a CertID at the CA that issued the old certificate.
                bundle = await named.issuer.issue(names, key_pem, replaces if index == 0 else None)
            except CancelledError:
                raise
            except Exception as e:
                if len(self.issuers) == 1:
                    raise
                count = self._failures.get((key, index), 0) + 1
                self._failures[(key, index)] = count
                over = policy.hands_over(e, count, self.budget)
                if index == last or not over:
                    logger.warning(
                        "CA %d of %d (%s) failed for %s (%d in a row): %s; %s",
                        index + 1, len(self.issuers), named.url, ", ".join(names), count, e,
                        "no CA left to ask" if over else
                        f"it is asked again on the next attempt ({self.budget - count} more "
                        "before the next CA is asked)",
                    )  # fmt: skip
                    raise
                logger.warning(
                    "CA %d of %d (%s) failed for %s: %s; asking the next CA (%s)",
                    index + 1, len(self.issuers), named.url, ", ".join(names), e,
                    self.issuers[index + 1].url,
                )  # fmt: skip
                continue
            for i in range(len(self.issuers)):
                self._failures.pop((key, i), None)
            if index > 0:
                logger.warning(
                    "Certificate for %s issued by CA %d of %d (%s), after %d CA(s) failed",
                    ", ".join(names), index + 1, len(self.issuers), named.url, index,
                )  # fmt: skip
            metadata = dict(bundle.metadata)
            metadata.setdefault("issuer_directory", named.url)
            metadata["issuer_fallbacks"] = index
            return attrs.evolve(bundle, metadata=metadata)
        raise AssertionError("unreachable: the last CA returns or raises")


async def _none() -> None:
    return None


def _prepare_failed(failure: Failure, url: str) -> None:
    failure.trap(Exception)
    logger.debug("could not set up the account at %s ahead of the order: %s", url, failure.value)


__all__ = ["FallbackIssuer", "NamedIssuer"]
