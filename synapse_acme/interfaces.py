"""The contracts between synapse_acme's parts, and nothing else.

Every implementation is an ``attrs`` class declared with ``@implementer``; in-memory
fakes live in :mod:`synapse_acme.testing` and pass the same contract tests as the real ones.

The methods are annotated (without ``self``, as zope.interface declares them), so mypy's zope
plugin checks every ``@implementer`` class against them: an implementation whose signature
drifts from its contract is a type error (``tests/contracts/test_contracts_typed.py`` proves it).

The storage contract is split the way a second backend (PostgreSQL) needs it, each part with
what it guarantees beside each method: certificates (:class:`ICertificateStore`), listing
(:class:`IStoreAdmin`), the ACME account (:class:`IAccountStore`), challenge tokens
(:class:`IChallengeStore`), the issuance lock (:class:`IIssuanceLock`) and change notification
(:class:`ICertificateChanges`). :class:`IStorageBackend` is all of them: what a backend must
provide, checked by one contract suite (``tests/unit/test_store_contract.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFromThreads,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
)
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from synapse_acme.alerts import Alert
    from synapse_acme.errors import StoreError
    from synapse_acme.model import AccountRecord, CertificateBundle, RenewalWindow


class IReactor(
    IReactorCore, IReactorTime, IReactorTCP, IReactorFromThreads, IReactorPluggableNameResolver
):
    """What synapse_acme needs of a reactor: time, TCP, DNS, calls from threads and shutdown
    triggers (Synapse's ``ISynapseReactor`` is a superset). Used as a type only: a reactor
    providing each of these interfaces need not declare this one."""


# -- storage ---------------------------------------------------------------------------------


class ICertificateStore(Interface):
    """Where certificate bundles live between runs, keyed by :func:`synapse_acme.names.names_key`.

    A bundle is written whole or not at all: a reader never sees a certificate without its key.
    Only intact bundles go in and come out (:func:`synapse_acme.store.check_intact`: the chain
    is complete PEM blocks signed in order, the key matches the leaf). A key that is not
    :func:`synapse_acme.names.is_safe_key` fails with StoreError on every method, before any
    storage is touched. Not found is ``None``, never an error.
    """

    def load(key: str) -> Deferred[CertificateBundle | None]:
        """Deferred firing with the :class:`~synapse_acme.model.CertificateBundle` stored
        under ``key``, or ``None`` if there is none. Fails with StoreError naming the file if
        it is unreadable or damaged (never a damaged bundle). Each load returns a fresh copy:
        changing its metadata changes nothing stored."""

    def save(key: str, bundle: CertificateBundle) -> Deferred[None]:
        """Deferred firing with ``None`` once ``bundle`` is durably stored under ``key``
        (replacing what was there atomically: readers, in this process or another, see the
        old bundle or the new one, never a mix). Fails with StoreError (also for a bundle that
        is not intact, or metadata that is not JSON); the old bundle survives."""


class IStoreAdmin(Interface):
    """Whole-store operations for tools, not for the running service: ``migrate-store`` copies
    every entry from one backend to another, so it must be able to list them."""

    def keys() -> Deferred[list[str]]:
        """Deferred firing with the sorted list of keys that hold a bundle (whether or not it
        is intact: :meth:`ICertificateStore.load` says that)."""


class IBatchLoad(Interface):
    """Optional, for a store where each read is a round trip (PostgreSQL): many bundles read
    at once. The service uses it, where a store provides it, to load its certificates at
    start; the result is exactly what :meth:`ICertificateStore.load` gives key by key."""

    def load_many(
        keys: Sequence[str],
    ) -> Deferred[dict[str, CertificateBundle | StoreError | None]]:
        """Deferred firing with every one of ``keys`` mapped to its bundle (checked intact,
        as :meth:`ICertificateStore.load` returns it), ``None`` if it has none, or the
        StoreError its ``load`` would fail with (an unsafe key, a damaged bundle). Fails as a
        whole (StoreError) only if the store cannot be read at all."""

    def chain_digests(keys: Sequence[str]) -> Deferred[dict[str, str]]:
        """Deferred firing with the SHA-256 (hex) of the stored chain PEM of each of ``keys``
        that holds a bundle (the others are absent): the cheap look at which bundles changed,
        so a periodic re-read loads only those. Fails (StoreError) if the store cannot be
        read."""


class IAccountStore(Interface):
    """The ACME account: its private key and the record of it at the CA.

    An account key is never replaced behind the operator's back (a new key is a new account,
    with new rate limits and no history), so the contract only creates one where none exists.
    Deliberately starting over is :func:`synapse_acme.account.start_new_account`'s job.
    """

    def load_account_key() -> Deferred[bytes | None]:
        """Deferred firing with the account key as stored (PEM, or a certbot JWK), ``None`` if
        there is none. Fails with StoreError naming where it is if it cannot be read."""

    def create_account_key(key: bytes) -> Deferred[bool]:
        """Deferred firing with True once ``key`` is durably stored as the account key, or
        False (storing nothing) if there already is one: two processes creating at once end
        up with one key, the first, which the loser then loads. Fails with StoreError."""

    def load_account_record() -> Deferred[AccountRecord | None]:
        """Deferred firing with the :class:`~synapse_acme.model.AccountRecord`, ``None`` if
        none was saved. Fails with StoreError if it is damaged."""

    def save_account_record(record: AccountRecord) -> Deferred[None]:
        """Deferred firing with ``None`` once ``record`` durably replaced the previous one
        (atomically). Fails with StoreError; the old record survives."""


class IChallengeStore(Interface):
    """Challenge answers shared by every process on the store, so that any of them can answer
    the CA (``/.well-known/acme-challenge/<token>``), not only the one that placed the order.

    Tokens are base64url, 1-256 characters (:func:`synapse_acme.names.is_safe_token`):
    :meth:`put_challenge` refuses any other token with ValueError, and for :meth:`get_challenge`
    and :meth:`remove_challenge` one is simply unknown (the web path is untrusted input).
    Answers are short-lived, not secret (the CA fetches them over plain HTTP) and need not
    survive a restart: an order interrupted by a restart is ordered again.
    """

    def put_challenge(token: str, key_authorization: str) -> Deferred[None]:
        """Deferred firing with ``None`` once every process on this store answers ``token``
        with ``key_authorization`` (ASCII; replacing an earlier answer for the same token).
        Fails with ValueError for a malformed token or answer, StoreError if it cannot be
        stored."""

    def get_challenge(token: str) -> Deferred[str | None]:
        """Deferred firing with the key authorization stored for ``token``, ``None`` if there
        is none. Fails with StoreError if the store cannot be read."""

    def remove_challenge(token: str) -> Deferred[None]:
        """Deferred firing with ``None`` once ``token`` is answered no more. An unknown token
        is not an error."""


class IIssuanceLock(Interface):
    """A named lock with a lease, guarding an expensive job (one issuance) across processes,
    never every read.

    A lease is held by ``holder`` (a string unique to the process, e.g. host and pid) until
    ``lease_seconds`` after its last :meth:`acquire` or :meth:`renew`, measured on the clock
    the backend was given (the rules: :mod:`synapse_acme.lease`). A holder that dies stops
    renewing, and the lease expires: no lock outlives its process by more than one lease.
    So renew well within the lease (a third of it), and after acquiring re-read the store:
    another process may have done the work meanwhile. ``name`` must be a safe store key
    (:func:`synapse_acme.names.is_safe_key`), else StoreError; ``holder`` a non-empty string
    and ``lease_seconds`` positive, else ValueError.
    """

    def acquire(name: str, holder: str, lease_seconds: float) -> Deferred[bool]:
        """Deferred firing with True if ``holder`` now holds ``name`` for ``lease_seconds``
        (it was free, its lease had expired, or ``holder`` already held it: then the lease
        is extended), False if another holder's lease is in force. Never waits."""

    def renew(name: str, holder: str, lease_seconds: float) -> Deferred[bool]:
        """Deferred firing with True once ``holder``'s lease on ``name`` runs for another
        ``lease_seconds`` from now, or False if ``holder`` does not hold a lease in force (it
        expired, even if nobody took it since, or was never taken): the job must then stop,
        since another holder may have run meanwhile."""

    def release(name: str, holder: str) -> Deferred[None]:
        """Deferred firing with ``None`` once ``name`` is free, if ``holder`` held it; a lock
        held by another holder (or by nobody) is left as it is."""


class ICertificateChanges(Interface):
    """Change notification: tells a process when a certificate was saved, by this process or
    by another on the same store, so that it can serve the new one without a restart."""

    def subscribe(callback: Callable[[str], object]) -> Callable[[], None]:
        """Call ``callback(key)`` on the reactor thread after the bundle under ``key``
        changes (saved through any handle on this store, in any process), within the
        backend's notification delay after the save's Deferred fired. Several changes may be
        reported once; the callback loads the bundle itself. An exception in a callback is
        logged and does not stop the others. Returns a function that unsubscribes."""


class IStorageBackend(
    ICertificateStore,
    IStoreAdmin,
    IAccountStore,
    IChallengeStore,
    IIssuanceLock,
    ICertificateChanges,
):
    """Everything a storage backend provides (the file store, the in-memory fake and the
    PostgreSQL store); each passes the same contract suite."""


# -- issuance --------------------------------------------------------------------------------


class IResponder(Interface):
    """Answers one kind of ACME challenge (txacme's shape)."""

    challenge_type = Attribute("The ACME challenge type it answers, e.g. ``'http-01'``.")

    def start_responding(
        identifier: str, token: str, key_authorization: str
    ) -> Deferred[None] | None:
        """Start answering the challenge ``token`` for ``identifier`` with ``key_authorization``
        (the exact body to serve). Returns ``None`` or a Deferred firing with ``None`` once
        the answer is live."""

    def stop_responding(identifier: str, token: str) -> Deferred[None] | None:
        """Stop answering ``token``. Returns ``None`` or a Deferred firing with ``None``.
        Must not fail when the token is unknown."""


class IIssuer(Interface):
    """Obtains certificates from one ACME CA (one full RFC 8555 issuance per call)."""

    def issue(
        names: Sequence[str], key_pem: bytes, replaces: str | None = None
    ) -> Deferred[CertificateBundle]:
        """Order a certificate for ``names`` (sequence of str; the first is the CN), with
        a CSR signed by ``key_pem``. ``replaces`` is the ARI CertID of the certificate
        being renewed, or ``None``. Deferred firing with a
        :class:`~synapse_acme.model.CertificateBundle` (``key_pem`` as given, the full chain,
        and metadata), or failing with AcmeError / AcmeProtocolError / AcmeTransportError /
        ChallengeFailed."""

    def renewal_info(
        chain_pem: bytes, directory: str | None = None
    ) -> Deferred[RenewalWindow | None]:
        """Deferred firing with a :class:`~synapse_acme.model.RenewalWindow` if the CA
        offers ARI (``renewalInfo`` in its directory) for the leaf of ``chain_pem``, else
        ``None``. ``directory``: the directory URL of the CA that issued it (the bundle's
        ``issuer_directory``), if known; an issuer for several CAs asks that one. Never fails
        because the CA lacks ARI."""


class IPreparingIssuer(IIssuer):
    """An issuer that can do its once-per-account setup ahead of the first order (the
    service starts it while the preflight checks run, so a first start does not wait for the
    two one after the other)."""

    def prepare() -> Deferred[None]:
        """Deferred firing with None once the account orders would use exists at the CA
        (registering it now if it does not yet); at once if it already does. Fails as
        :meth:`IIssuer.issue` would fail to register; an issuer that would recover from
        that failure within ``issue`` (another CA to ask) fires with None instead."""


class ICertificateConsumer(Interface):
    """Something that serves certificates and wants to know when one changes
    (the hot-swapping TLS creator, the Synapse glue, the file exporter)."""

    def certificate_changed(key: str, bundle: CertificateBundle) -> None:
        """``bundle`` is now the certificate for ``key``. Called on the reactor thread;
        must not block. A consumer that raises is logged and does not stop the others."""


class ICertificateBatchConsumer(ICertificateConsumer):
    """A consumer that takes many certificates more cheaply at once than one by one (the
    hot-swapping TLS creator: one swap, and OpenSSL's parsing left to a background warm-up).
    The service hands it what it reads from the store at start-up in batches."""

    def certificates_loaded(bundles: Mapping[str, CertificateBundle]) -> None:
        """Each ``bundles[key]`` is now the certificate for ``key``, as if by
        :meth:`certificate_changed` for each. Called on the reactor thread; must not block.
        A bad bundle is logged and left out, and does not stop the others."""


# -- alerts ----------------------------------------------------------------------------------


class IAlertSink(Interface):
    """Somewhere alerts go: a webhook, the homeserver's server notices, a Matrix room. The
    :class:`~synapse_acme.alerter.Alerter` decides what to send (and logs each alert); a sink
    only delivers."""

    def deliver(alert: Alert) -> Deferred[None]:
        """Deliver ``alert``. Deferred firing with ``None`` once it was delivered, or failing
        with the reason. A sink retries on its own within a bound (never forever) and must not
        block; cancelling the Deferred abandons the delivery."""

    def describe() -> str:
        """Where alerts go, for log lines; never a secret (a webhook's path may hold one)."""
