"""The hot-swapping, SNI-selecting TLS connection creator.

Every certificate gets one prebuilt :class:`OpenSSL.SSL.Context` when it is installed; the
handshake path only looks a name up in an immutable in-memory snapshot (no disk I/O, no context
building, no locks: everything runs on the reactor thread). Installing a certificate validates it
first, builds its context, then replaces the whole snapshot in one assignment, so a connection
keeps the snapshot it was created with and every later connection sees the new one.

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
from collections.abc import Callable, Iterable, Mapping, Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from OpenSSL import SSL
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IProtocolNegotiationFactory,
    IReactorTime,
)
from zope.interface import implementer

from synapse_acme import crypto
from synapse_acme.acme.tlsalpn import ALPN_PROTOCOL
from synapse_acme.errors import BundleError
from synapse_acme.interfaces import ICertificateConsumer
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
        from OpenSSL._util import lib

        set_list = lib.SSL_CTX_set1_curves_list
        raw = ctx._context  # type: ignore[attr-defined]
    except (ImportError, AttributeError):
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


@attrs.frozen
class _Entry:
    """One installed certificate and its prebuilt context."""

    key: str
    bundle: CertificateBundle
    context: SSL.Context
    names: tuple[str, ...]  # the leaf's SAN DNS names
    serial: int
    not_after: datetime.datetime


@attrs.frozen
class _Snapshot:
    """Immutable lookup tables; a new one replaces the old on every change."""

    entries: Mapping[str, _Entry]  # key -> entry, in installation order
    # The default certificate's names map to ``dispatch`` itself (it serves that certificate),
    # so its handshakes never switch context.
    exact: Mapping[str, SSL.Context]
    wildcard: Mapping[str, SSL.Context]  # "b.c" for a "*.b.c" SAN
    default: _Entry | None
    dispatch: SSL.Context  # every connection starts here; its SNI callback reads this snapshot
    # name -> a context serving the name's normal certificate that also answers its pending
    # tls-alpn-01 challenge (empty almost always)
    challenges: Mapping[str, SSL.Context] = attrs.field(factory=dict)
    pending: Mapping[str, _Challenge] = attrs.field(factory=dict)

    def lookup(self, name: str | None) -> SSL.Context | None:
        """Pending challenge, exact name, then wildcard, else ``None`` (keep the default).

        ``dispatch`` also means "keep the default": the connection already has it."""
        if name is None:
            return None
        ctx = self.challenges.get(name) or self.exact.get(name)
        if ctx is None:
            _, dot, parent = name.partition(".")
            if dot and parent:
                ctx = self.wildcard.get(parent)
        return ctx


def _build_snapshot(
    entries: Mapping[str, _Entry],
    default_key: str | None,
    alpn: Sequence[bytes],
    pending: Mapping[str, _Challenge] | None = None,
) -> _Snapshot:
    # Where two certificates cover a name, the one valid longest wins (a fresh renewal beats a
    # stale certificate still installed under another key); ties go to the earlier installed.
    exact: dict[str, _Entry] = {}
    wildcard: dict[str, _Entry] = {}
    for entry in entries.values():
        for name in entry.names:
            table, label = (wildcard, name[2:]) if name.startswith("*.") else (exact, name)
            held = table.get(label)
            if held is None or entry.not_after > held.not_after:
                table[label] = entry
    default: _Entry | None = None
    if default_key is not None:
        default = entries.get(default_key)
    if default is None and entries:
        default = next(iter(entries.values()))
    if default is not None:
        dispatch = build_context(default.bundle, alpn)
    else:
        # Nothing to serve yet: handshakes fail cleanly ("no shared cipher") until a certificate
        # is installed.
        dispatch = _base_context(alpn)

    def context(entry: _Entry) -> SSL.Context:
        # Switching contexts in a handshake is not free (OpenSSL copies the certificate
        # settings over), and dispatch already serves the default certificate.
        return dispatch if entry is default else entry.context

    def normal_entry(name: str) -> _Entry | None:
        _, dot, parent = name.partition(".")
        found = exact.get(name) or (wildcard.get(parent) if dot else None)
        return found or default

    def challenge_context(challenge: _Challenge) -> SSL.Context:
        # Built like the name's normal context, so a client that is not validating gets
        # exactly what it would get without the challenge.
        entry = normal_entry(challenge.name)
        if entry is not None:
            return build_context(entry.bundle, alpn, challenge=challenge)
        # Nothing to serve yet (the first issuance, no placeholder). OpenSSL refuses a
        # handshake on a context without a certificate before ALPN runs, so this one holds the
        # validation certificate: other clients get it instead of a failed handshake, and
        # trust it no more than they would trust nothing.
        ctx = _base_context(alpn, challenge)
        ctx.use_certificate(challenge.certificate)
        ctx.use_privatekey(challenge.key)  # type: ignore[arg-type]
        return ctx

    pending = dict(pending or {})
    snapshot = _Snapshot(
        entries=dict(entries),
        exact={k: context(e) for k, e in exact.items()},
        wildcard={k: context(e) for k, e in wildcard.items()},
        default=default,
        dispatch=dispatch,
        challenges={name: challenge_context(c) for name, c in pending.items()},
        pending=pending,
    )
    # Only when some name needs another certificate than the default, or has a challenge
    # pending: with one certificate (most homeservers) every name gets the default anyway, and
    # a handshake then runs no Python at all.
    if snapshot.challenges or any(
        ctx is not dispatch for ctx in (*snapshot.exact.values(), *snapshot.wildcard.values())
    ):
        dispatch.set_tlsext_servername_callback(_sni_callback(snapshot))
    return snapshot


def _sni_callback(snapshot: _Snapshot) -> Callable[[SSL.Connection], None]:
    def on_server_name(conn: SSL.Connection) -> None:
        # Runs inside OpenSSL: an exception here would only be printed, so never raise.
        try:
            ctx = snapshot.lookup(_normalise_sni(conn.get_servername()))
            if ctx is not None and ctx is not snapshot.dispatch:
                conn.set_context(ctx)
        except Exception:
            log.exception("TLS: selecting a certificate by SNI failed; serving the default")

    return on_server_name


@implementer(IOpenSSLServerConnectionCreator, ICertificateConsumer)
@attrs.define(eq=False)
class HotSwapTLS:
    """Serves many certificates by SNI and replaces any of them atomically at run time.

    ``default_key`` names the certificate for clients without SNI or with an unknown name;
    without it (or until it is installed) the first installed certificate is the default.
    ``required_names`` maps a key to the names its certificate must cover; without an entry,
    the bundle's ``metadata["names"]`` are required (if present). ``skew`` tolerates a
    certificate dated slightly in the future. ``on_swap`` is called after each swap that put
    a new certificate in (metrics count them).
    """

    clock: IReactorTime
    default_key: str | None = None
    alpn: Sequence[bytes] = DEFAULT_ALPN
    required_names: Mapping[str, Sequence[str]] | None = None
    skew: datetime.timedelta = crypto.DEFAULT_SKEW
    on_swap: Callable[[], None] | None = attrs.field(default=None, kw_only=True)
    _snapshot: _Snapshot = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.alpn = tuple(self.alpn)
        self._snapshot = _build_snapshot({}, self.default_key, self.alpn)

    # -- IOpenSSLServerConnectionCreator ------------------------------------------------------

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """A connection bound to the current snapshot: it keeps these certificates even if a
        swap happens before its ClientHello arrives."""
        return SSL.Connection(self._snapshot.dispatch, None)

    # -- ICertificateConsumer -----------------------------------------------------------------

    def certificate_changed(self, key: str, bundle: CertificateBundle) -> None:
        """Install ``bundle`` for ``key``; a bad bundle is logged and the old one keeps serving."""
        try:
            self.set_bundle(key, bundle)
        except BundleError as e:
            current = self._snapshot.entries.get(key)
            still = (
                f"still serving serial {current.serial:x} (valid until "
                f"{current.not_after.isoformat()})"
                if current is not None
                else "nothing is served for it yet"
            )
            log.error("TLS: refusing the new certificate for %s: %s; %s", key, e, still)
        except Exception:
            log.exception("TLS: unexpected error installing the certificate for %s", key)

    # -- direct use ---------------------------------------------------------------------------

    def set_bundle(
        self, key: str, bundle: CertificateBundle, allow_expired: bool | None = None
    ) -> None:
        """Validate ``bundle``, build its context, and swap it in; BundleError if unusable.

        Expired certificates are refused, except (by default) when nothing is served for
        ``key`` yet: then serving the last known certificate beats serving none (logged loudly).
        """
        old = self._snapshot
        entry = self._prepare(key, bundle, allow_expired, old)
        entries = dict(old.entries)
        entries[key] = entry
        self._rebuild(entries)
        self._swapped()
        self._log_installed(entry)

    def set_bundles(self, bundles: Mapping[str, CertificateBundle]) -> dict[str, BundleError]:
        """Install many bundles with one swap (startup: everything in the store at once).

        Each bundle is checked as by :meth:`set_bundle`; bad ones are logged, left out (the old
        certificate for that key stays) and returned as ``{key: error}``.
        """
        old = self._snapshot
        entries = dict(old.entries)
        refused: dict[str, BundleError] = {}
        installed = []
        for key, bundle in bundles.items():
            try:
                entry = self._prepare(key, bundle, None, old)
            except BundleError as e:
                refused[key] = e
                log.error("TLS: refusing the certificate for %s: %s", key, e)
                continue
            entries[key] = entry
            installed.append(entry)
        if installed:
            self._rebuild(entries)
            self._swapped()
        for entry in installed:
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
        self, key: str, bundle: CertificateBundle, allow_expired: bool | None, old: _Snapshot
    ) -> _Entry:
        now = crypto.now_from_clock(self.clock)
        if allow_expired is None:
            allow_expired = key not in old.entries
        chain = crypto.validate_bundle(
            bundle, self._names_for(key, bundle), now, skew=self.skew, allow_expired=allow_expired
        )
        leaf = chain[0]
        entry = _Entry(
            key=key,
            bundle=bundle,
            context=build_context(bundle, self.alpn, chain),
            names=tuple(crypto.certificate_names(leaf)),
            serial=leaf.serial_number,
            not_after=crypto.not_after(leaf),
        )
        if entry.not_after <= now:
            log.warning(
                "TLS: serving an EXPIRED certificate for %s (expired %s) until a new one arrives",
                key,
                entry.not_after.isoformat(),
            )
        return entry

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
        old = self._snapshot
        if key in old.entries:
            entries = {k: e for k, e in old.entries.items() if k != key}
            self._rebuild(entries)
            log.info("TLS: no longer serving the certificate for %s", key)

    def _rebuild(
        self,
        entries: Mapping[str, _Entry],
        pending: Mapping[str, _Challenge] | None = None,
    ) -> None:
        """Swap in a snapshot of ``entries`` and the pending challenges (``pending``, or
        the current ones)."""
        if pending is None:
            pending = self._snapshot.pending
        self._snapshot = _build_snapshot(entries, self.default_key, self.alpn, pending)

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
        self._rebuild(self._snapshot.entries, pending)

    def remove_challenge(self, name: str) -> None:
        """Stop answering ``tls-alpn-01`` for ``name`` (no error if nothing is pending)."""
        name = name.lower().rstrip(".")
        if name in self._snapshot.pending:
            pending = {k: c for k, c in self._snapshot.pending.items() if k != name}
            self._rebuild(self._snapshot.entries, pending)

    def challenge_names(self) -> list[str]:
        """The names with a pending ``tls-alpn-01`` challenge, sorted."""
        return sorted(self._snapshot.pending)

    def keys(self) -> list[str]:
        """The keys with an installed certificate, in installation order."""
        return list(self._snapshot.entries)

    def names(self) -> list[str]:
        """Every name (``*.x`` for wildcards) some installed certificate answers, sorted."""
        snap = self._snapshot
        return sorted([*snap.exact, *(f"*.{w}" for w in snap.wildcard)])

    def current(self, key: str) -> CertificateBundle | None:
        """The bundle being served for ``key``, or ``None``."""
        entry = self._snapshot.entries.get(key)
        return entry.bundle if entry is not None else None

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
    "INTERMEDIATE_CIPHERS",
    "HotSwapTLS",
    "build_context",
]
