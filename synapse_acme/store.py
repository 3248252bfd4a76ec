"""The file store: one private directory per certificate, replaced whole or not at all.

Layout under the storage root::

    certificates/<key>/fullchain.pem   leaf first, then intermediates
    certificates/<key>/privkey.pem     0600
    certificates/<key>/metadata.json   the bundle's metadata
    certificates/<key>~new-<hex>/      a save in progress (or interrupted)
    certificates/<key>~old-<hex>/      the bundle being replaced
    certificates/<key>~del-<hex>/      left by an interrupted delete of earlier versions

A save writes the three files into a fresh ``~new-`` sibling, fsyncs, then swaps directories
with two renames; :meth:`FileStore.recover` finishes or undoes whatever a crash left behind.
:meth:`FileStore.save_many` does the same for several certificates with one flush: every
``~new-`` directory is durable before the first swap, and the swaps are made durable together.

:class:`FileStore` is the certificate part of the storage contract
(:class:`~synapse_acme.interfaces.ICertificateStore` and its listing,
:class:`~synapse_acme.interfaces.IStoreAdmin`); :class:`synapse_acme.filebackend.FileBackend` adds
the account, challenge tokens, the issuance lock and change notification around it.

Staging directories use ``~``, which a key can never contain, so ``a.example.new-1`` (a
legal DNS name, hence a legal key) can never be mistaken for a leftover of ``a.example``.

What the store hands out is intact (:func:`check_intact`): the chain is whole PEM blocks and
nothing else, each certificate is signed by the next, the key parses and matches the leaf, and
the chain has the SHA-256 recorded beside it in ``metadata.json`` when it was saved (which also
catches a chain cut exactly between two blocks, or an intermediate changed on disk). A damaged
entry is a StoreError naming the file and the problem, never a bundle: the service then treats
the certificate as missing and issues a new one, and nothing damaged is served or exported.
Store files are read with :func:`synapse_acme.fsutil.read_regular`: a symlink or a FIFO in
place of one is refused, never followed or blocked on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import attrs
from twisted.internet import defer
from zope.interface import implementer

from synapse_acme import crypto, fsutil
from synapse_acme.errors import BundleError, StoreError
from synapse_acme.interfaces import ICertificateStore, IStoreAdmin
from synapse_acme.model import CertificateBundle
from synapse_acme.names import is_safe_key

logger = logging.getLogger(__name__)

CERTIFICATES_DIR = "certificates"
CHAIN_FILE = "fullchain.pem"
KEY_FILE = "privkey.pem"
METADATA_FILE = "metadata.json"
_FILES = (KEY_FILE, CHAIN_FILE, METADATA_FILE)
#: Written into metadata.json by :meth:`FileStore.save`, checked and removed by ``load``; the
#: bundle's own metadata never sees it.
CHAIN_DIGEST_FIELD = "fullchain_sha256"
#: A key, a chain or the metadata is a few KiB; a bigger file is not one of ours and is not
#: read into memory.
MAX_FILE_BYTES = 256 * 1024
_SEP = "~"  # never valid in a key (see names.is_safe_key)
_NEW, _OLD, _DEL = "new", "old", "del"
_T = TypeVar("_T")


def check_key(key: object) -> str:
    """Return ``key`` if it is usable as one path component, else StoreError.

    Keys come from :func:`synapse_acme.names.names_key`; this is the second lock on the door,
    so that no caller bug can make the store read or write outside its directory.
    """
    if not isinstance(key, str) or not is_safe_key(key):
        raise StoreError(f"refusing unsafe store key {key!r}: expected [a-z0-9._-]+ without '..'")
    return key


def encode_metadata(metadata: Any) -> bytes:
    """Metadata as stored (sorted, indented JSON); StoreError if it is not JSON-serialisable."""
    try:
        text = json.dumps(dict(metadata), sort_keys=True, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StoreError(f"certificate metadata is not JSON-serialisable: {e}") from None
    return text.encode("utf-8") + b"\n"


def decode_metadata(data: bytes, where: str) -> dict[str, Any]:
    """Parse stored metadata; StoreError naming ``where`` if it is not a JSON object."""
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise StoreError(f"corrupt certificate metadata in {where}: {e}") from None
    if not isinstance(value, dict):
        raise StoreError(f"corrupt certificate metadata in {where}: not a JSON object")
    return value


def check_bundle(bundle: object) -> CertificateBundle:
    """StoreError unless ``bundle`` is a CertificateBundle with non-empty bytes."""
    if not isinstance(bundle, CertificateBundle):
        raise StoreError(f"expected a CertificateBundle, got {type(bundle).__name__}")
    for field in ("key_pem", "chain_pem"):
        value = getattr(bundle, field)
        if not isinstance(value, bytes) or not value:
            raise StoreError(f"certificate bundle has an empty or non-bytes {field}")
    return bundle


def check_intact(bundle: CertificateBundle, where: str) -> None:
    """StoreError unless the bundle is whole and self-consistent, naming the file under
    ``where`` (the entry's directory) and what is wrong with it.

    Whole: :func:`crypto.parse_chain` in strict mode (only complete PEM blocks) and a key that
    parses. Consistent: each certificate signed by the next (:func:`crypto.check_chain_order`)
    and the key is the leaf's (:func:`crypto.check_key_matches`). No clock and no names: an
    expired certificate or one for other names is intact (the service decides about those).
    A placeholder is a single self-signed certificate and passes the same checks. A leaf
    without its issuer passes too: a CA may sign leaves directly with a root that clients
    already trust, and the issuer accepts such a chain, so refusing it here would re-issue it
    forever; a chain that lost its intermediate on disk is caught by the digest instead
    (:data:`CHAIN_DIGEST_FIELD`, which only the file store keeps).
    """
    chain_file = os.path.join(where, CHAIN_FILE)
    key_file = os.path.join(where, KEY_FILE)
    try:
        chain = crypto.parse_chain(bundle.chain_pem, strict=True)
        if crypto.is_verified_pair(bundle.chain_pem, bundle.key_pem):
            return  # these bytes passed the signature and key checks below in this process
        crypto.check_chain_order(chain)
    except BundleError as e:
        raise StoreError(f"{chain_file} is damaged: {e}") from None
    try:
        crypto.load_private_key(bundle.key_pem)
    except BundleError as e:
        raise StoreError(f"{key_file} is damaged: {e}") from None
    try:
        crypto.check_key_matches(bundle.key_pem, chain[0])
    except BundleError as e:
        raise StoreError(f"{key_file} does not belong to {chain_file}: {e}") from None


def _chain_digest(chain_pem: bytes) -> str:
    return hashlib.sha256(chain_pem).hexdigest()


def as_deferred(f: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
    """Run blocking-but-tiny file work now; any OSError becomes a StoreError failure."""
    try:
        return defer.succeed(f(*args))
    except StoreError:
        return defer.fail()
    except OSError as e:
        return defer.fail(StoreError(f"storage error: {fsutil.describe_os_error(e)}"))
    except Exception:
        return defer.fail()  # a bug, but still reported through the Deferred


@implementer(ICertificateStore, IStoreAdmin)
@attrs.define
class FileStore:
    """Certificates on the local filesystem under ``root`` (see the module docstring).

    ``auto_recover``: run :meth:`recover` before the first operation. Turn it off in a
    short-lived tool that may run while the service is mid-save (recovery assumes no other
    writer; cross-process locking is a separate contract).
    """

    root: str
    auto_recover: bool = True
    _recovered: bool = attrs.field(default=False, init=False)

    @property
    def certificates_dir(self) -> str:
        return os.path.join(self.root, CERTIFICATES_DIR)

    def path_for(self, key: str) -> str:
        """The directory holding the bundle for ``key`` (StoreError for an unsafe key)."""
        return os.path.join(self.certificates_dir, check_key(key))

    # -- ICertificateStore -------------------------------------------------------------

    def load(self, key: str) -> defer.Deferred[CertificateBundle | None]:
        """Deferred firing with the bundle under ``key``, ``None`` if absent; StoreError naming
        the file if the entry is corrupt (the caller keeps serving what it has)."""
        return as_deferred(self._load, key)

    def save(self, key: str, bundle: CertificateBundle) -> defer.Deferred[None]:
        """Deferred firing with ``None`` once ``bundle`` durably replaced what was under ``key``.
        Fails with StoreError; the old bundle is then untouched."""
        return as_deferred(self._save, key, bundle)

    def save_many(
        self, items: Sequence[tuple[str, CertificateBundle]]
    ) -> defer.Deferred[list[StoreError | None]]:
        """Deferred firing with one error per ``(key, bundle)`` (None: saved), once all of
        them are durable: :meth:`save` for each, sharing one disk flush. Each item is atomic
        on its own; one that fails does not stop the others."""
        return as_deferred(self._save_many, items)

    # -- IStoreAdmin ------------------------------------------------------------------

    def keys(self) -> defer.Deferred[list[str]]:
        """Deferred firing with the sorted keys that have a certificate directory."""
        return as_deferred(self._keys)

    # -- the blocking work ---------------------------------------------------------------

    def _maybe_recover(self) -> None:
        if self.auto_recover and not self._recovered:
            self.recover()

    def _load(self, key: str) -> CertificateBundle | None:
        path = self.path_for(key)
        self._maybe_recover()
        if not os.path.lexists(path):
            return None
        if not os.path.isdir(path) or os.path.islink(path):
            raise StoreError(f"corrupt certificate entry {path}: not a directory")
        bundle = read_entry(path)
        for warning in fsutil.check_mode(os.path.join(path, KEY_FILE), fsutil.PRIVATE_FILE_MODE):
            logger.warning("%s", warning)
        return bundle

    def _ensure_dirs(self) -> None:
        fsutil.ensure_private_dir(self.root)
        fsutil.ensure_private_dir(self.certificates_dir)

    def _save(self, key: str, bundle: CertificateBundle) -> None:
        error = self._save_many([(key, bundle)])[0]
        if error is not None:
            raise error

    def _save_many(self, items: Sequence[tuple[str, CertificateBundle]]) -> list[StoreError | None]:
        """Save every ``(key, bundle)`` in order, each exactly as :meth:`save` does, with one
        disk flush for all of them: every entry's files are written into its ``~new-``
        directory, all are fsynced together, then each entry is swapped in, and the directory
        holding them is fsynced once. Returns each item's error (None: durably saved); an
        item that fails leaves its key's old bundle untouched and the others go on."""
        errors: list[StoreError | None] = [None] * len(items)
        staged: list[tuple[int, str, str, str]] = []  # (index, key, ~new- directory, final)
        paths: list[str] = []
        for i, (key, bundle) in enumerate(items):
            try:
                final = self.path_for(key)
                check_bundle(bundle)
                check_intact(bundle, final)  # never store what load would refuse
                metadata = encode_metadata(
                    {**bundle.metadata, CHAIN_DIGEST_FIELD: _chain_digest(bundle.chain_pem)}
                )
                if not staged:
                    self._maybe_recover()
                    self._ensure_dirs()
                new = self._staging(key, _NEW)
                paths.extend(self._write_staged(key, new, bundle, metadata))
            except StoreError as e:
                errors[i] = e
                continue
            except OSError as e:
                errors[i] = StoreError(f"storage error: {fsutil.describe_os_error(e)}")
                continue
            staged.append((i, key, new, final))
        if not staged:
            return errors
        try:
            # Every file and directory durable before any swap, in one disk flush.
            fsutil.fsync_all(paths)
        except OSError as e:
            for i, key, new, _final in staged:
                _rmtree_quietly(new)
                errors[i] = StoreError(
                    f"cannot save certificate {key!r} under {new}: {fsutil.describe_os_error(e)}"
                )
            return errors
        olds: list[str] = []
        for i, key, new, final in staged:
            try:
                old = self._swap_in(key, new, final)
            except StoreError as e:
                errors[i] = e
                continue
            if old is not None:
                olds.append(old)
        try:
            fsutil.fsync_dir(self.certificates_dir)
        except OSError as e:
            logger.warning("could not fsync %s: %s", self.certificates_dir, e)
        for old in olds:
            _rmtree_quietly(old)
        return errors

    def _write_staged(
        self, key: str, new: str, bundle: CertificateBundle, metadata: bytes
    ) -> list[str]:
        """The entry's three files in the fresh directory ``new``, not yet fsynced; returns
        what to fsync (the files and ``new``). StoreError, with ``new`` removed, on failure."""
        try:
            os.mkdir(new, fsutil.PRIVATE_DIR_MODE)
            os.chmod(new, fsutil.PRIVATE_DIR_MODE)
            files = [
                (os.path.join(new, KEY_FILE), bundle.key_pem, 0o600),
                (os.path.join(new, CHAIN_FILE), bundle.chain_pem, 0o644),
                (os.path.join(new, METADATA_FILE), metadata, 0o644),
            ]
            for path, data, mode in files:
                fsutil.write_new_file(path, data, mode, sync=False)
        except OSError as e:
            _rmtree_quietly(new)
            raise StoreError(
                f"cannot save certificate {key!r} under {new}: {fsutil.describe_os_error(e)}"
            ) from None
        return [path for path, _, _ in files] + [new]

    def _swap_in(self, key: str, new: str, final: str) -> str | None:
        """Rename ``final`` to ``~old-``, then ``~new-`` to ``final``; undo the first on failure.
        Returns the ``~old-`` directory to remove once the swap is durable (the caller fsyncs
        the certificates directory first), None if there was no earlier entry."""
        old: str | None = None
        try:
            if os.path.lexists(final):
                old = self._staging(key, _OLD)
                os.rename(final, old)
            os.rename(new, final)
        except OSError as e:
            if old is not None and not os.path.lexists(final):
                try:
                    os.rename(old, final)
                    old = None
                except OSError:
                    pass  # recover() will restore it on the next start
            _rmtree_quietly(new)
            raise StoreError(
                f"cannot replace certificate directory {final}: {fsutil.describe_os_error(e)}"
            ) from None
        return old

    def _staging(self, key: str, kind: str) -> str:
        return os.path.join(self.certificates_dir, f"{key}{_SEP}{kind}-{secrets.token_hex(6)}")

    def _keys(self) -> list[str]:
        self._maybe_recover()
        try:
            names = os.listdir(self.certificates_dir)
        except FileNotFoundError:
            return []
        return sorted(
            n
            for n in names
            if is_safe_key(n)
            and os.path.isdir(os.path.join(self.certificates_dir, n))
            and not os.path.islink(os.path.join(self.certificates_dir, n))
        )

    # -- crash recovery ----------------------------------------------------------------

    def recover(self) -> list[str]:
        """Finish or undo what an interrupted save/delete left behind; returns what it did.

        For each key: a ``~del-`` leftover is removed. If ``<key>`` exists, ``~new-`` and
        ``~old-`` leftovers are removed (the save never reported success, keeping the old
        bundle is the "not at all" outcome). If ``<key>`` is missing (crash between the two
        renames), the newest complete ``~new-`` becomes ``<key>``, else a complete ``~old-``
        is put back; everything else is removed. Stray temporary files are removed too.
        Must run when no other process is writing this store (startup).
        """
        self._recovered = True
        self.check_permissions()
        actions: list[str] = []
        for directory in (self.root, self.certificates_dir):
            try:
                entries = os.listdir(directory)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise StoreError(
                    f"cannot list {directory}: {fsutil.describe_os_error(e)}"
                ) from None
            for name in entries:
                if fsutil.is_temp_name(name):
                    path = os.path.join(directory, name)
                    if os.path.isfile(path) and not os.path.islink(path):
                        fsutil.remove_quietly(path)
                        actions.append(f"removed stray temporary file {path}")
        try:
            entries = os.listdir(self.certificates_dir)
        except FileNotFoundError:
            entries = []
        leftovers: dict[str, dict[str, list[str]]] = {}
        for name in entries:
            key, sep, rest = name.partition(_SEP)
            kind = rest.split("-", 1)[0]
            path = os.path.join(self.certificates_dir, name)
            if not sep or not is_safe_key(key) or kind not in (_NEW, _OLD, _DEL):
                continue
            if not os.path.isdir(path) or os.path.islink(path):
                continue
            leftovers.setdefault(key, {_NEW: [], _OLD: [], _DEL: []})[kind].append(path)
        for key, kinds in sorted(leftovers.items()):
            actions.extend(self._recover_key(key, kinds))
        if actions:
            for action in actions:
                logger.warning("storage recovery: %s", action)
            try:
                fsutil.fsync_dir(self.certificates_dir)
            except OSError:
                pass
        return actions

    def check_permissions(self) -> list[str]:
        """Tighten the store to 0700 directories and 0600 key files; returns the warnings.

        Runs at start (from :meth:`recover`): a store restored from a backup, copied with
        ``cp -r`` or created under a loose umask must not keep private keys readable by other
        users. Each fix is logged as a warning naming the path and the old mode; a path we
        cannot fix (not our file) is reported instead.
        """
        warnings: list[str] = []
        for directory in (self.root, self.certificates_dir):
            if os.path.isdir(directory) and not os.path.islink(directory):
                warnings.extend(fsutil.ensure_private_dir(directory, follow=False))
        try:
            entries = os.listdir(self.certificates_dir)
        except OSError:
            entries = []
        for name in sorted(entries):
            path = os.path.join(self.certificates_dir, name)
            if not os.path.isdir(path) or os.path.islink(path):
                continue
            warnings.extend(fsutil.ensure_private_dir(path, follow=False))
            key_path = os.path.join(path, KEY_FILE)
            if os.path.isfile(key_path) and not os.path.islink(key_path):
                warnings.extend(fsutil.ensure_private_file(key_path))
        return warnings

    def _recover_key(self, key: str, kinds: dict[str, list[str]]) -> list[str]:
        actions: list[str] = []
        final = os.path.join(self.certificates_dir, key)
        for path in kinds[_DEL]:
            _rmtree_quietly(path)
            actions.append(f"finished deleting {path}")
        news = sorted(kinds[_NEW], key=_mtime, reverse=True)
        olds = sorted(kinds[_OLD], key=_mtime, reverse=True)
        if not os.path.lexists(final):
            for candidate, what in [(p, "new") for p in news] + [(p, "previous") for p in olds]:
                if _is_complete(candidate):
                    os.rename(candidate, final)
                    actions.append(f"restored the {what} bundle {candidate} as {final}")
                    break
        for path in news + olds:
            if os.path.lexists(path):
                _rmtree_quietly(path)
                actions.append(f"removed interrupted save leftover {path}")
        return actions


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def read_entry(path: str) -> CertificateBundle:
    """The intact bundle in entry directory ``path`` (see :func:`check_intact`), else StoreError
    naming the file and the problem (missing, not a regular file, too large, damaged)."""
    contents: dict[str, bytes] = {}
    for name in _FILES:
        file_path = os.path.join(path, name)
        data = fsutil.read_regular(file_path, limit=MAX_FILE_BYTES)
        if data is None:
            raise StoreError(f"corrupt certificate entry: {file_path} is missing")
        if not data:
            raise StoreError(f"corrupt certificate entry: {file_path} is empty")
        contents[name] = data
    metadata = decode_metadata(contents[METADATA_FILE], os.path.join(path, METADATA_FILE))
    recorded = metadata.pop(CHAIN_DIGEST_FIELD, None)
    bundle = CertificateBundle(
        key_pem=contents[KEY_FILE], chain_pem=contents[CHAIN_FILE], metadata=metadata
    )
    check_intact(bundle, path)  # first: it says more precisely what is wrong
    # Absent in entries saved before the digest existed: those get the structural checks only.
    if recorded is not None and recorded != _chain_digest(contents[CHAIN_FILE]):
        raise StoreError(
            f"{os.path.join(path, CHAIN_FILE)} is damaged: it changed after it was saved (its "
            f"SHA-256 differs from the {CHAIN_DIGEST_FIELD} recorded in {METADATA_FILE}; a "
            "certificate was removed, added or altered)"
        )
    return bundle


def _is_complete(path: str) -> bool:
    """True if ``path`` holds an intact bundle (what :meth:`FileStore.load` would accept):
    recovery never promotes a half-written or damaged staging directory."""
    try:
        read_entry(path)
    except (OSError, StoreError) as e:
        logger.info("storage recovery: not restoring %s: %s", path, e)
        return False
    return True


def _rmtree_quietly(path: str) -> None:
    """Remove a staging directory; a failure only leaves work for the next recover()."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        logger.warning("could not remove %s: %s", path, fsutil.describe_os_error(e))
