"""The ACME account key: load the operator's existing one, or create ours once, privately.

Old Synapse (txacme) wrote an RSA PEM to ``account_key_file``; such files must keep working,
because the account (and its rate-limit history) lives at the CA under that key. New keys are
ECDSA P-256 (ES256): smaller, faster, accepted by every CA we know. A certbot JWK JSON file
is accepted too. The key's content never appears in logs or exceptions, only its path.

A key is created only for a store that never had an account. Once the CA has told us the
account URL, ``<storage>/account.json`` records it with the CA's directory URL and the key's
RFC 7638 thumbprint. From then on (and for older stores, as soon as they hold a certificate)
a missing or unreadable key is an error that says so, never silently a new account; a key
whose thumbprint differs from the record is refused too (a file swapped for a foreign key).
The one way to start over is explicit: :func:`start_new_account` (``synapse-acme
new-account``), which keeps the old files beside the new ones.

``account_key_file`` is read through a symbolic link (the operator chose the path, and may
point it at a secrets directory), but the file at the end must be a regular file that belongs
to this user: a FIFO is refused without blocking, a file of another user is refused before it
is read or chmod-ed.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import urllib.parse

import attrs
import josepy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from synapse_acme import crypto, fsutil
from synapse_acme.errors import StoreError
from synapse_acme.model import AccountRecord
from synapse_acme.names import is_safe_key
from synapse_acme.store import CERTIFICATES_DIR, METADATA_FILE

logger = logging.getLogger(__name__)

DEFAULT_ACCOUNT_KEY_TYPE = "ecdsa-p256"
# CAs (Let's Encrypt included) refuse smaller RSA account keys with badPublicKey.
MIN_RSA_BITS = 2048
_SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")
_MAX_KEY_FILE = 64 * 1024  # a key file is a few KiB; anything larger is not one
ACCOUNT_RECORD_FILE = "account.json"
_MAX_RECORD_FILE = 64 * 1024
#: What to run to start a new account on purpose (named in every refusal).
NEW_ACCOUNT_COMMAND = "`synapse-acme new-account -c <config file>`"


def _jwk_from_key(key: object, where: str) -> josepy.JWK:
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            logger.warning(
                "account key %s is RSA-%d; CAs require at least %d bits and may refuse it",
                where,
                key.key_size,
                MIN_RSA_BITS,
            )
        return josepy.JWKRSA(key=key)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in _SUPPORTED_CURVES:
            raise StoreError(f"account key {where} uses unsupported curve {key.curve.name}")
        return josepy.JWKEC(key=key)
    raise StoreError(
        f"account key {where} is a {type(key).__name__.lstrip('_')}; expected an RSA or "
        "ECDSA (P-256/P-384/P-521) private key"
    )


def jwk_from_pem(pem: bytes, where: str = "<memory>") -> josepy.JWK:
    """A josepy JWK for an unencrypted PEM private key (PKCS#1, SEC1 or PKCS#8; RSA or EC).

    StoreError naming ``where`` (never the content) if it is not a usable private key.
    """
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise StoreError(
            f"account key {where} is encrypted; synapse-acme needs an unencrypted key"
        ) from None
    except (ValueError, UnicodeError):
        raise StoreError(f"account key {where} is not a PEM private key") from None
    return _jwk_from_key(key, where)


def _jwk_from_json(data: bytes, where: str) -> josepy.JWK:
    """certbot stores account keys as JWK JSON (``private_key.json``)."""
    try:
        jwk = josepy.JWK.json_loads(data)
    except (ValueError, josepy.errors.DeserializationError, json.JSONDecodeError):
        raise StoreError(f"account key {where} is not a PEM private key or JWK") from None
    key = getattr(getattr(jwk, "key", None), "_wrapped", None)
    if key is None:
        key = getattr(jwk, "key", None)
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise StoreError(f"account key {where} holds no RSA or ECDSA private key")
    return _jwk_from_key(key, where)


def parse_account_key(data: bytes, where: str) -> josepy.JWK:
    """PEM or JWK JSON bytes -> JWK; StoreError naming ``where`` otherwise."""
    if data.lstrip().startswith(b"{"):
        return _jwk_from_json(data, where)
    return jwk_from_pem(data, where)


def key_thumbprint(jwk: josepy.JWK) -> str:
    """The RFC 7638 SHA-256 thumbprint of the key, base64url (as ACME uses it)."""
    return base64.urlsafe_b64encode(jwk.thumbprint()).rstrip(b"=").decode("ascii")


# -- one account per CA ------------------------------------------------------------------------

#: Where the accounts at the second and later CAs of ``acme.issuers`` live, one directory each.
ACCOUNTS_DIR = "accounts"
_MAX_CA_DIR_NAME = 100


def ca_dir_name(url: str) -> str:
    """A path-safe directory name for the CA with directory URL ``url``: its host, port and
    path, lower-case, every run of other characters than ``a-z0-9.-`` (and every ``..``) made
    one ``_`` (``https://acme.zerossl.com/v2/DV90`` -> ``acme.zerossl.com_v2_dv90``). Two
    CAs on one host (step-ca provisioners, two Pebbles) get two names."""
    parts = urllib.parse.urlsplit(url)
    text = f"{parts.netloc}{parts.path}".lower()
    name = re.sub(r"(?:[^a-z0-9.-]|\.{2,})+", "_", text).strip("_.-")[:_MAX_CA_DIR_NAME]
    return name or "ca"


def issuer_account_paths(
    index: int, url: str, account_key_file: str, storage: str
) -> tuple[str, str]:
    """``(key file, directory of account.json)`` for the account at CA number ``index`` of
    the list (0 is the first). The first CA keeps ``account_key_file`` and the store's own
    ``account.json``, so a store from before ``issuers`` keeps its account; each other CA has
    ``<storage>/accounts/<ca_dir_name>/account.key`` and ``account.json`` beside it."""
    if index == 0:
        return account_key_file, storage
    directory = os.path.join(storage, ACCOUNTS_DIR, ca_dir_name(url))
    return os.path.join(directory, "account.key"), directory


# -- the account record ------------------------------------------------------------------------


def record_path(storage: str) -> str:
    return os.path.join(storage, ACCOUNT_RECORD_FILE)


def read_account_record(storage: str) -> AccountRecord | None:
    """The record in ``<storage>/account.json``, ``None`` if there is none; StoreError naming
    the file if it is damaged (or not a regular file)."""
    path = record_path(storage)
    data = fsutil.read_regular(path, limit=_MAX_RECORD_FILE)
    if data is None:
        return None
    try:
        value = json.loads(data.decode("utf-8"))
        fields = {name: value[name] for name in ("url", "directory", "thumbprint")}
        if not all(isinstance(v, str) and v for v in fields.values()):
            raise ValueError("url, directory and thumbprint must be non-empty strings")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise StoreError(f"the account record {path} is damaged: {e}") from None
    return AccountRecord(**fields)


def write_account_record(storage: str, record: AccountRecord) -> None:
    """Replace ``<storage>/account.json`` atomically (StoreError if it cannot be written)."""
    fsutil.atomic_write(record_path(storage), record.to_json(), fsutil.PRIVATE_FILE_MODE)


@attrs.define
class AccountRecorder:
    """Called with the account URL each time the CA tells us (see ``AcmeIssuer.on_account``);
    writes ``account.json`` when it says something new."""

    storage: str
    directory: str
    thumbprint: str

    def __call__(self, url: str) -> None:
        record = AccountRecord(url=url, directory=self.directory, thumbprint=self.thumbprint)
        try:
            if read_account_record(self.storage) == record:
                return
        except StoreError as e:
            logger.warning("Replacing the damaged account record: %s", e)
        write_account_record(self.storage, record)
        logger.info("Recorded the ACME account %s in %s", url, record_path(self.storage))


def account_evidence(storage: str) -> str | None:
    """Why the store shows that an account existed, as words for an error message; ``None``
    for a store that never had one (a first run)."""
    path = record_path(storage)
    if os.path.lexists(path):
        try:
            record = read_account_record(storage)
        except StoreError:
            return f"{path} exists (a record of the account, though unreadable)"
        if record is not None:
            return f"{path} records the account {record.url} at {record.directory}"
    issued = _issued_certificates(storage)
    if issued:
        more = f" and {len(issued) - 3} more" if len(issued) > 3 else ""
        where = os.path.join(storage, "certificates")
        return f"{where} holds certificates issued to the account ({', '.join(issued[:3])}{more})"
    return None


def _issued_certificates(storage: str) -> list[str]:
    """Store keys of certificates that are not placeholders (a damaged entry counts: it was
    issued once). Reads only metadata.json, never a key."""
    certificates = os.path.join(storage, CERTIFICATES_DIR)
    try:
        names = sorted(os.listdir(certificates))
    except OSError:
        return []
    issued = []
    for name in names:
        entry = os.path.join(certificates, name)
        if not is_safe_key(name) or os.path.islink(entry) or not os.path.isdir(entry):
            continue
        try:
            data = fsutil.read_regular(os.path.join(entry, METADATA_FILE), limit=_MAX_RECORD_FILE)
            placeholder = data is not None and json.loads(data).get("placeholder") is True
        except (StoreError, ValueError, AttributeError):
            placeholder = False
        if not placeholder:
            issued.append(name)
    return issued


# -- the key -----------------------------------------------------------------------------------


def _read_key(path: str) -> josepy.JWK | None:
    """The key at ``path``, ``None`` if there is no file; StoreError if it is unusable.
    (The caller checked that it belongs to us.)"""
    try:
        data = fsutil.read_regular(path, follow=True, limit=_MAX_KEY_FILE)
    except StoreError as e:
        raise StoreError(f"cannot use the account key: {e}") from None
    if data is None:
        if os.path.islink(path):
            raise StoreError(
                f"the account key {path} is a symbolic link to {os.path.realpath(path)}, "
                "which does not exist"
            )
        return None
    _tighten_mode(path)
    return parse_account_key(data, path)


def _tighten_mode(path: str) -> None:
    for warning in fsutil.check_mode(path, fsutil.PRIVATE_FILE_MODE):
        logger.warning("account key: %s", warning)
        # A looser key (restored from a backup, copied by hand) is tightened, loudly.
        try:  # through a descriptor: the operator's link is followed, a FIFO is refused
            if fsutil.tighten(path, fsutil.PRIVATE_FILE_MODE, follow=True) is not None:
                logger.warning("account key: tightened %s to 0600", path)
        except OSError as e:
            logger.warning(
                "account key: cannot set mode 0600 on %s: %s", path, fsutil.describe_os_error(e)
            )
        except StoreError as e:
            logger.warning("account key: cannot set mode 0600: %s", e)


def load_or_create_account_key(
    path: str, key_type: str = DEFAULT_ACCOUNT_KEY_TYPE, *, storage: str | None = None
) -> josepy.JWK:
    """The account key stored at ``path``; created (``key_type``, 0600, atomically) if absent
    and the store never had an account.

    An existing key of any supported type is used as is (``key_type`` only applies to new keys).
    A looser mode than 0600 is tightened to 0600 with a warning. Two processes starting at once
    end up with the same key: creation never replaces an existing file. Blocking I/O on a tiny file.

    With ``storage`` (the certificate store this key serves), a missing or unreadable key is a
    StoreError when :func:`account_evidence` shows an account existed, and a key that is not the
    one recorded in ``account.json`` is refused; each error names the file, the evidence and
    the way out (:data:`NEW_ACCOUNT_COMMAND`).
    """
    fsutil.check_owned_by_us(path, "the account key")
    try:
        jwk = _read_key(path)
    except StoreError as e:
        evidence = account_evidence(storage) if storage is not None else None
        seen = f"; {evidence}, so it is the key of an existing ACME account" if evidence else ""
        raise StoreError(
            f"{e}{seen}. synapse-acme never replaces an account key it cannot read: fix or "
            f"restore the file, or start a new account explicitly with {NEW_ACCOUNT_COMMAND} "
            "(which keeps the old file beside the new one)"
        ) from None
    if jwk is None:
        evidence = account_evidence(storage) if storage is not None else None
        if evidence is not None:
            raise StoreError(
                f"the ACME account key {path} is missing, but {evidence}. A new key would "
                "be a new account, so synapse-acme does not create one on its own: restore "
                f"{path} from a backup, or start a new account explicitly with "
                f"{NEW_ACCOUNT_COMMAND}"
            )
        jwk = _create_key(path, key_type, storage)
    if storage is not None:
        _check_recorded(jwk, path, storage)
    return jwk


def missing_key_directory(path: str, storage: str) -> str | None:
    """The directory of account key ``path`` if it is missing and outside ``storage``, else None.

    synapse-acme creates directories for the key only inside the storage directory: a path
    copied from an example (``/path/to/acme_account.key``) must be an error naming the setting,
    not a new ``/path/to`` at the filesystem root.
    """
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(parent):
        return None
    root = os.path.abspath(storage)
    if parent == root or parent.startswith(root.rstrip(os.sep) + os.sep):
        return None
    return parent


def _create_key(path: str, key_type: str, storage: str | None = None) -> josepy.JWK:
    parent = os.path.dirname(os.path.abspath(path))
    if storage is not None and missing_key_directory(path, storage) is not None:
        raise StoreError(
            f"cannot create the account key {path}: the directory {parent} does not exist "
            f"(synapse-acme creates directories only inside the storage directory {storage})"
        )
    if not os.path.isdir(parent):
        fsutil.ensure_private_dir(parent)
    pem = crypto.generate_private_key_pem(key_type)
    if fsutil.create_exclusive(path, pem, fsutil.PRIVATE_FILE_MODE):
        logger.info("Created a new %s ACME account key at %s", key_type, path)
        return jwk_from_pem(pem, path)
    # another process created it between our check and our write: use theirs
    theirs = _read_key(path)
    if theirs is None:
        raise StoreError(f"cannot create the account key {path}: something is in the way")
    return theirs


def _check_recorded(jwk: josepy.JWK, path: str, storage: str) -> None:
    try:
        record = read_account_record(storage)
    except StoreError as e:
        # Only a safety net, and no secret: the next registration writes it again.
        logger.warning("Cannot check the account key against its record: %s", e)
        return
    if record is None:
        return
    thumbprint = key_thumbprint(jwk)
    if thumbprint != record.thumbprint:
        raise StoreError(
            f"the account key {path} is not the key of the account recorded in "
            f"{record_path(storage)} ({record.url} at {record.directory}): its thumbprint is "
            f"{thumbprint}, the record's is {record.thumbprint}. Put the account's key back, "
            f"or start a new account explicitly with {NEW_ACCOUNT_COMMAND}"
        )


# -- starting over, explicitly ----------------------------------------------------------------


@attrs.frozen
class NewAccount:
    """What :func:`start_new_account` did."""

    key_path: str
    thumbprint: str
    old_key: str | None  # where the previous key file went, if there was one
    old_record: str | None  # where the previous account.json went, if there was one


def start_new_account(
    path: str,
    storage: str,
    stamp: str,
    *,
    force: bool = False,
    key_type: str = DEFAULT_ACCOUNT_KEY_TYPE,
) -> NewAccount:
    """Replace the account key at ``path`` with a fresh one: the way out when the old key is
    lost, damaged or not the account's, on the operator's explicit request.

    Nothing is deleted: the old key file is renamed to ``<path>.broken-<stamp>`` (or
    ``.replaced-<stamp>`` for a healthy key replaced with ``force``) and ``account.json`` to
    ``account.json.old-<stamp>``. A healthy key that belongs to the recorded account is
    refused without ``force``. ``stamp`` is the caller's clock reading (e.g. 20261101T120000Z).
    The caller holds the store's lock. The CA registers the new account on next use.
    """
    fsutil.check_owned_by_us(path, "the account key")  # another user's file is not ours to move
    missing = missing_key_directory(path, storage)
    if missing is not None:  # before anything is moved aside
        raise StoreError(
            f"cannot create the new account key {path}: the directory {missing} does not exist "
            f"(synapse-acme creates directories only inside the storage directory {storage})"
        )
    try:
        current = _read_key(path)
        problem = None
    except StoreError as e:
        current, problem = None, str(e)
    try:
        record = read_account_record(storage)
    except StoreError:
        record = None
    suffix = "broken"
    if current is not None and (record is None or record.thumbprint == key_thumbprint(current)):
        if not force:
            whose = f" and belongs to the account {record.url}" if record is not None else ""
            raise StoreError(
                f"the account key {path} is readable{whose}: nothing to repair. To leave "
                "that account anyway, add --force (the key is kept as "
                f"{path}.replaced-{stamp})"
            )
        suffix = "replaced"
    elif problem is not None:
        logger.warning("Starting a new account: %s", problem)
    old_key = _move_aside(path, f"{suffix}-{stamp}") if os.path.lexists(path) else None
    old_record = None
    if os.path.lexists(record_path(storage)):
        old_record = _move_aside(record_path(storage), f"old-{stamp}")
    pem = crypto.generate_private_key_pem(key_type)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        fsutil.ensure_private_dir(parent)
    if not fsutil.create_exclusive(path, pem, fsutil.PRIVATE_FILE_MODE):
        raise StoreError(f"cannot create the new account key {path}: another file appeared there")
    jwk = jwk_from_pem(pem, path)
    logger.warning(
        "Started a new ACME account key at %s (previous key file: %s)", path, old_key or "none"
    )
    return NewAccount(
        key_path=path, thumbprint=key_thumbprint(jwk), old_key=old_key, old_record=old_record
    )


def _move_aside(path: str, suffix: str) -> str:
    """Rename ``path`` (a link itself, never its target) to an unused ``<path>.<suffix>``."""
    base = f"{path}.{suffix}"
    target, n = base, 1
    while os.path.lexists(target):
        n += 1
        target = f"{base}-{n}"
    try:
        os.rename(path, target)
    except OSError as e:
        raise StoreError(
            f"cannot move {path} aside to {target}: {fsutil.describe_os_error(e)}"
        ) from None
    return target
