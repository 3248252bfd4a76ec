"""The hot-swapping, SNI-selecting TLS connection creator.

The handshake path only looks a name up in an immutable in-memory snapshot (no disk I/O, no
context building, no locks but the one ordering the parsed-certificate cache: it may run on
any thread). Installing a certificate validates it and publishes a new snapshot in one
assignment, so a connection keeps the snapshot it was created with and every later connection
sees the new one. A swap copies only what changed (:class:`_Layered`), not the whole map.

Many certificates stay cheap: contexts are shared, one per CA chain and key type, and carry no
certificate of their own; a connection for another name than the default's gets its leaf and
key set on it in the SNI callback, from OpenSSL objects parsed once (at installation, by the
background warm-up or by the first handshake that needs them) and kept in a bounded LRU cache
(:class:`_MaterialCache`). The default certificate has a context of its own, built a reactor
turn after it changes (until then it is set on each connection as it is created). Leaf and key
are always parsed and set together from one installed bundle, so a handshake never mixes two.

Use it wherever Twisted takes a TLS context factory::

    tls = HotSwapTLS(clock=reactor, default_key="example.com")
    tls.set_bundle("example.com", bundle)
    reactor.listenSSL(8448, site, tls)                              # or
    tls_server_endpoint(reactor, "tcp:8448", tls).listen(site)     # or
    TLSMemoryBIOFactory(tls, False, site)

and subscribe it to the provisioning service (it is an ``ICertificateConsumer``) so renewals
reach every listener without a restart.

It also answers ``tls-alpn-01`` (RFC 8737) for the names given to :meth:`HotSwapTLS.set_challenge`
(by :class:`synapse_acme.tlsalpn01.TLSALPN01Responder`): a connection whose SNI names such a name
starts on a per-challenge context that serves the name's normal certificate, and whose ALPN
callback (OpenSSL runs it after the SNI callback and before it picks the certificate to send)
swaps in the validation certificate only when the client offers ``acme-tls/1`` and nothing else.
A client offering other protocols, or none, gets the normal certificate. With no challenge
pending the handshake path is the one without challenges.
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import PublicKeyAlgorithmOID
from OpenSSL import SSL
from OpenSSL._util import exception_from_error_queue, ffi, lib
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLServerConnectionCreator,
    IProtocolNegotiationFactory,
    IReactorTime,
)
from zope.interface import implementer

from synapse_acme import crypto
from synapse_acme.acme.tlsalpn import ALPN_PROTOCOL
from synapse_acme.errors import BundleError
from synapse_acme.interfaces import ICertificateBatchConsumer
from synapse_acme.model import CertificateBundle

log = logging.getLogger(__name__)

DEFAULT_ALPN: tuple[bytes, ...] = (b"h2", b"http/1.1")

# Mozilla "intermediate" TLS 1.2 suites (server-side TLS guidelines v5.7) without the DHE ones:
# forward secret (ECDHE) and AEAD (GCM, ChaCha20-Poly1305) only, so no DH parameter file is
# needed. TLS 1.3 suites are all ECDHE + AEAD; OpenSSL's default list for them is kept.
INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)

# Key exchange groups, Mozilla "intermediate": X25519, P-256, P-384 (and the post-quantum hybrid
# where this OpenSSL has it). OpenSSL's default list would also offer x448, P-521 and the
# finite-field ffdhe groups in TLS 1.3.
GROUPS_PREFERRED = b"X25519MLKEM768:X25519:P-256:P-384"
GROUPS_FALLBACK = b"X25519:P-256:P-384"

# How many certificates stay parsed for OpenSSL, about 7 KiB each (70 MiB when full). Beyond that
# the least recently used is dropped and parsed again on its next handshake (about 0.1 ms).
DEFAULT_CACHE_SIZE = 10_000

# Identifies our session cache; any constant works, it only has to be set (OpenSSL refuses to
# resume sessions without one when client certificates are ever involved).
_SESSION_ID_CONTEXT = b"synapse-acme"


def _alpn_selector(
    protocols: tuple[bytes, ...],
) -> Callable[[SSL.Connection, list[bytes]], bytes | object]:
    """Our preference order wins; no overlap means "no ALPN", not a failed handshake.

    If the wrapped protocol factory says what it speaks (``IProtocolNegotiationFactory``, as
    ``twisted.web.server.Site`` does: ``h2`` only when the ``h2`` library is installed), only
    protocols in both lists are chosen, so a client is never talked into HTTP/2 that the
    server cannot speak.
    """

    def select(conn: SSL.Connection, offered: list[bytes]) -> bytes | object:
        allowed = protocols
        tls_protocol = conn.get_app_data()  # set by TLSMemoryBIOFactory
        wrapped = getattr(getattr(tls_protocol, "factory", None), "wrappedFactory", None)
        negotiation = IProtocolNegotiationFactory(wrapped, None)
        while negotiation is None and hasattr(wrapped, "wrappedFactory"):
            wrapped = wrapped.wrappedFactory  # through wrappers (the handshake deadline)
            negotiation = IProtocolNegotiationFactory(wrapped, None)
        if negotiation is not None:
            speakable = set(negotiation.acceptableProtocols())
            allowed = tuple(p for p in protocols if p in speakable)
        for proto in allowed:
            if proto in offered:
                return proto
        return SSL.NO_OVERLAPPING_PROTOCOLS

    return select


AlpnSelector = Callable[[SSL.Connection, list[bytes]], bytes | object]


def _challenge_selector(normal: AlpnSelector | None, challenge: _Challenge) -> AlpnSelector:
    """RFC 8737 section 3: the validation certificate for a client offering only
    ``acme-tls/1``; every other client gets the ``normal`` choice (and keeps the normal
    certificate the context was built with)."""

    def select(conn: SSL.Connection, offered: list[bytes]) -> bytes | object:
        if offered == [ALPN_PROTOCOL]:
            # Still allowed here: OpenSSL chooses the certificate to send after ALPN.
            conn.use_certificate(challenge.certificate)
            conn.use_privatekey(challenge.key)  # type: ignore[arg-type]
            log.debug("TLS: answered a tls-alpn-01 validation for %s", challenge.name)
            return ALPN_PROTOCOL
        if normal is None:
            return SSL.NO_OVERLAPPING_PROTOCOLS
        return normal(conn, offered)

    return select


def _set_groups(ctx: SSL.Context) -> None:
    """Limit key exchange to the ECDHE groups above (ECDH auto-selection is on by default).

    pyOpenSSL has no public call for this; its cffi binding does. Twisted's CertificateOptions
    pins P-256 alone with set_tmp_ecdh; we deliberately do not. Without the binding, OpenSSL's
    defaults (all forward secret) stay.
    """
    try:
        set_list = lib.SSL_CTX_set1_curves_list
        raw = ctx._context  # type: ignore[attr-defined]
    except AttributeError:
        log.debug("TLS: cannot set key exchange groups; keeping OpenSSL's defaults")
        return
    if set_list(raw, GROUPS_PREFERRED) == 1:
        return
    lib.ERR_clear_error()  # a refused list leaves an error queued that would surface later
    if set_list(raw, GROUPS_FALLBACK) != 1:
        lib.ERR_clear_error()
        log.warning("TLS: OpenSSL refused the key exchange groups; keeping its defaults")


def _base_context(alpn: Sequence[bytes], challenge: _Challenge | None = None) -> SSL.Context:
    """A server context with the modern settings and no certificate yet."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(
        SSL.OP_NO_COMPRESSION  # CRIME
        | SSL.OP_NO_RENEGOTIATION  # client-initiated renegotiation is a DoS lever
        | SSL.OP_SINGLE_ECDH_USE
        # No session resumption at all (docs/how-it-works.md, "TLS sessions"): no tickets,
        # whose keys would outlive certificates and let a session made for one name resume
        # under another, and no server-side session cache.
        | SSL.OP_NO_TICKET
    )
    ctx.set_cipher_list(INTERMEDIATE_CIPHERS.encode("ascii"))
    _set_groups(ctx)
    ctx.set_session_id(_SESSION_ID_CONTEXT)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    selector = _alpn_selector(tuple(alpn)) if alpn else None
    if challenge is not None:
        selector = _challenge_selector(selector, challenge)
    if selector is not None:
        ctx.set_alpn_select_callback(selector)  # type: ignore[arg-type]
    return ctx


def build_context(
    bundle: CertificateBundle,
    alpn: Sequence[bytes] = DEFAULT_ALPN,
    chain: Sequence[x509.Certificate] | None = None,
    challenge: _Challenge | None = None,
) -> SSL.Context:
    """A ready-to-serve context for ``bundle`` (full chain sent, key checked against the leaf).

    ``chain`` is the already-parsed chain if the caller has it. ``challenge``: also answer
    that pending ``tls-alpn-01`` challenge (see :func:`_challenge_selector`). Raises
    BundleError if OpenSSL refuses the key or certificate. Does not check validity dates or
    names: see :func:`synapse_acme.crypto.validate_bundle`.
    """
    certs = list(chain) if chain is not None else crypto.parse_chain(bundle.chain_pem)
    key = crypto.load_private_key(bundle.key_pem)
    ctx = _base_context(alpn, challenge)
    try:
        ctx.use_certificate(certs[0])
        for extra in certs[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(key)  # type: ignore[arg-type]
        ctx.check_privatekey()
    except SSL.Error as e:
        raise BundleError(f"OpenSSL refuses the certificate or key: {e}") from None
    return ctx


def _normalise_sni(server_name: bytes | None) -> str | None:
    if not server_name:
        return None
    try:
        name = server_name.decode("ascii")
    except UnicodeDecodeError:
        return None
    return name.lower().rstrip(".") or None


@attrs.frozen
class _Challenge:
    """A pending ``tls-alpn-01`` challenge: the validation certificate for ``name``."""

    name: str
    certificate: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes = attrs.field(repr=False)


_Chain = tuple[x509.Certificate, ...]  # the certificates sent after a leaf

# OpenSSL's key type (its certificate slot) for a leaf's public key algorithm.
_KEY_KINDS = {
    PublicKeyAlgorithmOID.EC_PUBLIC_KEY: lib.EVP_PKEY_EC,
    PublicKeyAlgorithmOID.RSAES_PKCS1_v1_5: lib.EVP_PKEY_RSA,
}


@attrs.frozen(eq=False)  # compared and hashed by identity: the material cache's key
class _Entry:
    """One installed certificate: what was checked at installation, nothing OpenSSL-side yet."""

    key: str
    bundle: CertificateBundle
    names: tuple[str, ...]  # the leaf's SAN DNS names
    serial: int
    not_after: datetime.datetime
    leaf_der: bytes = attrs.field(repr=False)
    # The certificates sent after the leaf, one tuple shared by every entry with the same
    # chain (see HotSwapTLS._intern).
    intermediates: _Chain = attrs.field(repr=False)


class _Material:
    """What OpenSSL needs to serve one entry: its parsed leaf and key, and the shared context
    that sends the entry's intermediates (see :meth:`HotSwapTLS._chain_context`)."""

    __slots__ = ("context", "key", "leaf")

    def __init__(self, leaf: Any, key: Any, context: SSL.Context) -> None:
        self.leaf = leaf  # X509 *, freed with the object
        self.key = key  # EVP_PKEY *, freed with the object
        self.context = context


def _load_material(
    entry: _Entry,
    chain_context: Callable[[_Chain, int], SSL.Context],
    check: bool = False,
) -> _Material:
    """Parse ``entry``'s leaf and key into OpenSSL objects; BundleError if OpenSSL refuses them.

    This is the only per-certificate OpenSSL work, done on the first handshake that needs the
    certificate, or at installation when it replaces one being served: then with ``check``,
    which also tries the pair on a connection (key match, OpenSSL's security level), so a
    bundle OpenSSL would refuse never replaces a good one. Without ``check`` the handshake
    that needs it finds that out (see ``HotSwapTLS._on_server_name``).
    """
    bio = lib.BIO_new_mem_buf(entry.leaf_der, len(entry.leaf_der))
    try:
        leaf = lib.d2i_X509_bio(bio, ffi.NULL)
    finally:
        lib.BIO_free(bio)
    pem = entry.bundle.key_pem
    bio = lib.BIO_new_mem_buf(pem, len(pem))
    try:
        key = lib.PEM_read_bio_PrivateKey(bio, ffi.NULL, ffi.NULL, ffi.NULL)
    finally:
        lib.BIO_free(bio)
    if leaf == ffi.NULL or key == ffi.NULL:
        lib.ERR_clear_error()
        if leaf != ffi.NULL:
            lib.X509_free(leaf)
        if key != ffi.NULL:
            lib.EVP_PKEY_free(key)
        raise BundleError("OpenSSL refuses the certificate or key: it does not parse")
    material = _Material(
        ffi.gc(leaf, lib.X509_free),
        ffi.gc(key, lib.EVP_PKEY_free),
        chain_context(entry.intermediates, lib.EVP_PKEY_id(key)),
    )
    if check:
        try:
            _use(SSL.Connection(material.context, None), material)
        except SSL.Error as e:
            raise BundleError(f"OpenSSL refuses the certificate or key: {e}") from None
    return material


def _use(conn: SSL.Connection, material: _Material) -> None:
    """Make ``conn`` serve ``material``'s certificate and key (SSL.Error if OpenSSL refuses).

    The connection's context must be ``material.context`` or one for the same chain and key
    type: then the leaf and key replace the ones in their slot together, so no other
    certificate stays behind for OpenSSL to pick.
    """
    ssl = conn._ssl  # type: ignore[attr-defined]
    if lib.SSL_use_certificate(ssl, material.leaf) != 1 or (
        lib.SSL_use_PrivateKey(ssl, material.key) != 1
    ):
        exception_from_error_queue(SSL.Error)  # raises it, with OpenSSL's reasons


class _MaterialCache:
    """The parsed certificates, least recently used first, at most ``size`` of them.

    Keyed by entry (identity): a swap brings a new entry, so a cached pair can never be served
    for another bundle than the one it was parsed from. ``None`` caches a refusal (logged
    once). The lock guards the order only: parsing happens outside it.
    """

    def __init__(self, size: int, load: Callable[[_Entry], _Material]) -> None:
        self.size = size
        self._load = load
        self._items: OrderedDict[_Entry, _Material | None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, entry: _Entry) -> bool:
        return entry in self._items

    def get(self, entry: _Entry) -> _Material | None:
        with self._lock:
            material = self._items.get(entry, _MISSING)
            if material is not _MISSING:
                self._items.move_to_end(entry)
                return material  # type: ignore[return-value]
        try:
            material = self._load(entry)
        except BundleError as e:
            self.refuse(entry, e)
            return None
        self.put(entry, material)
        return material

    def refuse(self, entry: _Entry, reason: Exception) -> None:
        """Remember (and say, once) that OpenSSL will not serve ``entry``."""
        log.error(
            "TLS: cannot serve the certificate for %s (serial %x): %s; its names get the "
            "default certificate",
            entry.key,
            entry.serial,
            reason,
        )
        self.put(entry, None)

    def put(self, entry: _Entry, material: _Material | None) -> None:
        with self._lock:
            self._items[entry] = material
            self._items.move_to_end(entry)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def discard(self, entry: _Entry) -> None:
        with self._lock:
            self._items.pop(entry, None)


_MISSING: Any = object()

# Certificates parsed per reactor turn by the background warm-up (about 0.1 ms each).
_WARM_SLICE = 32

# How many changed names a _Layered map keeps beside its shared base before folding them in.
# A swap copies at most this many (not the whole map); one swap in this many copies the base.
_OVERLAY_MAX = 256


@attrs.frozen
class _Layered:
    """A persistent name -> entry map: a base dict that is never changed once published, plus
    a small overlay of later changes (``None``: removed). :meth:`updated` returns a new map
    and leaves this one as it was, so a connection pinned to an older snapshot keeps its view
    while a swap costs O(changes), not O(certificates)."""

    base: Mapping[str, _Entry] = attrs.field(factory=dict)
    overlay: Mapping[str, _Entry | None] = attrs.field(factory=dict)

    def get(self, name: str) -> _Entry | None:
        entry = self.overlay.get(name, _MISSING)
        if entry is _MISSING:
            return self.base.get(name)
        return entry  # type: ignore[no-any-return]

    def updated(self, changes: Mapping[str, _Entry | None]) -> _Layered:
        if not changes:
            return self
        overlay = {**self.overlay, **changes}
        if len(overlay) <= _OVERLAY_MAX:
            return _Layered(self.base, overlay)
        base = dict(self.base)
        for name, entry in overlay.items():
            if entry is None:
                base.pop(name, None)
            else:
                base[name] = entry
        return _Layered(base, {})

    def names(self) -> list[str]:
        merged = {**self.base, **self.overlay}
        return [name for name, entry in merged.items() if entry is not None]


@attrs.frozen(eq=False)
class _Snapshot:
    """What a connection sees, fixed when it is created; a swap publishes a new one.

    The default certificate is in ``dispatch`` itself once its own context is built (in the
    background after the default changes: ``default_set``); until then it is set on each
    connection (from ``default_material``) when it is created. Either way its names never
    switch anything in a handshake.
    """

    exact: _Layered
    wildcard: _Layered  # "b.c" for a "*.b.c" SAN
    default: _Entry | None
    default_material: _Material | None
    # Every connection starts here; with ``sni`` its SNI callback reads this snapshot.
    dispatch: SSL.Context
    sni: bool = False
    default_set: bool = False  # ``dispatch`` holds the default certificate and key
    # name -> a context serving the name's normal certificate that also answers its pending
    # tls-alpn-01 challenge (empty almost always)
    challenges: Mapping[str, SSL.Context] = attrs.field(factory=dict)
    pending: Mapping[str, _Challenge] = attrs.field(factory=dict)

    def lookup(self, name: str) -> _Entry | None:
        """The entry serving ``name``: exact name, then wildcard, else the default."""
        entry = self.exact.get(name)
        if entry is None:
            _, dot, parent = name.partition(".")
            if dot and parent:
                entry = self.wildcard.get(parent)
        return entry or self.default


class _Connection(SSL.Connection):
    """A server connection that remembers the snapshot it was created with."""

    snapshot: _Snapshot


def _split(name: str) -> tuple[bool, str]:
    """(is wildcard, table label): ``*.b.c`` -> (True, "b.c")."""
    return (True, name[2:]) if name.startswith("*.") else (False, name)


@implementer(IOpenSSLServerConnectionCreator, ICertificateBatchConsumer)
@attrs.define(eq=False)
class HotSwapTLS:
    """Serves many certificates by SNI and replaces any of them atomically at run time.

    ``default_key`` names the certificate for clients without SNI or with an unknown name;
    without it (or until it is installed) the first installed certificate is the default.
    ``required_names`` maps a key to the names its certificate must cover; without an entry,
    the bundle's ``metadata["names"]`` are required (if present). ``skew`` tolerates a
    certificate dated slightly in the future. ``on_swap`` is called after each swap that put
    a new certificate in (metrics count them). ``cache_size``: how many certificates stay
    parsed for OpenSSL (least recently used are dropped and parsed again on their next
    handshake). ``warm_up``: after an installation, parse the certificates no handshake has
    needed yet in the background, a slice per reactor turn, until the cache is full, so their
    first handshakes do not pay for it.

    Installing validates a bundle and swaps it in; its OpenSSL objects are made on the first
    handshake that needs them (or at once when it replaces a certificate being served), so
    loading many certificates costs their validation only, and memory stays bounded.
    Changes must come from one thread at a time (the reactor's); handshakes may run anywhere.
    """

    clock: IReactorTime
    default_key: str | None = None
    alpn: Sequence[bytes] = DEFAULT_ALPN
    required_names: Mapping[str, Sequence[str]] | None = None
    skew: datetime.timedelta = crypto.DEFAULT_SKEW
    on_swap: Callable[[], None] | None = attrs.field(default=None, kw_only=True)
    cache_size: int = attrs.field(default=DEFAULT_CACHE_SIZE, kw_only=True)
    warm_up: bool = attrs.field(default=True, kw_only=True)
    _snapshot: _Snapshot = attrs.field(init=False)
    _entries: dict[str, _Entry] = attrs.field(init=False, factory=dict)  # installation order
    _installed: dict[str, int] = attrs.field(init=False, factory=dict)  # key -> sequence
    _sequence: int = attrs.field(init=False, default=0)
    # label -> keys whose certificate covers it (exact names; wildcard parents)
    _exact_by: dict[str, set[str]] = attrs.field(init=False, factory=dict)
    _wildcard_by: dict[str, set[str]] = attrs.field(init=False, factory=dict)
    _materials: _MaterialCache = attrs.field(init=False)
    _chain_contexts: dict[tuple[_Chain, int, bool], SSL.Context] = attrs.field(
        init=False, factory=dict
    )
    _chains: dict[_Chain, _Chain] = attrs.field(init=False, factory=dict)
    _prepared: set[tuple[int, int]] = attrs.field(init=False, factory=set)
    # Installed entries not parsed yet, for the background warm-up (see _warm_some).
    _cold: deque[_Entry] = attrs.field(init=False, factory=deque)
    _warming: IDelayedCall | None = attrs.field(init=False, default=None)
    _dispatching: IDelayedCall | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        if self.cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, not {self.cache_size}")
        self.alpn = tuple(self.alpn)
        self._materials = _MaterialCache(self.cache_size, self._load)
        self._snapshot = _Snapshot(
            exact=_Layered(),
            wildcard=_Layered(),
            default=None,
            default_material=None,
            # Nothing to serve yet: handshakes fail cleanly ("no shared cipher") until a
            # certificate is installed.
            dispatch=_base_context(self.alpn),
        )

    # -- IOpenSSLServerConnectionCreator ------------------------------------------------------

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """A connection bound to the current snapshot: it keeps these certificates even if a
        swap happens before its ClientHello arrives."""
        snapshot = self._snapshot
        conn = _Connection(snapshot.dispatch, None)
        conn.snapshot = snapshot
        if snapshot.default_material is not None and not snapshot.default_set:
            try:
                _use(conn, snapshot.default_material)
            except SSL.Error:  # checked at installation; this handshake fails cleanly
                log.exception("TLS: OpenSSL refused the default certificate on a connection")
        return conn

    def _on_server_name(self, conn: SSL.Connection) -> None:
        # Runs inside OpenSSL: an exception here would only be printed, so never raise.
        snapshot: _Snapshot | None = getattr(conn, "snapshot", None)
        if snapshot is None:
            return
        try:
            name = _normalise_sni(conn.get_servername())
            if name is None:
                return
            challenge = snapshot.challenges.get(name) if snapshot.challenges else None
            if challenge is not None:
                conn.set_context(challenge)
                return
            entry = snapshot.lookup(name)
            if entry is None or entry is snapshot.default:
                return  # the connection already serves the default
            material = self._materials.get(entry)
            if material is None:
                return
            if material.context is not snapshot.dispatch:
                # Also takes the default certificate off the connection.
                conn.set_context(material.context)
            try:
                _use(conn, material)
            except SSL.Error as e:  # a certificate parsed lazily, refused by OpenSSL
                self._materials.refuse(entry, e)
                self._serve_default(conn, snapshot)
        except Exception:
            log.exception("TLS: selecting a certificate by SNI failed; serving the default")
            self._serve_default(conn, snapshot)

    def _serve_default(self, conn: SSL.Connection, snapshot: _Snapshot) -> None:
        try:
            conn.set_context(snapshot.dispatch)
            if snapshot.default_material is not None:
                _use(conn, snapshot.default_material)
        except Exception:
            log.exception("TLS: restoring the default certificate failed")

    # -- ICertificateConsumer -----------------------------------------------------------------

    def certificate_changed(self, key: str, bundle: CertificateBundle) -> None:
        """Install ``bundle`` for ``key``; a bad bundle is logged and the old one keeps serving."""
        try:
            self.set_bundle(key, bundle)
        except BundleError as e:
            current = self._entries.get(key)
            still = (
                f"still serving serial {current.serial:x} (valid until "
                f"{current.not_after.isoformat()})"
                if current is not None
                else "nothing is served for it yet"
            )
            log.error("TLS: refusing the new certificate for %s: %s; %s", key, e, still)
        except Exception:
            log.exception("TLS: unexpected error installing the certificate for %s", key)

    def certificates_loaded(self, bundles: Mapping[str, CertificateBundle]) -> None:
        """Install many bundles with one swap (what the service read from the store at
        start-up): :meth:`set_bundles`, which logs each bad bundle and leaves it out."""
        self.set_bundles(bundles)

    # -- direct use ---------------------------------------------------------------------------

    def set_bundle(
        self, key: str, bundle: CertificateBundle, allow_expired: bool | None = None
    ) -> None:
        """Validate ``bundle`` (also parsing it for OpenSSL, and trying it on a connection) and
        swap it in; BundleError if unusable.

        Expired certificates are refused, except (by default) when nothing is served for
        ``key`` yet: then serving the last known certificate beats serving none (logged loudly).
        """
        entry = self._prepare(key, bundle, allow_expired, eager=True)
        self._apply({key: entry})
        self._swapped()
        self._log_installed(entry)

    def set_bundles(self, bundles: Mapping[str, CertificateBundle]) -> dict[str, BundleError]:
        """Install many bundles with one swap (startup: everything in the store at once).

        Each bundle is checked as by :meth:`set_bundle`; bad ones are logged, left out (the old
        certificate for that key stays) and returned as ``{key: error}``. To keep loading many
        cheap, only a bundle that replaces one being served, or the default's, is parsed for
        OpenSSL here; the others are parsed by the background warm-up or their first
        handshake. The rare bundle that passes the checks but that OpenSSL refuses (say an
        RSA key under OpenSSL's security level) is then logged, and its names get the
        default certificate.
        """
        refused: dict[str, BundleError] = {}
        installed: dict[str, _Entry] = {}
        for key, bundle in bundles.items():
            try:
                # A bundle that replaces one being served (or will be the default) is parsed
                # for OpenSSL at once: a bundle OpenSSL refuses then never replaces a good
                # one. The others wait for the warm-up or their first handshake.
                eager = key in self._entries or key == self.default_key
                entry = self._prepare(key, bundle, None, eager)
            except BundleError as e:
                refused[key] = e
                log.error("TLS: refusing the certificate for %s: %s", key, e)
                continue
            installed[key] = entry
        if installed:
            self._apply(installed)
            self._swapped()
        for entry in installed.values():
            self._log_installed(entry)
        return refused

    def _swapped(self) -> None:
        if self.on_swap is None:
            return
        try:
            self.on_swap()
        except Exception:  # counting never undoes a swap
            log.exception("TLS: the swap observer failed")

    def _prepare(
        self, key: str, bundle: CertificateBundle, allow_expired: bool | None, eager: bool
    ) -> _Entry:
        """Validate ``bundle`` into an entry; with ``eager`` also parse it for OpenSSL now."""
        now = crypto.now_from_clock(self.clock)
        if allow_expired is None:
            allow_expired = key not in self._entries
        chain = crypto.validate_bundle(
            bundle, self._names_for(key, bundle), now, skew=self.skew, allow_expired=allow_expired
        )
        leaf = chain[0]
        entry = _Entry(
            key=key,
            bundle=bundle,
            names=tuple(crypto.certificate_names(leaf)),
            serial=leaf.serial_number,
            not_after=crypto.not_after(leaf),
            leaf_der=leaf.public_bytes(serialization.Encoding.DER),
            intermediates=self._intern(tuple(chain[1:]), leaf),
        )
        if eager:
            self._materials.put(entry, self._load(entry, check=True))
        if entry.not_after <= now:
            log.warning(
                "TLS: serving an EXPIRED certificate for %s (expired %s) until a new one arrives",
                key,
                entry.not_after.isoformat(),
            )
        return entry

    def _intern(self, intermediates: _Chain, leaf: x509.Certificate) -> _Chain:
        """One copy per distinct chain (a CA has a handful), not one per certificate
        (certificates compare and hash by their DER). A chain and key type seen for the first
        time get their context now, so a handshake builds none (short of a key type not
        foreseen here)."""
        interned = self._chains.setdefault(intermediates, intermediates)
        # From the algorithm's OID: cheaper than making the public key again.
        kind = _KEY_KINDS.get(leaf.public_key_algorithm_oid)
        if kind is not None and (id(interned), kind) not in self._prepared:
            self._chain_context(interned, kind, True)
            self._prepared.add((id(interned), kind))  # interned chains live as long as self
        return interned

    def _load(self, entry: _Entry, check: bool = False) -> _Material:
        # The context with the SNI callback: the one connections start on whenever there is
        # more than one certificate, so a name with the default's chain switches nothing.
        return _load_material(
            entry, lambda chain, kind: self._chain_context(chain, kind, True), check
        )

    def _chain_context(
        self, intermediates: _Chain, key_type: int, sni: bool = False
    ) -> SSL.Context:
        """The context (no certificate of its own) that sends ``intermediates`` after the leaf,
        shared by every certificate of that chain and key type (one per CA chain and key
        type, built once). ``sni``: with the SNI callback, for connections to start on."""
        found = self._chain_contexts.get((intermediates, key_type, sni))
        if found is not None:
            return found
        ctx = _base_context(self.alpn)
        try:
            for cert in intermediates:
                ctx.add_extra_chain_cert(cert)
        except (SSL.Error, ValueError) as e:
            raise BundleError(f"OpenSSL refuses the chain: {e}") from None
        if sni:
            ctx.set_tlsext_servername_callback(self._on_server_name)
        return self._chain_contexts.setdefault((intermediates, key_type, sni), ctx)

    def _log_installed(self, entry: _Entry) -> None:
        if entry.bundle.metadata.get("placeholder"):
            log.warning("TLS: serving a self-signed placeholder certificate for %s", entry.key)
        log.info(
            "TLS: now serving certificate serial %x for %s (%s), valid until %s",
            entry.serial,
            entry.key,
            ", ".join(entry.names),
            entry.not_after.isoformat(),
        )

    def remove(self, key: str) -> None:
        """Stop serving the certificate under ``key`` (no error if there is none)."""
        if key in self._entries:
            self._apply({key: None})
            log.info("TLS: no longer serving the certificate for %s", key)

    def _apply(
        self,
        changes: Mapping[str, _Entry | None],
        pending: Mapping[str, _Challenge] | None = None,
    ) -> None:
        """Install (or, for ``None``, remove) entries and publish a new snapshot.

        Costs O(names of the changed entries) plus an occasional fold of the overlay (see
        :class:`_Layered`), never a rebuild of everything.
        """
        old = self._snapshot
        if pending is None:
            pending = old.pending
        touched: dict[bool, set[str]] = {False: set(), True: set()}
        for key, entry in changes.items():
            before = self._entries.get(key)
            if before is not None:
                self._materials.discard(before)
                for name in before.names:
                    wild, label = _split(name)
                    touched[wild].add(label)
                    self._index(wild)[label].discard(key)
            if entry is None:
                self._entries.pop(key, None)
                self._installed.pop(key, None)
                continue
            self._entries[key] = entry  # a replaced key keeps its place
            if self.warm_up and entry not in self._materials:
                self._cold.append(entry)
            if key not in self._installed:
                self._installed[key] = self._sequence
                self._sequence += 1
            for name in entry.names:
                wild, label = _split(name)
                touched[wild].add(label)
                self._index(wild).setdefault(label, set()).add(key)
        exact = old.exact.updated({label: self._winner(False, label) for label in touched[False]})
        wildcard = old.wildcard.updated(
            {label: self._winner(True, label) for label in touched[True]}
        )
        default = self._entries.get(self.default_key) if self.default_key is not None else None
        if default is None and self._entries:
            default = next(iter(self._entries.values()))
        material = old.default_material if default is old.default else None
        if default is not None and material is None:
            # Every connection gets it: tried on a connection first unless a handshake (or
            # the installation) already did.
            if default in self._materials:
                material = self._materials.get(default)
            else:
                material = self._checked(default)
        # Only when some name may need another certificate than the default, or a challenge
        # is pending: with one certificate (most homeservers) every name gets the default
        # anyway, and a handshake then runs no Python at all.
        sni = len(self._entries) > 1 or bool(pending)
        default_set = old.default_set and default is old.default and sni == old.sni
        if default_set:
            dispatch = old.dispatch  # still right: it holds this default, with this callback
        elif material is not None:
            dispatch = self._chain_context(
                default.intermediates,  # type: ignore[union-attr]
                lib.EVP_PKEY_id(material.key),
                sni,
            )
        else:
            dispatch = self._bare_dispatch(sni)
        snapshot = _Snapshot(
            exact=exact,
            wildcard=wildcard,
            default=default,
            default_material=material,
            dispatch=dispatch,
            sni=sni,
            default_set=default_set,
            pending=dict(pending),
        )
        if pending:
            snapshot = attrs.evolve(
                snapshot,
                challenges={n: self._challenge_context(snapshot, c) for n, c in pending.items()},
            )
        self._snapshot = snapshot
        self._schedule_warm_up()
        self._schedule_dispatch()

    def _schedule_dispatch(self) -> None:
        snapshot = self._snapshot
        if snapshot.default_material is None or snapshot.default_set or self._dispatching:
            return
        self._dispatching = self.clock.callLater(0, self._build_dispatch)

    def _build_dispatch(self) -> None:
        """Give the default certificate a context of its own to start connections on, so
        creating a connection sets nothing on it (about 3% of a full handshake's server CPU).
        Built after the swap, not in it: a swap of the default stays cheap."""
        self._dispatching = None
        snapshot = self._snapshot
        if snapshot.default is None or snapshot.default_set or snapshot.default_material is None:
            return
        try:
            ctx = build_context(snapshot.default.bundle, self.alpn)
        except BundleError as e:  # parsed and tried already: not expected
            log.warning("TLS: keeping the default certificate set per connection: %s", e)
            return
        if snapshot.sni:
            ctx.set_tlsext_servername_callback(self._on_server_name)
        if self._snapshot is snapshot:
            self._snapshot = attrs.evolve(snapshot, dispatch=ctx, default_set=True)
        else:  # changed meanwhile
            self._schedule_dispatch()

    def _checked(self, entry: _Entry) -> _Material | None:
        """Parse ``entry`` and try it on a connection; cache the outcome."""
        try:
            material = self._load(entry, check=True)
        except BundleError as e:
            self._materials.refuse(entry, e)
            return None
        self._materials.put(entry, material)
        return material

    def _schedule_warm_up(self) -> None:
        if self.warm_up and self._cold and self._warming is None:
            self._warming = self.clock.callLater(0, self._warm_some)

    def _warm_some(self) -> None:
        """Parse a slice of the installed certificates no handshake has needed yet (about
        3 ms of the reactor's time), then yield to it; stop when the cache is full."""
        self._warming = None
        done = 0
        while self._cold and done < _WARM_SLICE:
            if len(self._materials) >= self._materials.size:
                self._cold.clear()
                return
            entry = self._cold.popleft()
            if self._entries.get(entry.key) is entry and entry not in self._materials:
                self._checked(entry)
                done += 1
        self._schedule_warm_up()

    def _index(self, wild: bool) -> dict[str, set[str]]:
        return self._wildcard_by if wild else self._exact_by

    def _winner(self, wild: bool, label: str) -> _Entry | None:
        # Where two certificates cover a name, the one valid longest wins (a fresh renewal
        # beats a stale certificate still installed under another key); ties go to the
        # earlier installed.
        keys = self._index(wild).get(label)
        if not keys:
            self._index(wild).pop(label, None)
            return None
        best = max(keys, key=lambda k: (self._entries[k].not_after, -self._installed[k]))
        return self._entries[best]

    def _bare_dispatch(self, sni: bool) -> SSL.Context:
        """A context without any certificate (nothing installed, or the default refused)."""
        return self._chain_context((), -1, sni)

    def _challenge_context(self, snapshot: _Snapshot, challenge: _Challenge) -> SSL.Context:
        # Built like the name's normal context, so a client that is not validating gets
        # exactly what it would get without the challenge.
        entry = snapshot.lookup(challenge.name)
        if entry is not None:
            return build_context(entry.bundle, self.alpn, challenge=challenge)
        # Nothing to serve yet (the first issuance, no placeholder). OpenSSL refuses a
        # handshake on a context without a certificate before ALPN runs, so this one holds the
        # validation certificate: other clients get it instead of a failed handshake, and
        # trust it no more than they would trust nothing.
        ctx = _base_context(self.alpn, challenge)
        ctx.use_certificate(challenge.certificate)
        ctx.use_privatekey(challenge.key)  # type: ignore[arg-type]
        return ctx

    # -- tls-alpn-01 --------------------------------------------------------------------------

    def set_challenge(
        self, name: str, certificate: x509.Certificate, key: CertificateIssuerPrivateKeyTypes
    ) -> None:
        """Answer a handshake for ``name`` offering only ``acme-tls/1`` with ``certificate``
        (the RFC 8737 validation certificate, see :mod:`synapse_acme.acme.tlsalpn`) until
        :meth:`remove_challenge`; replaces an earlier one for ``name``."""
        name = name.lower().rstrip(".")
        pending = dict(self._snapshot.pending)
        pending[name] = _Challenge(name=name, certificate=certificate, key=key)
        self._apply({}, pending)

    def remove_challenge(self, name: str) -> None:
        """Stop answering ``tls-alpn-01`` for ``name`` (no error if nothing is pending)."""
        name = name.lower().rstrip(".")
        if name in self._snapshot.pending:
            pending = {k: c for k, c in self._snapshot.pending.items() if k != name}
            self._apply({}, pending)

    def challenge_names(self) -> list[str]:
        """The names with a pending ``tls-alpn-01`` challenge, sorted."""
        return sorted(self._snapshot.pending)

    def keys(self) -> list[str]:
        """The keys with an installed certificate, in installation order."""
        return list(self._entries)

    def names(self) -> list[str]:
        """Every name (``*.x`` for wildcards) some installed certificate answers, sorted."""
        snap = self._snapshot
        return sorted([*snap.exact.names(), *(f"*.{w}" for w in snap.wildcard.names())])

    def current(self, key: str) -> CertificateBundle | None:
        """The bundle being served for ``key``, or ``None``."""
        entry = self._entries.get(key)
        return entry.bundle if entry is not None else None

    def serial(self, key: str) -> int | None:
        """The serial number of the certificate served for ``key``, or ``None``."""
        entry = self._entries.get(key)
        return entry.serial if entry is not None else None

    def default(self) -> str | None:
        """The key of the certificate clients without SNI get, or ``None`` if nothing is served."""
        entry = self._snapshot.default
        return entry.key if entry is not None else None

    def _names_for(self, key: str, bundle: CertificateBundle) -> Sequence[str] | None:
        if self.required_names is not None and key in self.required_names:
            return list(self.required_names[key])
        names = bundle.metadata.get("names")
        if isinstance(names, Iterable) and not isinstance(names, (str, bytes)):
            return [str(n) for n in names]
        return None


__all__ = [
    "DEFAULT_ALPN",
    "DEFAULT_CACHE_SIZE",
    "INTERMEDIATE_CIPHERS",
    "HotSwapTLS",
    "build_context",
]
