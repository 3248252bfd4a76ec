"""Copies the current certificate to the homeserver's own TLS file paths, as one pair.

Synapse (and anything else reading ``tls_certificate_path`` / ``tls_private_key_path``) must find
a key and a certificate that belong together at every instant, also when the process is killed
in the middle of a renewal. Two files cannot be replaced together by two renames, so the pair
goes through one indirection (the same idea as certbot's ``live/`` -> ``archive/``)::

    <dir of tls_certificate_path>/.synapse-acme-<cert file name>/   the "live directory", 0755
        v17/fullchain.pem   0644      one complete pair per version, never changed once written
        v17/privkey.pem     0600
        v16/...             the previous version, kept for a reader that straddled the flip
        current -> v17      the one switch: replaced by a single atomic rename of a symlink
    tls_certificate_path  -> .synapse-acme-<name>/current/fullchain.pem   (symlinks, made once)
    tls_private_key_path  -> .../current/privkey.pem

A new certificate is written into a fresh version directory (staged under a temporary name,
fsynced, renamed into place), then ``current`` is flipped. Both configured paths resolve through
``current`` at every open, so the pair seen on disk changes in one step. A reader that opens the
two files one after the other can still straddle a flip; it must re-read until the pair matches
(:mod:`synapse_acme.pairs` does that for synapse-acme's own readers).

When both paths are the same file (key and chain combined), one atomic rename is enough and no
live directory is made.

The old Synapse promise is kept: a file this tool did not write is never overwritten. Ownership
is a small record, ``<storage>/exports.json``, mapping each path to the SHA-256 of what we last
wrote there (for the combined file and for files written by earlier versions); a symlink is ours
when it points exactly where we would point it. A missing path is ours; a file holding exactly
the bytes we are about to write is ours (a crash between writing and recording must not lock us
out). Anything else at a configured path (another tool's symlink, a FIFO, a directory, an
operator's own file) is foreign: nothing is written, and the failure is reported.

An export that fails is a failure: :attr:`FileExporter.state` says so (``synapse-acme status``
shows it), and with a clock the exporter retries (10 s, 30 s, 1 min, ... 1 h) until it succeeds.
"""

from __future__ import annotations

import datetime
import enum
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
from collections.abc import Callable, Sequence

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from synapse_acme import crypto, fsutil, policy
from synapse_acme.errors import StoreError
from synapse_acme.interfaces import ICertificateConsumer
from synapse_acme.model import CertificateBundle
from synapse_acme.status import ExportStatus
from synapse_acme.threaded import Runner

logger = logging.getLogger(__name__)

EXPORTS_FILE = "exports.json"
CERT_MODE = 0o644  # public: other services (a reverse proxy) may read the chain
KEY_MODE = 0o600
LIVE_DIR_MODE = 0o755  # like the directory the chain used to sit in: readable, key file is not
LIVE_PREFIX = ".synapse-acme-"
CURRENT = "current"
CHAIN_NAME = "fullchain.pem"
KEY_NAME = "privkey.pem"
#: Versions kept besides the current one, for a reader that resolved ``current`` just before a
#: flip and opens its second file just after.
KEEP_PREVIOUS = 1
#: The largest file read back from a configured path (a chain of a few certificates is ~5 KiB).
MAX_EXPORT_FILE = 1024 * 1024
_RECORD_VERSION = 1
_VERSION_RE = re.compile(r"^v([0-9]{1,12})$")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _abspath(path: str) -> str:
    return os.path.abspath(path)


class ExportOutcome(enum.Enum):
    """What the last export attempt did."""

    NONE = "none"  # nothing exported yet
    OK = "ok"  # the configured paths hold the certificate
    FOREIGN = "foreign"  # a configured path holds something we did not write: left alone
    FAILED = "failed"  # writing failed (disk full, permissions...)


@attrs.frozen
class ExportState:
    """The exporter's last result, for status reports and one-shot commands."""

    outcome: ExportOutcome = ExportOutcome.NONE
    serial: str | None = None  # the leaf serial the configured paths hold now (hex), if ours
    error: str | None = None
    failures: int = 0
    next_retry: float | None = None  # clock seconds

    @property
    def failed(self) -> bool:
        return self.outcome in (ExportOutcome.FAILED, ExportOutcome.FOREIGN)


class ForeignFiles(StoreError):
    """A configured path holds something synapse-acme did not write; nothing was changed."""


@attrs.frozen
class _PathState:
    kind: str  # "missing", "file", "ourlink", "foreign"
    data: bytes | None = None  # what reading through the path gives (None: absent/unreadable)
    why: str = ""  # for "foreign": what it is


@implementer(ICertificateConsumer)
@attrs.define(eq=False)
class FileExporter(Service):
    """Writes certificate ``key``'s chain to ``cert_path`` and key to ``key_path`` as one pair
    (see the module docstring); ``cert_path == key_path`` writes one combined file (key then
    chain, 0600). ``storage`` is where the ownership record lives.

    ``on_export`` is called with ``(key, bundle)`` after the files actually changed (e.g. so a
    homeserver can re-read them). ``clock``: retry a failed export with the backoff of
    :data:`synapse_acme.policy.EXPORT_RETRY_SCHEDULE` while the service runs; ``None`` (one-shot
    commands) never retries. ``on_state`` is called after every attempt (status publishing).
    ``runner``: where the file work of :meth:`certificate_changed` runs (a
    :class:`~synapse_acme.threaded.BlockingRunner` inside a homeserver); ``None``: right here.
    ``log_failures``: False when the caller reports :attr:`state` itself (one-shot commands).
    """

    key: str
    cert_path: str = attrs.field(converter=_abspath)
    key_path: str = attrs.field(converter=_abspath)
    storage: str = attrs.field(converter=_abspath)
    on_export: Callable[[str, CertificateBundle], object] | None = None
    clock: IReactorTime | None = None
    on_state: Callable[[ExportState], object] | None = None
    runner: Runner | None = None
    log_failures: bool = True
    state: ExportState = attrs.field(factory=ExportState, init=False)
    _warned: set[str] = attrs.field(factory=set, init=False)
    _pending: CertificateBundle | None = attrs.field(default=None, init=False, repr=False)
    _retry_call: IDelayedCall | None = attrs.field(default=None, init=False)

    def status(self) -> ExportStatus:
        """:attr:`state` with the paths, as status reports show it."""
        return ExportStatus(
            state=self.state.outcome.value,
            cert_path=self.cert_path,
            key_path=self.key_path,
            serial=self.state.serial,
            error=self.state.error,
            failures=self.state.failures,
        )

    @property
    def record_path(self) -> str:
        return os.path.join(self.storage, EXPORTS_FILE)

    @property
    def combined(self) -> bool:
        return self.cert_path == self.key_path

    @property
    def live_dir(self) -> str:
        head, tail = os.path.split(self.cert_path)
        return os.path.join(head, LIVE_PREFIX + tail)

    def _link_target(self, path: str, name: str) -> str:
        """What ``path`` points at: relative inside one directory, else absolute (a relative
        target with ``..`` would resolve wrongly through a symlinked directory)."""
        if os.path.dirname(path) == os.path.dirname(self.cert_path):
            return os.path.join(os.path.basename(self.live_dir), CURRENT, name)
        return os.path.join(self.live_dir, CURRENT, name)

    def _links(self) -> dict[str, tuple[str, str]]:
        """path -> (file name in a version, link target), key first."""
        return {
            self.key_path: (KEY_NAME, self._link_target(self.key_path, KEY_NAME)),
            self.cert_path: (CHAIN_NAME, self._link_target(self.cert_path, CHAIN_NAME)),
        }

    # -- Service -------------------------------------------------------------------------

    def stopService(self) -> None:
        super().stopService()
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None

    # -- ICertificateConsumer ------------------------------------------------------------

    def certificate_changed(self, key: str, bundle: CertificateBundle) -> None:
        """Export ``bundle`` if it is for our key. Never raises: a failure is recorded in
        :attr:`state`, logged, and retried with backoff (with a clock); the homeserver keeps
        its current files meanwhile."""
        if key != self.key:
            return
        self._pending = bundle
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        self._attempt()

    def _attempt(self) -> None:
        self._retry_call = None
        bundle = self._pending
        if bundle is None:
            return
        if self.runner is None:
            self._finish(_outcome(self.export, bundle))
        else:
            # In the runner's thread; results are handled back on the reactor thread.
            self.runner(_outcome, self.export, bundle).addCallback(self._finish)

    def _finish(self, outcome: bool | Exception) -> bool:
        """Record a failed :meth:`export` in :attr:`state` (and retry it); publish the state."""
        if isinstance(outcome, ForeignFiles):
            self._failed(ExportOutcome.FOREIGN, str(outcome))
        elif isinstance(outcome, Exception):
            e = outcome
            why = str(e) if isinstance(e, StoreError) else f"{type(e).__name__}: {e}"
            self._failed(ExportOutcome.FAILED, why)
        if self.on_state is not None:
            try:
                self.on_state(self.state)
            except Exception:
                logger.exception("Could not publish the export state")
        return outcome is True

    def _failed(self, outcome: ExportOutcome, why: str) -> None:
        failures = self.state.failures + 1
        next_retry = None
        if self.clock is not None and self.running:
            delay = policy.backoff_delay(failures, schedule=policy.EXPORT_RETRY_SCHEDULE)
            next_retry = self.clock.seconds() + delay
            self._retry_call = self.clock.callLater(delay, self._attempt)
            then = f"retrying in {delay:.0f} s"
        else:
            then = "not retried by this process"
        self.state = attrs.evolve(
            self.state, outcome=outcome, error=why, failures=failures, next_retry=next_retry
        )
        logger.log(
            logging.ERROR if self.log_failures else logging.DEBUG,
            "Could not export the certificate for %s to %s / %s (%s); the homeserver keeps "
            "the files it has: %s",
            self.key,
            self.cert_path,
            self.key_path,
            then,
            why,
        )

    # -- the work ------------------------------------------------------------------------

    def export(self, bundle: CertificateBundle) -> bool:
        """Make the configured paths hold ``bundle`` as one pair; True if what they hold changed.

        Sets :attr:`state` on success. ForeignFiles if a configured path is not ours (warned
        once per path; nothing written); StoreError if writing fails (the paths keep their old,
        matching pair).
        """
        planned = self._planned(bundle)
        record = self._load_record()
        states = {p: self._inspect(p, planned[p][0], record) for p in planned}
        foreign = {p: s.why for p, s in states.items() if s.kind == "foreign"}
        if foreign:
            if self.log_failures:
                for path, why in foreign.items():
                    self._warn_foreign(path, why)
            raise ForeignFiles(
                "; ".join(
                    f"not overwriting {p}: {why} (delete it or point {self._setting(p)} elsewhere "
                    "to let synapse-acme manage it)"
                    for p, why in sorted(foreign.items())
                )
            )
        changed = any(s.data != planned[p][0] for p, s in states.items())
        if self.combined:
            if changed:
                self._write_combined(planned)
        else:
            self._export_pair(bundle, states, changed)
        new_record = dict(record)
        new_record.update({p: _sha256(data) for p, (data, _) in planned.items()})
        if new_record != record:
            self._save_record(new_record)
        self._warned.difference_update(planned)
        self.state = ExportState(
            outcome=ExportOutcome.OK, serial=crypto.leaf_serial_hex(bundle.chain_pem)
        )
        if changed:
            logger.info(
                "Exported the certificate for %s to %s",
                self.key,
                ", ".join(sorted(planned)),
            )
            if self.on_export is not None:
                try:
                    self.on_export(self.key, bundle)
                except Exception:
                    logger.exception("After exporting the certificate for %s", self.key)
        return changed

    def repair(self, bundle: CertificateBundle | None) -> bool:
        """At start, before anything reads the files: make the configured paths hold the
        store's current ``bundle`` (re-exporting a pair that is missing, mismatched or stale),
        tighten the exported key to 0600 and remove temporary files an interrupted export left.

        Never raises; True if the files changed. A failure is in :attr:`state` and logged.
        """
        try:
            self._remove_stale_temporaries()
            self._tighten_key_modes()
        except Exception as e:  # housekeeping must not stop the repair itself
            logger.warning("Export housekeeping in %s failed: %s", self.live_dir, e)
        if bundle is None:
            return False
        self._pending = bundle
        return self._finish(_outcome(self.export, bundle))

    def write_placeholder_if_missing(
        self,
        names: Sequence[str],
        now: datetime.datetime,
        lifetime: datetime.timedelta = crypto.PLACEHOLDER_LIFETIME,
    ) -> bool:
        """Write a self-signed placeholder pair if a target file is missing, so a homeserver
        that insists on TLS files can start before the first issuance. True if written.

        Existing files that are not ours are left alone (and warned about), as always.
        """
        targets = {self.cert_path, self.key_path}
        if all(os.path.exists(p) for p in targets):
            return False
        bundle = crypto.make_placeholder_bundle(list(names), now, lifetime)
        try:
            written = self.export(bundle)
        except StoreError as e:  # ForeignFiles included: never replace what is not ours
            logger.error("Could not write a placeholder certificate: %s", e)
            return False
        if written:
            logger.warning(
                "Wrote a self-signed PLACEHOLDER certificate for %s to %s; it is replaced as "
                "soon as a real certificate is issued",
                ", ".join(names),
                self.cert_path,
            )
        return written

    # -- what is there now ---------------------------------------------------------------

    def _planned(self, bundle: CertificateBundle) -> dict[str, tuple[bytes, int]]:
        if self.combined:
            key = bundle.key_pem if bundle.key_pem.endswith(b"\n") else bundle.key_pem + b"\n"
            return {self.cert_path: (key + bundle.chain_pem, KEY_MODE)}
        return {
            self.key_path: (bundle.key_pem, KEY_MODE),
            self.cert_path: (bundle.chain_pem, CERT_MODE),
        }

    def _inspect(self, path: str, planned: bytes, record: dict[str, str]) -> _PathState:
        """Whose ``path`` is, and what reading it gives (never blocks, never follows a link
        that is not ours)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return _PathState("missing")
        except OSError as e:
            return _PathState("foreign", why=f"cannot inspect it: {fsutil.describe_os_error(e)}")
        if stat.S_ISLNK(st.st_mode):
            links = self._links()
            if self.combined or path not in links or os.readlink(path) != links[path][1]:
                return _PathState(
                    "foreign", why="it is a symbolic link that synapse-acme did not make"
                )
            try:
                data = fsutil.read_regular(path, follow=True, limit=MAX_EXPORT_FILE)
            except StoreError as e:  # points into our live directory, at something odd
                logger.warning("%s", e)
                return _PathState("ourlink")
            if data is not None and data != planned and path in record:
                if record[path] != _sha256(data):
                    # Written through the link by somebody else: theirs now, as with a file.
                    return _PathState(
                        "foreign", why="its content was changed after synapse-acme wrote it"
                    )
            return _PathState("ourlink", data)
        if not stat.S_ISREG(st.st_mode):
            return _PathState("foreign", why=f"it is {fsutil.file_kind(st.st_mode)}")
        try:
            data = fsutil.read_regular(path, limit=MAX_EXPORT_FILE)
        except StoreError as e:
            return _PathState("foreign", why=str(e))
        if data is None:
            return _PathState("missing")
        if data == planned or record.get(path) == _sha256(data):
            return _PathState("file", data)
        return _PathState("foreign", why="it was not written by synapse-acme")

    def _warn_foreign(self, path: str, why: str) -> None:
        if path in self._warned:
            return
        self._warned.add(path)
        logger.warning(
            "not overwriting %s: %s (delete it or point %s elsewhere to let synapse-acme "
            "manage it)",
            path,
            why,
            self._setting(path),
        )

    def _setting(self, path: str) -> str:
        return "tls_private_key_path" if path == self.key_path else "tls_certificate_path"

    # -- writing a pair ------------------------------------------------------------------

    def _export_pair(
        self, bundle: CertificateBundle, states: dict[str, _PathState], changed: bool
    ) -> None:
        links = self._links()
        all_links = all(s.kind == "ourlink" for s in states.values())
        if not changed and all_links:
            return
        try:
            self._ensure_live_dir()
            if not all_links:
                self._link_existing_pair(states)
            if changed:
                version = self._write_version(bundle)
                self._flip(version)
            # Paths still missing (first export) or not yet links: the existing one first, so
            # a kill in between leaves "no pair yet", never a mismatched one.
            order = sorted(links, key=lambda p: states[p].kind == "missing")
            made = False
            for path in order:
                if not os.path.islink(path):
                    self._make_link(path, links[path][1])
                    made = True
            if made:
                for parent in {os.path.dirname(p) for p in links}:
                    _fsync_dir_quietly(parent)
        except OSError as e:
            raise StoreError(
                f"cannot export to {self.cert_path} / {self.key_path}: "
                f"{fsutil.describe_os_error(e)}"
            ) from None
        self._prune_versions()

    def _link_existing_pair(self, states: dict[str, _PathState]) -> None:
        """Turn two regular files of ours (an earlier version's layout) that hold a matching
        pair into links to a version holding the same bytes, so that no path changes content."""
        key_state, cert_state = states[self.key_path], states[self.cert_path]
        if key_state.kind != "file" or cert_state.kind != "file":
            return
        assert key_state.data is not None and cert_state.data is not None
        if not _pair_matches(key_state.data, cert_state.data):
            return  # already broken: replacing them one by one cannot make it worse
        version = self._write_version(
            CertificateBundle(key_pem=key_state.data, chain_pem=cert_state.data)
        )
        self._flip(version)
        for path, (_, target) in self._links().items():
            self._make_link(path, target)
        logger.info(
            "Export layout: %s and %s are now links into %s (one atomic switch per renewal)",
            self.cert_path,
            self.key_path,
            self.live_dir,
        )

    def _ensure_live_dir(self) -> None:
        parent = os.path.dirname(self.cert_path)
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=fsutil.PRIVATE_DIR_MODE, exist_ok=True)
        kparent = os.path.dirname(self.key_path)
        if not os.path.isdir(kparent):
            os.makedirs(kparent, mode=fsutil.PRIVATE_DIR_MODE, exist_ok=True)
        try:
            st = os.lstat(self.live_dir)
        except FileNotFoundError:
            os.mkdir(self.live_dir, LIVE_DIR_MODE)
            os.chmod(self.live_dir, LIVE_DIR_MODE)
            return
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError(
                f"cannot export: {self.live_dir} is {fsutil.file_kind(st.st_mode)}, not the "
                "directory synapse-acme keeps its exported versions in (remove it)"
            )

    def _versions(self) -> list[tuple[int, str]]:
        out = []
        for name in os.listdir(self.live_dir):
            m = _VERSION_RE.match(name)
            if m:
                out.append((int(m.group(1)), name))
        return sorted(out)

    def _write_version(self, bundle: CertificateBundle) -> str:
        """A new, complete, durable version directory; returns its name."""
        versions = self._versions()
        name = f"v{versions[-1][0] + 1 if versions else 1}"
        final = os.path.join(self.live_dir, name)
        staging = fsutil.temp_name_for(final)
        os.mkdir(staging, LIVE_DIR_MODE)
        try:
            os.chmod(staging, LIVE_DIR_MODE)
            fsutil.write_new_file(os.path.join(staging, KEY_NAME), bundle.key_pem, KEY_MODE)
            fsutil.write_new_file(os.path.join(staging, CHAIN_NAME), bundle.chain_pem, CERT_MODE)
            fsutil.fsync_dir(staging)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsutil.fsync_dir(self.live_dir)
        return name

    def _flip(self, version: str) -> None:
        """``current`` -> ``version`` in one rename (the moment the exported pair changes)."""
        self._make_link(os.path.join(self.live_dir, CURRENT), version)
        fsutil.fsync_dir(self.live_dir)

    def _make_link(self, path: str, target: str) -> None:
        """``path`` becomes a symlink to ``target`` in one rename (replacing what was there)."""
        tmp = fsutil.temp_name_for(path)
        os.symlink(target, tmp)
        try:
            os.rename(tmp, path)
        except BaseException:
            fsutil.remove_quietly(tmp)
            raise

    def _prune_versions(self) -> None:
        """Keep the current version and :data:`KEEP_PREVIOUS` before it; remove the rest
        (older ones and any written but never made current by an interrupted export)."""
        try:
            current = os.readlink(os.path.join(self.live_dir, CURRENT))
            versions = self._versions()
        except OSError:
            return
        numbers = {name: n for n, name in versions}
        if current not in numbers:
            return
        older = [name for n, name in versions if n < numbers[current]]
        keep = {current, *older[len(older) - KEEP_PREVIOUS :]} if KEEP_PREVIOUS else {current}
        for _, name in versions:
            if name not in keep:
                shutil.rmtree(os.path.join(self.live_dir, name), ignore_errors=True)

    def _write_combined(self, planned: dict[str, tuple[bytes, int]]) -> None:
        ((path, (data, mode)),) = planned.items()
        parent = os.path.dirname(path)
        try:
            if not os.path.isdir(parent):
                os.makedirs(parent, mode=fsutil.PRIVATE_DIR_MODE, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create {parent}: {fsutil.describe_os_error(e)}") from None
        fsutil.atomic_write(path, data, mode)

    # -- housekeeping at start -----------------------------------------------------------

    def _remove_stale_temporaries(self) -> None:
        """Temporary files (ours only: named after the configured paths) and staging
        directories that a killed export left behind."""
        ours: dict[str, set[str]] = {}
        for p in (self.cert_path, self.key_path):
            ours.setdefault(os.path.dirname(p), set()).add(os.path.basename(p))
        for directory, bases in ours.items():
            try:
                names = os.listdir(directory)
            except OSError:
                continue
            for name in names:
                stem = name[1:].rsplit(".", 2)[0] if fsutil.is_temp_name(name) else None
                path = os.path.join(directory, name)
                if stem in bases and not os.path.isdir(path):
                    fsutil.remove_quietly(path)
                    logger.warning(
                        "Removed a temporary file left by an interrupted export: %s", path
                    )
        if self.combined or not os.path.isdir(self.live_dir) or os.path.islink(self.live_dir):
            return
        for name in os.listdir(self.live_dir):
            if fsutil.is_temp_name(name):
                path = os.path.join(self.live_dir, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    fsutil.remove_quietly(path)
        self._prune_versions()

    def _tighten_key_modes(self) -> None:
        """An exported key loosened by hand (chmod 644, a backup restore) is set back to 0600."""
        candidates = [self.key_path] if self.combined or not os.path.islink(self.key_path) else []
        if not self.combined and os.path.isdir(self.live_dir) and not os.path.islink(self.live_dir):
            candidates += [
                os.path.join(self.live_dir, name, KEY_NAME) for _, name in self._versions()
            ]
        for path in candidates:
            try:
                old = fsutil.tighten(path, KEY_MODE)
            except (FileNotFoundError, StoreError):
                continue
            except OSError as e:
                logger.warning("cannot set mode 0600 on %s: %s", path, fsutil.describe_os_error(e))
                continue
            if old is not None:
                logger.warning(
                    "%s had mode %04o; tightened it to 0600 (it holds a private key)", path, old
                )

    # -- the ownership record ------------------------------------------------------------

    def _load_record(self) -> dict[str, str]:
        try:
            data = fsutil.read_regular(self.record_path, limit=MAX_EXPORT_FILE)
        except StoreError as e:
            logger.warning("ignoring unreadable export record: %s", e)
            return {}
        if data is None:
            return {}
        try:
            value = json.loads(data.decode("utf-8"))
            files = value["files"]
            if not isinstance(files, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in files.items()
            ):
                raise ValueError("'files' is not a mapping of paths to hashes")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            # Safe direction: with no record, existing files are simply not overwritten.
            logger.warning("ignoring corrupt export record %s: %s", self.record_path, e)
            return {}
        return dict(files)

    def _save_record(self, record: dict[str, str]) -> None:
        fsutil.ensure_private_dir(self.storage)
        body = {"version": _RECORD_VERSION, "files": dict(sorted(record.items()))}
        fsutil.atomic_write(
            self.record_path,
            json.dumps(body, indent=2).encode("utf-8") + b"\n",
            fsutil.PRIVATE_FILE_MODE,
        )


def _outcome(
    export: Callable[[CertificateBundle], bool], bundle: CertificateBundle
) -> bool | Exception:
    """``export(bundle)``'s result, or the exception it raised (safe to carry across threads)."""
    try:
        return export(bundle)
    except Exception as e:
        return e


def _pair_matches(key_pem: bytes, chain_pem: bytes) -> bool:
    try:
        return crypto.key_matches_leaf(key_pem, chain_pem)
    except Exception:
        return False


def _fsync_dir_quietly(path: str) -> None:
    try:
        fsutil.fsync_dir(path)
    except OSError as e:
        if e.errno != errno.EINVAL:
            logger.warning("could not fsync %s: %s", path, fsutil.describe_os_error(e))
