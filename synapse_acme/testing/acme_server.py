"""An in-memory ACME server (RFC 8555 + RFC 9773 ARI + profiles) for tests.

Pebble has neither ARI nor profiles and cannot be told to misbehave on cue, so this fake is where
those paths are exercised. It follows txacme's model: the real client talks to
:attr:`FakeAcmeServer.resource` through ``treq.testing.StubTreq`` (or a real ``Site``), and the
server *verifies* every request the way a CA does (JWS signature, nonce, ``url``, ``kid``/``jwk``),
answering with RFC 7807 problem documents. Time comes only from the injected clock.

Faults are planned through :attr:`FakeAcmeServer.faults`; each planned fault fires once (or the
number of times asked) and is then gone, so a test can say "the next finalize fails with 503".

For subprocess tests it also runs as a process over real HTTP(S):
``python -m synapse_acme.testing.acme_server --listen tcp:0:interface=127.0.0.1
[--base-url URL] [--http01-port 5002] [--profile shortlived=518400] ...``
prints ``ready <directory url>`` once listening; without ``--base-url`` the URL is that of the
port it bound (so ``tcp:0`` lets it pick a free one, with no race).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import itertools
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import attrs
import josepy as jose
from acme import challenges, messages
from acme import jws as acme_jws
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from synapse_acme.acme.tlsalpn import TLSALPN01
from synapse_acme.acme.trust import IssuerTrust
from synapse_acme.testing.certificates import ca_certificate

logger = logging.getLogger(__name__)


def _challenge_type(typ: str) -> type[challenges.Challenge]:
    """The message class for ``typ``: certbot's library, plus tls-alpn-01 it no longer has."""
    return TLSALPN01 if typ == TLSALPN01.typ else challenges.Challenge.TYPES[typ]


ERROR_PREFIX = "urn:ietf:params:acme:error:"
JOSE_JSON = "application/jose+json"
PROBLEM_JSON = "application/problem+json"
PEM_CHAIN = "application/pem-certificate-chain"

#: JWS algorithms accepted for account keys (RFC 8555 6.2: no "none", no MAC).
ALLOWED_ALGS: tuple[str, ...] = ("RS256", "ES256", "ES384", "ES512")
_EAB_ALGS = {"HS256": jose.HS256, "HS384": jose.HS384, "HS512": jose.HS512}
_EC_ALG_CURVE = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
# RFC 5280 CRLReason values a subscriber may use; 7 is unassigned, 8 (removeFromCRL) is CRL-only.
# Orders and authorizations live this long (Let's Encrypt: 7 days).
_ORDER_LIFETIME = datetime.timedelta(days=7)
# RFC 9773 4.3.3 suggests clients re-check about every 6 hours.
_DEFAULT_ARI_RETRY_AFTER = 6 * 3600.0
_CA_LIFETIME = datetime.timedelta(days=3650)
_BACKDATE = datetime.timedelta(minutes=1)

PATH_KINDS: tuple[str, ...] = (
    "directory",
    "newNonce",
    "newAccount",
    "newOrder",
    "renewalInfo",
    "account",
    "orders",
    "order",
    "finalize",
    "authz",
    "challenge",
    "certificate",
)

Validator = Callable[[str, str, str], Any]
AriWindow = Callable[[x509.Certificate], tuple[datetime.datetime, datetime.datetime]]


def ari_cert_id(cert: x509.Certificate) -> str:
    """RFC 9773 CertID: base64url(AKI keyIdentifier) "." base64url(DER serial INTEGER bytes)."""
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    if aki.key_identifier is None:
        raise ValueError("certificate has no authority key identifier")
    serial = cert.serial_number
    serial_bytes = serial.to_bytes(math.ceil((serial.bit_length() + 1) / 8), "big", signed=True)
    return f"{_b64(aki.key_identifier)}.{_b64(serial_bytes)}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _now(clock: IReactorTime) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(clock.seconds(), tz=datetime.timezone.utc)


def _problem_type(code_or_type: str) -> str:
    return code_or_type if ":" in code_or_type else ERROR_PREFIX + code_or_type


class _Problem(Exception):
    """Internal: abort a request with an RFC 7807 problem document."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
        subproblems: tuple[messages.Error, ...] = (),
    ):
        super().__init__(detail)
        self.status = status
        self.type = _problem_type(code)
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})
        self.subproblems = subproblems


# --------------------------------------------------------------------------------------------
# State objects (public for assertions; mutate them only through the server)


@attrs.define
class Account:
    """One ACME account as the server knows it."""

    url: str
    jwk: jose.JWK
    contact: tuple[str, ...] = ()
    status: str = "valid"
    terms_of_service_agreed: bool = False
    eab_kid: str | None = None
    order_urls: list[str] = attrs.field(factory=list)


@attrs.define
class Challenge:
    """One challenge of an authorization."""

    url: str
    type: str
    token: bytes
    authz_url: str
    status: str = "pending"
    validated: datetime.datetime | None = None
    error: messages.Error | None = None


@attrs.define
class Authorization:
    """One authorization; ``result`` holds the validation outcome until enough polls have passed."""

    url: str
    account_url: str
    identifier: str
    wildcard: bool
    expires: datetime.datetime
    challenges: list[Challenge] = attrs.field(factory=list)
    status: str = "pending"
    answered: Challenge | None = None
    result: messages.Error | bool | None = None
    polls: int = 0


@attrs.define
class Order:
    """One order; ``identifiers`` are as requested (``*.`` kept for wildcards)."""

    url: str
    account_url: str
    identifiers: tuple[str, ...]
    authz_urls: list[str]
    expires: datetime.datetime
    profile: str | None = None
    replaces: str | None = None
    status: str = "pending"
    error: messages.Error | None = None
    cert_id: str | None = None
    finalize_polls: int = 0

    @property
    def finalize_url(self) -> str:
        return self.url + "/finalize"


@attrs.define
class IssuedCertificate:
    """A certificate the fake CA issued; ``chain_pem`` is what it serves (faults included)."""

    cert_id: str
    url: str
    order_url: str
    account_url: str
    names: tuple[str, ...]
    certificate: x509.Certificate
    chain_pem: bytes
    alternate_chain_pem: bytes


@attrs.define
class RequestRecord:
    """One request the server answered (for assertions on polling behaviour)."""

    time: float
    method: str
    kind: str
    url: str
    status: int


# --------------------------------------------------------------------------------------------
# Fault plan


@attrs.define
class _Fault:
    kind: str  # a PATH_KIND, or "*" for any
    action: str  # "fail" | "garbage"
    remaining: int
    status: int = 500
    problem_type: str = ERROR_PREFIX + "serverInternal"
    detail: str = ""
    retry_after: float | None = None
    body: bytes = b""
    content_type: str = ""


@attrs.define
class FaultPlan:
    """What to break next. Each planned fault fires the given number of times, then is gone."""

    _faults: list[_Fault] = attrs.field(factory=list)
    reject_nonces: int = 0
    wrong_key_certificates: int = 0
    wrong_names_certificates: int = 0
    empty_chains: int = 0
    misordered_chains: int = 0
    ca_leaves: int = 0
    client_auth_leaves: int = 0
    leaf_only_chains: int = 0
    foreign_root_chains: int = 0
    annotated_chains: int = 0
    drop_nonce_headers: int = 0
    fired: list[str] = attrs.field(factory=list)

    def reject_nonce_next(self, n: int = 1) -> None:
        """The next ``n`` signed requests get ``badNonce`` although their nonce is good."""
        self.reject_nonces += n

    def fail_next(
        self,
        kind: str,
        status: int = 500,
        problem_type: str = "serverInternal",
        detail: str = "injected failure",
        retry_after: float | None = None,
        *,
        count: int = 1,
    ) -> None:
        """The next ``count`` requests to ``kind`` (a :data:`PATH_KINDS` entry or ``"*"``)
        get a problem document with ``status``; ``problem_type`` is a code or a full URN."""
        _check_kind(kind)
        self._faults.append(
            _Fault(
                kind,
                "fail",
                count,
                status=status,
                problem_type=_problem_type(problem_type),
                detail=detail,
                retry_after=retry_after,
            )
        )

    def rate_limit(
        self,
        kind: str = "newOrder",
        retry_after: float | None = 3600.0,
        detail: str = "too many certificates already issued (injected)",
        *,
        count: int = 1,
    ) -> None:
        """The next ``count`` requests to ``kind`` get 429 ``rateLimited`` with Retry-After."""
        self.fail_next(kind, 429, "rateLimited", detail, retry_after, count=count)

    def garbage_next(
        self,
        kind: str,
        body: bytes = b"<html><body>502 Bad Gateway</body></html>",
        content_type: str = "text/html",
        status: int = 200,
        *,
        count: int = 1,
    ) -> None:
        """The next ``count`` requests to ``kind`` get ``body`` as ``content_type``
        (a proxy's HTML page, truncated JSON, ...)."""
        _check_kind(kind)
        self._faults.append(
            _Fault(kind, "garbage", count, status=status, body=body, content_type=content_type)
        )

    def wrong_key_certificate_next(self) -> None:
        """The next issued leaf certifies a different public key than the CSR's."""
        self.wrong_key_certificates += 1

    def wrong_names_certificate_next(self) -> None:
        """The next issued leaf names ``unexpected.invalid`` instead of the ordered names."""
        self.wrong_names_certificates += 1

    def empty_chain_next(self) -> None:
        """The next issued certificate is served as an empty body."""
        self.empty_chains += 1

    def ca_leaf_next(self) -> None:
        """The next issued leaf is marked ``CA:TRUE`` (right key and names)."""
        self.ca_leaves += 1

    def client_auth_leaf_next(self) -> None:
        """The next issued leaf's extended key usage is clientAuth only, without serverAuth."""
        self.client_auth_leaves += 1

    def leaf_only_next(self) -> None:
        """The next issued certificate is served alone, without its intermediate."""
        self.leaf_only_chains += 1

    def foreign_root_next(self) -> None:
        """The next issued chain (right key and names) comes from another hierarchy: an
        intermediate and root that no client trusts."""
        self.foreign_root_chains += 1

    def misordered_chain_next(self) -> None:
        """The next issued chain is served intermediate first, leaf last."""
        self.misordered_chains += 1

    def annotated_chain_next(self) -> None:
        """The next issued chain comes with RFC 7468 explanatory text (``subject=...``) before
        each block, as ``openssl`` prints it and some CAs serve it (RFC 8555 forbids it)."""
        self.annotated_chains += 1

    def drop_nonce_header_next(self, n: int = 1) -> None:
        """The next ``n`` responses carry no ``Replay-Nonce`` header."""
        self.drop_nonce_headers += n

    def pending(self) -> int:
        """How many planned faults have not fired yet (0 once a test's plan is used up)."""
        return (
            sum(f.remaining for f in self._faults)
            + self.reject_nonces
            + self.wrong_key_certificates
            + self.wrong_names_certificates
            + self.empty_chains
            + self.misordered_chains
            + self.ca_leaves
            + self.client_auth_leaves
            + self.leaf_only_chains
            + self.foreign_root_chains
            + self.annotated_chains
            + self.drop_nonce_headers
        )

    def _take(self, kind: str) -> _Fault | None:
        for fault in self._faults:
            if fault.kind in (kind, "*"):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                self.fired.append(f"{fault.action}:{kind}")
                return fault
        return None

    def _take_counter(self, name: str) -> bool:
        value = getattr(self, name)
        if value > 0:
            setattr(self, name, value - 1)
            self.fired.append(name)
            return True
        return False


def _check_kind(kind: str) -> None:
    if kind != "*" and kind not in PATH_KINDS:
        raise ValueError(f"unknown path kind {kind!r}; expected one of {PATH_KINDS} or '*'")


# --------------------------------------------------------------------------------------------
# The fake CA's keys and certificates


@attrs.frozen
class _CA:
    root: x509.Certificate
    alt_root: x509.Certificate
    intermediate: x509.Certificate
    cross_intermediate: x509.Certificate  # same subject and key, signed by alt_root
    intermediate_key: ec.EllipticCurvePrivateKey = attrs.field(repr=False)

    @classmethod
    def create(cls, now: datetime.datetime) -> _CA:
        root_key = ec.generate_private_key(ec.SECP256R1())
        alt_root_key = ec.generate_private_key(ec.SECP256R1())
        int_key = ec.generate_private_key(ec.SECP256R1())
        root_name = _name("Fake ACME Root X1")
        alt_root_name = _name("Fake ACME Alternate Root X2")
        int_name = _name("Fake ACME Intermediate E1")
        start, end = now - datetime.timedelta(days=1), now + _CA_LIFETIME
        root = ca_certificate(root_name, root_key, root_name, root_key, start, end)
        alt_root = ca_certificate(
            alt_root_name, alt_root_key, alt_root_name, alt_root_key, start, end
        )
        intermediate = ca_certificate(int_name, int_key, root_name, root_key, start, end, 0)
        cross = ca_certificate(int_name, int_key, alt_root_name, alt_root_key, start, end, 0)
        return cls(root, alt_root, intermediate, cross, int_key)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "synapse-acme test CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# --------------------------------------------------------------------------------------------
# The server


@attrs.define
class FakeAcmeServer:
    """An RFC 8555 CA in memory, with ARI (RFC 9773) and profiles, that checks what clients send.

    ``validate(identifier, token, key_authorization)`` decides each challenge (called once per
    answered challenge; ``identifier`` is the bare name, without ``*.``). It returns a bool, an
    ``acme.messages.Error`` (the challenge's problem), or a Deferred of either; ``None`` means every
    challenge passes. ``require_eab`` maps EAB key ids to raw HMAC keys. ``profiles`` maps profile
    names to certificate lifetimes in seconds. ``ari_window(cert)`` returns the (start, end) of the
    suggested renewal window; the default runs from 1/2 to 2/3 of the lifetime.
    ``authz_delay_polls`` / ``finalize_delay_polls`` are how many polls still answer
    pending/processing after a challenge is answered / an order finalized.
    """

    clock: IReactorTime
    base_url: str = "https://acme.test"
    validate: Validator | None = attrs.field(default=None, kw_only=True)
    require_eab: dict[str, bytes] | None = attrs.field(default=None, kw_only=True, repr=False)
    terms_of_service: str | None = attrs.field(default=None, kw_only=True)
    profiles: dict[str, int] | None = attrs.field(default=None, kw_only=True)
    ari: bool = attrs.field(default=True, kw_only=True)
    cert_lifetime: float = attrs.field(default=90 * 86400.0, kw_only=True)
    ari_window: AriWindow | None = attrs.field(default=None, kw_only=True)
    ari_retry_after: float = attrs.field(default=_DEFAULT_ARI_RETRY_AFTER, kw_only=True)
    authz_delay_polls: int = attrs.field(default=1, kw_only=True)
    finalize_delay_polls: int = attrs.field(default=1, kw_only=True)
    retry_after: float | None = attrs.field(default=None, kw_only=True)
    challenge_types: tuple[str, ...] = attrs.field(default=("http-01", "dns-01"), kw_only=True)
    blocked_names: set[str] = attrs.field(factory=set, kw_only=True)

    faults: FaultPlan = attrs.field(factory=FaultPlan, init=False)
    accounts: dict[str, Account] = attrs.field(factory=dict, init=False)
    orders: dict[str, Order] = attrs.field(factory=dict, init=False)
    authorizations: dict[str, Authorization] = attrs.field(factory=dict, init=False)
    challenges: dict[str, Challenge] = attrs.field(factory=dict, init=False)
    issued: dict[str, IssuedCertificate] = attrs.field(factory=dict, init=False)
    replaced: dict[str, str] = attrs.field(factory=dict, init=False)  # cert id -> order url
    validations: list[tuple[str, str, str]] = attrs.field(factory=list, init=False)
    requests: list[RequestRecord] = attrs.field(factory=list, init=False)
    _nonces: set[str] = attrs.field(factory=set, init=False)
    _ids: Iterator[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _ca: _CA = attrs.field(init=False)
    _origin: str = attrs.field(init=False)
    _prefix: str = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        match = re.match(r"^(https?://[^/]+)(/.*)?$", self.base_url)
        if match is None:
            raise ValueError(f"base_url must be an http(s) URL, got {self.base_url!r}")
        self._origin = match.group(1)
        self._prefix = match.group(2) or ""
        self._ca = _CA.create(_now(self.clock))

    # ---- public views -------------------------------------------------------------------

    @property
    def resource(self) -> IResource:
        """The whole server as one twisted.web resource, for the root of ``base_url``'s host."""
        return _AcmeResource(self)

    @property
    def directory_url(self) -> str:
        return self.base_url + "/directory"

    @property
    def root_pem(self) -> bytes:
        """The root the default chain ends at (not included in served chains)."""
        return _pem(self._ca.root)

    @property
    def intermediate_pem(self) -> bytes:
        return _pem(self._ca.intermediate)

    @property
    def trust(self) -> IssuerTrust:
        """Both roots (default and alternate chain), as a private CA's operator configures
        them in ``issuer_roots``."""
        return IssuerTrust((self._ca.root, self._ca.alt_root), ("the fake CA's roots",))

    @property
    def alternate_root_pem(self) -> bytes:
        """Root of the alternate chain (Link rel="alternate"); it cross-signs the intermediate."""
        return _pem(self._ca.alt_root)

    @property
    def alternate_intermediate_pem(self) -> bytes:
        return _pem(self._ca.cross_intermediate)

    def order_by_cert_id(self, cert_id: str) -> Order | None:
        issued = self.issued.get(cert_id)
        return self.orders.get(issued.order_url) if issued else None

    def request_kinds(self) -> list[str]:
        """The kinds of the requests answered so far, in order (handy in assertions)."""
        return [r.kind for r in self.requests]

    # ---- URL helpers ---------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return self.base_url + path

    def _new_id(self) -> str:
        return str(next(self._ids))

    def _new_nonce(self) -> str:
        nonce = _b64(os.urandom(16))
        self._nonces.add(nonce)
        return nonce

    def _directory(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"caaIdentities": ["acme.test"]}
        if self.terms_of_service:
            meta["termsOfService"] = self.terms_of_service
        if self.require_eab is not None:
            meta["externalAccountRequired"] = True
        if self.profiles:
            meta["profiles"] = {
                name: f"certificates valid for {lifetime} seconds"
                for name, lifetime in self.profiles.items()
            }
        directory: dict[str, Any] = {
            "newNonce": self._url("/new-nonce"),
            "newAccount": self._url("/new-account"),
            "newOrder": self._url("/new-order"),
            "meta": meta,
        }
        if self.ari:
            directory["renewalInfo"] = self._url("/renewal-info")
        return directory

    # ---- request dispatch ----------------------------------------------------------------

    def _route(self, path: str) -> tuple[str, list[str]]:
        """Map a path (without the base prefix) to (kind, ids)."""
        fixed = {
            "/directory": "directory",
            "/new-nonce": "newNonce",
            "/new-account": "newAccount",
            "/new-order": "newOrder",
        }
        if path in fixed:
            return fixed[path], []
        patterns = (
            (r"/renewal-info/([^/]+)", "renewalInfo"),
            (r"/acct/(\d+)", "account"),
            (r"/acct/(\d+)/orders", "orders"),
            (r"/order/(\d+)", "order"),
            (r"/order/(\d+)/finalize", "finalize"),
            (r"/authz/(\d+)", "authz"),
            (r"/chall/(\d+)", "challenge"),
            (r"/cert/(\d+)", "certificate"),
            (r"/cert/(\d+)/alt/(\d+)", "certificate"),
        )
        for pattern, kind in patterns:
            match = re.fullmatch(pattern, path)
            if match:
                return kind, list(match.groups())
        raise _Problem(404, "malformed", f"no such resource: {path}")

    def _render(self, request: Request) -> bytes:
        method = request.method.decode("ascii", "replace")
        raw_path = request.uri.decode("utf-8", "replace")
        url = self._origin + raw_path
        path = raw_path.split("?", 1)[0]
        kind = "unknown"
        status = 200
        try:
            if not path.startswith(self._prefix + "/"):
                raise _Problem(404, "malformed", f"no such resource: {path}")
            kind, ids = self._route(path[len(self._prefix) :])
            fault = self.faults._take(kind)
            if fault is not None:
                if fault.action == "fail":
                    headers = {}
                    if fault.retry_after is not None:
                        headers["Retry-After"] = _retry_after(fault.retry_after)
                    raise _Problem(fault.status, fault.problem_type, fault.detail, headers=headers)
                request.setResponseCode(fault.status)
                request.setHeader(b"Content-Type", fault.content_type.encode())
                self._common_headers(request)
                status = fault.status
                return fault.body
            body = self._handle(request, method, kind, ids, url)
            status = request.code
            self._common_headers(request)
            return body
        except _Problem as problem:
            status = problem.status
            return self._problem_response(request, problem)
        except Exception:
            # A bug in the fake must still look like a CA's 500, not a Twisted HTML page.
            logger.exception("fake ACME server failed on %s %s", method, url)
            status = 500
            return self._problem_response(
                request, _Problem(500, "serverInternal", "the fake ACME server crashed")
            )
        finally:
            logger.debug("%s %s -> %s", method, url, status)
            self.requests.append(RequestRecord(self.clock.seconds(), method, kind, url, status))

    def _common_headers(self, request: Request) -> None:
        if not self.faults._take_counter("drop_nonce_headers"):
            request.setHeader(b"Replay-Nonce", self._new_nonce().encode())
        request.responseHeaders.addRawHeader(
            b"Link", f'<{self.directory_url}>;rel="index"'.encode()
        )
        request.setHeader(b"Cache-Control", b"no-store")

    def _problem_response(self, request: Request, problem: _Problem) -> bytes:
        error = messages.Error(typ=problem.type, detail=problem.detail)
        if problem.subproblems:
            error = messages.Error(
                typ=problem.type, detail=problem.detail, subproblems=problem.subproblems
            )
        doc = error.to_json()
        doc.update(problem.extra)
        doc.setdefault("status", problem.status)
        request.setResponseCode(problem.status)
        request.setHeader(b"Content-Type", PROBLEM_JSON.encode())
        for name, value in problem.headers.items():
            request.setHeader(name.encode(), value.encode())
        self._common_headers(request)
        return json.dumps(doc).encode()

    def _handle(self, request: Request, method: str, kind: str, ids: list[str], url: str) -> bytes:
        if kind == "directory":
            self._require_method(method, "GET")
            return self._json(request, 200, self._directory())
        if kind == "newNonce":
            self._require_method(method, "GET", "HEAD")
            request.setResponseCode(200 if method == "HEAD" else 204)
            return b""
        if kind == "renewalInfo":
            self._require_method(method, "GET")
            return self._renewal_info(request, ids[0])
        self._require_method(method, "POST")
        jwsreq = self._verify(request, kind, url)
        handler = getattr(self, f"_post_{kind}")
        result: bytes = handler(request, jwsreq, *ids)
        return result

    @staticmethod
    def _require_method(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise _Problem(
                405,
                "malformed",
                f"method {method} not allowed here",
                headers={"Allow": ", ".join(allowed)},
            )

    def _json(
        self,
        request: Request,
        status: int,
        doc: Mapping[str, Any],
        location: str | None = None,
        retry_after: bool = False,
    ) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        if location is not None:
            request.setHeader(b"Location", location.encode())
        if retry_after and self.retry_after is not None:
            request.setHeader(b"Retry-After", _retry_after(self.retry_after).encode())
        return json.dumps(doc).encode()

    # ---- JWS verification ------------------------------------------------------------------

    def _verify(self, request: Request, kind: str, url: str) -> _SignedRequest:
        content_type = request.getHeader(b"content-type") or b""
        if content_type.split(b";")[0].strip().lower() != JOSE_JSON.encode():
            raise _Problem(
                415, "malformed", f"Content-Type must be {JOSE_JSON}, got {content_type!r}"
            )
        body = request.content.read() if request.content is not None else b""
        try:
            outer = json.loads(body)
        except ValueError:
            raise _Problem(400, "malformed", "request body is not JSON") from None
        header, payload, jws = self._parse_jws(outer, "request")

        if header.get("url") != url:
            raise _Problem(
                403, "unauthorized", f"JWS url {header.get('url')!r} does not match {url!r}"
            )
        nonce = header.get("nonce")
        if not isinstance(nonce, str) or nonce not in self._nonces:
            raise _Problem(400, "badNonce", f"nonce {nonce!r} was not issued or already used")
        self._nonces.discard(nonce)
        if self.faults._take_counter("reject_nonces"):
            raise _Problem(400, "badNonce", "nonce rejected (injected)")

        has_jwk, has_kid = "jwk" in header, "kid" in header
        if has_jwk == has_kid:
            raise _Problem(400, "malformed", "exactly one of jwk and kid must be present")
        account: Account | None = None
        if has_jwk:
            if kind != "newAccount":
                raise _Problem(400, "malformed", f"jwk is only allowed for newAccount, not {kind}")
            key = self._parse_jwk(header["jwk"], header["alg"])
        else:
            kid = header["kid"]
            if kind == "newAccount":
                raise _Problem(400, "malformed", "newAccount must be signed with jwk, not kid")
            account = self.accounts.get(kid) if isinstance(kid, str) else None
            if account is None:
                raise _Problem(400, "accountDoesNotExist", f"no account at kid {kid!r}")
            key = account.jwk
            self._check_alg_matches(header["alg"], key)
        try:
            ok = jws.verify(key)
        except Exception:  # josepy raises assorted errors for mismatched key/alg
            ok = False
        if not ok:
            raise _Problem(400, "malformed", "JWS signature verification failed")
        if account is not None and account.status != "valid":
            raise _Problem(401, "unauthorized", f"account is {account.status}")
        return _SignedRequest(header, payload, key, account, url)

    def _parse_jws(self, outer: Any, what: str) -> tuple[dict[str, Any], bytes, acme_jws.JWS]:
        if not isinstance(outer, dict) or set(outer) != {"protected", "payload", "signature"}:
            raise _Problem(
                400,
                "malformed",
                f"{what} must be a flattened JWS with exactly protected, payload, signature",
            )
        try:
            header = json.loads(_unb64(outer["protected"]))
            payload = _unb64(outer["payload"])
        except ValueError:
            raise _Problem(
                400, "malformed", f"{what}: protected header or payload is not base64url JSON"
            ) from None
        if not isinstance(header, dict):
            raise _Problem(400, "malformed", f"{what}: protected header is not a JSON object")
        alg = header.get("alg")
        if alg not in ALLOWED_ALGS and not (what == "externalAccountBinding" and alg in _EAB_ALGS):
            allowed = list(_EAB_ALGS) if what == "externalAccountBinding" else list(ALLOWED_ALGS)
            raise _Problem(
                400,
                "badSignatureAlgorithm",
                f"{what}: algorithm {alg!r} is not allowed",
                extra={"algorithms": allowed},
            )
        try:
            jws = cast(acme_jws.JWS, acme_jws.JWS.from_json(outer))
        except Exception as e:
            raise _Problem(
                400, "malformed", f"{what}: cannot parse JWS ({type(e).__name__})"
            ) from None
        return header, payload, jws

    @staticmethod
    def _parse_jwk(jobj: Any, alg: str) -> jose.JWK:
        try:
            key = cast(jose.JWK, jose.JWK.from_json(jobj))
        except Exception:
            raise _Problem(400, "malformed", "jwk is not a valid JSON Web Key") from None
        if isinstance(key, jose.JWKRSA):
            size = key.key.key_size
            if size < 2048 or size > 8192:
                raise _Problem(400, "badPublicKey", f"RSA key size {size} is not allowed")
        elif isinstance(key, jose.JWKEC):
            if key.key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
                raise _Problem(400, "badPublicKey", "EC curve not allowed")
        else:
            raise _Problem(400, "badPublicKey", "only RSA and EC account keys are allowed")
        if isinstance(key.key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
            raise _Problem(400, "malformed", "jwk must be a public key")
        FakeAcmeServer._check_alg_matches(alg, key)
        return key

    @staticmethod
    def _check_alg_matches(alg: str, key: jose.JWK) -> None:
        if alg == "RS256":
            ok = isinstance(key, jose.JWKRSA)
        else:
            ok = isinstance(key, jose.JWKEC) and key.key.curve.name == _EC_ALG_CURVE.get(alg)
        if not ok:
            raise _Problem(
                400,
                "badSignatureAlgorithm",
                f"algorithm {alg} does not fit the key",
                extra={"algorithms": list(ALLOWED_ALGS)},
            )

    @staticmethod
    def _object_payload(req: _SignedRequest) -> dict[str, Any]:
        if req.payload == b"":
            raise _Problem(400, "malformed", "this resource needs a JSON object payload")
        try:
            obj = json.loads(req.payload)
        except ValueError:
            raise _Problem(400, "malformed", "payload is not JSON") from None
        if not isinstance(obj, dict):
            raise _Problem(400, "malformed", "payload must be a JSON object")
        return obj

    # ---- accounts --------------------------------------------------------------------------

    def _account_by_key(self, key: jose.JWK) -> Account | None:
        thumb = key.thumbprint()
        for account in self.accounts.values():
            if account.jwk.thumbprint() == thumb:
                return account
        return None

    def _account_doc(self, account: Account) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "status": account.status,
            "contact": list(account.contact),
            "orders": account.url + "/orders",
            "key": account.jwk.to_json(),
        }
        if account.terms_of_service_agreed:
            doc["termsOfServiceAgreed"] = True
        return doc

    def _post_newAccount(self, request: Request, req: _SignedRequest) -> bytes:
        payload = self._object_payload(req)
        existing = self._account_by_key(req.key)
        if existing is not None:
            return self._json(request, 200, self._account_doc(existing), existing.url)
        if payload.get("onlyReturnExisting") is True:
            raise _Problem(400, "accountDoesNotExist", "no account exists for this key")
        if self.terms_of_service and payload.get("termsOfServiceAgreed") is not True:
            raise _Problem(
                403,
                "userActionRequired",
                "you must agree to the terms of service",
                extra={"instance": self.terms_of_service},
            )
        contact = self._check_contact(payload.get("contact", []))
        eab_kid = None
        if self.require_eab is not None:
            eab = payload.get("externalAccountBinding")
            if eab is None:
                raise _Problem(
                    403, "externalAccountRequired", "an external account binding is required"
                )
            eab_kid = self._verify_eab(eab, req)
        url = self._url(f"/acct/{self._new_id()}")
        account = Account(
            url=url,
            jwk=req.key,
            contact=contact,
            terms_of_service_agreed=payload.get("termsOfServiceAgreed") is True,
            eab_kid=eab_kid,
        )
        self.accounts[url] = account
        return self._json(request, 201, self._account_doc(account), url)

    @staticmethod
    def _check_contact(contact: Any) -> tuple[str, ...]:
        if not isinstance(contact, list) or not all(isinstance(c, str) for c in contact):
            raise _Problem(400, "malformed", "contact must be a list of strings")
        for item in contact:
            if not item.startswith("mailto:"):
                raise _Problem(400, "unsupportedContact", f"only mailto: contacts, got {item!r}")
            if not re.fullmatch(r"mailto:[^@\s,]+@[^@\s,]+\.[^@\s,]+", item):
                raise _Problem(400, "invalidContact", f"not an email address: {item!r}")
        return tuple(contact)

    def _verify_eab(self, eab: Any, req: _SignedRequest) -> str:
        assert self.require_eab is not None
        header, payload, jws = self._parse_jws(eab, "externalAccountBinding")
        if header.get("alg") not in _EAB_ALGS:
            raise _Problem(
                400,
                "badSignatureAlgorithm",
                "EAB must use an HMAC algorithm",
                extra={"algorithms": list(_EAB_ALGS)},
            )
        if "nonce" in header:
            raise _Problem(400, "malformed", "EAB JWS must not carry a nonce")
        if header.get("url") != req.url:
            raise _Problem(400, "malformed", "EAB url must equal the newAccount URL")
        kid = header.get("kid")
        hmac_key = self.require_eab.get(kid) if isinstance(kid, str) else None
        if hmac_key is None:
            raise _Problem(403, "unauthorized", f"unknown EAB key id {kid!r}")
        try:
            bound = cast(jose.JWK, jose.JWK.from_json(json.loads(payload)))
        except Exception:
            raise _Problem(400, "malformed", "EAB payload is not a JWK") from None
        if bound.thumbprint() != req.key.thumbprint():
            raise _Problem(400, "malformed", "EAB payload is not the account key")
        try:
            ok = jws.verify(jose.JWKOct(key=hmac_key))
        except Exception:
            ok = False
        if not ok:
            raise _Problem(403, "unauthorized", "EAB signature does not verify")
        return str(kid)

    def _post_account(self, request: Request, req: _SignedRequest, acct_id: str) -> bytes:
        account = self._owned_account(req, acct_id)
        if req.payload != b"":
            payload = self._object_payload(req)
            if "contact" in payload:
                account.contact = self._check_contact(payload["contact"])
            if payload.get("status") == "deactivated":
                account.status = "deactivated"
            elif "status" in payload:
                raise _Problem(400, "malformed", "only status 'deactivated' may be set")
        return self._json(request, 200, self._account_doc(account), account.url)

    def _post_orders(self, request: Request, req: _SignedRequest, acct_id: str) -> bytes:
        account = self._owned_account(req, acct_id)
        self._require_post_as_get(req)
        return self._json(request, 200, {"orders": list(account.order_urls)})

    def _owned_account(self, req: _SignedRequest, acct_id: str) -> Account:
        url = self._url(f"/acct/{acct_id}")
        account = self.accounts.get(url)
        if account is None:
            raise _Problem(404, "malformed", "no such account")
        if req.account is not account:
            raise _Problem(403, "unauthorized", "this is not your account")
        return account

    # ---- orders ----------------------------------------------------------------------------

    def _post_newOrder(self, request: Request, req: _SignedRequest) -> bytes:
        assert req.account is not None
        payload = self._object_payload(req)
        if "notBefore" in payload or "notAfter" in payload:
            raise _Problem(400, "malformed", "notBefore/notAfter are not supported")
        names = self._check_identifiers(payload.get("identifiers"))
        profile = payload.get("profile")
        if profile is not None:
            if not self.profiles or profile not in self.profiles:
                raise _Problem(400, "invalidProfile", f"unknown profile {profile!r}")
        replaces = payload.get("replaces")
        if replaces is not None:
            self._check_replaces(replaces, req.account, names)
        now = _now(self.clock)
        order_url = self._url(f"/order/{self._new_id()}")
        authz_urls = []
        for name in names:
            authz = self._new_authz(req.account, name, now)
            authz_urls.append(authz.url)
        order = Order(
            url=order_url,
            account_url=req.account.url,
            identifiers=names,
            authz_urls=authz_urls,
            expires=now + _ORDER_LIFETIME,
            profile=profile,
            replaces=replaces,
        )
        self.orders[order_url] = order
        req.account.order_urls.append(order_url)
        if replaces is not None:
            self.replaced[replaces] = order_url
        return self._json(request, 201, self._order_doc(order), order_url, retry_after=True)

    def _check_identifiers(self, identifiers: Any) -> tuple[str, ...]:
        if not isinstance(identifiers, list) or not identifiers:
            raise _Problem(400, "malformed", "identifiers must be a non-empty list")
        names: list[str] = []
        subproblems = []
        for ident in identifiers:
            if not isinstance(ident, dict) or not isinstance(ident.get("value"), str):
                raise _Problem(400, "malformed", f"bad identifier {ident!r}")
            typ, value = ident.get("type"), ident["value"]
            problem = None
            if typ == "ip":
                problem = ("rejectedIdentifier", "IP identifiers are not issued here")
            elif typ != "dns":
                problem = ("unsupportedIdentifier", f"identifier type {typ!r} is not supported")
            elif not _valid_dns_name(value):
                problem = ("rejectedIdentifier", f"{value!r} is not a valid lower-case DNS name")
            elif value in self.blocked_names or value.removeprefix("*.") in self.blocked_names:
                problem = ("rejectedIdentifier", f"policy forbids issuing for {value!r}")
            if problem is not None:
                subproblems.append(
                    messages.Error(
                        typ=_problem_type(problem[0]),
                        detail=problem[1],
                        identifier=messages.Identifier(
                            typ=messages.IdentifierType(str(typ)), value=value
                        ),
                    )
                )
            elif value not in names:
                names.append(value)
        if subproblems:
            first = subproblems[0]
            code = first.typ if len(subproblems) == 1 else ERROR_PREFIX + "rejectedIdentifier"
            raise _Problem(400, code, str(first.detail), subproblems=tuple(subproblems))
        return tuple(names)

    def _check_replaces(self, replaces: Any, account: Account, names: tuple[str, ...]) -> None:
        issued = self.issued.get(replaces) if isinstance(replaces, str) else None
        if issued is None:
            raise _Problem(
                400, "malformed", f"replaces names no certificate issued here: {replaces!r}"
            )
        if issued.account_url != account.url:
            raise _Problem(
                403, "unauthorized", "the replaced certificate belongs to another account"
            )
        if not set(issued.names) & set(names):
            raise _Problem(
                400, "malformed", "the new order shares no identifier with the replaced certificate"
            )
        previous = self.orders.get(self.replaced.get(replaces, ""))
        if previous is not None and previous.status != "invalid":
            raise _Problem(
                409,
                ERROR_PREFIX + "alreadyReplaced",
                f"certificate {replaces} is already replaced by {previous.url}",
            )

    def _new_authz(self, account: Account, name: str, now: datetime.datetime) -> Authorization:
        wildcard = name.startswith("*.")
        authz = Authorization(
            url=self._url(f"/authz/{self._new_id()}"),
            account_url=account.url,
            identifier=name.removeprefix("*."),
            wildcard=wildcard,
            expires=now + _ORDER_LIFETIME,
        )
        for typ in self.challenge_types:
            if wildcard and typ != "dns-01":
                continue
            chall = Challenge(
                url=self._url(f"/chall/{self._new_id()}"),
                type=typ,
                token=os.urandom(32),
                authz_url=authz.url,
            )
            authz.challenges.append(chall)
            self.challenges[chall.url] = chall
        if not authz.challenges:
            raise _Problem(400, "rejectedIdentifier", f"no challenge type can validate {name!r}")
        self.authorizations[authz.url] = authz
        return authz

    def _order_doc(self, order: Order) -> dict[str, Any]:
        body = messages.Order(
            identifiers=[
                messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=n)
                for n in order.identifiers
            ],
            status=messages.Status.from_json(order.status),
            authorizations=list(order.authz_urls),
            finalize=order.finalize_url,
            expires=order.expires,
            profile=order.profile,
            error=order.error,
        )
        doc: dict[str, Any] = body.to_json()
        if order.status == "valid" and order.cert_id is not None:
            doc["certificate"] = self.issued[order.cert_id].url
        if order.replaces is not None:
            doc["replaces"] = order.replaces
        return doc

    def _owned(self, table: Mapping[str, Any], url: str, req: _SignedRequest) -> Any:
        obj = table.get(url)
        if obj is None:
            raise _Problem(404, "malformed", f"no such resource: {url}")
        assert req.account is not None
        if obj.account_url != req.account.url:
            raise _Problem(403, "unauthorized", "this resource belongs to another account")
        return obj

    @staticmethod
    def _require_post_as_get(req: _SignedRequest) -> None:
        if req.payload != b"":
            raise _Problem(400, "malformed", "POST-as-GET needs an empty payload")

    def _post_order(self, request: Request, req: _SignedRequest, order_id: str) -> bytes:
        self._require_post_as_get(req)
        order: Order = self._owned(self.orders, self._url(f"/order/{order_id}"), req)
        self._poll_order(order)
        busy = order.status in ("pending", "processing")
        return self._json(request, 200, self._order_doc(order), order.url, retry_after=busy)

    def _poll_order(self, order: Order) -> None:
        """One client look at an order: advances its authorizations and its issuance."""
        if order.status == "pending":
            for url in order.authz_urls:
                self._poll_authz(self.authorizations[url])
        elif order.status == "processing":
            if order.finalize_polls >= self.finalize_delay_polls:
                order.status = "valid"
            else:
                order.finalize_polls += 1
        self._expire_order(order)

    def _expire_order(self, order: Order) -> None:
        if order.status in ("pending", "ready") and _now(self.clock) > order.expires:
            order.status = "invalid"
            order.error = messages.Error.with_code("malformed", detail="order expired")

    def _update_order_status(self, order: Order) -> None:
        if order.status != "pending":
            return
        states = [self.authorizations[u].status for u in order.authz_urls]
        if any(s == "invalid" for s in states):
            order.status = "invalid"
            order.error = messages.Error.with_code(
                "unauthorized", detail="an authorization of this order failed"
            )
        elif all(s == "valid" for s in states):
            order.status = "ready"

    # ---- authorizations and challenges ------------------------------------------------------

    def _authz_doc(self, authz: Authorization) -> dict[str, Any]:
        body = messages.Authorization(
            identifier=messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=authz.identifier),
            challenges=[self._challenge_body(c) for c in authz.challenges],
            status=messages.Status.from_json(authz.status),
            expires=authz.expires,
            wildcard=True if authz.wildcard else None,
        )
        doc: dict[str, Any] = body.to_json()
        return doc

    def _challenge_body(self, chall: Challenge) -> messages.ChallengeBody:
        return messages.ChallengeBody(
            chall=_challenge_type(chall.type)(token=chall.token),
            uri=chall.url,
            status=messages.Status.from_json(chall.status),
            validated=chall.validated,
            error=chall.error,
        )

    def _poll_authz(self, authz: Authorization) -> None:
        if authz.status != "pending" or authz.answered is None:
            return
        if authz.result is not None and authz.polls >= self.authz_delay_polls:
            self._settle(authz)
        else:
            authz.polls += 1

    def _settle(self, authz: Authorization) -> None:
        chall = authz.answered
        assert chall is not None
        if authz.result is True:
            chall.status = "valid"
            chall.validated = _now(self.clock)
            authz.status = "valid"
        else:
            chall.status = "invalid"
            chall.error = (
                authz.result
                if isinstance(authz.result, messages.Error)
                else messages.Error.with_code(
                    "incorrectResponse",
                    detail=f"the {chall.type} response for {authz.identifier} was wrong",
                )
            )
            authz.status = "invalid"
        for order in self.orders.values():
            if authz.url in order.authz_urls:
                self._update_order_status(order)

    def _post_authz(self, request: Request, req: _SignedRequest, authz_id: str) -> bytes:
        authz: Authorization = self._owned(
            self.authorizations, self._url(f"/authz/{authz_id}"), req
        )
        if req.payload != b"":
            payload = self._object_payload(req)
            if payload != {"status": "deactivated"}:
                raise _Problem(400, "malformed", "an authorization can only be deactivated")
            if authz.status in ("pending", "valid"):
                authz.status = "deactivated"
                for order in self.orders.values():
                    if authz.url in order.authz_urls and order.status in ("pending", "ready"):
                        order.status = "invalid"
        else:
            self._poll_authz(authz)
        return self._json(
            request, 200, self._authz_doc(authz), authz.url, retry_after=authz.status == "pending"
        )

    def _post_challenge(self, request: Request, req: _SignedRequest, chall_id: str) -> bytes:
        url = self._url(f"/chall/{chall_id}")
        chall = self.challenges.get(url)
        if chall is None:
            raise _Problem(404, "malformed", f"no such resource: {url}")
        authz: Authorization = self._owned(self.authorizations, chall.authz_url, req)
        if req.payload == b"":
            self._poll_authz(authz)
        else:
            if self._object_payload(req) != {}:
                raise _Problem(400, "malformed", "a challenge is answered with an empty object {}")
            if authz.status == "pending" and authz.answered is None:
                self._answer(authz, chall, req)
        request.responseHeaders.addRawHeader(b"Link", f'<{authz.url}>;rel="up"'.encode())
        return self._json(
            request,
            200,
            self._challenge_body(chall).to_json(),
            retry_after=chall.status == "processing",
        )

    def _answer(self, authz: Authorization, chall: Challenge, req: _SignedRequest) -> None:
        chall.status = "processing"
        authz.answered = chall
        token = _b64(chall.token)
        chall_obj = cast(
            challenges.KeyAuthorizationChallenge,
            _challenge_type(chall.type)(token=chall.token),
        )
        key_authz = chall_obj.key_authorization(req.key)
        self.validations.append((authz.identifier, token, key_authz))

        def record(result: Any) -> None:
            if isinstance(result, Failure):
                logger.error("validate() failed: %s", result.getErrorMessage())
                result = messages.Error.with_code(
                    "serverInternal", detail="the validator raised an error"
                )
            elif not isinstance(result, messages.Error):
                result = bool(result)
            authz.result = result
            if authz.polls >= self.authz_delay_polls and authz.status == "pending":
                self._settle(authz)

        if self.validate is None:
            record(True)
        else:
            d: Deferred[Any] = maybeDeferred(self.validate, authz.identifier, token, key_authz)
            d.addBoth(record)

    # ---- finalize and certificates ------------------------------------------------------------

    def _post_finalize(self, request: Request, req: _SignedRequest, order_id: str) -> bytes:
        order: Order = self._owned(self.orders, self._url(f"/order/{order_id}"), req)
        payload = self._object_payload(req)
        self._expire_order(order)
        if order.status != "ready":
            raise _Problem(403, "orderNotReady", f"order is {order.status}, not ready")
        try:
            csr = messages.CertificateRequest.from_json(payload).csr
        except Exception:
            raise _Problem(400, "badCSR", "csr is not a base64url DER PKCS#10 request") from None
        self._check_csr(csr, order, req)
        self._issue(order, csr)
        order.status = "processing"
        order.finalize_polls = 0
        if self.finalize_delay_polls <= 0:
            order.status = "valid"
        return self._json(
            request,
            200,
            self._order_doc(order),
            order.url,
            retry_after=order.status == "processing",
        )

    @staticmethod
    def _check_csr(csr: x509.CertificateSigningRequest, order: Order, req: _SignedRequest) -> None:
        if not csr.is_signature_valid:
            raise _Problem(400, "badCSR", "CSR signature does not verify")
        key = csr.public_key()
        if isinstance(key, rsa.RSAPublicKey):
            if key.key_size < 2048:
                raise _Problem(400, "badCSR", f"RSA key of {key.key_size} bits is too short")
        elif isinstance(key, ec.EllipticCurvePublicKey):
            if key.curve.name not in ("secp256r1", "secp384r1"):
                raise _Problem(400, "badCSR", f"EC curve {key.curve.name} is not accepted")
        else:
            raise _Problem(400, "badCSR", "only RSA and ECDSA keys are accepted")
        der = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        account_der = req.key.key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if der == account_der:
            raise _Problem(400, "badCSR", "the certificate key must not be the account key")
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
            others = [g for g in san if not isinstance(g, x509.DNSName)]
        except x509.ExtensionNotFound:
            names, others = set(), []
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        for cn in cns:
            names.add(str(cn.value).lower())
        if others:
            raise _Problem(400, "badCSR", "CSR may only name DNS identifiers")
        if names != set(order.identifiers):
            raise _Problem(
                400,
                "badCSR",
                f"CSR names {sorted(names)} do not match the order's {sorted(order.identifiers)}",
            )

    def _issue(self, order: Order, csr: x509.CertificateSigningRequest) -> IssuedCertificate:
        now = _now(self.clock)
        lifetime = float(self.cert_lifetime)
        if order.profile is not None and self.profiles:
            lifetime = float(self.profiles[order.profile])
        names = list(order.identifiers)
        public_key = csr.public_key()
        if self.faults._take_counter("wrong_key_certificates"):
            public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
        if self.faults._take_counter("wrong_names_certificates"):
            names = ["unexpected.invalid"]
        ca = self._ca
        if self.faults._take_counter("foreign_root_chains"):
            ca = _CA.create(now)
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
                if len(names[0]) <= 64
                else x509.Name([])
            )
            .issuer_name(ca.intermediate.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + datetime.timedelta(seconds=lifetime))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
            .add_extension(
                x509.BasicConstraints(ca=self.faults._take_counter("ca_leaves"), path_length=None),
                critical=True,
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH]
                    if self.faults._take_counter("client_auth_leaves")
                    else [ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(public_key),  # type: ignore[arg-type]
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    ca.intermediate_key.public_key()
                ),
                critical=False,
            )
        )
        leaf = builder.sign(ca.intermediate_key, hashes.SHA256())
        cert_id = ari_cert_id(leaf)
        chain = _pem(leaf) + _pem(ca.intermediate)
        if self.faults._take_counter("leaf_only_chains"):
            chain = _pem(leaf)
        if self.faults._take_counter("misordered_chains"):
            chain = _pem(ca.intermediate) + _pem(leaf)
        if self.faults._take_counter("empty_chains"):
            chain = b""
        if self.faults._take_counter("annotated_chains"):
            chain = (
                b"subject=leaf\n" + _pem(leaf) + b"\nsubject=intermediate\n" + _pem(ca.intermediate)
            )
        issued = IssuedCertificate(
            cert_id=cert_id,
            url=self._url(f"/cert/{self._new_id()}"),
            order_url=order.url,
            account_url=order.account_url,
            names=tuple(order.identifiers),
            certificate=leaf,
            chain_pem=chain,
            alternate_chain_pem=_pem(leaf) + _pem(ca.cross_intermediate),
        )
        self.issued[cert_id] = issued
        order.cert_id = cert_id
        return issued

    def _issued_by_url(self, url: str) -> IssuedCertificate:
        for issued in self.issued.values():
            if issued.url == url:
                return issued
        raise _Problem(404, "malformed", f"no such certificate: {url}")

    def _post_certificate(
        self, request: Request, req: _SignedRequest, cert_id: str, alt: str | None = None
    ) -> bytes:
        self._require_post_as_get(req)
        issued = self._issued_by_url(self._url(f"/cert/{cert_id}"))
        assert req.account is not None
        if issued.account_url != req.account.url:
            raise _Problem(403, "unauthorized", "this certificate belongs to another account")
        if alt is None:
            body = issued.chain_pem
            request.responseHeaders.addRawHeader(
                b"Link", f'<{issued.url}/alt/1>;rel="alternate"'.encode()
            )
        elif alt == "1":
            body = issued.alternate_chain_pem
            request.responseHeaders.addRawHeader(
                b"Link", f'<{issued.url}>;rel="alternate"'.encode()
            )
        else:
            raise _Problem(404, "malformed", "no such alternate chain")
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", PEM_CHAIN.encode())
        return body

    # ---- ARI ---------------------------------------------------------------------------------

    def renewal_window(self, cert_id: str) -> tuple[datetime.datetime, datetime.datetime]:
        """The window the server would suggest now for ``cert_id`` (KeyError if unknown)."""
        issued = self.issued[cert_id]
        cert = issued.certificate
        if self.ari_window is not None:
            return self.ari_window(cert)
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        lifetime = end - start
        return start + lifetime / 2, start + lifetime * 2 / 3

    def _renewal_info(self, request: Request, cert_id: str) -> bytes:
        if not self.ari:
            raise _Problem(404, "malformed", "this server does not offer renewalInfo")
        parts = cert_id.split(".")
        try:
            if len(parts) != 2 or not all(parts):
                raise ValueError
            _unb64(parts[0])
            _unb64(parts[1])
        except ValueError:
            raise _Problem(
                400, "malformed", f"not an RFC 9773 certificate id: {cert_id!r}"
            ) from None
        if cert_id not in self.issued:
            raise _Problem(404, "malformed", f"unknown certificate id {cert_id!r}")
        start, end = self.renewal_window(cert_id)
        info = messages.RenewalInfo(
            suggested_window=messages.RenewalInfo.SuggestedWindow(start=start, end=end)
        )
        request.setHeader(b"Retry-After", _retry_after(self.ari_retry_after).encode())
        return self._json(request, 200, info.to_json())


def http01_validator(
    http_client: Any, port: int = 80, address: str = "127.0.0.1"
) -> Callable[[str, str, str], Deferred[Any]]:
    """A ``validate`` callable that checks HTTP-01 the way a CA does, over real (or stub) HTTP.

    It fetches ``http://<address>:<port>/.well-known/acme-challenge/<token>`` with
    ``Host: <identifier>`` through ``http_client`` (``treq``, a ``treq.HTTPClient`` or a
    ``StubTreq``) and fires with ``True`` if the body is the key authorization, else with the
    problem a CA would report (``incorrectResponse`` / ``unauthorized`` / ``connection``).
    Use it with ``challenge_types=("http-01",)``: it does not know about other types.
    """

    def validate(identifier: str, token: str, key_authz: str) -> Deferred[Any]:
        url = f"http://{address}:{port}/.well-known/acme-challenge/{token}"
        d: Deferred[Any] = http_client.get(url, headers={b"Host": [identifier.encode("ascii")]})

        def got_response(response: Any) -> Any:
            if response.code != 200:
                return messages.Error.with_code(
                    "unauthorized",
                    detail=f"{url} (Host {identifier}) answered HTTP {response.code}",
                )
            return response.content().addCallback(check_body)

        def check_body(body: bytes) -> Any:
            if body.strip() == key_authz.encode("ascii"):
                return True
            return messages.Error.with_code(
                "incorrectResponse",
                detail=f"{url} (Host {identifier}) served {body[:80]!r}, not the key authorization",
            )

        def failed(failure: Failure) -> messages.Error:
            return messages.Error.with_code(
                "connection", detail=f"cannot fetch {url}: {failure.getErrorMessage()}"
            )

        d.addCallback(got_response)
        d.addErrback(failed)
        return d

    return validate


@attrs.frozen
class _SignedRequest:
    header: dict[str, Any]
    payload: bytes
    key: jose.JWK
    account: Account | None
    url: str


def _retry_after(seconds: float) -> str:
    return str(max(0, math.ceil(seconds)))


def _valid_dns_name(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return False
    except ValueError:
        pass
    name = value.removeprefix("*.")
    if not name or len(value) > 253 or name != name.lower():
        return False
    labels = name.split(".")
    label_re = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
    return len(labels) >= 2 and all(label_re.match(label) for label in labels)


class _AcmeResource(Resource):
    """The twisted.web face of :class:`FakeAcmeServer`: every path handled by one leaf."""

    isLeaf = True

    def __init__(self, server: FakeAcmeServer):
        super().__init__()
        self._server = server

    def render(self, request: Request) -> bytes:  # type: ignore[override]
        return self._server._render(request)


# --------------------------------------------------------------------------------------------
# Running the fake as a process (for subprocess integration tests that need ARI or profiles)


def _parse_args(argv: list[str]) -> Any:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m synapse_acme.testing.acme_server",
        description="Serve the fake ACME server over real HTTP(S) until killed.",
    )
    parser.add_argument(
        "--listen",
        default="tcp:14001:interface=127.0.0.1",
        help="Twisted server endpoint string (tcp:..., ssl:...)",
    )
    parser.add_argument(
        "--base-url",
        default=None,
        help="the URL clients reach it at (default: http(s)://<bound address>:<bound port>)",
    )
    parser.add_argument(
        "--http01-port",
        type=int,
        default=None,
        help="validate http-01 by fetching from 127.0.0.1:<port>; "
        "without it every challenge passes",
    )
    parser.add_argument("--no-ari", action="store_true")
    parser.add_argument("--cert-lifetime", type=float, default=90 * 86400.0)
    parser.add_argument("--profile", action="append", default=[], metavar="NAME=SECONDS")
    parser.add_argument("--eab", action="append", default=[], metavar="KID=BASE64URL_HMAC")
    parser.add_argument("--terms-of-service", default=None)
    parser.add_argument("--retry-after", type=float, default=None)
    parser.add_argument("--authz-delay-polls", type=int, default=1)
    parser.add_argument("--finalize-delay-polls", type=int, default=1)
    parser.add_argument(
        "--ca-out", default=None, help="directory to write root.pem and intermediate.pem into"
    )
    return parser.parse_args(argv)


def main(reactor: Any, *argv: str) -> Deferred[None]:
    """``twisted.internet.task.react`` entry point: serve until the process is killed.

    Prints ``ready <directory url>`` on stdout once listening.
    """
    import sys

    from twisted.internet.endpoints import serverFromString
    from twisted.web.server import Site

    args = _parse_args(list(argv))
    validate = None
    types: tuple[str, ...] = ("http-01", "dns-01")
    if args.http01_port is not None:
        from treq.client import HTTPClient
        from twisted.web.client import Agent

        validate = http01_validator(HTTPClient(Agent(reactor)), port=args.http01_port)
        types = ("http-01",)
    profiles = {k: int(v) for k, v in (p.split("=", 1) for p in args.profile)} or None
    eab = {k: _unb64(v) for k, v in (e.split("=", 1) for e in args.eab)} if args.eab else None

    done: Deferred[None] = Deferred()
    # The server needs its URL, which may hold the port bound here: it takes the site's
    # requests once made (before "ready", nobody knows where to send any).
    site = Site(Resource())
    listening = serverFromString(reactor, args.listen).listen(site)

    def ready(port: Any) -> Deferred[None]:
        base_url = args.base_url
        if base_url is None:
            host = port.getHost()
            address = f"[{host.host}]" if ":" in host.host else host.host
            scheme = "https" if args.listen.startswith("ssl:") else "http"
            base_url = f"{scheme}://{address}:{host.port}"
        server = FakeAcmeServer(
            reactor,
            base_url,
            validate=validate,
            require_eab=eab,
            terms_of_service=args.terms_of_service,
            profiles=profiles,
            ari=not args.no_ari,
            cert_lifetime=args.cert_lifetime,
            authz_delay_polls=args.authz_delay_polls,
            finalize_delay_polls=args.finalize_delay_polls,
            retry_after=args.retry_after,
            challenge_types=types,
        )
        site.resource = server.resource
        if args.ca_out:
            with open(os.path.join(args.ca_out, "root.pem"), "wb") as f:
                f.write(server.root_pem)
            with open(os.path.join(args.ca_out, "intermediate.pem"), "wb") as f:
                f.write(server.intermediate_pem)
        sys.stdout.write(f"ready {server.directory_url}\n")
        sys.stdout.flush()
        return done

    listening.addCallback(ready)
    return listening


if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess test
    import sys

    from twisted.internet.task import react

    react(main, sys.argv[1:])
