"""The provisioning service: keeps every configured certificate issued, renewed and served.

It owns no protocol and no storage format: it asks the :class:`~synapse_acme.interfaces.IIssuer`
for certificates, the :class:`~synapse_acme.interfaces.ICertificateStore` to keep them, the
:mod:`~synapse_acme.policy` when to renew and how long to back off, and tells every
:class:`~synapse_acme.interfaces.ICertificateConsumer` when a certificate changes.

Rules it keeps (after certmagic and txacme):
- start serving what the store has at once (even expired or a placeholder, loudly logged) and
  issue in the background; the host's start is never blocked or failed by the CA;
- at most one order per certificate at a time: a second request joins the one in flight;
- a failure keeps the previous certificate, is logged once per attempt with the ACME error type
  and the next attempt time, and backs off per certificate (front-loaded table, Retry-After);
- an issued certificate that cannot be saved is kept in memory and saved on the next attempt
  instead of being ordered again (rate limits are precious);
- the periodic check logs its own errors, so it never dies; the next check is scheduled only
  when the current one has finished, so a check stuck on a silent CA never runs twice at once;
- ``stopService`` cancels what is in flight (issuances, a running check and its ARI fetches)
  instead of waiting for the CA, so stopping takes no longer than the cancellations.

One-shot mode (``one_shot=True``, used by ``synapse-acme issue``/``renew``): the store is read
and only what :meth:`AcmeService.renew` is asked for is done. No periodic check, no ARI fetch,
no retry timer, no coalescing timer; a failure is recorded (status, ``last_error``) without a
next attempt time, since nothing in this process will retry it, and is logged at DEBUG only:
the caller (the CLI's ``FAILED`` line) is its one report, with :meth:`AcmeService.failure_summary`.

Shared store (``coordination``, the PostgreSQL store: several processes, on one host or several):
- before ordering, the service takes the issuance lock named after the certificate's key; while
  another process holds it, this one orders nothing, waits, and adopts that process's result;
- once it holds the lock it re-reads the store: a certificate newer than the one it had when it
  decided to renew (forced renewals included) was obtained meanwhile by another process, and is
  adopted instead of ordered again; so one renewal is one order, however many processes ask;
- it renews the lease every third of its length while ordering; a lease found lost (the lock
  may have passed to another process) stops the issuance, and nothing is saved;
- :meth:`AcmeService.store_changed` (called on the store's change notification) and every
  periodic check adopt what another process saved.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from synapse_acme import crypto, policy
from synapse_acme.errors import (
    AccountRefused,
    AcmeError,
    BundleError,
    ChallengeFailed,
    SynapseAcmeError,
)
from synapse_acme.interfaces import (
    IBatchLoad,
    ICertificateBatchConsumer,
    ICertificateConsumer,
    ICertificateStore,
    IIssuanceLock,
    IIssuer,
    IPreparingIssuer,
)
from synapse_acme.model import CertificateBundle, CertificateSpec, RenewalWindow
from synapse_acme.names import canonical_names, names_key
from synapse_acme.status import CertificateStatus, format_time, time_from_seconds

logger = logging.getLogger(__name__)

# How often to ask the CA for a fresh ARI window when it gives no Retry-After (RFC 9773 suggests
# clients poll about twice a day).
ARI_DEFAULT_RECHECK = 6 * 3600.0
#: Status changes within this many seconds are published once (100 certificates finishing
#: together write the status file once, not 100 times); stopService publishes what is left.
STATUS_COALESCE_SECONDS = 0.5
#: Certificates read per query at start from a store that reads in batches (IBatchLoad, the
#: PostgreSQL store): one round trip per batch instead of one per certificate, and the reactor
#: still runs between batches (each batch is checked and adopted on it).
STORE_LOAD_BATCH = 200
#: How long another process's issuance lock holds when nobody renews it (its holder died): a
#: waiting process orders in its place after at most this. The holder renews it every third.
DEFAULT_LEASE_SECONDS = 60.0
#: How often a process waiting for another's issuance looks at the store and the lock again.
DEFAULT_WAIT_POLL = 1.0


class LeaseLost(SynapseAcmeError):
    """The issuance lock's lease was lost while ordering: another process may be ordering the
    same certificate, so this one stops and saves nothing."""


@attrs.frozen
class Coordination:
    """How processes sharing one store take turns to order (see the module docstring).

    ``lock``: the store's issuance lock; ``holder``: this process's name in it (unique: host,
    pid and a random part); ``lease_seconds``: how long the lock outlives a holder that stopped
    renewing it; ``wait_poll``: how often a waiting process looks at the store and the lock.
    """

    lock: IIssuanceLock
    holder: str
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    wait_poll: float = DEFAULT_WAIT_POLL


def _error_type(failure: Failure | BaseException) -> str:
    exc = failure.value if isinstance(failure, Failure) else failure
    if isinstance(exc, AccountRefused):
        return exc.problem.code
    if isinstance(exc, AcmeError):
        return exc.code
    if isinstance(exc, ChallengeFailed) and exc.error is not None:
        return exc.error.code
    return type(exc).__name__


def _retry_after(exc: BaseException) -> float | None:
    if isinstance(exc, AcmeError):
        return exc.retry_after
    if isinstance(exc, ChallengeFailed) and exc.error is not None:
        return exc.error.retry_after
    return None


@attrs.define(eq=False)
class _Managed:
    """What the service knows about one configured certificate (mutable, private to the
    service; others read :class:`~synapse_acme.status.CertificateStatus`)."""

    spec: CertificateSpec
    key: str
    bundle: CertificateBundle | None = None
    # Whether bundle is a self-signed placeholder: set with bundle (only _adopt sets either),
    # so the periodic check reads a flag here instead of each bundle's metadata.
    placeholder: bool = False
    serial: str | None = None  # of bundle's leaf (hex)
    issuer: str | None = None  # bundle's leaf's issuer name (RFC 4514)
    not_before: datetime.datetime | None = None
    not_after: datetime.datetime | None = None
    renew_at: datetime.datetime | None = None
    ari: RenewalWindow | None = None
    ari_next_fetch: float = 0.0
    failures: int = 0
    next_attempt: float = 0.0  # clock seconds; 0 = no backoff in force
    last_error: str | None = None
    last_error_type: str | None = None
    ca_retry_at: float | None = None  # clock seconds; the CA's Retry-After with the last error
    last_attempt: float | None = None
    last_success: float | None = None
    last_failure: float | None = None  # when the last failed attempt started
    unsaved: CertificateBundle | None = attrs.field(default=None, repr=False)
    in_flight: defer.Deferred[CertificateBundle] | None = None
    waiters: list[defer.Deferred[CertificateBundle]] = attrs.Factory(list)
    retry_call: IDelayedCall | None = None


class AcmeService(Service):
    """A Twisted Service that drives issuance and renewal for a fixed set of certificates.

    ``specs`` are the certificates to keep (names are canonicalised; a set given twice is a
    ValueError); ``store`` keeps them; ``issuer`` obtains them and their ARI windows; ``clock``
    is the only source of time. ``threshold_days`` caps how early a certificate is renewed
    (``reprovision_threshold``; None: no cap); ``check_interval`` and ``check_jitter`` set the
    wait between the end of one periodic check and the start of the next; ``rand`` draws the
    jitter and the renewal moment; ``key_generator`` makes a new private key per issuance from
    a key type; ``on_status`` receives :meth:`status` after changes (coalesced while running).
    ``one_shot`` selects one-shot mode (see the module docstring): no timers at all, failures
    recorded without a next attempt and left for the caller to report. ``ready`` returns a
    Deferred that fires once challenges can be answered (the standalone HTTP-01 listener is
    bound); every order waits for it, and if it fails the attempt fails with its error
    without reaching the CA, whose failed validations count against its limits.
    ``before_order(spec, previous)`` (the preflight, a dry run) runs before every order, after
    ``ready``, with the certificate being replaced (None, or a placeholder's None); its Deferred
    failing fails that attempt like any other failure (recorded, backed off, old certificate
    kept) without an order. ``on_result(key, success)`` is told how each issuance attempt
    ended (metrics count them); a cancelled one is not an attempt that ended.
    ``coordination``: the issuance lock of a store shared by several processes (see the module
    docstring); None (the file store) orders without asking anyone.
    """

    def __init__(
        self,
        specs: Sequence[CertificateSpec],
        store: ICertificateStore,
        issuer: IIssuer,
        clock: IReactorTime,
        *,
        threshold_days: float | None = 30,
        check_interval: float = 600.0,
        check_jitter: float = 0.1,
        rand: random.Random | None = None,
        key_generator: Callable[[str], bytes] = crypto.generate_private_key_pem,
        on_status: Callable[[list[CertificateStatus]], None] | None = None,
        one_shot: bool = False,
        ready: Callable[[], defer.Deferred[Any]] | None = None,
        before_order: (
            Callable[[CertificateSpec, CertificateBundle | None], defer.Deferred[Any]] | None
        ) = None,
        on_result: Callable[[str, bool], None] | None = None,
        coordination: Coordination | None = None,
    ) -> None:
        self._store = store
        self._coordination = coordination
        self._on_result = on_result
        self._ready = ready
        self._before_order = before_order
        self._issuer = issuer
        self._clock = clock
        self._threshold = (
            datetime.timedelta(days=threshold_days) if threshold_days is not None else None
        )
        self._check_interval = check_interval
        self._check_jitter = check_jitter
        self._rand = rand if rand is not None else random.Random()
        self._key_generator = key_generator
        self._on_status = on_status
        self._one_shot = one_shot
        self._consumers: list[ICertificateConsumer] = []
        self._managed: dict[str, _Managed] = {}
        for spec in specs:
            names = canonical_names(spec.names)
            key = names_key(names)
            if key in self._managed:
                raise ValueError(f"certificate for {', '.join(names)} is configured twice")
            self._managed[key] = _Managed(spec=attrs.evolve(spec, names=names), key=key)
        self._tick_call: IDelayedCall | None = None
        self._loading: defer.Deferred[None] | None = None
        self._running_check: defer.Deferred[None] | None = None
        # Set by stopService: what fails from now on was cancelled by it (a cancelled HTTP
        # request may surface as a transport error), so it is not reported as a CA failure.
        self._stopping = False
        self._status_call: IDelayedCall | None = None

    # -- public API -------------------------------------------------------------------------

    @property
    def keys(self) -> list[str]:
        """The store keys of the managed certificates, in configuration order."""
        return list(self._managed)

    def status_of(self, key: str) -> CertificateStatus:
        """The status of certificate ``key`` now (KeyError if it is not managed here)."""
        return self._status(self._managed[key], self._clock.seconds())

    def failure_summary(self, key: str) -> str | None:
        """The last failure of ``key`` as one sentence for an operator (the error, its type,
        what is kept), or None if its last attempt did not fail. Says nothing about retries:
        that depends on who runs the service."""
        m = self._managed[key]
        if m.last_error is None:
            return None
        text = f"{m.last_error} (error type {m.last_error_type}); {_kept(m)}"
        if m.unsaved is not None and self._one_shot:
            text += " (it is lost when this process exits)"
        if m.ca_retry_at is not None:
            text += f"; the CA asks not to try again before {_at(m.ca_retry_at)}"
        return text

    def key_for(self, names: Iterable[str]) -> str:
        return names_key(names)

    def current(self, key: str) -> CertificateBundle | None:
        """The bundle being served for ``key`` now (possibly a placeholder or expired)."""
        return self._managed[key].bundle

    def add_consumer(self, consumer: ICertificateConsumer) -> None:
        """Register ``consumer``; it is told at once about every certificate already held."""
        self._consumers.append(consumer)
        self._notify_many([consumer], [m.key for m in self._managed.values()])

    def when_loaded(self) -> defer.Deferred[None]:
        """Deferred firing once the store has been read (after ``startService``)."""
        if self._loading is None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()

        def fire(result: object) -> object:
            d.callback(None)
            return result

        self._loading.addBoth(fire)
        return d

    def renew(
        self, key: str | None = None, force: bool = False, requested_at: float | None = None
    ) -> defer.Deferred[list[tuple[str, CertificateBundle | Failure]]]:
        """Issue now: ``key`` or every certificate. Without ``force`` only those due (or missing).

        Fires with a list of ``(key, CertificateBundle | Failure)``, one per certificate tried;
        ``force`` ignores the renewal time and any backoff in force. ``requested_at``: when the
        renewal was asked for (seconds on the clock's scale, e.g. a request file's mtime); a
        certificate issued since then already answers it (on a shared store another process
        may have renewed it meanwhile, asked at the same moment), so it is not ordered again.
        """
        targets = [self._managed[key]] if key is not None else list(self._managed.values())
        now = self._now()
        chosen = [m for m in targets if force or self._due(m, now)]
        ds: list[defer.Deferred[tuple[str, CertificateBundle | Failure]]] = []
        for m in chosen:
            if requested_at is not None and m.bundle is not None and m.in_flight is None:
                issued = _issued_at(m.bundle)
                if issued is not None and issued >= requested_at:
                    logger.info(
                        "The certificate for %s was issued at %s, after the renewal was asked "
                        "for: not ordering it again",
                        _names(m),
                        format_time(time_from_seconds(issued)),
                    )
                    ds.append(defer.succeed((m.key, m.bundle)))
                    continue
            d = self._obtain(m)
            ds.append(d.addCallbacks(lambda b, k=m.key: (k, b), lambda f, k=m.key: (k, f)))
        return defer.gatherResults(ds)

    def status(self) -> list[CertificateStatus]:
        """The status of every certificate, in configuration order. What the TLS listeners
        serve and the export are not known here (``served_serial`` and ``export`` are None):
        :meth:`synapse_acme.runtime.Runtime.status` adds them."""
        now = self._clock.seconds()
        return [self._status(m, now) for m in self._managed.values()]

    def _status(self, m: _Managed, now: float) -> CertificateStatus:
        metadata = m.bundle.metadata if m.bundle is not None else {}
        ca_url = metadata.get("issuer_directory")
        fallbacks = metadata.get("issuer_fallbacks")
        return CertificateStatus(
            key=m.key,
            names=m.spec.names,
            has_certificate=m.bundle is not None,
            placeholder=m.placeholder,
            serial=m.serial,
            issuer=m.issuer,
            ca_url=ca_url if isinstance(ca_url, str) else None,
            fallbacks=fallbacks if isinstance(fallbacks, int) and fallbacks > 0 else 0,
            not_before=m.not_before,
            not_after=m.not_after,
            renew_at=m.renew_at,
            ari_window=(m.ari.start, m.ari.end) if m.ari is not None else None,
            failures=m.failures,
            next_attempt=time_from_seconds(m.next_attempt) if m.next_attempt > now else None,
            last_error=m.last_error,
            last_error_type=m.last_error_type,
            last_attempt=time_from_seconds(m.last_attempt),
            last_success=time_from_seconds(m.last_success),
            last_failure=time_from_seconds(m.last_failure),
            issuing=m.in_flight is not None,
            unsaved=m.unsaved is not None,
        )

    # -- Service lifecycle ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._loading = defer.ensureDeferred(self._load_all())
        self._loading.addErrback(self._log_unexpected, "loading certificates from the store")
        if not self._one_shot:
            self._loading.addBoth(lambda _: self._schedule_tick(0))

    def stopService(self) -> defer.Deferred[None]:
        """Stop timers, cancel what is in flight (issuances, the periodic check and its ARI
        fetches), and fire once nothing is running; then write the status still pending."""
        super().stopService()
        self._stopping = True
        if self._tick_call is not None and self._tick_call.active():
            self._tick_call.cancel()
        self._tick_call = None
        pending: list[defer.Deferred[Any]] = []
        for m in self._managed.values():
            if m.retry_call is not None and m.retry_call.active():
                m.retry_call.cancel()
            m.retry_call = None
            if m.in_flight is not None:
                quiet: defer.Deferred[Any] = defer.Deferred()
                m.waiters.append(quiet)  # type: ignore[arg-type]
                quiet.addErrback(lambda _: None)
                pending.append(quiet)
                m.in_flight.cancel()
        if self._running_check is not None:
            # Its errback (see _tick) swallows the CancelledError; waiting for it is instant.
            check = self._running_check
            pending.append(check)
            check.cancel()

        def flush(_: object) -> None:
            if self._status_call is not None and self._status_call.active():
                self._status_call.cancel()
                self._status_call = None
                self._write_status()

        return defer.DeferredList(pending, consumeErrors=True).addCallback(flush)

    # -- internals ----------------------------------------------------------------------------

    def _now(self) -> datetime.datetime:
        return crypto.now_from_clock(self._clock)

    async def _load_all(self) -> None:
        """Serve what the store holds for every managed certificate. A store that reads in
        batches (:class:`~synapse_acme.interfaces.IBatchLoad`) is asked
        :data:`STORE_LOAD_BATCH` keys at a time, any other one key by key."""
        batch = IBatchLoad(self._store, None)
        keys = list(self._managed)
        loaded: dict[str, CertificateBundle | Exception | None] = {}
        # Adopted, not yet told to the consumers: they are told STORE_LOAD_BATCH at a time,
        # so the TLS map swaps once per batch (see ICertificateBatchConsumer).
        adopted: list[str] = []
        try:
            for i, m in enumerate(self._managed.values()):
                if len(adopted) >= STORE_LOAD_BATCH:
                    self._notify_many(self._consumers, adopted)
                    adopted = []
                try:
                    if batch is None:
                        bundle = await self._store.load(m.key)
                    else:
                        if m.key not in loaded:  # the next batch
                            loaded = await _load_batch(batch, keys[i : i + STORE_LOAD_BATCH])
                        got = loaded[m.key]
                        if isinstance(got, Exception):
                            raise got
                        bundle = got
                except Exception as e:  # a corrupt entry must not stop the others
                    logger.error("Cannot read the stored certificate for %s: %s", _names(m), e)
                    continue
                if bundle is None:
                    logger.info("No stored certificate for %s yet; it will be issued", _names(m))
                    continue
                try:
                    self._adopt(m, bundle, allow_expired=True, notify=False)
                except BundleError as e:
                    logger.error("Stored certificate for %s is unusable: %s", _names(m), e)
                    continue
                adopted.append(m.key)
                # A one-shot command serves nothing: it says what the store holds.
                if m.not_after is not None and m.not_after <= self._now():
                    logger.warning(
                        "The stored certificate for %s EXPIRED on %s"
                        + ("" if self._one_shot else "; serving it until a new one is issued"),
                        _names(m),
                        format_time(m.not_after),
                    )
                elif m.placeholder:
                    logger.warning(
                        "The store holds only a self-signed placeholder for %s"
                        + ("" if self._one_shot else "; serving it until the real one is issued"),
                        _names(m),
                    )
        finally:
            self._notify_many(self._consumers, adopted)

    def _adopt(
        self,
        m: _Managed,
        bundle: CertificateBundle,
        allow_expired: bool = False,
        notify: bool = True,
    ) -> None:
        """Make ``bundle`` the served certificate of ``m`` and (with ``notify``) tell the
        consumers."""
        placeholder = bool(bundle.metadata.get("placeholder"))
        names = None if placeholder else m.spec.names
        chain = crypto.validate_bundle(bundle, names, self._now(), allow_expired=allow_expired)
        m.bundle = bundle
        m.placeholder = placeholder
        m.serial = f"{chain[0].serial_number:x}"
        m.issuer = chain[0].issuer.rfc4514_string()
        m.not_before = crypto.not_before(chain[0])
        m.not_after = crypto.not_after(chain[0])
        m.ari = None
        m.ari_next_fetch = 0.0
        self._compute_renew_at(m)
        if notify:
            for consumer in list(self._consumers):
                self._notify_one(consumer, m.key, bundle)

    def _notify_many(self, consumers: Sequence[ICertificateConsumer], keys: Sequence[str]) -> None:
        """Tell ``consumers`` the current bundle of each of ``keys`` (those that have one):
        at once to an :class:`ICertificateBatchConsumer`, one by one to the others."""
        bundles = {k: b for k in keys if (b := self._managed[k].bundle) is not None}
        if not bundles:
            return
        for consumer in list(consumers):
            many = ICertificateBatchConsumer(consumer, None)
            if many is None:
                for key, bundle in bundles.items():
                    self._notify_one(consumer, key, bundle)
                continue
            try:
                many.certificates_loaded(bundles)
            except Exception:
                logger.exception(
                    "Certificate consumer %r failed for %d certificates", consumer, len(bundles)
                )

    def _notify_one(
        self, consumer: ICertificateConsumer, key: str, bundle: CertificateBundle
    ) -> None:
        try:
            consumer.certificate_changed(key, bundle)
        except Exception:
            logger.exception("Certificate consumer %r failed for %s", consumer, key)

    def _compute_renew_at(self, m: _Managed) -> None:
        if m.bundle is None or m.not_before is None or m.not_after is None or m.placeholder:
            m.renew_at = None
            return
        window = (m.ari.start, m.ari.end) if m.ari is not None else None
        m.renew_at = policy.renewal_time(
            m.not_before,
            m.not_after,
            threshold=self._threshold,
            ari_window=window,
            rand=self._rand,
        )

    def _due(self, m: _Managed, now: datetime.datetime) -> bool:
        if m.bundle is None or m.placeholder or m.renew_at is None or m.not_after is None:
            return True
        return policy.needs_renewal(now, m.renew_at, m.not_after, not_before=m.not_before)

    def _schedule_tick(self, delay: float) -> None:
        if not self.running:
            return
        if self._tick_call is not None and self._tick_call.active():
            self._tick_call.cancel()
        self._tick_call = self._clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        """The periodic check. Never raises; schedules the next one when this one has ended
        (however it ended), so checks never overlap or pile up behind a silent CA."""
        self._tick_call = None
        if self._running_check is not None:
            return  # cannot happen (one timer, set only after a check ends); never run two
        d = defer.ensureDeferred(self._check_all())
        self._running_check = d
        d.addErrback(self._check_failed)
        d.addBoth(self._check_ended)

    def _check_failed(self, failure: Failure) -> None:
        if self._stopping and failure.check(defer.CancelledError):
            return  # stopService cancelled it
        self._log_unexpected(failure, "the periodic certificate check")

    def _check_ended(self, _: object) -> None:
        self._running_check = None
        self._schedule_tick(
            policy.next_check_delay(self._check_interval, self._check_jitter, self._rand)
        )

    async def _check_all(self) -> None:
        if self._coordination is not None:
            # The safety net under change notification: another process may have renewed.
            await self._follow_all()
        await self._refresh_ari()
        if self._stopping:
            return  # stopped while fetching ARI: order nothing
        now = self._now()
        seconds = self._clock.seconds()
        for m in self._managed.values():
            if m.in_flight is not None or not self._due(m, now):
                continue
            if m.next_attempt > seconds:
                continue  # backing off; a retry call is already scheduled
            d = self._obtain(m)
            d.addErrback(lambda _: None)  # already logged by _obtain

    async def _refresh_ari(self) -> None:
        """Fetch the CA's renewal window for certificates whose window is stale (RFC 9773)."""
        seconds = self._clock.seconds()
        for m in self._managed.values():
            if m.bundle is None or m.placeholder or seconds < m.ari_next_fetch:
                continue
            bundle = m.bundle
            try:
                directory = bundle.metadata.get("issuer_directory")
                window = await self._issuer.renewal_info(
                    bundle.chain_pem, directory if isinstance(directory, str) else None
                )
            except Exception as e:
                if self._stopping:
                    return  # cancelled by stopService (perhaps seen as a transport error)
                logger.info("Could not fetch the ARI renewal window for %s: %s", _names(m), e)
                m.ari_next_fetch = self._clock.seconds() + ARI_DEFAULT_RECHECK
                continue
            finally:
                seconds = self._clock.seconds()  # the fetch took time
            if m.bundle is not bundle:
                continue  # replaced meanwhile
            recheck = ARI_DEFAULT_RECHECK
            if window is not None:
                m.ari = window
                if window.retry_after:
                    recheck = max(60.0, window.retry_after)
                self._compute_renew_at(m)
            m.ari_next_fetch = self._clock.seconds() + recheck

    def _obtain(self, m: _Managed) -> defer.Deferred[CertificateBundle]:
        """A Deferred for a new certificate for ``m``, joining the issuance in flight if any."""
        waiter: defer.Deferred[CertificateBundle] = defer.Deferred(
            lambda d: m.waiters.remove(d) if d in m.waiters else None
        )
        m.waiters.append(waiter)
        if m.in_flight is None:
            if m.retry_call is not None and m.retry_call.active():
                m.retry_call.cancel()
            m.retry_call = None
            m.in_flight = defer.ensureDeferred(self._issue(m))
            m.in_flight.addBoth(self._finished, m)
        return waiter

    def _finished(self, result: CertificateBundle | Failure, m: _Managed) -> None:
        m.in_flight = None
        waiters, m.waiters = m.waiters, []
        for w in waiters:
            if isinstance(result, Failure):
                w.errback(result)
            else:
                w.callback(result)
        if isinstance(result, Failure):
            result.trap(Exception)  # consumed: every waiter got it, and it was logged
        self._publish_status()

    async def _issue(self, m: _Managed) -> CertificateBundle:
        m.last_attempt = self._clock.seconds()
        attempt = m.failures + 1
        seen = m.bundle  # what this process had when it decided to renew
        ours = True
        try:
            if m.unsaved is not None:
                bundle = m.unsaved
                stored = None
                if self._coordination is not None:
                    # Another process may have saved a newer one meanwhile: never replace it.
                    stored = await self._newer_in_store(m, bundle)
                if stored is not None:
                    bundle, ours = stored, False
                    logger.info(
                        "Not saving the certificate for %s issued earlier: another process "
                        "saved a newer one",
                        _names(m),
                    )
                else:
                    logger.info("Saving the certificate for %s issued earlier", _names(m))
                    await self._store.save(m.key, bundle)
                m.unsaved = None
            elif self._coordination is None:
                bundle = await self._order(m, attempt)
                await self._store.save(m.key, bundle)
                m.unsaved = None
            else:
                bundle, ours = await self._order_shared(m, attempt, seen, self._coordination)
        except defer.CancelledError:
            logger.info("Issuance for %s cancelled", _names(m))
            raise
        except Exception as e:
            if self._stopping:  # cancelled by stopService, perhaps seen as a transport error
                # A FirstError's text holds a whole traceback: say what it wraps.
                why = e.subFailure.value if isinstance(e, defer.FirstError) else e
                logger.info("Issuance for %s cancelled (stopping): %s", _names(m), why)
                raise
            self._record_failure(m, e, attempt)
            raise
        if m.bundle is None or m.bundle.chain_pem != bundle.chain_pem:
            self._adopt(m, bundle)  # (a notification may have adopted another's already)
        m.failures = 0
        m.next_attempt = 0.0
        m.last_error = m.last_error_type = None
        m.ca_retry_at = None
        m.last_success = self._clock.seconds()
        if not ours:
            logger.info(
                "Certificate for %s was obtained by another process on the shared store; "
                "serving it (valid until %s, renewal planned at %s)",
                _names(m),
                format_time(m.not_after),
                format_time(m.renew_at),
            )
            return bundle
        self._tell_result(m, True)
        logger.info(
            "Certificate for %s obtained; valid until %s, renewal planned at %s",
            _names(m),
            format_time(m.not_after),
            format_time(m.renew_at),
        )
        return bundle

    async def _order(self, m: _Managed, attempt: int) -> CertificateBundle:
        """One order at the CA for ``m`` (after ``ready`` and ``before_order``); the new bundle
        is kept in ``m.unsaved`` until the caller saved it. Once ``ready``, the issuer sets
        up its account (registers it, the first time) while ``before_order`` (the preflight)
        runs, not after it."""
        if self._ready is not None:
            # Nothing reaches the CA, not even the account, while no challenge can be answered.
            await self._ready()
        prepared = None
        if IPreparingIssuer.providedBy(self._issuer):
            prepared = self._issuer.prepare()
        try:
            if self._before_order is not None:
                await self._before_order(m.spec, None if m.placeholder else m.bundle)
        except BaseException as e:
            if prepared is not None:
                # The check's error is the one to report; the registration goes on (other
                # certificates' orders may be waiting for it) unless this issuance was cancelled.
                prepared.addErrback(lambda _: None)
                if isinstance(e, defer.CancelledError):
                    prepared.cancel()
            raise
        logger.info("Obtaining a certificate for %s (attempt %d)", _names(m), attempt)
        if prepared is not None:
            await prepared
        replaces = None
        if m.bundle is not None and not m.placeholder:
            replaces = m.bundle.metadata.get("ari_cert_id")
        key_pem = self._key_generator(m.spec.key_type)
        bundle = await self._issuer.issue(m.spec.names, key_pem, replaces)
        crypto.validate_bundle(bundle, m.spec.names, self._now())
        m.unsaved = bundle
        return bundle

    async def _order_shared(
        self, m: _Managed, attempt: int, seen: CertificateBundle | None, how: Coordination
    ) -> tuple[CertificateBundle, bool]:
        """Order under the store's issuance lock: ``(bundle, True)`` once ordered and saved,
        or ``(bundle, False)`` for a newer certificate another process saved (adopted, not
        ordered). Waits while another process holds the lock."""
        waiting = False
        while not await how.lock.acquire(m.key, how.holder, how.lease_seconds):
            if not waiting:
                logger.info(
                    "Another process is obtaining the certificate for %s; waiting for it",
                    _names(m),
                )
                waiting = True
            await task.deferLater(self._clock, how.wait_poll)
            try:
                stored = await self._newer_in_store(m, seen)
            except Exception as e:  # the store may be back at the next look
                logger.warning("Cannot read the shared store for %s: %s", _names(m), e)
                continue
            if stored is not None:
                return stored, False
        keeper = _LeaseKeeper(self._clock, how, m.key)
        try:
            stored = await self._newer_in_store(m, seen)
            if stored is not None:
                return stored, False
            order = defer.ensureDeferred(self._order(m, attempt))
            keeper.start(order)
            try:
                bundle = await order
            except defer.CancelledError:
                if keeper.lost:
                    m.unsaved = None  # never saved: another process may hold the lock now
                    raise LeaseLost(_lease_lost(m)) from None
                raise
            finally:
                keeper.stop()
            if keeper.lost:
                m.unsaved = None
                raise LeaseLost(_lease_lost(m))
            await self._store.save(m.key, bundle)
            m.unsaved = None
            return bundle, True
        finally:
            keeper.stop()
            try:
                await how.lock.release(m.key, how.holder)
            except Exception as e:  # the lease expires on its own
                logger.warning("Could not release the issuance lock of %s: %s", _names(m), e)

    async def _newer_in_store(
        self, m: _Managed, seen: CertificateBundle | None
    ) -> CertificateBundle | None:
        """The stored bundle of ``m`` if it is a usable certificate newer than ``seen``, else
        None (StoreError if the store cannot be read)."""
        return self._newer(m, seen, await self._store.load(m.key))

    def _newer(
        self, m: _Managed, seen: CertificateBundle | None, stored: CertificateBundle | None
    ) -> CertificateBundle | None:
        """``stored`` (read for ``m``) if it is a usable certificate newer than ``seen``."""
        if stored is None or stored.metadata.get("placeholder"):
            return None
        if seen is not None and stored.chain_pem == seen.chain_pem:
            return None
        try:
            chain = crypto.validate_bundle(stored, m.spec.names, self._now())
        except BundleError as e:
            logger.warning("The stored certificate for %s is unusable: %s", _names(m), e)
            return None
        if seen is not None and not seen.metadata.get("placeholder"):
            try:
                old = crypto.parse_chain(seen.chain_pem)[0]
            except BundleError:
                return stored
            if crypto.not_before(chain[0]) < crypto.not_before(old):
                return None  # older than what is served: never go back
        return stored

    def store_changed(self, key: str) -> defer.Deferred[None]:
        """The store says the bundle under ``key`` changed (another process saved it): serve
        it if it is newer than the one served. Never fails (errors are logged); a key not
        managed here is ignored."""
        m = self._managed.get(key)
        if m is None:
            return defer.succeed(None)
        return defer.ensureDeferred(self._follow(m))

    async def _follow_all(self) -> None:
        """Adopt whatever another process saved, for every certificate not being issued here;
        read in batches from a store that offers them (IBatchLoad), else key by key."""
        batch = IBatchLoad(self._store, None)
        if batch is None:
            for m in self._managed.values():
                if m.in_flight is None:
                    await self._follow(m)
            return
        try:
            digests = await batch.chain_digests(list(self._managed))
        except Exception as e:  # the store may be back at the next look
            logger.warning("Cannot read the shared store's certificates: %s", e)
            return
        # Only what changed is loaded (and decrypted, and checked): an idle look is one query.
        managed = [
            m
            for m in self._managed.values()
            if m.key in digests
            and (m.bundle is None or digests[m.key] != _chain_digest(m.bundle.chain_pem))
        ]
        for start in range(0, len(managed), STORE_LOAD_BATCH):
            chunk = [m for m in managed[start : start + STORE_LOAD_BATCH] if m.in_flight is None]
            loaded = await _load_batch(batch, [m.key for m in chunk])
            for m in chunk:
                if m.in_flight is None:
                    self._follow_stored(m, loaded[m.key])

    async def _follow(self, m: _Managed) -> None:
        got: CertificateBundle | Exception | None
        try:
            got = await self._store.load(m.key)
        except Exception as e:
            got = e
        self._follow_stored(m, got)

    def _follow_stored(self, m: _Managed, got: CertificateBundle | Exception | None) -> None:
        """Serve ``got`` (what the store gave for ``m``) if it is newer than what is served."""
        if isinstance(got, Exception):
            logger.warning("Cannot read the changed certificate for %s: %s", _names(m), got)
            return
        stored = self._newer(m, m.bundle, got)
        if stored is None or (m.bundle is not None and m.bundle.chain_pem == stored.chain_pem):
            return
        self._adopt(m, stored)
        # Whatever this process was backing off from, the certificate is now fine.
        m.failures = 0
        m.next_attempt = 0.0
        m.last_error = m.last_error_type = None
        logger.info(
            "Serving the certificate for %s saved by another process (valid until %s)",
            _names(m),
            format_time(m.not_after),
        )
        self._publish_status()

    def _tell_result(self, m: _Managed, success: bool) -> None:
        if self._on_result is None:
            return
        try:
            self._on_result(m.key, success)
        except Exception:
            logger.exception("The issuance result observer failed")

    def _record_failure(self, m: _Managed, e: BaseException, attempt: int) -> None:
        self._tell_result(m, False)
        m.failures += 1
        m.last_failure = m.last_attempt
        m.last_error = str(e) if isinstance(e, SynapseAcmeError) else f"{type(e).__name__}: {e}"
        m.last_error_type = _error_type(e)
        retry_after = _retry_after(e)
        m.ca_retry_at = self._clock.seconds() + retry_after if retry_after is not None else None
        what = "save" if m.unsaved is not None else "obtain"
        if self._one_shot:
            # Nothing here will retry, so no next attempt is stored or promised; the caller
            # reports the failure (renew() fires with it), so this is for -v only.
            m.next_attempt = 0.0
            logger.debug(
                "Failed to %s a certificate for %s (attempt %d, error type %s): %s; "
                "one-shot mode: no retry is scheduled",
                what,
                _names(m),
                attempt,
                m.last_error_type,
                m.last_error,
                exc_info=not isinstance(e, SynapseAcmeError),
            )
            return
        delay = policy.backoff_delay(m.failures, retry_after, self._rand)
        m.next_attempt = self._clock.seconds() + delay
        logger.error(
            "Failed to %s a certificate for %s (attempt %d, error type %s): %s; "
            "still serving %s; next attempt at %s (in %.0f s)",
            what,
            _names(m),
            attempt,
            m.last_error_type,
            m.last_error,
            "the previous certificate" if m.bundle is not None else "no certificate",
            _at(m.next_attempt),
            delay,
            exc_info=not isinstance(e, SynapseAcmeError),
        )
        if self.running:
            m.retry_call = self._clock.callLater(delay, self._retry, m)

    def _retry(self, m: _Managed) -> None:
        m.retry_call = None
        if m.unsaved is not None or (m.in_flight is None and self._due(m, self._now())):
            self._obtain(m).addErrback(lambda _: None)

    def _publish_status(self) -> None:
        if self._on_status is None:
            return
        if not self.running or self._one_shot:  # one-shot: no timers, write at once
            self._write_status()
        elif self._status_call is None or not self._status_call.active():
            self._status_call = self._clock.callLater(STATUS_COALESCE_SECONDS, self._write_status)

    def _write_status(self) -> None:
        self._status_call = None
        if self._on_status is None:
            return
        try:
            self._on_status(self.status())
        except Exception:
            logger.exception("Could not publish the certificate status")

    def _log_unexpected(self, failure: Failure, what: str) -> None:
        logger.error("Unexpected error in %s", what, exc_info=failure.value)


def _chain_digest(chain_pem: bytes) -> str:
    return hashlib.sha256(chain_pem).hexdigest()


async def _load_batch(
    batch: IBatchLoad, keys: list[str]
) -> dict[str, CertificateBundle | Exception | None]:
    """What ``batch`` holds for ``keys``; the store's error for each key if it cannot be read."""
    try:
        return dict(await batch.load_many(keys))
    except Exception as e:
        return dict.fromkeys(keys, e)


class _LeaseKeeper:
    """Renews the issuance lock's lease every third of its length while an order runs; if the
    lock says the lease is gone, cancels the order (:attr:`lost`). A renewal that fails (the
    database is unreachable) is logged and tried again: nobody can take the lock meanwhile
    unless the lease runs out, which the next renewal then reports."""

    def __init__(self, clock: IReactorTime, how: Coordination, name: str) -> None:
        self._clock = clock
        self._how = how
        self._name = name
        self._call: IDelayedCall | None = None
        self._order: defer.Deferred[Any] | None = None
        self.lost = False

    def start(self, order: defer.Deferred[Any]) -> None:
        self._order = order
        self._schedule()

    def stop(self) -> None:
        self._order = None
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self) -> None:
        self._call = self._clock.callLater(self._how.lease_seconds / 3, self._renew)

    def _renew(self) -> None:
        self._call = None
        d = self._how.lock.renew(self._name, self._how.holder, self._how.lease_seconds)
        d.addCallbacks(self._renewed, self._failed)

    def _renewed(self, held: bool) -> None:
        if self._order is None:
            return  # stopped meanwhile
        if not held:
            logger.error("Lost the issuance lock of %s: stopping this order", self._name)
            self.lost = True
            self._order.cancel()
            return
        self._schedule()

    def _failed(self, failure: Failure) -> None:
        if self._order is None:
            return
        logger.warning(
            "Could not renew the issuance lock of %s (%s); trying again",
            self._name,
            failure.getErrorMessage(),
        )
        self._schedule()


def _lease_lost(m: _Managed) -> str:
    return (
        f"the issuance lock of {_names(m)} was lost while ordering (its lease ran out): another "
        "process may be ordering it, so this certificate is not saved"
    )


def _issued_at(bundle: CertificateBundle) -> float | None:
    """When the issuer says ``bundle`` was issued (its ``issued_at`` metadata), in seconds
    since the epoch; None for a placeholder or a bundle without it."""
    if bundle.metadata.get("placeholder"):
        return None
    text = bundle.metadata.get("issued_at")
    if not isinstance(text, str):
        return None
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def _names(m: _Managed) -> str:
    return ", ".join(m.spec.names)


def _kept(m: _Managed) -> str:
    """What the store still holds for ``m`` after a failed attempt."""
    if m.unsaved is not None:
        return "the certificate was issued but could not be saved"
    if m.bundle is None:
        return "there is still no certificate"
    if m.placeholder:
        return "only the self-signed placeholder is kept"
    return "the previous certificate is kept"


def _at(seconds: float | None) -> str | None:
    """Clock seconds as written in log lines and messages."""
    return format_time(time_from_seconds(seconds))
