"""Which roots an issued certificate must chain to, and the check that it does.

A CA's answer is only served once its chain reaches a root that clients trust: the system's
trust store (what federation peers and browsers use), plus roots the operator names for a private
CA (``acme.issuer_roots``; the roots in ``acme.ca_bundle`` count too, since a private CA such as
step-ca serves its API under the same root it issues from). A leaf without its intermediate, one
signed by an unknown root, or a chain that only a configured intermediate would complete is
refused, and the last good certificate keeps serving.

The roots are read once, when :func:`load_issuer_trust` runs at start (a TLS client does the
same); the check itself is pure: the chain, a name and the time come in as arguments.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import ssl
import warnings
from collections.abc import Iterable, Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from synapse_acme import fsutil
from synapse_acme.errors import BundleError, ConfigError, StoreError

logger = logging.getLogger(__name__)

_PEM_BLOCK = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)
# The system bundle on Debian is ~200 KiB; a file 50 times that is not a trust store.
_MAX_ROOTS_FILE = 10 * 1024 * 1024
_SHA256 = hashes.SHA256()


@attrs.frozen
class IssuerTrust:
    """The roots issued chains must reach. ``sources`` says where they came from (for messages).

    Build it with :func:`load_issuer_trust`; tests may build one from their CA's roots.
    """

    roots: tuple[x509.Certificate, ...] = attrs.field(repr=False)
    sources: tuple[str, ...] = ()
    _store: Store = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        # Only self-issued certificates anchor a chain: a configured intermediate must not
        # excuse a CA that serves a leaf without it (clients that know only the root fail).
        anchors = [r for r in self.roots if is_root(r)]
        if not anchors:
            raise ValueError("IssuerTrust needs at least one root (self-issued) certificate")
        object.__setattr__(self, "_store", Store(anchors))

    def check(self, chain: Sequence[x509.Certificate], name: str, now: datetime.datetime) -> None:
        """BundleError unless ``chain`` (leaf first, then what the CA sent with it) builds a
        path to one of :attr:`roots` valid at ``now`` for ``name`` (RFC 5280 path building and
        the server-authentication policy). Only the chain's own certificates may be used as
        intermediates, so a missing intermediate is an error even if a client could fetch it.
        """
        leaf, intermediates = chain[0], list(chain[1:])
        # A wildcard is not a reference identity: check a name it covers instead.
        reference = "synapse-acme-check" + name[1:] if name.startswith("*.") else name
        subject: x509.GeneralName
        try:
            subject = x509.IPAddress(ipaddress.ip_address(reference))
        except ValueError:
            subject = x509.DNSName(reference)
        verifier = PolicyBuilder().store(self._store).time(now).build_server_verifier(subject)
        try:
            verifier.verify(leaf, intermediates)
        except VerificationError as e:
            where = " and ".join(self.sources) or "the configured roots"
            hint = ""
            if len(chain) == 1:
                hint = " (the CA sent the certificate without any intermediate)"
            raise BundleError(
                f"the chain does not reach a trusted root ({where}){hint}: {e}"
            ) from None


def is_root(cert: x509.Certificate) -> bool:
    """A root: a self-issued certificate (subject and issuer are the same name).

    Names encoded byte for byte alike are the same name, and that settles it without building
    the Name objects (a system store has ~150 roots to check at every start); any other pair
    is compared as Names, so a root whose two names differ only in encoding still counts.
    """
    raw = _raw_issuer_and_subject(cert.tbs_certificate_bytes)
    if raw is not None and raw[0] == raw[1]:
        return True
    return cert.subject == cert.issuer


def _der_element(data: bytes, at: int) -> tuple[int, int]:
    """(start of the next element, end of the element at ``at``) in DER ``data``: the
    element's tag, length and content; ValueError when it runs past the end."""
    if at + 2 > len(data):
        raise ValueError("truncated")
    first = data[at + 1]
    start = at + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or start + count > len(data):
            raise ValueError("bad length")
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    if start + length > len(data):
        raise ValueError("truncated")
    return start, start + length


def _raw_issuer_and_subject(tbs: bytes) -> tuple[bytes, bytes] | None:
    """The DER of the issuer and subject Names in a TBSCertificate (RFC 5280 section 4.1:
    [0] version, serialNumber, signature, issuer, validity, subject, ...); None if the
    bytes do not have that shape (the caller then compares parsed Names)."""
    try:
        content, _ = _der_element(tbs, 0)  # the TBSCertificate SEQUENCE
        fields: list[bytes] = []
        at = content
        while len(fields) < 6:
            _, end = _der_element(tbs, at)
            fields.append(tbs[at:end])
            at = end
    except (ValueError, IndexError):
        return None
    if not fields or fields[0][:1] != b"\xa0":  # no explicit version: a v1 certificate
        fields.insert(0, b"")
    return fields[3], fields[5]


def load_pem_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate in PEM ``data`` that parses (a system bundle may hold one that an
    older or stricter parser rejects; it is skipped, not fatal)."""
    out = []
    with warnings.catch_warnings():  # e.g. a root with a negative serial: a warning per start
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        # The whole file in one call first (the system bundle: a few ms; block by block, as
        # below, takes ten times that at every start). It fails whole on one bad block, and
        # also reads labels the blocks below do not: then block by block it is.
        try:
            everything = x509.load_pem_x509_certificates(data)
        except ValueError:
            everything = []
        if everything and len(everything) == data.count(b"-----BEGIN CERTIFICATE-----"):
            return everything
        for match in _PEM_BLOCK.finditer(data):
            try:
                out.append(x509.load_pem_x509_certificate(match.group(0)))
            except ValueError:
                continue
    return out


def system_roots() -> tuple[list[x509.Certificate], str | None]:
    """The system trust store (OpenSSL's default paths, honouring ``SSL_CERT_FILE`` and
    ``SSL_CERT_DIR``) and where it was found; ``([], None)`` when there is none."""
    paths = ssl.get_default_verify_paths()
    if paths.cafile:
        data = _read(paths.cafile)
        if data is not None:
            return load_pem_certificates(data), paths.cafile
    if paths.capath and os.path.isdir(paths.capath):
        roots: dict[bytes, x509.Certificate] = {}
        for entry in sorted(os.listdir(paths.capath)):
            data = _read(os.path.join(paths.capath, entry))
            for cert in load_pem_certificates(data or b""):
                roots.setdefault(cert.fingerprint(_SHA256), cert)
        if roots:
            return list(roots.values()), paths.capath
    return [], None


def load_issuer_trust(files: Iterable[tuple[str, str]], *, use_system: bool = True) -> IssuerTrust:
    """The trust for issued chains: the system store (unless ``use_system`` is false) plus the
    certificates in each ``(config key, path)`` of ``files``. ConfigError naming the key when a
    file cannot be read or holds no certificate, or when there is no root at all."""
    roots: list[x509.Certificate] = []
    sources: list[str] = []
    if use_system:
        found, where = system_roots()
        if found:
            roots.extend(found)
            sources.append(f"the system trust store {where}")
    for key, path in files:
        try:
            data = fsutil.read_regular(path, follow=True, limit=_MAX_ROOTS_FILE)
        except StoreError as e:
            raise ConfigError(key, f"cannot read the roots file: {e}", path) from None
        certs = load_pem_certificates(data or b"")
        if not certs:
            raise ConfigError(key, "expected a PEM file with at least one certificate", path)
        if key.endswith("issuer_roots") and not any(is_root(c) for c in certs):
            raise ConfigError(
                key,
                "expected the CA's root certificate (self-signed); this file holds only "
                "intermediates, which the CA must send with each certificate instead",
                path,
            )
        roots.extend(certs)
        sources.append(f"{key} {path}")
    if not roots:
        raise ConfigError(
            "acme.issuer_roots",
            "no trusted root to check issued certificates against: the system trust store is "
            "empty or missing (install ca-certificates) and no issuer_roots file is set",
            has_value=False,
        )
    logger.debug("Issued certificates must chain to %d roots from %s", len(roots), sources)
    return IssuerTrust(tuple(roots), tuple(sources))


def _read(path: str) -> bytes | None:
    try:
        return fsutil.read_regular(path, follow=True, limit=_MAX_ROOTS_FILE)
    except StoreError:
        return None


__all__ = ["IssuerTrust", "is_root", "load_issuer_trust", "load_pem_certificates", "system_roots"]
