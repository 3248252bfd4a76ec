"""Hot-reload of externally managed certificate files (certbot, an operator, a config tool).

A :class:`FileWatcher` polls a ``fullchain.pem``/``privkey.pem`` pair on the reactor's clock. A
tick costs two ``stat`` calls; the files are read and hashed only when a stat result changed, and
handed on only when their *content* changed (a ``touch`` is not a renewal). Renewal tools replace
the two files one after the other (certbot flips two ``live/`` symlinks to new ``archive/``
files), so a pair read across a replacement is re-read at once (:mod:`synapse_acme.pairs`); a
key that still does not match its certificate is taken as "mid-renewal": the watcher waits for
the next tick and only logs an error if the mismatch persists for ``grace`` seconds.
:func:`install_sighup` makes ``kill -HUP`` an explicit "reload now".

No restart is needed after a renewal: the new pair reaches every TLS listener through the
consumer (:class:`synapse_acme.tls.HotSwapTLS`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall

from synapse_acme.errors import BundleError, StoreError
from synapse_acme.interfaces import ICertificateConsumer
from synapse_acme.model import CertificateBundle
from synapse_acme.pairs import read_pair

log = logging.getLogger(__name__)

# Polling every few seconds is invisible in cost (two stats) and bounds how long a renewed
# certificate waits to be served; renewal tools run at most a few times a day.
DEFAULT_INTERVAL = 5.0
# certbot replaces both links within milliseconds; a minute of mismatch means something is wrong.
DEFAULT_GRACE = 60.0

_StatSig = tuple[tuple[int, int, int, int, int], ...]


def _stat_signature(*paths: str) -> _StatSig:
    """What changes whenever a file (or the target of a symlink) is replaced or rewritten."""
    sigs = []
    for path in paths:
        st = os.stat(path)  # follows symlinks: a flipped link shows a new inode
        sigs.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(sigs)


@attrs.define(eq=False)
class FileWatcher(Service):
    """Watches one certificate/key file pair and hands each new, matching pair to ``consumer``
    as ``consumer.certificate_changed(key, bundle)``.

    A Twisted service: ``startService`` checks at once (serving the files present at start),
    then every ``interval`` seconds. Every check logs its own errors, so the loop never dies.
    """

    cert_path: str
    key_path: str
    key: str
    consumer: ICertificateConsumer
    clock: IReactorTime
    interval: float = DEFAULT_INTERVAL
    grace: float = DEFAULT_GRACE
    _loop: LoopingCall | None = attrs.field(default=None, init=False)
    _last_stat: _StatSig | None = attrs.field(default=None, init=False)
    _delivered: bytes | None = attrs.field(default=None, init=False)
    _bad_since: float | None = attrs.field(default=None, init=False)
    _bad_reported: bool = attrs.field(default=False, init=False)
    _bad_problem: str = attrs.field(default="", init=False)

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def stopService(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        super().stopService()

    def check(self, force: bool = False) -> bool:
        """Look at the files once; True if a new pair was handed to the consumer.

        ``force`` (SIGHUP) re-reads and re-delivers even if nothing seems to have changed.
        Never raises.
        """
        try:
            return self._check(force)
        except Exception:
            log.exception("certificate watch: checking %s failed", self.cert_path)
            return False

    def reload(self) -> None:
        """Re-read and re-deliver now (the SIGHUP action)."""
        log.info("certificate watch: reloading %s and %s on request", self.cert_path, self.key_path)
        self.check(force=True)

    def _check(self, force: bool) -> bool:
        now = self.clock.seconds()
        try:
            sig = _stat_signature(self.cert_path, self.key_path)
        except OSError as e:
            # A missing file during a rename dance is normal for an instant; persisting is not.
            return self._not_ready(now, f"cannot stat: {e}", stat=None)
        if sig == self._last_stat and not force:
            if self._bad_since is not None:
                self._not_ready(now, None, stat=sig)
            return False
        try:
            # Re-reads at once if it straddled a replacement (see synapse_acme.pairs).
            chain_pem, key_pem = read_pair(self.cert_path, self.key_path)
        except OSError as e:
            return self._not_ready(now, f"cannot read: {e}", stat=None)
        except (BundleError, StoreError) as e:
            return self._not_ready(now, str(e), stat=sig)
        # Both stats again: if a file was replaced while we read, what we hold is a matching
        # pair but maybe not the newest: deliver it, and look again next tick.
        seen: _StatSig | None = sig
        if _stat_signature(self.cert_path, self.key_path) != sig:
            seen = None
        digest = hashlib.sha256(chain_pem).digest() + hashlib.sha256(key_pem).digest()
        if digest == self._delivered and not force:
            self._last_stat = seen  # touched, not changed
            self._clear_bad()
            return False
        bundle = CertificateBundle(
            key_pem=key_pem,
            chain_pem=chain_pem,
            metadata={"source": "files", "cert_path": self.cert_path, "key_path": self.key_path},
        )
        self._last_stat = seen
        self._delivered = digest
        self._clear_bad()
        log.info("certificate watch: %s changed, installing it for %s", self.cert_path, self.key)
        self.consumer.certificate_changed(self.key, bundle)
        return True

    def _not_ready(self, now: float, problem: str | None, stat: _StatSig | None) -> bool:
        # Remember the stat so an unchanged half-renewed pair is not re-read every tick; a
        # ``None`` stat forces a re-read next time.
        self._last_stat = stat
        if problem is not None:
            self._bad_problem = problem
        if self._bad_since is None:
            self._bad_since = now
            log.info(
                "certificate watch: %s / %s not usable yet (%s); waiting for the next check",
                self.cert_path,
                self.key_path,
                problem,
            )
        elif not self._bad_reported and now - self._bad_since >= self.grace:
            self._bad_reported = True
            log.error(
                "certificate watch: %s / %s unusable for %.0f s (%s); still serving the "
                "previous certificate",
                self.cert_path,
                self.key_path,
                now - self._bad_since,
                self._bad_problem,
            )
        return False

    def _clear_bad(self) -> None:
        if self._bad_reported:
            log.info("certificate watch: %s / %s usable again", self.cert_path, self.key_path)
        self._bad_since = None
        self._bad_reported = False


_SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def install_sighup(
    reactor: IReactorFromThreads, callback: Callable[[], object]
) -> Callable[[], None]:
    """Run ``callback`` on the reactor thread on every SIGHUP, then any previous Python handler.

    Returns a function that restores the previous handler (if ours is still installed).
    Must be called from the main thread (Python's rule for signal handlers).
    """
    previous: _SignalHandler = signal.getsignal(signal.SIGHUP)

    def on_sighup(signum: int, frame: FrameType | None) -> None:
        # A signal handler may interrupt the reactor anywhere: hand the work to the reactor.
        reactor.callFromThread(callback)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGHUP, on_sighup)

    def uninstall() -> None:
        if signal.getsignal(signal.SIGHUP) is on_sighup:
            signal.signal(signal.SIGHUP, previous)  # type: ignore[arg-type]

    return uninstall


__all__ = ["DEFAULT_GRACE", "DEFAULT_INTERVAL", "FileWatcher", "install_sighup"]
