"""Copies the current certificate to the homeserver's own TLS file paths, safely.

Synapse (and anything else reading ``tls_certificate_path`` / ``tls_private_key_path``) sees
the issued chain after a restart too. The old Synapse promise is kept: a file this tool did not
write is never overwritten. Ownership is a small record, ``<storage>/exports.json``, mapping
each path to the SHA-256 of what we last wrote there. A file counts as ours when it is missing,
matches that record, or already holds exactly the bytes we are about to write (a crash between
writing and recording must not lock us out; a file holding our freshly generated private key
can only have come from us).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence

import attrs
from zope.interface import implementer

from synapse_acme import crypto, fsutil
from synapse_acme.errors import StoreError
from synapse_acme.interfaces import ICertificateConsumer
from synapse_acme.model import CertificateBundle

logger = logging.getLogger(__name__)

EXPORTS_FILE = "exports.json"
CERT_MODE = 0o644  # public: other services (a reverse proxy) may read the chain
KEY_MODE = 0o600
_RECORD_VERSION = 1
DEFAULT_PLACEHOLDER_LIFETIME = datetime.timedelta(days=7)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _abspath(path: str) -> str:
    return os.path.abspath(path)


def _read(path: str) -> bytes | None:
    """The file's bytes, ``None`` if it does not exist (StoreError if unreadable)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreError(f"cannot read {path}: {fsutil.describe_os_error(e)}") from None


@implementer(ICertificateConsumer)
@attrs.define
class FileExporter:
    """Writes certificate ``key``'s chain to ``cert_path`` and key to ``key_path`` (atomically;
    key 0600, chain 0644) whenever it changes. ``cert_path == key_path`` writes one combined
    file (key then chain, 0600). ``storage`` is where the ownership record lives.

    ``on_export`` is called with ``(key, bundle)`` after the files were actually rewritten
    (e.g. so a homeserver can re-read them).
    """

    key: str
    cert_path: str = attrs.field(converter=_abspath)
    key_path: str = attrs.field(converter=_abspath)
    storage: str = attrs.field(converter=_abspath)
    on_export: Callable[[str, CertificateBundle], object] | None = None
    _warned: set[str] = attrs.field(factory=set, init=False)

    @property
    def record_path(self) -> str:
        return os.path.join(self.storage, EXPORTS_FILE)

    # -- ICertificateConsumer ------------------------------------------------------------

    def certificate_changed(self, key: str, bundle: CertificateBundle) -> None:
        """Export ``bundle`` if it is for our key. Never raises: failures are logged and the
        next change (or restart) tries again; the homeserver keeps its current files."""
        if key != self.key:
            return
        try:
            self.export(bundle)
        except Exception as e:
            why = str(e) if isinstance(e, StoreError) else f"{type(e).__name__}: {e}"
            logger.error(
                "Could not export the certificate for %s to %s / %s: %s",
                key,
                self.cert_path,
                self.key_path,
                why,
            )

    # -- the work ------------------------------------------------------------------------

    def export(self, bundle: CertificateBundle) -> bool:
        """Write ``bundle`` to the target paths if they are ours; True if a file changed.

        False when nothing needed writing, or when a target is not ours (warned once per
        path). StoreError if writing fails (the old files stay whole).
        """
        planned = self._planned(bundle)
        record = self._load_record()
        foreign = [p for p, data in planned.items() if not self._is_ours(p, data, record)]
        if foreign:
            for path in foreign:
                self._warn_foreign(path)
            return False
        changed = {p: (data, mode) for p, (data, mode) in planned.items() if _read(p) != data}
        self._write_files(changed)
        new_record = dict(record)
        new_record.update({p: _sha256(data) for p, (data, _) in planned.items()})
        if new_record != record:
            self._save_record(new_record)
        for path in planned:
            self._warned.discard(path)
        if changed:
            logger.info(
                "Exported the certificate for %s to %s",
                self.key,
                ", ".join(sorted(changed)),
            )
            if self.on_export is not None:
                self.on_export(self.key, bundle)
        return bool(changed)

    def write_placeholder_if_missing(
        self,
        names: Sequence[str],
        now: datetime.datetime,
        lifetime: datetime.timedelta = DEFAULT_PLACEHOLDER_LIFETIME,
    ) -> bool:
        """Write a self-signed placeholder pair if a target file is missing, so a homeserver
        that insists on TLS files can start before the first issuance. True if written.

        Existing files that are not ours are left alone (and warned about), as always.
        """
        targets = {self.cert_path, self.key_path}
        if all(os.path.lexists(p) for p in targets):
            return False
        bundle = crypto.make_placeholder_bundle(list(names), now, lifetime)
        try:
            written = self.export(bundle)
        except StoreError as e:
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

    # -- helpers -------------------------------------------------------------------------

    def _planned(self, bundle: CertificateBundle) -> dict[str, tuple[bytes, int]]:
        if self.cert_path == self.key_path:
            key = bundle.key_pem if bundle.key_pem.endswith(b"\n") else bundle.key_pem + b"\n"
            return {self.cert_path: (key + bundle.chain_pem, KEY_MODE)}
        return {
            self.key_path: (bundle.key_pem, KEY_MODE),
            self.cert_path: (bundle.chain_pem, CERT_MODE),
        }

    def _is_ours(self, path: str, planned: tuple[bytes, int], record: dict[str, str]) -> bool:
        if os.path.islink(path):
            return False  # e.g. certbot's live/ symlinks: somebody else's layout
        current = _read(path)
        if current is None or current == planned[0]:
            return True
        return record.get(path) == _sha256(current)

    def _warn_foreign(self, path: str) -> None:
        if path in self._warned:
            return
        self._warned.add(path)
        which = "tls_private_key_path" if path == self.key_path else "tls_certificate_path"
        logger.warning(
            "not overwriting %s: it was not written by synapse-acme (delete it or point %s "
            "elsewhere to let synapse-acme manage it)",
            path,
            which,
        )

    def _write_files(self, files: dict[str, tuple[bytes, int]]) -> None:
        """Stage every file first, then rename them back to back: the window in which the
        key and the chain on disk do not match is two renames long."""
        staged: list[tuple[str, str]] = []
        try:
            for path, (data, mode) in files.items():
                parent = os.path.dirname(path)
                if not os.path.isdir(parent):
                    os.makedirs(parent, mode=fsutil.PRIVATE_DIR_MODE, exist_ok=True)
                tmp = fsutil.temp_name_for(path)
                staged.append((tmp, path))
                fsutil.write_new_file(tmp, data, mode)
            for tmp, path in staged:
                os.rename(tmp, path)
        except OSError as e:
            for tmp, _ in staged:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            raise StoreError(
                f"cannot write {', '.join(sorted(files))}: {fsutil.describe_os_error(e)}"
            ) from None
        for parent in {os.path.dirname(p) for p in files}:
            try:
                fsutil.fsync_dir(parent)
            except OSError as e:
                logger.warning("could not fsync %s: %s", parent, fsutil.describe_os_error(e))

    def _load_record(self) -> dict[str, str]:
        data = _read(self.record_path)
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
