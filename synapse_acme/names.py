"""Canonical DNS names and the path-safe, order-independent key a certificate is stored under.

Built in one place (certmagic's rule) so that the store, the service and the CLI agree, and so that
no configured name can ever steer a path outside the storage directory.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_KEY_SAFE = re.compile(r"^[a-z0-9._-]+$")
# RFC 8555 §8.3: a challenge token is base64url; real CAs send 43 characters. 256 bounds the
# work done for junk while leaving room for any CA.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")
_MAX_NAME = 253
# A key stays readable for one name; several names get the (sorted) first plus a digest of all,
# so the key never depends on the order the operator wrote them in.
_DIGEST_CHARS = 12


def canonical_name(name: str) -> str:
    """Lower-case, strip one trailing dot, IDNA-encode; ``ValueError`` saying why if invalid.

    A leading ``*.`` (wildcard) is kept. IP literals are refused: HTTP-01 for IPs is not supported.
    """
    if not isinstance(name, str):
        raise ValueError(f"expected a DNS name as a string, got {type(name).__name__}")
    text = name.strip().lower()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise ValueError("empty name")
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        pass
    else:
        raise ValueError(f"IP addresses are not supported, only DNS names: {name!r}")
    wildcard = text.startswith("*.")
    rest = text[2:] if wildcard else text
    try:
        ascii_name = rest.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise ValueError(f"not a valid DNS name: {name!r} ({e})") from None
    labels = ascii_name.split(".")
    for label in labels:
        if not _LABEL.match(label):
            raise ValueError(f"not a valid DNS name: {name!r} (bad label {label!r})")
    result = ("*." if wildcard else "") + ascii_name
    if len(result) > _MAX_NAME:
        raise ValueError(f"DNS name longer than {_MAX_NAME} characters: {name!r}")
    return result


def canonical_names(names: Iterable[str]) -> tuple[str, ...]:
    """Canonicalise every name, dropping duplicates and keeping the first occurrence's order."""
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(canonical_name(name), None)
    if not seen:
        raise ValueError("no names given")
    return tuple(seen)


def _safe(name: str) -> str:
    return "wildcard_" + name[2:] if name.startswith("*.") else name


def names_key(names: Iterable[str]) -> str:
    """The store key for a certificate covering ``names``: same set of names, same key.

    ``["b.example", "a.example"]`` and ``["a.example", "b.example"]`` give the same key;
    one name gives the name itself (``*`` written as ``wildcard_``).
    """
    ordered = sorted(canonical_names(names))
    first = _safe(ordered[0])
    if len(ordered) == 1:
        key = first
    else:
        digest = hashlib.sha256(",".join(ordered).encode("ascii")).hexdigest()[:_DIGEST_CHARS]
        key = f"{first}_{len(ordered)}names-{digest}"
    if not is_safe_key(key):  # cannot happen for canonical names; a guard for future changes
        raise ValueError(f"unsafe store key derived from names: {key!r}")
    return key


def is_safe_key(key: str) -> bool:
    """True if ``key`` is usable as one path component: ``[a-z0-9._-]+``, no ``..``, not ``.``."""
    return bool(_KEY_SAFE.match(key)) and ".." not in key and key not in (".",) and len(key) <= 255


def is_safe_token(token: object) -> bool:
    """True if ``token`` is a string an ACME challenge token can be: base64url, 1-256 characters
    (safe in a URL path segment and as a lookup key in any store)."""
    return isinstance(token, str) and _TOKEN.fullmatch(token) is not None


def check_challenge(token: object, key_authorization: object) -> None:
    """ValueError unless ``token`` is a challenge token (:func:`is_safe_token`) and
    ``key_authorization`` an ASCII string: what every challenge store accepts."""
    if not is_safe_token(token):
        raise ValueError(f"not an ACME challenge token (base64url, 1-256): {token!r}")
    if not isinstance(key_authorization, str) or not key_authorization.isascii():
        raise ValueError("a key authorization must be an ASCII string")
