"""The file backend of the whole storage contract (:class:`~.interfaces.IStorageBackend`).

Certificates are :class:`~synapse_acme.store.FileStore`'s (unchanged); around them, in the same
storage directory::

    account.key (or account_key_file)  the account key, created once, never replaced (0600)
    account.json                       the account record (synapse_acme.account)
    challenges/<sha256 of the token>   one answer per file (a token may be longer than a file
                                       name may be; the digest always fits)
    locks/<name>.lease                 the issuance lease: {"holder": ..., "expires": ...}
    locks/<name>.lock                  held (flock) only while a lease file is read and replaced

Every other process on the same directory (same host, or a shared filesystem with working
``flock``) sees the same account, answers the same challenges and honours the same leases. A
lease update is a read-modify-write under a short ``flock`` (:class:`~synapse_acme.interprocess.
StoreLock`, waiting: it is held for a few system calls), so two processes never both take a lock;
the lease itself, not the ``flock``, is what outlives the call, and it expires on the clock if its
holder dies. Expiry compares clock readings of different processes: with the reactor as the clock
that is wall time, so hosts sharing a store need synchronised clocks (NTP), as with any lease.

Change notification polls: every ``notify_interval`` seconds one ``listdir`` of the certificates
directory and one ``stat`` per entry (a save renames a new directory into place, so the entry's
inode changes), the way :mod:`synapse_acme.watch` follows externally managed files. Like the rest
of the file store, each operation is a few small, blocking file operations; a host whose reactor
must never wait on a disk runs them through :mod:`synapse_acme.threaded`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from typing import TypeVar

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from synapse_acme import account, fsutil, lease
from synapse_acme.errors import StoreError
from synapse_acme.interfaces import IStorageBackend
from synapse_acme.interprocess import StoreLock
from synapse_acme.model import AccountRecord, CertificateBundle
from synapse_acme.names import check_challenge, is_safe_key, is_safe_token
from synapse_acme.store import FileStore, as_deferred, check_key

logger = logging.getLogger(__name__)

ACCOUNT_KEY_FILE = "account.key"
CHALLENGES_DIR = "challenges"
LOCKS_DIR = "locks"
#: How often change notification looks at the certificates directory. One listdir and a stat
#: per certificate: invisible in cost, and a new certificate reaches the other processes'
#: listeners within this delay.
NOTIFY_INTERVAL = 2.0
_MAX_SMALL_FILE = 64 * 1024  # account keys, records, answers and leases are far smaller

_Signature = tuple[int, int, int, int]
_R = TypeVar("_R")


@implementer(IStorageBackend)
@attrs.define(eq=False)
class FileBackend:
    """The storage contract on the local filesystem under ``root`` (see the module docstring).

    ``clock`` measures leases and drives change notification (the reactor in production).
    ``account_key_file`` is where the account key lives (default ``<root>/account.key``; an
    operator may keep it elsewhere, the ``account_key_file`` setting). ``notify_interval``: see
    :data:`NOTIFY_INTERVAL`. ``auto_recover`` is passed to the :class:`FileStore`: crash
    recovery assumes no other writer, so only the process holding the store's lock
    (:class:`~synapse_acme.interprocess.StoreLock`) may leave it on.
    """

    root: str
    clock: IReactorTime
    account_key_file: str | None = None
    notify_interval: float = NOTIFY_INTERVAL
    auto_recover: bool = True
    certificates: FileStore = attrs.field(init=False)
    _subscribers: list[Callable[[str], object]] = attrs.field(factory=list, init=False)
    _poll: LoopingCall | None = attrs.field(default=None, init=False)
    _seen: dict[str, _Signature] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self.certificates = FileStore(self.root, auto_recover=self.auto_recover)

    @property
    def account_key_path(self) -> str:
        return self.account_key_file or os.path.join(self.root, ACCOUNT_KEY_FILE)

    # -- ICertificateStore, IStoreAdmin ---------------------------------------------------------

    def load(self, key: str) -> defer.Deferred[CertificateBundle | None]:
        """See :meth:`FileStore.load`."""
        return self.certificates.load(key)

    def save(self, key: str, bundle: CertificateBundle) -> defer.Deferred[None]:
        """See :meth:`FileStore.save`."""
        return self.certificates.save(key, bundle)

    def keys(self) -> defer.Deferred[list[str]]:
        """See :meth:`FileStore.keys`."""
        return self.certificates.keys()

    # -- IAccountStore --------------------------------------------------------------------------

    def load_account_key(self) -> defer.Deferred[bytes | None]:
        """Deferred firing with the bytes of the account key file, ``None`` if there is none;
        StoreError for a file of another user, a FIFO, or one too large to be a key."""
        return as_deferred(self._load_account_key)

    def create_account_key(self, key: bytes) -> defer.Deferred[bool]:
        """Deferred firing with True once ``key`` is the account key file (0600, fsynced), or
        False if the file already exists (left untouched)."""
        return as_deferred(self._create_account_key, key)

    def load_account_record(self) -> defer.Deferred[AccountRecord | None]:
        """Deferred firing with the record in ``account.json``, ``None`` if there is none."""
        return as_deferred(account.read_account_record, self.root)

    def save_account_record(self, record: AccountRecord) -> defer.Deferred[None]:
        """Deferred firing with ``None`` once ``account.json`` was atomically replaced."""
        return as_deferred(self._save_account_record, record)

    def _load_account_key(self) -> bytes | None:
        path = self.account_key_path
        fsutil.check_owned_by_us(path, "the account key")
        # Followed if a link: the operator may point account_key_file at a secrets directory.
        return fsutil.read_regular(path, follow=True, limit=_MAX_SMALL_FILE)

    def _create_account_key(self, key: bytes) -> bool:
        path = self.account_key_path
        if not isinstance(key, bytes) or not key:
            raise StoreError("an account key must be non-empty bytes")
        missing = account.missing_key_directory(path, self.root)
        if missing is not None:
            raise StoreError(
                f"cannot create the account key {path}: the directory {missing} does not exist "
                f"(synapse-acme creates directories only inside the storage directory {self.root})"
            )
        fsutil.ensure_private_dir(self.root)
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            fsutil.ensure_private_dir(parent)
        return fsutil.create_exclusive(path, key, fsutil.PRIVATE_FILE_MODE)

    def _save_account_record(self, record: AccountRecord) -> None:
        fsutil.ensure_private_dir(self.root)
        account.write_account_record(self.root, record)

    # -- IChallengeStore ------------------------------------------------------------------------

    def put_challenge(self, token: str, key_authorization: str) -> defer.Deferred[None]:
        """Deferred firing with ``None`` once the answer is in its file (atomically replaced)."""
        try:
            check_challenge(token, key_authorization)
        except ValueError:
            return defer.fail()
        return as_deferred(self._put_challenge, token, key_authorization.encode("ascii"))

    def get_challenge(self, token: str) -> defer.Deferred[str | None]:
        """Deferred firing with the stored answer, ``None`` if there is none."""
        if not is_safe_token(token):
            return defer.succeed(None)
        return as_deferred(self._get_challenge, token)

    def remove_challenge(self, token: str) -> defer.Deferred[None]:
        """Deferred firing with ``None`` once the answer's file is gone."""
        if not is_safe_token(token):
            return defer.succeed(None)
        return as_deferred(self._remove_challenge, token)

    def _challenge_path(self, token: str) -> str:
        digest = hashlib.sha256(token.encode("ascii")).hexdigest()
        return os.path.join(self.root, CHALLENGES_DIR, digest)

    def _put_challenge(self, token: str, body: bytes) -> None:
        fsutil.ensure_private_dir(self.root)
        fsutil.ensure_private_dir(os.path.join(self.root, CHALLENGES_DIR), follow=False)
        fsutil.atomic_write(self._challenge_path(token), body, fsutil.PRIVATE_FILE_MODE)

    def _get_challenge(self, token: str) -> str | None:
        data = fsutil.read_regular(self._challenge_path(token), limit=_MAX_SMALL_FILE)
        return data.decode("ascii", "replace") if data is not None else None

    def _remove_challenge(self, token: str) -> None:
        try:
            os.unlink(self._challenge_path(token))
        except FileNotFoundError:
            pass

    # -- IIssuanceLock --------------------------------------------------------------------------

    def acquire(self, name: str, holder: str, lease_seconds: float) -> defer.Deferred[bool]:
        """Deferred firing with True if ``holder`` now holds ``name``'s lease, else False."""
        return self._update_lease(name, holder, lease_seconds, lease.acquire)

    def renew(self, name: str, holder: str, lease_seconds: float) -> defer.Deferred[bool]:
        """Deferred firing with True if ``holder``'s lease in force was extended, else False."""
        return self._update_lease(name, holder, lease_seconds, lease.renew)

    def release(self, name: str, holder: str) -> defer.Deferred[None]:
        """Deferred firing with ``None`` once ``holder``'s lease on ``name`` (if any) is gone."""
        try:
            check_key(name)
            lease.check_request(holder, 1.0)
        except (StoreError, ValueError):
            return defer.fail()
        return as_deferred(self._locked, name, lambda current: self._release(name, holder, current))

    def _update_lease(
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

        def update(current: lease.Lease | None) -> bool:
            new = rule(current, holder, lease_seconds, self.clock.seconds())
            if new is None:
                return False
            self._write_lease(name, new)
            return True

        return as_deferred(self._locked, name, update)

    def _release(self, name: str, holder: str, current: lease.Lease | None) -> None:
        if lease.releases(current, holder):
            fsutil.remove_quietly(self._lease_path(name))

    def _locks_dir(self) -> str:
        return os.path.join(self.root, LOCKS_DIR)

    def _lease_path(self, name: str) -> str:
        return os.path.join(self._locks_dir(), f"{name}.lease")

    def _locked(self, name: str, update: Callable[[lease.Lease | None], _R]) -> _R:
        """``update(current lease)`` while holding the name's guard ``flock``."""
        fsutil.ensure_private_dir(self.root)
        fsutil.ensure_private_dir(self._locks_dir(), follow=False)
        guard = StoreLock.acquire(self._locks_dir(), f"{name}.lock", wait=True)
        try:
            return update(self._read_lease(name))
        finally:
            guard.release()

    def _read_lease(self, name: str) -> lease.Lease | None:
        path = self._lease_path(name)
        data = fsutil.read_regular(path, limit=_MAX_SMALL_FILE)
        if data is None:
            return None
        try:
            value = json.loads(data.decode("utf-8"))
            holder, expires = value["holder"], value["expires"]
            if not isinstance(holder, str) or not isinstance(expires, (int, float)):
                raise ValueError("holder must be a string and expires a number")
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            # Written atomically, so only a hand edit damages it: a free lock is the way out.
            logger.warning("Ignoring the damaged lease %s: %s", path, e)
            return None
        return lease.Lease(holder, float(expires))

    def _write_lease(self, name: str, new: lease.Lease) -> None:
        data = json.dumps({"holder": new.holder, "expires": new.expires}).encode("utf-8")
        fsutil.atomic_write(self._lease_path(name), data, fsutil.PRIVATE_FILE_MODE)

    # -- ICertificateChanges --------------------------------------------------------------------

    def subscribe(self, callback: Callable[[str], object]) -> Callable[[], None]:
        """Call ``callback(key)`` within ``notify_interval`` seconds of a change to ``key``'s
        bundle (polled, see the module docstring); returns the unsubscribe function."""
        self._subscribers.append(callback)
        if self._poll is None:
            self._seen = self._scan_quietly() or {}
            self._poll = LoopingCall(self._check_changes)
            self._poll.clock = self.clock
            self._poll.start(self.notify_interval, now=False)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)
            if not self._subscribers and self._poll is not None:
                if self._poll.running:
                    self._poll.stop()
                self._poll = None

        return unsubscribe

    def _scan(self) -> dict[str, _Signature]:
        directory = self.certificates.certificates_dir
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return {}
        seen: dict[str, _Signature] = {}
        for name in names:
            if not is_safe_key(name):
                continue  # staging directories (~new-, ~old-) and anything foreign
            try:
                st = os.lstat(os.path.join(directory, name))
            except FileNotFoundError:
                continue  # renamed away between the listdir and the stat
            seen[name] = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        return seen

    def _scan_quietly(self) -> dict[str, _Signature] | None:
        try:
            return self._scan()
        except OSError as e:
            logger.warning(
                "Cannot look for certificate changes in %s: %s",
                self.certificates.certificates_dir,
                fsutil.describe_os_error(e),
            )
            return None

    def _check_changes(self) -> None:
        """One poll; never raises (an exception would stop the LoopingCall for good)."""
        current = self._scan_quietly()
        if current is None:
            return
        before, self._seen = self._seen, current
        changed = sorted(
            k for k in current.keys() | before.keys() if current.get(k) != before.get(k)
        )
        for key in changed:
            for callback in list(self._subscribers):
                try:
                    callback(key)
                except Exception:
                    logger.exception("A certificate change subscriber failed for %s", key)
