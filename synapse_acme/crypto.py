"""Keys and certificate parsing/validation (cryptography).

Everything here is pure and synchronous; time comes in as an argument (see :func:`now_from_clock`).
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import itertools
import re
import threading
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.interfaces import IReactorTime

from synapse_acme.errors import BundleError
from synapse_acme.model import CertificateBundle

KEY_TYPES: tuple[str, ...] = ("ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096")
PLACEHOLDER_ORG = "synapse-acme placeholder (not a real certificate)"
#: How long a self-signed placeholder is valid: long enough for the first issuance to be
#: retried for days, short enough that a forgotten one is noticed.
PLACEHOLDER_LIFETIME = datetime.timedelta(days=7)
# Clocks of the CA and of this host disagree a little; a certificate dated a few minutes ahead is
# normal right after issuance and must not be refused.
DEFAULT_SKEW = datetime.timedelta(minutes=5)


def generate_private_key_pem(key_type: str = "ecdsa-p256") -> bytes:
    """A fresh private key of ``key_type`` (one of :data:`KEY_TYPES`) as unencrypted PKCS8 PEM."""
    key: PrivateKeyTypes
    if key_type == "ecdsa-p256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif key_type == "ecdsa-p384":
        key = ec.generate_private_key(ec.SECP384R1())
    elif key_type.startswith("rsa-") and key_type in KEY_TYPES:
        key = rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    else:
        raise ValueError(f"unknown key type {key_type!r}; expected one of {', '.join(KEY_TYPES)}")
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(key_pem: bytes) -> PrivateKeyTypes:
    """Parse a PEM private key; BundleError (without the key's content) if it is not one."""
    try:
        return serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise BundleError(f"private key does not parse: {type(e).__name__}") from None


_PEM_CERT_BEGIN = b"-----BEGIN CERTIFICATE-----"
# One whole CERTIFICATE block: the markers on their own lines, only base64 between them.
_PEM_CERT_BLOCK = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\s]*?-----END CERTIFICATE-----[ \t]*(?:\r?\n|$)"
)


def _skip_space(data: bytes, pos: int) -> int:
    while pos < len(data) and data[pos : pos + 1].isspace():
        pos += 1
    return pos


def parse_chain(chain_pem: bytes, *, strict: bool = False) -> list[x509.Certificate]:
    """Every certificate of a PEM chain, leaf first; BundleError if none parses.

    Lenient by default, like OpenSSL: text around the blocks is skipped, and so is an
    incomplete last block. ``strict`` is for files we wrote ourselves (the store): the bytes
    must be whole CERTIFICATE blocks and whitespace, nothing else (RFC 8555 section 9.1's
    application/pem-certificate-chain), so a truncated file, a partial block or trailing
    bytes are BundleError instead of a silently shorter chain.
    """
    if strict:
        return _parse_chain_strict(chain_pem)
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as e:
        raise BundleError(f"certificate chain does not parse: {e}") from None
    if not certs:
        raise BundleError("certificate chain is empty")
    return certs


def _parse_chain_strict(chain_pem: bytes) -> list[x509.Certificate]:
    blocks: list[bytes] = []
    pos = _skip_space(chain_pem, 0)
    while pos < len(chain_pem):
        block = _PEM_CERT_BLOCK.match(chain_pem, pos)
        if block is None:
            n = len(blocks) + 1
            if chain_pem.startswith(_PEM_CERT_BEGIN, pos):
                raise BundleError(
                    f"certificate {n} of the chain is incomplete (no END line where it should "
                    "be): the file is truncated or damaged"
                )
            what = f"after certificate {len(blocks)}" if blocks else "before any certificate"
            raise BundleError(
                f"unexpected bytes {what} (at byte {pos}): only whole PEM CERTIFICATE "
                "blocks belong here (trailing garbage or a damaged block)"
            )
        blocks.append(block.group(0))
        pos = _skip_space(chain_pem, block.end())
    if not blocks:
        raise BundleError("certificate chain is empty")
    certs = []
    for n, pem in enumerate(blocks, 1):
        try:
            certs.append(x509.load_pem_x509_certificate(pem))
        except ValueError as e:
            raise BundleError(f"certificate {n} of the chain does not parse: {e}") from None
    return certs


def canonical_chain_pem(chain_pem: bytes) -> bytes:
    """The chain as bare PEM blocks, one after the other, as the store keeps it.

    A CA may surround its blocks with RFC 7468 explanatory text (RFC 8555 forbids it, not all
    CAs listen); that text is dropped here so what is saved passes the store's strict reading.
    BundleError if a block is incomplete (a lenient parse would silently drop it).
    """
    certs = parse_chain(chain_pem)
    if len(certs) != chain_pem.count(_PEM_CERT_BEGIN):
        raise BundleError(
            f"certificate chain has {chain_pem.count(_PEM_CERT_BEGIN)} BEGIN CERTIFICATE "
            f"lines but only {len(certs)} whole certificates: it is truncated or damaged"
        )
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The certificate's SAN DNS names, lower-case (the CN is ignored, as browsers do)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]


def name_matches(pattern: str, name: str) -> bool:
    """RFC 6125 matching: exact, or ``*.a.b`` matching exactly one extra left-most label."""
    pattern, name = pattern.lower(), name.lower()
    if pattern == name:
        return True
    if pattern.startswith("*."):
        head, _, tail = name.partition(".")
        return bool(head) and head != "*" and tail == pattern[2:]
    return False


def not_before(cert: x509.Certificate) -> datetime.datetime:
    return cert.not_valid_before_utc


def not_after(cert: x509.Certificate) -> datetime.datetime:
    return cert.not_valid_after_utc


def _public_bytes(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def leaf_serial_hex(chain_pem: bytes) -> str | None:
    """The leaf's serial number in hex (how status reports and compares certificates), or
    ``None`` if the chain does not parse."""
    try:
        return f"{parse_chain(chain_pem)[0].serial_number:x}"
    except BundleError:
        return None


def key_matches_leaf(key_pem: bytes, chain_pem: bytes) -> bool:
    """True if ``key_pem`` is the private key of the first certificate in ``chain_pem``.

    BundleError if either does not parse."""
    leaf = parse_chain(chain_pem)[0]
    key = load_private_key(key_pem)
    return _public_bytes(key.public_key()) == _public_bytes(leaf.public_key())


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    # verify_directly_issued_by also compares the issuer name with the issuer's subject (a
    # ValueError); comparing them here first cost a tenth of loading 10,000 certificates.
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, Exception):  # InvalidSignature and unsupported algorithms alike
        return False
    return True


def check_chain_order(chain: Sequence[x509.Certificate]) -> None:
    """BundleError unless each certificate of ``chain`` is signed by the next one."""
    for child, parent in itertools.pairwise(chain):
        if not _signed_by(child, parent):
            raise BundleError(
                f"chain out of order or incomplete: {child.subject.rfc4514_string()!r} "
                f"is not signed by the next certificate {parent.subject.rfc4514_string()!r}"
            )


def check_key_matches(key_pem: bytes, leaf: x509.Certificate) -> None:
    """BundleError unless ``key_pem`` parses and is the private key of ``leaf``."""
    key = load_private_key(key_pem)
    # Public keys compare in OpenSSL (type, parameters, value): cheaper than two encodings.
    if key.public_key() != leaf.public_key():
        raise BundleError("private key does not match the certificate")


def check_leaf_usage(leaf: x509.Certificate) -> None:
    """BundleError unless ``leaf`` may serve TLS: not a CA certificate (``CA:TRUE``), and an
    extended key usage that includes serverAuth (every public CA sets it; a certificate
    without it is refused by browsers and by Synapse's federation peers)."""
    try:
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is not None and bc.ca:
        raise BundleError("the certificate is a CA certificate (CA:TRUE), not a server's")
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise BundleError(
            "the certificate has no extended key usage; a TLS server's needs serverAuth"
        ) from None
    if ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        raise BundleError("the certificate's extended key usage does not include serverAuth")


#: How many verified pairs :class:`_VerifiedPairs` remembers (about 130 bytes each).
VERIFIED_PAIRS_MAX = 65536


class _VerifiedPairs:
    """The digests of the chain and key pairs that passed the checks that do not depend on
    the time or the names (key match, leaf usage, chain signatures): the costly part of
    :func:`validate_bundle` (an ECDSA signature check alone is 0.1 ms).

    One bundle is validated several times in a process's life: by the store that reads it,
    the service that adopts it, the TLS map that serves it. The first pays for those checks;
    the others find the digest of the very same bytes here, and only parse the chain and
    check the names and dates. Only success is remembered, and it stands for the exact bytes
    hashed, so nothing less is checked. Bounded (least recently used first out); thread-safe
    (stores validate in their I/O thread)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def digest(chain_pem: bytes, key_pem: bytes) -> bytes:
        h = hashlib.sha256(len(chain_pem).to_bytes(8, "big"))
        h.update(chain_pem)
        h.update(key_pem)
        return h.digest()

    def __contains__(self, digest: bytes) -> bool:
        with self._lock:
            if digest not in self._seen:
                return False
            self._seen.move_to_end(digest)
            return True

    def add(self, digest: bytes) -> None:
        with self._lock:
            self._seen[digest] = None
            self._seen.move_to_end(digest)
            while len(self._seen) > self._limit:
                self._seen.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()


_verified = _VerifiedPairs(VERIFIED_PAIRS_MAX)


def is_verified_pair(chain_pem: bytes, key_pem: bytes) -> bool:
    """Whether these exact bytes already passed :func:`validate_bundle`'s key match, leaf
    usage and chain signature checks in this process (names and dates are not part of it)."""
    return _verified.digest(chain_pem, key_pem) in _verified


def forget_verified() -> None:
    """Forget every pair :func:`validate_bundle` verified (benchmarks and tests start cold)."""
    _verified.clear()


def validate_bundle(
    bundle: CertificateBundle,
    names: Sequence[str] | None,
    now: datetime.datetime,
    skew: datetime.timedelta = DEFAULT_SKEW,
    allow_expired: bool = False,
) -> list[x509.Certificate]:
    """Check a bundle is fit to serve; return its parsed chain or raise BundleError saying why.

    Checks: the key parses and matches the leaf (:func:`check_key_matches`); the leaf is an
    end-entity certificate for TLS servers (:func:`check_leaf_usage`); each certificate
    is signed by the next one (complete, in order; :func:`check_chain_order`); the leaf covers
    every name in ``names``; notBefore is not beyond ``now + skew``; and, unless
    ``allow_expired``, notAfter is after ``now``.

    The first three checks are done once per pair of bytes in a process (see
    :class:`_VerifiedPairs`); the names and dates on every call.
    """
    chain = parse_chain(bundle.chain_pem)
    leaf = chain[0]
    digest = _verified.digest(bundle.chain_pem, bundle.key_pem)
    if digest not in _verified:
        check_key_matches(bundle.key_pem, leaf)
        check_leaf_usage(leaf)
        check_chain_order(chain)
        _verified.add(digest)
    if names:
        have = certificate_names(leaf)
        missing = [n for n in names if not any(name_matches(p, n) for p in have)]
        if missing:
            raise BundleError(
                f"certificate does not cover {', '.join(missing)} (it covers {', '.join(have)})"
            )
    if not_before(leaf) > now + skew:
        raise BundleError(f"certificate is not valid before {not_before(leaf).isoformat()}")
    if not allow_expired and not_after(leaf) <= now:
        raise BundleError(f"certificate expired at {not_after(leaf).isoformat()}")
    return chain


def make_placeholder_bundle(
    names: Sequence[str],
    now: datetime.datetime,
    lifetime: datetime.timedelta = PLACEHOLDER_LIFETIME,
    key_type: str = "ecdsa-p256",
) -> CertificateBundle:
    """A self-signed, clearly labelled stand-in so a homeserver can start before issuance."""
    key_pem = generate_private_key_pem(key_type)
    key = load_private_key(key_pem)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, names[0]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, PLACEHOLDER_ORG),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + lifetime)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(key, _hash_for(key))  # type: ignore[arg-type]
    )
    return CertificateBundle(
        key_pem=key_pem,
        chain_pem=cert.public_bytes(serialization.Encoding.PEM),
        metadata={"names": list(names), "placeholder": True, "issued_at": now.isoformat()},
    )


def _hash_for(key: object) -> hashes.HashAlgorithm:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def is_placeholder(cert: x509.Certificate) -> bool:
    """True for certificates made by :func:`make_placeholder_bundle`."""
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return any(a.value == PLACEHOLDER_ORG for a in orgs)


def now_from_clock(clock: IReactorTime) -> datetime.datetime:
    """The clock's current time as an aware UTC datetime (the only way library code reads time)."""
    return datetime.datetime.fromtimestamp(clock.seconds(), tz=datetime.timezone.utc)


__all__ = [
    "DEFAULT_SKEW",
    "KEY_TYPES",
    "PLACEHOLDER_LIFETIME",
    "canonical_chain_pem",
    "certificate_names",
    "check_chain_order",
    "check_key_matches",
    "forget_verified",
    "generate_private_key_pem",
    "is_placeholder",
    "is_verified_pair",
    "load_private_key",
    "make_placeholder_bundle",
    "name_matches",
    "not_after",
    "not_before",
    "now_from_clock",
    "parse_chain",
    "validate_bundle",
]
