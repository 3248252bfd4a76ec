"""One issuance, RFC 8555 section 7.1 end to end: order -> responders -> poll -> finalize -> chain.

The order-flow rules are certbot's ``ClientV2`` ones (Retry-After, ``ready``/``processing``,
``orderNotReady``, alternate chains), ported to Deferreds: every wait is a ``deferLater`` on
the injected clock, so tests move time with ``task.Clock`` and nothing ever sleeps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import josepy as jose
from acme import challenges, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from synapse_acme import crypto
from synapse_acme.acme.ari import ari_cert_id
from synapse_acme.acme.client import AcmeClient, Fetched
from synapse_acme.acme.csr import make_csr_pem
from synapse_acme.acme.tlsalpn import recognise
from synapse_acme.acme.trust import IssuerTrust
from synapse_acme.errors import (
    AcmeError,
    AcmeProtocolError,
    AcmeTransportError,
    BundleError,
    ChallengeFailed,
)
from synapse_acme.interfaces import IPreparingIssuer, IResponder
from synapse_acme.model import CertificateBundle, RenewalWindow
from synapse_acme.names import canonical_names, names_key

log = logging.getLogger(__name__)

# Pebble (and Let's Encrypt, for cached authorizations) often finish validation within a few
# milliseconds: without a Retry-After, polls start after FIRST_POLL_DELAY and double up to
# poll_interval (10, 20, 40 ... ms), so a fast CA is seen at once and a slow one costs only a
# handful of extra polls. certbot sleeps 1 s and lego 5 s here, which is where their time goes.
FIRST_POLL_DELAY = 0.01
# A poll is a read (POST-as-GET of an authorization or order), so repeating it is harmless. A
# poll that gets no answer (timeout, reset connection) is tried again this many times, after
# ``poll_interval``, before the issuance fails: one lost request should not throw away an order
# whose validation may already have succeeded.
POLL_READ_RETRIES = 2


def _acme_error(problem: messages.Error | None, url: str | None) -> AcmeError | None:
    if problem is None:
        return None
    subs = tuple(s.to_partial_json() for s in (problem.subproblems or ()))
    return AcmeError(
        type=str(problem.typ or "about:blank"),
        detail=str(problem.detail or problem.title or ""),
        url=url,
        subproblems=subs,
    )


def _identifier(authz: messages.Authorization) -> str:
    value = str(authz.identifier.value) if authz.identifier is not None else "?"
    return f"*.{value}" if authz.wildcard else value


async def _withdraw(responder: IResponder, ident: str, token: str) -> None:
    """Stop answering ``token`` and wait until that is done, even when cancelled meanwhile (a
    sibling authorization failed): a DNS-01 record must be deleted before the issuance reports
    its failure and the process may exit. A cancellation is passed on afterwards; a responder
    that fails to stop is logged, never raised."""
    stopping = defer.maybeDeferred(responder.stop_responding, ident, token)
    outcome: list[object] = []
    waiters: list[Deferred[None]] = []

    def finished(result: object) -> None:
        outcome.append(result)
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)

    stopping.addBoth(finished)
    cancelled = False
    while not outcome:
        waiter: Deferred[None] = Deferred()  # cancelling it leaves `stopping` running
        waiters.append(waiter)
        try:
            await waiter
        except defer.CancelledError:
            cancelled = True
    if isinstance(outcome[0], Failure):
        f = outcome[0]
        log.error(
            "responder failed to stop answering %s",
            ident,
            exc_info=(f.type, f.value, f.getTracebackObject()),  # type: ignore[arg-type]
        )
    if cancelled:
        raise defer.CancelledError()


@implementer(IPreparingIssuer)
@attrs.define
class AcmeIssuer:
    """Obtains certificates from the CA behind ``client``, answering challenges with
    ``responders`` (preferred first; ``challenge_preferences`` narrows and reorders them per
    certificate: keyed by :func:`~synapse_acme.names.names_key` of its names, each value the
    challenge types to use, preferred first); every issued chain must reach a root of ``trust``
    (:class:`~synapse_acme.acme.trust.IssuerTrust`; None only for dry runs against a staging CA,
    whose roots nobody trusts: the chain is then checked for order, key and names only). The
    account is registered on first use, and ``on_account`` (if given) is called with its URL
    each time the CA tells it (the runtime records it in the store; a failing callback is
    logged, never fails the issuance)."""

    client: AcmeClient
    responders: Sequence[IResponder]
    clock: IReactorTime
    account_key: jose.JWK = attrs.field(repr=False)
    trust: IssuerTrust | None = attrs.field(repr=False)
    contact: Sequence[str] = ()
    tos_agreed: bool = False
    eab: tuple[str, str] | None = attrs.field(default=None, repr=False)
    #: The setting named when the CA refuses the binding (``acme.issuers[1].eab``).
    eab_setting: str = "acme.eab"
    profile: str | None = None
    poll_interval: float = 0.5
    poll_timeout: float = 300.0
    preferred_chain: str | None = None
    on_account: Callable[[str], object] | None = None
    challenge_preferences: Mapping[str, Sequence[str]] = attrs.field(factory=dict)
    _account_lock: defer.DeferredLock = attrs.field(
        init=False, factory=defer.DeferredLock, repr=False
    )

    # -- IPreparingIssuer (IIssuer) -------------------------------------------------------

    def issue(
        self, names: Sequence[str], key_pem: bytes, replaces: str | None = None
    ) -> Deferred[CertificateBundle]:
        """See :meth:`IIssuer.issue`. Cancelling the Deferred stops polling and withdraws
        every challenge answer."""
        return Deferred.fromCoroutine(self._issue(tuple(names), key_pem, replaces))

    def renewal_info(
        self, chain_pem: bytes, directory: str | None = None
    ) -> Deferred[RenewalWindow | None]:
        """See :meth:`IIssuer.renewal_info`. ``None`` also for a certificate that cannot have
        ARI (a placeholder without an Authority Key Identifier). ``directory`` is not needed:
        this issuer has one CA."""
        return Deferred.fromCoroutine(self._renewal_info(chain_pem))

    def prepare(self) -> Deferred[None]:
        """See :meth:`IPreparingIssuer.prepare`: registers the account if it has none yet
        (orders made meanwhile wait for the same registration)."""
        if self.client.account_url is not None:
            return defer.succeed(None)
        return Deferred.fromCoroutine(self._ensure_account()).addCallback(lambda _url: None)

    # -- account ----------------------------------------------------------------------------

    async def _ensure_account(self) -> str:
        url: str = await self._account_lock.run(
            lambda: Deferred.fromCoroutine(self._register_if_needed())
        )
        return url

    async def _register_if_needed(self) -> str:
        if self.client.account_url is not None:
            return self.client.account_url
        url = await self.client.register(
            tuple(self.contact), self.tos_agreed, self.eab, self.eab_setting
        )
        if self.on_account is not None:
            try:
                self.on_account(url)
            except Exception as e:  # the account works; only its record in the store is behind
                log.warning("could not record the ACME account %s: %s", url, e)
        return url

    # -- issuance ---------------------------------------------------------------------------

    async def _issue(
        self, names: tuple[str, ...], key_pem: bytes, replaces: str | None
    ) -> CertificateBundle:
        names = canonical_names(names)  # a bad name fails the Deferred, it does not raise
        for attempt in (1, 2):
            await self._ensure_account()
            try:
                return await self._issue_once(names, key_pem, replaces)
            except AcmeError as e:
                if e.code != "accountDoesNotExist" or attempt == 2:
                    raise
                log.warning("the CA forgot our account (%s); registering again", e)
                self.client.account_url = None
        raise AssertionError("unreachable")

    async def _new_order(self, names: tuple[str, ...], replaces: str | None) -> Fetched[Any]:
        try:
            return await self.client.new_order(names, replaces=replaces, profile=self.profile)
        except AcmeError as e:
            # RFC 9773: the certificate was already replaced (or the CA dislikes the CertID);
            # a plain order still gets us a certificate.
            if replaces is None or not (e.code == "alreadyReplaced" or e.status == 409):
                raise
            log.info("the CA refused replaces=%s (%s); ordering without it", replaces, e.code)
            return await self.client.new_order(names, replaces=None, profile=self.profile)

    async def _issue_once(
        self, names: tuple[str, ...], key_pem: bytes, replaces: str | None
    ) -> CertificateBundle:
        order = await self._new_order(names, replaces)
        log.info("order %s for %s: %s", order.url, ", ".join(names), order.body.status)
        if order.body.status == messages.STATUS_INVALID:
            raise self._order_failed(order)
        responders = self._responders_for(names)
        await self._authorize_all(list(order.body.authorizations), responders)
        order = await self._finalize(order, names, key_pem)
        cert_url = str(order.body.certificate)
        chain_pem = await self._download(cert_url)
        bundle = self._bundle(names, key_pem, chain_pem, order, cert_url)
        log.info("certificate issued for %s (%s)", ", ".join(names), cert_url)
        return bundle

    def _responders_for(self, names: tuple[str, ...]) -> list[IResponder]:
        """The responders to use for ``names``, preferred first."""
        types = self.challenge_preferences.get(names_key(names))
        if types is None:
            return list(self.responders)
        by_type = {r.challenge_type: r for r in self.responders}
        return [by_type[t] for t in types if t in by_type]

    async def _authorize_all(self, urls: list[str], responders: Sequence[IResponder]) -> None:
        """Work every authorization in parallel; on the first failure cancel the rest (so
        each withdraws its challenge answer) and re-raise that failure."""
        ds = [Deferred.fromCoroutine(self._authorize(url, responders)) for url in urls]
        try:
            await defer.DeferredList(ds, fireOnOneErrback=True, consumeErrors=True)
        except defer.FirstError as e:
            for d in ds:
                d.cancel()
            await defer.DeferredList(ds, consumeErrors=True)
            e.subFailure.raiseException()

    def _pick(
        self, authz: Fetched[messages.Authorization], responders: Sequence[IResponder]
    ) -> tuple[messages.ChallengeBody, challenges.KeyAuthorizationChallenge, IResponder]:
        """The first of ``responders`` (in their order) whose type the CA offers."""
        offered = [(challb, recognise(challb.chall)) for challb in authz.body.challenges or ()]
        for responder in responders:
            for challb, chall in offered:
                if (
                    isinstance(chall, challenges.KeyAuthorizationChallenge)
                    and chall.typ == responder.challenge_type
                ):
                    return challb, chall, responder
        types = [str(c.jobj.get("type", "?")) if isinstance(c, challenges.UnrecognizedChallenge)
                 else str(getattr(c, "typ", "?")) for _, c in offered]  # fmt: skip
        raise AcmeProtocolError(
            f"no challenge for {_identifier(authz.body)} we can answer: the CA offers "
            f"{', '.join(types) or 'none'}, we answer "
            f"{', '.join(r.challenge_type for r in responders) or 'nothing'} (the challenges "
            "setting, default: what this setup can answer)",
            authz.url,
        )

    async def _authorize(self, url: str, responders: Sequence[IResponder]) -> None:
        authz = await self.client.get_authorization(url)
        ident = _identifier(authz.body)
        if authz.body.status == messages.STATUS_VALID:
            log.debug("authorization for %s already valid", ident)
            return
        if authz.body.status != messages.STATUS_PENDING:
            raise ChallengeFailed(ident, self._authz_problem(authz, None))
        challb, chall, responder = self._pick(authz, responders)
        token = chall.encode("token")
        # The key authorization itself (RFC 8555 section 8.1): each responder derives what it
        # serves from it (HTTP-01 the body as is; DNS-01 its SHA-256 as a TXT value).
        key_authorization = chall.key_authorization(self.account_key)
        await defer.maybeDeferred(responder.start_responding, ident, token, key_authorization)
        try:
            answered = await self.client.answer_challenge(challb.uri)
            authz = await self._poll(
                lambda: self.client.get_authorization(url),
                {messages.STATUS_PENDING},
                f"authorization for {ident}",
                answered.retry_after,
            )
        finally:
            await _withdraw(responder, ident, token)
        if authz.body.status != messages.STATUS_VALID:
            raise ChallengeFailed(ident, self._authz_problem(authz, challb.uri))
        log.debug("authorization for %s valid", ident)

    def _authz_problem(
        self, authz: Fetched[messages.Authorization], challenge_url: str | None
    ) -> AcmeError | None:
        """The CA's reason: the answered challenge's error first, else any challenge's."""
        errors = [
            (c.uri == challenge_url, c.error)
            for c in (authz.body.challenges or ())
            if c.error is not None
        ]
        errors.sort(key=lambda pair: not pair[0])
        return _acme_error(errors[0][1], authz.url) if errors else None

    def _order_failed(self, order: Fetched[messages.Order]) -> Exception:
        err = _acme_error(order.body.error, order.url)
        if err is not None:
            return err
        return AcmeProtocolError("the order became invalid without saying why", order.url)

    async def _sleep(self, seconds: float) -> None:
        await task.deferLater(self.clock, max(0.0, seconds), lambda: None)

    def _delay(self, retry_after: float | None, waits: int) -> float:
        if retry_after is not None:
            return retry_after
        return min(self.poll_interval, FIRST_POLL_DELAY * 2 ** min(waits, 30))

    async def _poll(
        self,
        fetch: Callable[[], Deferred[Fetched[Any]]],
        waiting: set[messages.Status],
        what: str,
        retry_after: float | None = None,
    ) -> Fetched[Any]:
        """Fetch until the status leaves ``waiting``, honouring Retry-After, for at most
        ``poll_timeout`` seconds of clock time."""
        deadline = self.clock.seconds() + self.poll_timeout
        waits = 0
        while True:
            remaining = deadline - self.clock.seconds()
            await self._sleep(min(self._delay(retry_after, waits), max(0.0, remaining)))
            waits += 1
            item = await self._read(fetch, what)
            if item.body.status not in waiting:
                return item
            if remaining <= 0:
                raise AcmeProtocolError(
                    f"{what} still {item.body.status.name} after {self.poll_timeout:g} s", item.url
                )
            retry_after = item.retry_after

    async def _finalize(
        self, order: Fetched[messages.Order], names: tuple[str, ...], key_pem: bytes
    ) -> Fetched[messages.Order]:
        """Drive the order from ``pending``/``ready`` through ``processing`` to ``valid``.

        Every authorization is valid when this runs, so the order is normally ``ready``: it
        is finalized at once, without first fetching it again. A CA that is not there yet
        answers ``orderNotReady``, and then the order is polled like any other."""
        csr_pem = make_csr_pem(key_pem, names)
        csr_der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
        deadline = self.clock.seconds() + self.poll_timeout
        current = order
        finalized = False
        waits = 0
        while True:
            status = current.body.status
            if status == messages.STATUS_INVALID:
                raise self._order_failed(current)
            if status == messages.STATUS_VALID:
                if not current.body.certificate:
                    raise AcmeProtocolError("valid order without a certificate URL", order.url)
                return current
            # ``order`` itself still shows newOrder's status, from before the authorizations.
            finalizable = status == messages.STATUS_READY or (
                current is order and status == messages.STATUS_PENDING
            )
            if finalizable and not finalized:
                try:
                    current = await self.client.finalize(current, csr_der)
                    finalized = True
                    waits = 0
                    continue
                except AcmeError as e:
                    if e.code != "orderNotReady":
                        raise
            remaining = deadline - self.clock.seconds()
            if remaining <= 0:
                raise AcmeProtocolError(
                    f"order still {status.name} after {self.poll_timeout:g} s", order.url
                )
            await self._sleep(min(self._delay(current.retry_after, waits), remaining))
            waits += 1
            current = await self._read(lambda: self.client.get_order(order.url), "order")

    async def _read(self, fetch: Callable[[], Deferred[Fetched[Any]]], what: str) -> Fetched[Any]:
        """``fetch()``, tried again up to POLL_READ_RETRIES times when the CA does not answer."""
        retries = 0
        while True:
            try:
                return await fetch()
            except AcmeTransportError as e:
                retries += 1
                if retries > POLL_READ_RETRIES:
                    raise
                log.warning(
                    "polling the %s: %s; trying again in %g s (%d of %d)",
                    what, e, self.poll_interval, retries, POLL_READ_RETRIES,
                )  # fmt: skip
            await self._sleep(self.poll_interval)

    async def _download(self, cert_url: str) -> bytes:
        chain_pem, alternates = await self.client.download_chain(cert_url)
        if self.preferred_chain is None:
            return chain_pem
        candidates = [chain_pem]
        for url in alternates:
            alt_pem, _ = await self.client.download_chain(url)
            candidates.append(alt_pem)
        for pem in candidates:
            if _top_issuer_cn(pem) == self.preferred_chain:
                return pem
        log.warning(
            "no chain from %s is issued by %r; using the default one",
            cert_url,
            self.preferred_chain,
        )
        return chain_pem

    def _bundle(
        self,
        names: tuple[str, ...],
        key_pem: bytes,
        chain_pem: bytes,
        order: Fetched[messages.Order],
        cert_url: str,
    ) -> CertificateBundle:
        now = crypto.now_from_clock(self.clock)
        try:
            # Bare PEM blocks only: what the store accepts when it reads the chain back.
            chain_pem = crypto.canonical_chain_pem(chain_pem)
            bundle = CertificateBundle(key_pem=key_pem, chain_pem=chain_pem)
            chain = crypto.validate_bundle(bundle, names, now)
            if self.trust is not None:
                self.trust.check(chain, names[0], now)
        except BundleError as e:
            raise AcmeProtocolError(f"the issued certificate is unusable: {e}", cert_url) from None
        try:
            cert_id: str | None = ari_cert_id(chain[0])
        except BundleError:
            cert_id = None
        metadata = {
            "names": list(names),
            "issuer_directory": self.client.transport.directory_url,
            "order_url": order.url,
            "certificate_url": cert_url,
            "ari_cert_id": cert_id,
            "issued_at": now.isoformat(),
            "profile": order.body.profile or self.profile,
        }
        return attrs.evolve(bundle, metadata=metadata)

    # -- ARI --------------------------------------------------------------------------------

    async def _renewal_info(self, chain_pem: bytes) -> RenewalWindow | None:
        leaf = crypto.parse_chain(chain_pem)[0]
        try:
            cert_id = ari_cert_id(leaf)
        except BundleError:
            return None
        return await self.client.renewal_info(cert_id)


def _top_issuer_cn(chain_pem: bytes) -> str | None:
    """certbot's ``preferred_chain`` rule: the issuer CN of the chain's topmost certificate."""
    try:
        top = crypto.parse_chain(chain_pem)[-1]
    except BundleError:
        return None
    cns = top.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else None


__all__ = ["FIRST_POLL_DELAY", "AcmeIssuer"]
