"""How processes that share one store coordinate.

One process at a time *manages* a store (orders, saves, recovers after a crash): it holds an
advisory ``flock`` on ``<storage>/lock`` for its lifetime. The kernel drops the lock when that
process exits for any reason (kill -9 included), and a fork (Synapse's ``daemonize``) keeps it.
A second manager gets :class:`~synapse_acme.errors.StoreBusy` naming the holder's pid instead
of running crash recovery under the first one's feet or ordering the same certificates twice.

Anyone may ask the manager to renew everything now by creating ``<storage>/renew-request``
(``synapse-acme renew --force`` does that when the store is busy); the manager looks for it
every :data:`RENEW_REQUEST_POLL` seconds.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from typing import Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from synapse_acme import fsutil
from synapse_acme.errors import StoreBusy, StoreError
from synapse_acme.model import CertificateBundle

logger = logging.getLogger(__name__)

LOCK_FILE = "lock"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
RENEW_REQUEST_FILE = "renew-request"
#: How often the managing process looks for the renew-request file. Each look is one
#: ``unlink`` that fails with ENOENT (a single syscall), so four a second cost nothing and
#: ``renew --force`` hands over within a quarter of a second.
RENEW_REQUEST_POLL = 0.25


@attrs.define(eq=False)
class StoreLock:
    """The manager's hold on a store; :meth:`release` (or process exit) lets go."""

    path: str
    _fd: int | None

    @classmethod
    def acquire(cls, storage: str, name: str = LOCK_FILE, *, wait: bool = False) -> StoreLock:
        """Take the lock on ``storage`` (an existing directory) or raise StoreBusy/StoreError.

        The lock file is opened without following a symlink and without blocking, and must be
        a regular file: run as root, a symlink planted at ``<storage>/lock`` would otherwise
        make us truncate whatever it points to, and a FIFO would hang the start forever.

        ``name``: another lock file in ``storage`` (the file backend's short guards around a
        lease update, :mod:`synapse_acme.filebackend`). ``wait``: block until the lock is free
        instead of raising StoreBusy; only for locks held for a few system calls, never for
        the manager's lifetime lock.
        """
        path = os.path.join(storage, name)
        try:
            fd = fsutil.open_regular(path, os.O_RDWR | os.O_CREAT, mode=fsutil.PRIVATE_FILE_MODE)
        except FileNotFoundError as e:  # the storage directory itself is missing
            raise StoreError(f"cannot open {path}: {fsutil.describe_os_error(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StoreBusy(storage, holder) from None
            if e.errno in _NO_LOCKS:
                # Some network and FUSE filesystems have no flock: run unprotected rather
                # than not at all, and say so.
                logger.warning(
                    "The filesystem of %s cannot lock files (%s): nothing stops a second "
                    "synapse-acme process from using this store at the same time",
                    storage,
                    fsutil.describe_os_error(e),
                )
                return cls(path, None)
            raise StoreError(f"cannot lock {path}: {fsutil.describe_os_error(e)}") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError as e:  # the lock holds without the pid; the pid is only for messages
            logger.warning("Cannot record our pid in %s: %s", path, fsutil.describe_os_error(e))
        return cls(path, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let go (idempotent). The file stays: removing it would race a new acquirer."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


#: What :meth:`AcmeService.renew <synapse_acme.service.AcmeService.renew>` fires with: per
#: certificate key, the new bundle or the failure.
RenewalResults = list[tuple[str, CertificateBundle | Failure]]


class Renewer(Protocol):
    """What :class:`RenewRequestWatcher` needs of the provisioning service."""

    def renew(
        self, key: str | None = None, force: bool = False, requested_at: float | None = None
    ) -> Deferred[RenewalResults]:
        """Renew ``key`` (every certificate if ``None``); fires with the outcome per key. A
        certificate issued after ``requested_at`` already answers the request."""
        ...


class StoreLockService(Service):
    """Releases ``lock`` when its parent service stops (the lock was taken at build time)."""

    name = "store-lock"

    def __init__(self, lock: StoreLock) -> None:
        self.lock = lock

    def stopService(self) -> None:
        super().stopService()
        self.lock.release()


def renew_request_path(storage: str) -> str:
    return os.path.join(storage, RENEW_REQUEST_FILE)


def request_renewal(storage: str) -> str:
    """Ask the process managing ``storage`` to renew every certificate now; returns the path."""
    path = renew_request_path(storage)
    fsutil.atomic_write(path, b"", fsutil.PRIVATE_FILE_MODE)  # StoreError names the problem
    return path


class RenewRequestWatcher(Service):
    """In the managing process: a forced renewal of everything when renew-request appears.

    ``acme`` is the provisioning service (a :class:`Renewer`). Each request file causes one
    renewal.
    """

    name = "renew-request"

    def __init__(self, storage: str, acme: Renewer, clock: IReactorTime) -> None:
        self.path = renew_request_path(storage)
        self._acme = acme
        self._loop = LoopingCall(self.check)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self._loop.start(RENEW_REQUEST_POLL, now=True).addErrback(
            lambda f: logger.error("synapse-acme: renew-request watch stopped: %s", f.value)
        )

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def check(self) -> None:
        try:
            # When it was asked for: a certificate issued since (on a shared store, perhaps
            # by another process asked at the same moment) answers it.
            requested_at = os.stat(self.path).st_mtime
            os.unlink(self.path)  # taking the request is removing it: once per request
        except FileNotFoundError:
            return
        except OSError as e:
            logger.error(
                "synapse-acme: cannot remove %s (%s); not renewing",
                self.path,
                fsutil.describe_os_error(e),
            )
            return
        logger.info("synapse-acme: %s found: renewing every certificate now", self.path)
        d = self._acme.renew(None, force=True, requested_at=requested_at)
        d.addCallback(_log_renewals)
        d.addErrback(lambda f: logger.error("synapse-acme: forced renewal failed: %s", f.value))


def _log_renewals(results: RenewalResults) -> None:
    for key, outcome in results:
        if isinstance(outcome, CertificateBundle):
            logger.info("synapse-acme: forced renewal of %s succeeded", key)
        else:
            logger.error("synapse-acme: forced renewal of %s failed: %s", key, outcome.value)


__all__ = [
    "LOCK_FILE",
    "RENEW_REQUEST_FILE",
    "RENEW_REQUEST_POLL",
    "RenewRequestWatcher",
    "RenewalResults",
    "Renewer",
    "StoreLock",
    "StoreLockService",
    "renew_request_path",
    "request_renewal",
]
