"""An in-memory :class:`~synapse_acme.interfaces.IStorageBackend` for tests.

It follows the same contract as the file backend (:class:`synapse_acme.filebackend.FileBackend`,
checked by the same contract tests): same key validation, the same refusal of a bundle that is
not intact (:func:`synapse_acme.store.check_intact`), metadata round-tripped through JSON (so a
caller cannot mutate what is stored, and non-JSON metadata fails here as it would on disk), the
same lease rules (:mod:`synapse_acme.lease`, on the given clock), and a way to make the next save
fail for fault-injection tests.

:meth:`MemoryStore.another_handle` opens a second handle on the same data, as a second process
opens the same directory or database: what one saves, the other loads, answers and is told about.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from zope.interface import implementer

from synapse_acme import lease
from synapse_acme.errors import StoreError
from synapse_acme.interfaces import IStorageBackend
from synapse_acme.model import AccountRecord, CertificateBundle
from synapse_acme.names import check_challenge, is_safe_token
from synapse_acme.store import (
    check_bundle,
    check_intact,
    check_key,
    decode_metadata,
    encode_metadata,
)

logger = logging.getLogger(__name__)


@attrs.define(eq=False)
class _Shared:
    """What every handle on one memory store sees (the "disk")."""

    entries: dict[str, tuple[bytes, bytes, bytes]] = attrs.Factory(dict)
    account_key: bytes | None = None
    account_record: AccountRecord | None = None
    challenges: dict[str, str] = attrs.Factory(dict)
    leases: dict[str, lease.Lease] = attrs.Factory(dict)
    subscribers: list[Callable[[str], object]] = attrs.Factory(list)


@implementer(IStorageBackend)
@attrs.define
class MemoryStore:
    """Bundles in a dict, stored as bytes so every load returns a fresh copy.

    ``clock`` measures leases (default: a :class:`~twisted.internet.task.Clock` of its own, at
    0 until the test advances it). Change notification is immediate: subscribers are called
    as soon as a save succeeds, well within any delay the contract allows.
    """

    clock: IReactorTime = attrs.field(factory=Clock)
    _shared: _Shared = attrs.field(factory=_Shared)
    _fail_next: list[Exception] = attrs.field(factory=list, init=False)
    saves: int = attrs.field(default=0, init=False)  # successful saves, for assertions

    def another_handle(self) -> MemoryStore:
        """A second handle on the same data (another process on the same store)."""
        return MemoryStore(clock=self.clock, shared=self._shared)

    def fail_next_save(self, exc: Exception | None = None) -> None:
        """Make the next :meth:`save` fail with ``exc`` (default: a StoreError like ENOSPC)
        and leave the stored bundle untouched. Calls queue up."""
        self._fail_next.append(
            exc if exc is not None else StoreError("simulated: No space left on device (ENOSPC)")
        )

    # -- ICertificateStore, IStoreAdmin ---------------------------------------------------------

    def load(self, key: str) -> defer.Deferred[CertificateBundle | None]:
        """Deferred firing with a copy of the bundle under ``key``, or ``None``."""
        try:
            check_key(key)
        except StoreError:
            return defer.fail()
        entry = self._shared.entries.get(key)
        if entry is None:
            return defer.succeed(None)
        key_pem, chain_pem, metadata = entry
        return defer.succeed(
            CertificateBundle(
                key_pem=key_pem,
                chain_pem=chain_pem,
                metadata=decode_metadata(metadata, f"memory:{key}"),
            )
        )

    def save(self, key: str, bundle: CertificateBundle) -> defer.Deferred[None]:
        """Deferred firing with ``None`` once stored; StoreError for a bad key/bundle or an
        injected failure (the old bundle survives). Subscribers hear of it at once."""
        try:
            check_key(key)
            check_bundle(bundle)
            check_intact(bundle, f"memory:{key}")
            metadata = encode_metadata(bundle.metadata)
            if self._fail_next:
                raise self._fail_next.pop(0)
        except Exception:
            return defer.fail()
        self._shared.entries[key] = (bundle.key_pem, bundle.chain_pem, metadata)
        self.saves += 1
        d: defer.Deferred[None] = defer.succeed(None)
        d.addCallback(lambda _: self._notify(key))  # after the save's own result is settled
        return d

    def keys(self) -> defer.Deferred[list[str]]:
        """Deferred firing with the sorted stored keys."""
        return defer.succeed(sorted(self._shared.entries))

    # -- IAccountStore --------------------------------------------------------------------------

    def load_account_key(self) -> defer.Deferred[bytes | None]:
        """Deferred firing with the stored account key, ``None`` if there is none."""
        return defer.succeed(self._shared.account_key)

    def create_account_key(self, key: bytes) -> defer.Deferred[bool]:
        """Deferred firing with True if ``key`` was stored, False if there was one already."""
        if not isinstance(key, bytes) or not key:
            return defer.fail(StoreError("an account key must be non-empty bytes"))
        if self._shared.account_key is not None:
            return defer.succeed(False)
        self._shared.account_key = key
        return defer.succeed(True)

    def load_account_record(self) -> defer.Deferred[AccountRecord | None]:
        """Deferred firing with the saved record, ``None`` if there is none."""
        return defer.succeed(self._shared.account_record)

    def save_account_record(self, record: AccountRecord) -> defer.Deferred[None]:
        """Deferred firing with ``None`` once ``record`` replaced the previous one."""
        if not isinstance(record, AccountRecord):
            return defer.fail(StoreError(f"expected an AccountRecord, got {record!r}"))
        self._shared.account_record = record
        return defer.succeed(None)

    # -- IChallengeStore ------------------------------------------------------------------------

    def put_challenge(self, token: str, key_authorization: str) -> defer.Deferred[None]:
        """Deferred firing with ``None`` once every handle answers ``token``."""
        try:
            check_challenge(token, key_authorization)
        except ValueError:
            return defer.fail()
        self._shared.challenges[token] = key_authorization
        return defer.succeed(None)

    def get_challenge(self, token: str) -> defer.Deferred[str | None]:
        """Deferred firing with the answer for ``token``, ``None`` if there is none."""
        if not is_safe_token(token):
            return defer.succeed(None)
        return defer.succeed(self._shared.challenges.get(token))

    def remove_challenge(self, token: str) -> defer.Deferred[None]:
        """Deferred firing with ``None`` once ``token`` is answered no more."""
        if is_safe_token(token):
            self._shared.challenges.pop(token, None)
        return defer.succeed(None)

    # -- IIssuanceLock --------------------------------------------------------------------------

    def acquire(self, name: str, holder: str, lease_seconds: float) -> defer.Deferred[bool]:
        """Deferred firing with True if ``holder`` now holds ``name``'s lease, else False."""
        return self._update(name, holder, lease_seconds, lease.acquire)

    def renew(self, name: str, holder: str, lease_seconds: float) -> defer.Deferred[bool]:
        """Deferred firing with True if ``holder``'s lease in force was extended, else False."""
        return self._update(name, holder, lease_seconds, lease.renew)

    def release(self, name: str, holder: str) -> defer.Deferred[None]:
        """Deferred firing with ``None`` once ``holder``'s lease on ``name`` (if any) is gone."""
        try:
            check_key(name)
            lease.check_request(holder, 1.0)
        except (StoreError, ValueError):
            return defer.fail()
        if lease.releases(self._shared.leases.get(name), holder):
            del self._shared.leases[name]
        return defer.succeed(None)

    def _update(
        self,
        name: str,
        holder: str,
        lease_seconds: float,
        rule: Callable[[lease.Lease | None, str, float, float], lease.Lease | None],
    ) -> defer.Deferred[bool]:
        try:
            check_key(name)
            lease.check_request(holder, lease_seconds)
        except (StoreError, ValueError):
            return defer.fail()
        new = rule(self._shared.leases.get(name), holder, lease_seconds, self.clock.seconds())
        if new is None:
            return defer.succeed(False)
        self._shared.leases[name] = new
        return defer.succeed(True)

    # -- ICertificateChanges --------------------------------------------------------------------

    def subscribe(self, callback: Callable[[str], object]) -> Callable[[], None]:
        """Call ``callback(key)`` after every save through any handle; returns the
        unsubscribe function."""
        subscribers = self._shared.subscribers
        subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in subscribers:
                subscribers.remove(callback)

        return unsubscribe

    def _notify(self, key: str) -> None:
        for callback in list(self._shared.subscribers):
            try:
                callback(key)
            except Exception:
                logger.exception("A certificate change subscriber failed for %s", key)
