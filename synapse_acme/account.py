"""The ACME account key: load the operator's existing one, or create ours once, privately.

Old Synapse (txacme) wrote an RSA PEM to ``account_key_file``; such files must keep working,
because the account (and its rate-limit history) lives at the CA under that key. New keys are
ECDSA P-256 (ES256): smaller, faster, accepted by every CA we know. A certbot JWK JSON file
is accepted too. The key's content never appears in logs or exceptions, only its path.
"""

from __future__ import annotations

import json
import logging
import os

import josepy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from synapse_acme import crypto, fsutil
from synapse_acme.errors import StoreError

logger = logging.getLogger(__name__)

DEFAULT_ACCOUNT_KEY_TYPE = "ecdsa-p256"
# CAs (Let's Encrypt included) refuse smaller RSA account keys with badPublicKey.
MIN_RSA_BITS = 2048
_SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")
_MAX_KEY_FILE = 64 * 1024  # a key file is a few KiB; anything larger is not one


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


def _read_key_file(path: str) -> bytes:
    try:
        if os.path.isdir(path):
            raise StoreError(f"account key {path} is a directory, not a key file")
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as e:
        raise StoreError(f"cannot read account key {path}: {fsutil.describe_os_error(e)}") from None
    if len(data) > _MAX_KEY_FILE:
        raise StoreError(f"account key {path} is too large to be a key file")
    return data


def load_or_create_account_key(path: str, key_type: str = DEFAULT_ACCOUNT_KEY_TYPE) -> josepy.JWK:
    """The account key stored at ``path``; created (``key_type``, 0600, atomically) if absent.

    An existing key of any supported type is used as is (``key_type`` only applies to new keys).
    A looser mode than 0600 is tightened to 0600 with a warning. Two processes starting at once
    end up with the same key: creation never replaces an existing file. Blocking I/O on a tiny file.
    """
    if not os.path.lexists(path):
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            fsutil.ensure_private_dir(parent)
        pem = crypto.generate_private_key_pem(key_type)
        if fsutil.create_exclusive(path, pem, fsutil.PRIVATE_FILE_MODE):
            logger.info("Created a new %s ACME account key at %s", key_type, path)
            return jwk_from_pem(pem, path)
        # another process created it between our check and our write: use theirs
    for warning in fsutil.check_mode(path, fsutil.PRIVATE_FILE_MODE):
        logger.warning("account key: %s", warning)
        if os.path.isfile(path) and not os.path.islink(path):
            # A looser key (restored from a backup, copied by hand) is tightened, loudly.
            try:
                os.chmod(path, fsutil.PRIVATE_FILE_MODE)
                logger.warning("account key: tightened %s to 0600", path)
            except OSError as e:
                logger.warning(
                    "account key: cannot set mode 0600 on %s: %s", path, fsutil.describe_os_error(e)
                )
    return parse_account_key(_read_key_file(path), path)
