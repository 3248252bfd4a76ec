"""Signed HTTP to one ACME server: JWS, the nonce pool, badNonce retries, problem documents.

Everything the CA says comes back either as an :class:`AcmeResponse` whose shape has been
checked (status, content type, JSON object), or as one of the typed errors from
:mod:`synapse_acme.errors`. Nothing here blocks: every request is a Deferred with a timeout
measured on the injected clock.
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urljoin, urlsplit

import attrs
import josepy as jose
import treq
from acme import jws, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet import defer, error
from twisted.internet import ssl as tssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HostnameCachingHTTPSPolicy,
    HTTPConnectionPool,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers

from synapse_acme import __version__
from synapse_acme.errors import AcmeError, AcmeProtocolError, AcmeTransportError, ConfigError
from synapse_acme.policy import DEFAULT_REQUEST_TIMEOUT, MAX_REQUESTS_PER_MINUTE

log = logging.getLogger(__name__)

JSON = "application/json"
PROBLEM_JSON = "application/problem+json"
JOSE_JSON = "application/jose+json"
PEM_CHAIN = "application/pem-certificate-chain"

# acmez retries badNonce up to 10 times; certbot once. Pebble rejects 5% of good nonces by
# default. At 50% (tests/faults) 10 retries lose one request in 2^11: a 20-certificate run
# makes ~280 signed requests, so ~13% of such runs would fail. 20 retries (one in 2^21) cost
# nothing when nonces are good, and each retry is bounded and uses the nonce the CA just sent.
MAX_BAD_NONCE_RETRIES = 20
# A newNonce answer without a nonce is a CA (or proxy) hiccup; a few tries, then a clear error.
_NEW_NONCE_ATTEMPTS = 3
# One request, connect to last body byte: policy.DEFAULT_REQUEST_TIMEOUT (acme.request_timeout).
DEFAULT_CONNECT_TIMEOUT = 30.0
# Idle keep-alive connections to the CA; more requests at once open more, then close them.
MAX_PERSISTENT_CONNECTIONS = 16
# Bodies are small JSON objects or a PEM chain (a few KiB; an order for 100 names ~20 KiB);
# anything larger is not an ACME answer, and reading it whole would let a broken or hostile
# server (or a proxy) fill our memory.
MAX_RESPONSE_BYTES = 1024 * 1024
_MAX_ERROR_SNIPPET = 200

_TRANSPORT_FAILURES = (
    error.ConnectError,  # includes ConnectionRefused, DNSLookupError, TCPTimedOut
    error.ConnectionLost,
    ResponseFailed,
    ResponseNeverReceived,
    SSL.Error,
    OSError,
)


def _load_trust_roots(ca_bundle: str) -> list[tssl.Certificate]:
    try:
        with open(ca_bundle, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ConfigError(
            "acme.ca_bundle", f"cannot read the CA bundle ({e.strerror})", ca_bundle
        ) from None
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError("acme.ca_bundle", "the file holds no PEM certificate", ca_bundle)
    return [tssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)) for c in certs]


def make_http_client(
    reactor: Any,
    ca_bundle: str | None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> HTTPClient:
    """A treq client for talking to the CA.

    With ``ca_bundle`` (a PEM file path) only the certificates in it are trusted, so a private
    CA (or Pebble's throwaway one) works without touching environment variables; without it the
    platform's trust store is used. Connections are kept alive: an issuance makes a dozen
    requests to the same host. Up to ``MAX_PERSISTENT_CONNECTIONS`` idle ones are kept (100
    certificates renewed at once would otherwise close and re-handshake most connections),
    and the TLS client context is built once per host, not once per connection.
    """
    if ca_bundle is None:
        browser_like = BrowserLikePolicyForHTTPS()
    else:
        roots = _load_trust_roots(ca_bundle)
        browser_like = BrowserLikePolicyForHTTPS(trustRoot=tssl.trustRootFromCertificates(roots))
    policy = HostnameCachingHTTPSPolicy(browser_like)
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = MAX_PERSISTENT_CONNECTIONS
    pool.cachedConnectionTimeout = 60
    agent = Agent(reactor, contextFactory=policy, connectTimeout=connect_timeout, pool=pool)
    return HTTPClient(agent)


class _BodyTooLarge(Exception):
    pass


@attrs.define
class RequestRateLimiter:
    """At most ``limit`` request starts in any ``period`` seconds of ``clock`` time.

    Requests over the cap are queued in arrival order and released as the window slides: the
    cap delays, it never drops. Cancelling a queued Deferred takes it out of the queue.
    """

    clock: IReactorTime
    limit: int = MAX_REQUESTS_PER_MINUTE
    period: float = 60.0
    _starts: deque[float] = attrs.field(init=False, factory=deque)
    _waiting: deque[Deferred[None]] = attrs.field(init=False, factory=deque)
    _timer: IDelayedCall | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        if self.limit < 1 or self.period <= 0:
            raise ValueError(f"rate limit must be >= 1 per > 0 s, got {self.limit}/{self.period}")

    @property
    def queued(self) -> int:
        """How many requests are waiting for room under the cap."""
        return len(self._waiting)

    def acquire(self) -> Deferred[None]:
        """Deferred firing with ``None`` when the caller may start its request."""
        if not self._waiting and self._room():
            self._starts.append(self.clock.seconds())
            return defer.succeed(None)
        d: Deferred[None] = Deferred(self._cancel)
        if not self._waiting:
            log.warning(
                "more than %d requests to the CA within %g s; queueing the rest",
                self.limit,
                self.period,
            )
        self._waiting.append(d)
        self._arm()
        return d

    def _cancel(self, d: Deferred[None]) -> None:
        try:
            self._waiting.remove(d)
        except ValueError:
            pass

    def _room(self) -> bool:
        horizon = self.clock.seconds() - self.period
        while self._starts and self._starts[0] <= horizon:
            self._starts.popleft()
        return len(self._starts) < self.limit

    def _arm(self) -> None:
        if not self._waiting or (self._timer is not None and self._timer.active()):
            return
        delay = self._starts[0] + self.period - self.clock.seconds() if self._starts else 0.0
        self._timer = self.clock.callLater(max(0.0, delay), self._release)

    def _release(self) -> None:
        self._timer = None
        while self._waiting and self._room():
            d = self._waiting.popleft()
            self._starts.append(self.clock.seconds())
            d.callback(None)
        self._arm()


_BAD_URL_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")


def check_url(value: object, what: str, where: str | None = None) -> str:
    """``value`` if it is an absolute http(s) URL with a host, else AcmeProtocolError.

    Every URL the CA hands us (directory entries, Location, finalize, authorizations,
    challenges, certificate, alternates) passes here before we request it, so a broken or
    hostile answer becomes a typed error instead of a request to ``file:`` or ``javascript:``.
    """
    if not isinstance(value, str) or not value or len(value) > 2048:
        raise AcmeProtocolError(f"{what} is not a URL: {_short(value)}", where)
    if _BAD_URL_CHARS.search(value):
        raise AcmeProtocolError(f"{what} holds whitespace or control characters", where)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise AcmeProtocolError(f"{what} is not a URL: {_short(value)}", where) from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise AcmeProtocolError(f"{what} is not an http(s) URL: {_short(value)}", where)
    return value


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def jws_algorithm(key: jose.JWK) -> jose.JWASignature:
    """The JWS algorithm RFC 8555 clients use for an account key (RS256 or ES256/384/512)."""
    if isinstance(key, jose.JWKRSA):
        return jose.RS256
    if isinstance(key, jose.JWKEC):
        curve = key.key.curve.name
        algs = {"secp256r1": jose.ES256, "secp384r1": jose.ES384, "secp521r1": jose.ES512}
        if curve in algs:
            return algs[curve]
        raise ValueError(f"unsupported EC curve for an ACME account key: {curve}")
    raise ValueError(f"unsupported ACME account key type: {type(key).__name__}")


def _media_type(value: str | None) -> str | None:
    if value is None:
        return None
    return value.split(";", 1)[0].strip().lower()


_LINK = re.compile(r"<([^>]*)>\s*((?:;\s*[^,;]*)*)")
_PARAM = re.compile(r';\s*([^=;,\s]+)\s*=\s*(?:"([^"]*)"|([^;,\s]*))')


def parse_links(values: tuple[str, ...], base_url: str) -> list[tuple[str, str]]:
    """``(rel, absolute URL)`` pairs from RFC 8288 Link headers (several per header allowed)."""
    links = []
    for value in values:
        for m in _LINK.finditer(value):
            url = urljoin(base_url, m.group(1).strip())
            for p in _PARAM.finditer(m.group(2)):
                if p.group(1).lower() == "rel":
                    for rel in (p.group(2) or p.group(3) or "").split():
                        links.append((rel.lower(), url))
    return links


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After value (delay-seconds or an HTTP-date), or None.

    ``now`` is the clock's time, so an HTTP-date becomes a delay without reading the wall clock.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


@attrs.frozen
class AcmeResponse:
    """One checked answer from the CA.

    ``json`` is the decoded object when the body is ``application/json``; ``headers`` maps
    lower-case names to every value received.
    """

    url: str
    status: int
    headers: Mapping[str, tuple[str, ...]]
    body: bytes = attrs.field(repr=False)
    json: Any = attrs.field(default=None, repr=False)
    retry_after: float | None = None

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    @property
    def content_type(self) -> str | None:
        return _media_type(self.header("content-type"))

    @property
    def location(self) -> str | None:
        loc = self.header("location")
        return urljoin(self.url, loc) if loc else None

    def links(self, rel: str) -> list[str]:
        """Absolute URLs of every ``Link`` with relation ``rel`` (e.g. ``alternate``, ``up``)."""
        found = parse_links(self.headers.get("link", ()), self.url)
        return [url for r, url in found if r == rel]


def _headers_dict(headers: Headers) -> dict[str, tuple[str, ...]]:
    return {
        name.decode("latin-1").lower(): tuple(v.decode("latin-1") for v in values)
        for name, values in headers.getAllRawHeaders()
    }


def _snippet(body: bytes) -> str:
    text = body[:_MAX_ERROR_SNIPPET].decode("utf-8", "replace")
    return " ".join(text.split())


@attrs.define
class JWSTransport:
    """Signed requests to one ACME server with one account key.

    Holds the nonce pool and the cached directory (instance state, one per CA+key). ``kid`` is
    the account URL once registered; ``None`` embeds the public JWK (newAccount only).
    """

    http: HTTPClient
    clock: IReactorTime
    key: jose.JWK = attrs.field(repr=False)
    directory_url: str
    user_agent: str = f"synapse-acme/{__version__}"
    timeout: float = DEFAULT_REQUEST_TIMEOUT
    max_requests_per_minute: int = MAX_REQUESTS_PER_MINUTE
    #: Appended to a failure to verify the CA's HTTPS certificate: what decides the trust
    #: (the host knows its setting, e.g. ``acme.ca_bundle``).
    untrusted_hint: str | None = None
    #: Told of every answer: ``(endpoint, HTTP status)``, status None when none came (a
    #: timeout, a refused connection, a TLS failure). ``endpoint`` is the kind of resource
    #: (``newOrder``, ``finalize``, ...; see :meth:`post`), never the URL. Metrics count here.
    on_response: Callable[[str, int | None], None] | None = None
    _limiter: RequestRateLimiter = attrs.field(init=False, repr=False)
    _alg: jose.JWASignature = attrs.field(init=False, repr=False)
    _nonces: list[str] = attrs.field(init=False, factory=list, repr=False)
    _directory: messages.Directory | None = attrs.field(init=False, default=None, repr=False)
    _directory_lock: defer.DeferredLock = attrs.field(
        init=False, factory=defer.DeferredLock, repr=False
    )

    def __attrs_post_init__(self) -> None:
        self._alg = jws_algorithm(self.key)
        self._limiter = RequestRateLimiter(self.clock, self.max_requests_per_minute)

    @property
    def limiter(self) -> RequestRateLimiter:
        """The per-CA request cap this transport's requests queue behind."""
        return self._limiter

    # -- public API -------------------------------------------------------------------------

    def directory(self) -> Deferred[messages.Directory]:
        """Deferred firing with the CA's directory, fetched once and then cached (a failed
        fetch is not cached, so the next call tries again)."""
        return self._directory_lock.run(self._fetch_directory)

    def get(
        self, url: str, expect: str | None = JSON, *, endpoint: str = "other"
    ) -> Deferred[AcmeResponse]:
        """Unauthenticated GET (directory, renewalInfo). Deferred firing with the checked
        response; ``expect`` is the content type RFC 8555 fixes for the answer; ``endpoint``
        names the kind of resource for :attr:`on_response`."""
        return Deferred.fromCoroutine(self._checked("GET", url, None, expect, endpoint))

    def post(
        self,
        url: str,
        obj: jose.JSONDeSerializable | None,
        kid: str | None,
        expect: str | None = JSON,
        *,
        endpoint: str = "other",
    ) -> Deferred[AcmeResponse]:
        """JWS-signed POST of ``obj`` (``None``: POST-as-GET, an empty payload) to ``url``.

        Retries with a fresh nonce when the CA answers ``badNonce`` (up to
        :data:`MAX_BAD_NONCE_RETRIES` times). Deferred firing with the checked response.
        ``endpoint`` names the kind of resource (a directory name such as ``newOrder``, or
        ``order``, ``authorization``, ``challenge``, ``finalize``, ``certificate``) for
        :attr:`on_response`.
        """
        return Deferred.fromCoroutine(self._post(url, obj, kid, expect, endpoint))

    # -- internals --------------------------------------------------------------------------

    async def _fetch_directory(self) -> messages.Directory:
        if self._directory is not None:
            return self._directory
        resp = await self._checked("GET", self.directory_url, None, JSON, "directory")
        if not isinstance(resp.json, dict):
            raise AcmeProtocolError("the directory is not a JSON object", self.directory_url)
        for field in ("newNonce", "newAccount", "newOrder"):
            if not isinstance(resp.json.get(field), str):
                raise AcmeProtocolError(f"the directory has no {field} URL", self.directory_url)
            check_url(resp.json[field], f"the directory's {field}", self.directory_url)
        for field in ("renewalInfo", "revokeCert", "keyChange"):
            if field in resp.json:
                check_url(resp.json[field], f"the directory's {field}", self.directory_url)
        try:
            directory = messages.Directory.from_json(dict(resp.json))
        except (jose.DeserializationError, TypeError, ValueError) as e:
            raise AcmeProtocolError(
                f"the directory does not parse: {e}", self.directory_url
            ) from None
        self._directory = directory
        return directory

    async def _post(
        self,
        url: str,
        obj: jose.JSONDeSerializable | None,
        kid: str | None,
        expect: str | None,
        endpoint: str,
    ) -> AcmeResponse:
        payload = obj.json_dumps().encode("utf-8") if obj is not None else b""
        attempt = 0
        while True:
            nonce = await self._take_nonce()
            signed = jws.JWS.sign(
                payload, key=self.key, alg=self._alg, nonce=nonce, url=url, kid=kid
            ).json_dumps()
            try:
                return await self._checked("POST", url, signed.encode("utf-8"), expect, endpoint)
            except AcmeError as e:
                if e.code != "badNonce" or attempt >= MAX_BAD_NONCE_RETRIES:
                    raise
                attempt += 1
                log.debug("badNonce from %s; retrying with a fresh nonce (%d)", url, attempt)

    async def _take_nonce(self) -> bytes:
        attempts = 0
        while not self._nonces:
            url = (await self.directory())["newNonce"]
            if attempts >= _NEW_NONCE_ATTEMPTS:
                raise AcmeProtocolError("newNonce gave no usable Replay-Nonce header", url)
            attempts += 1
            # Every response feeds the pool (see _send); this HEAD exists only for that.
            await self._checked("HEAD", url, None, None, "newNonce")
        return jose.decode_b64jose(self._nonces.pop())

    def _remember_nonce(self, headers: Mapping[str, tuple[str, ...]], url: str) -> None:
        for nonce in headers.get("replay-nonce", ()):
            try:
                jose.decode_b64jose(nonce)
            except jose.DeserializationError:
                log.warning("ignoring a malformed Replay-Nonce from %s", url)
                continue
            self._nonces.append(nonce)

    async def _checked(
        self, method: str, url: str, body: bytes | None, expect: str | None, endpoint: str
    ) -> AcmeResponse:
        resp = await self._send(method, url, body, expect, endpoint)
        return self._check(resp, expect)

    def _observe(self, endpoint: str, status: int | None) -> None:
        if self.on_response is None:
            return
        try:
            self.on_response(endpoint, status)
        except Exception:  # an observer never fails a request
            log.exception("the CA response observer failed")

    async def _send(
        self, method: str, url: str, body: bytes | None, expect: str | None, endpoint: str
    ) -> AcmeResponse:
        headers = Headers({b"User-Agent": [self.user_agent.encode("ascii")]})
        if body is not None:
            headers.setRawHeaders(b"Content-Type", [JOSE_JSON.encode("ascii")])
        if expect is not None:
            headers.setRawHeaders(b"Accept", [f"{expect}, {PROBLEM_JSON}".encode("ascii")])
        check_url(url, "the request URL")
        await self._limiter.acquire()  # queued (not dropped) over the per-CA cap
        d = Deferred.fromCoroutine(self._request_and_read(method, url, headers, body))
        # Cancelling a request may fail it with ResponseNeverReceived(CancelledError) rather
        # than CancelledError: mark timeouts explicitly so they are reported as such.
        d.addTimeout(self.timeout, self.clock, onTimeoutCancel=_timed_out)
        try:
            status, raw_headers, content = await d
        except defer.TimeoutError:
            self._observe(endpoint, None)
            raise AcmeTransportError(f"no answer within {self.timeout:g} s", url) from None
        except _BodyTooLarge:
            self._observe(endpoint, None)
            raise AcmeProtocolError(
                f"the answer is larger than {MAX_RESPONSE_BYTES} bytes", url
            ) from None
        except _TRANSPORT_FAILURES as e:
            self._observe(endpoint, None)
            text = _describe_failure(e)
            if self.untrusted_hint and _UNTRUSTED in text:
                text += f"; {self.untrusted_hint}"
            raise AcmeTransportError(text, url) from None
        self._observe(endpoint, status)
        self._remember_nonce(raw_headers, url)
        retry_after = parse_retry_after(
            (raw_headers.get("retry-after") or (None,))[0], self.clock.seconds()
        )
        return AcmeResponse(
            url=url, status=status, headers=raw_headers, body=content, retry_after=retry_after
        )

    async def _request_and_read(
        self, method: str, url: str, headers: Headers, body: bytes | None
    ) -> tuple[int, dict[str, tuple[str, ...]], bytes]:
        response = await self.http.request(
            method, url, headers=headers, data=body, allow_redirects=False
        )
        chunks: list[bytes] = []
        if method != "HEAD":
            size = 0

            def collect(data: bytes) -> None:
                nonlocal size
                size += len(data)
                if size > MAX_RESPONSE_BYTES:
                    raise _BodyTooLarge()  # treq closes the connection
                chunks.append(data)

            await treq.collect(response, collect)
        return response.code, _headers_dict(response.headers), b"".join(chunks)

    def _check(self, resp: AcmeResponse, expect: str | None) -> AcmeResponse:
        ctype = resp.content_type
        if ctype == PROBLEM_JSON or resp.status >= 400:
            raise self._problem(resp)
        if not 200 <= resp.status < 300:
            raise AcmeProtocolError(f"unexpected HTTP status {resp.status}", resp.url, resp.status)
        if expect is None:
            return resp
        if ctype != expect:
            raise AcmeProtocolError(
                f"expected content type {expect}, got {ctype or 'none'}", resp.url, resp.status
            )
        if expect == JSON:
            try:
                obj = json.loads(resp.body)
            except (ValueError, UnicodeDecodeError) as e:
                raise AcmeProtocolError(
                    f"the JSON body does not parse ({e})", resp.url, resp.status
                ) from None
            if not isinstance(obj, dict):
                raise AcmeProtocolError(
                    f"expected a JSON object, got {type(obj).__name__}", resp.url, resp.status
                )
            return attrs.evolve(resp, json=obj)
        return resp

    def _problem(self, resp: AcmeResponse) -> Exception:
        """The typed error for a failed response.

        A problem document becomes :class:`AcmeError` with its type. A 429/5xx without one
        (a proxy's HTML page, say) becomes an ``about:blank`` AcmeError, which is RFC 7807's
        "the HTTP status says it all", so callers still see status and Retry-After. Any other
        failure without a problem document is a protocol error.
        """
        ctype = resp.content_type
        obj: Any = None
        if ctype in (PROBLEM_JSON, JSON):
            try:
                obj = json.loads(resp.body)
            except (ValueError, UnicodeDecodeError):
                obj = None
        if isinstance(obj, dict):
            try:
                problem = messages.Error.from_json(obj)
            except (jose.DeserializationError, TypeError, ValueError):
                problem = None
            if problem is not None:
                subs = obj.get("subproblems")
                return AcmeError(
                    type=str(problem.typ or "about:blank"),
                    detail=str(problem.detail or problem.title or ""),
                    status=resp.status,
                    url=resp.url,
                    retry_after=resp.retry_after,
                    subproblems=tuple(s for s in subs if isinstance(s, dict))
                    if isinstance(subs, list)
                    else (),
                )
        if resp.status == 429 or resp.status >= 500:
            return AcmeError(
                type="about:blank",
                detail=f"HTTP {resp.status} without a problem document: {_snippet(resp.body)!r}",
                status=resp.status,
                url=resp.url,
                retry_after=resp.retry_after,
            )
        return AcmeProtocolError(
            f"HTTP {resp.status} without a problem document (content type {ctype or 'none'})",
            resp.url,
            resp.status,
        )


def _timed_out(result: object, timeout: float) -> object:
    raise defer.TimeoutError(timeout)


# OpenSSL's reason when the server's certificate does not chain to a trusted root.
_UNTRUSTED = "certificate verify failed"


def _describe_failure(e: BaseException) -> str:
    if isinstance(e, (ResponseFailed, ResponseNeverReceived)):
        reasons = "; ".join(
            f"{r.type.__name__}: {r.getErrorMessage()}" for r in getattr(e, "reasons", [])
        )
        return f"{type(e).__name__} ({reasons})" if reasons else type(e).__name__
    return f"{type(e).__name__}: {e}"


__all__ = [
    "DEFAULT_REQUEST_TIMEOUT",
    "JOSE_JSON",
    "JSON",
    "MAX_BAD_NONCE_RETRIES",
    "MAX_REQUESTS_PER_MINUTE",
    "MAX_RESPONSE_BYTES",
    "PEM_CHAIN",
    "PROBLEM_JSON",
    "AcmeResponse",
    "JWSTransport",
    "RequestRateLimiter",
    "check_url",
    "jws_algorithm",
    "make_http_client",
    "parse_links",
    "parse_retry_after",
]
