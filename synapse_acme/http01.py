"""The HTTP-01 challenge responder: a live token map, what it answers, the resource.

:func:`answer` decides every reply. The resource serves it on every Synapse HTTP listener
(mounted at ``/.well-known/acme-challenge``); the standalone listener serves it through the
small protocol in :mod:`synapse_acme.http01_server`, bound by :mod:`synapse_acme.listeners`.
Both read the responder's map on each request instead of being rebuilt per challenge, and
neither raises: a bug costs one 500, never a dead listener.

On a shared store (``shared``, the PostgreSQL store) every token is also put in the store before
the CA is told, and a request for a token this process does not hold is looked up there
(:func:`answer_or_lookup`, asynchronously: the reactor never waits on the database), so any
process on any host answers the CA, not only the one that placed the order.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from synapse_acme.interfaces import IChallengeStore, IResponder
from synapse_acme.names import is_safe_token

logger = logging.getLogger(__name__)

# names.is_safe_token's rule, on the raw bytes of a request path segment.
_TOKEN = re.compile(rb"[A-Za-z0-9_-]{1,256}")
_ALLOWED_METHODS = (b"GET", b"HEAD")

#: Tokens a responder with a ``probe_secret`` answers without being told (see
#: :mod:`synapse_acme.preflight`): ``synapse-acme check`` proves that the process serving the
#: store's challenges answers, without talking to it. A token the issuer registered always wins
#: (a CA's random token starting like this is as likely as guessing 114 bits).
PROBE_PREFIX = "synapse-acme-probe-"


def probe_answer(secret: bytes, token: str) -> bytes:
    """The body a responder with ``secret`` serves for the probe ``token``: an HMAC, so only a
    process that holds the secret (derived from the account key) can answer it."""
    return hmac.new(secret, token.encode("ascii"), hashlib.sha256).hexdigest().encode("ascii")


def probe_secret_from_key(private_key_der: bytes) -> bytes:
    """The probe secret of a store: derived from its account key's private bytes, which every
    process serving the store reads; the HMAC never reveals it."""
    return hashlib.sha256(b"synapse-acme preflight probe\0" + private_key_der).digest()


class _WithProbes(Mapping[str, bytes]):
    """The live token map, plus an answer for every probe token (never listed)."""

    def __init__(self, tokens: Mapping[str, bytes], secret: bytes) -> None:
        self._tokens = tokens
        self._secret = secret

    def __getitem__(self, token: str) -> bytes:
        found = self._tokens.get(token)
        if found is not None:
            return found
        if token.startswith(PROBE_PREFIX) and is_safe_token(token):
            return probe_answer(self._secret, token)
        raise KeyError(token)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)


@implementer(IResponder)
@attrs.define
class HTTP01Responder:
    """Answers ``http-01`` challenges from an in-memory map ``token -> key authorization``.

    The issuer calls :meth:`start_responding` before telling the CA to validate and
    :meth:`stop_responding` afterwards; the resource from :meth:`resource` reads the map live.
    With ``probe_secret`` it also answers every preflight probe token (:data:`PROBE_PREFIX`)
    with :func:`probe_answer`. ``on_request`` is told of every request under the challenge
    path that both servers answer: True when a token was answered (a hit), else False.
    ``shared``: the challenge store of a store shared by several processes; tokens go there
    too, and tokens not held here are looked up there (see the module docstring).
    """

    challenge_type = "http-01"
    probe_secret: bytes | None = attrs.field(default=None, repr=False, kw_only=True)
    on_request: Callable[[bool], None] | None = attrs.field(default=None, kw_only=True)
    shared: IChallengeStore | None = attrs.field(default=None, kw_only=True)
    _tokens: dict[str, bytes] = attrs.field(factory=dict, init=False)
    _bounded: _BoundedLookup | None = attrs.field(default=None, init=False)

    def start_responding(
        self, identifier: str, token: str, key_authorization: str
    ) -> defer.Deferred[None] | None:
        """Serve ``key_authorization`` at ``/.well-known/acme-challenge/<token>`` from now on
        (with ``shared``: a Deferred firing once every process on the store answers it).

        Raises ValueError for a token no HTTP-01 resource could serve (not base64url), so an
        issuance fails with a clear reason instead of a validation timeout.
        """
        if not is_safe_token(token):
            raise ValueError(f"HTTP-01 token is not base64url (1-256 characters): {token!r}")
        self._tokens[token] = key_authorization.encode("ascii")
        logger.debug("Answering the HTTP-01 challenge for %s (token %s)", identifier, token)
        if self.shared is None:
            return None
        return self.shared.put_challenge(token, key_authorization)

    def stop_responding(self, identifier: str, token: str) -> defer.Deferred[None] | None:
        """Stop serving ``token``; an unknown token is not an error. With ``shared`` the
        token is removed from the store too (a failure there is logged: the answer is not
        secret, and it is useless once the CA has validated)."""
        if self._tokens.pop(token, None) is not None:
            logger.debug("Stopped answering the HTTP-01 challenge for %s", identifier)
        if self.shared is None:
            return None
        d = self.shared.remove_challenge(token)
        return d.addErrback(
            lambda f: logger.warning(
                "Could not remove the HTTP-01 token from the shared store: %s",
                f.getErrorMessage(),
            )
        )

    def lookup(self) -> Callable[[str], defer.Deferred[bytes | None]] | None:
        """How a token not held here is looked up (the shared store), None without one."""
        shared = self.shared
        if shared is None:
            return None

        def look(token: str) -> defer.Deferred[bytes | None]:
            d = shared.get_challenge(token)
            return d.addCallback(lambda found: found.encode("ascii") if found else None)

        if self._bounded is None:
            self._bounded = _BoundedLookup(look)
        return self._bounded

    def tokens(self) -> Mapping[str, bytes]:
        """A read-only live view of the tokens being answered (values: the response bodies),
        answering probe tokens too when the responder has a ``probe_secret``."""
        view = types.MappingProxyType(self._tokens)
        return view if self.probe_secret is None else _WithProbes(view, self.probe_secret)

    def resource(self) -> Resource:
        """The resource to mount as the ``acme-challenge`` child of ``.well-known``."""
        return _ChallengeResource(self.tokens(), self.on_request, self.lookup())


#: Store reads for tokens not held here, at once per process: a flood of made-up tokens (the
#: path is public) queues behind these instead of taking every database connection.
LOOKUPS_IN_FLIGHT = 4
#: Lookups waiting for one of those; beyond this a made-up-token flood is answered 404 at once
#: (logged), and the store is not asked.
LOOKUPS_WAITING = 1024


class _BoundedLookup:
    """``look`` with at most :data:`LOOKUPS_IN_FLIGHT` reads at once, :data:`LOOKUPS_WAITING`
    waiting, and one read for a token asked for several times meanwhile (a CA validates from
    several places at once)."""

    def __init__(self, look: Callable[[str], defer.Deferred[bytes | None]]) -> None:
        self._look = look
        self._limit = defer.DeferredSemaphore(LOOKUPS_IN_FLIGHT)
        self._pending: dict[str, list[defer.Deferred[bytes | None]]] = {}
        self._shed = 0  # lookups answered 404 at once

    def __call__(self, token: str) -> defer.Deferred[bytes | None]:
        waiters = self._pending.get(token)
        mine: defer.Deferred[bytes | None] = defer.Deferred()
        if waiters is not None:
            waiters.append(mine)
            return mine
        if len(self._pending) >= LOOKUPS_IN_FLIGHT + LOOKUPS_WAITING:
            self._log_shed()
            return defer.succeed(None)
        self._pending[token] = [mine]
        d = self._limit.run(self._look, token)
        d.addBoth(self._done, token)
        return mine

    def _done(self, result: bytes | Failure | None, token: str) -> None:
        for waiter in self._pending.pop(token, []):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def _log_shed(self) -> None:
        self._shed += 1
        if self._shed % 10000 == 1:  # the first, then one line per 10,000
            logger.warning(
                "Over %d HTTP-01 tokens not held here are waiting for the shared store: "
                "answering more with 404 at once (a flood of made-up tokens?); %d so far",
                LOOKUPS_IN_FLIGHT + LOOKUPS_WAITING,
                self._shed,
            )


@attrs.frozen
class Answer:
    """What the challenge path answers: status, the body a GET gets, and ``Allow`` for 405.

    Headers are the same for every answer (``text/plain``, ``no-store``); a HEAD gets the
    length of ``body`` without the body.
    """

    code: int
    body: bytes
    allow: bytes | None = None


NOT_FOUND = Answer(404, b"not found\n")
#: What a bug in answering costs: one 500, never the listener.
INTERNAL_ERROR = Answer(500, b"internal error\n")
_METHOD_NOT_ALLOWED = Answer(405, b"method not allowed\n", allow=b", ".join(_ALLOWED_METHODS))


def answer(
    tokens: Mapping[str, bytes],
    method: bytes,
    segments: Sequence[bytes],
    observe: Callable[[bool], None] | None = None,
) -> Answer:
    """The answer to ``method`` on ``/.well-known/acme-challenge/<segments...>``.

    ``segments`` are the percent-decoded path segments below ``acme-challenge``. The one
    decision both servers share: the resource Synapse mounts and the standalone listener's
    protocol (:mod:`synapse_acme.http01_server`). ``observe`` is told whether a token was
    answered (the responder's ``on_request``: metrics count hits and misses there).
    """
    result = _answer(tokens, method, segments)
    _tell(observe, result)
    return result


def answer_or_lookup(
    tokens: Mapping[str, bytes],
    method: bytes,
    segments: Sequence[bytes],
    observe: Callable[[bool], None] | None,
    lookup: Callable[[str], defer.Deferred[bytes | None]] | None,
) -> Answer | defer.Deferred[Answer]:
    """:func:`answer`, or, for a well-formed token not in ``tokens`` when there is a
    ``lookup`` (the shared store), a Deferred firing with the answer from it: its key
    authorization, else the same 404 (also when the store cannot be read: logged)."""
    result = _answer(tokens, method, segments)
    token = _wanted_token(method, segments) if result is NOT_FOUND and lookup else None
    if token is None or lookup is None:
        _tell(observe, result)
        return result

    def found(body: bytes | None) -> Answer:
        return Answer(200, body) if body is not None else NOT_FOUND

    def failed(failure: Failure) -> Answer:
        logger.warning(
            "Could not look an HTTP-01 token up in the shared store: %s",
            failure.getErrorMessage(),
        )
        return NOT_FOUND

    def told(result: Answer) -> Answer:
        _tell(observe, result)
        return result

    return defer.maybeDeferred(lookup, token).addCallbacks(found, failed).addCallback(told)


def _tell(observe: Callable[[bool], None] | None, result: Answer) -> None:
    if observe is not None:
        try:
            observe(result.code == 200)
        except Exception:  # counting never costs an answer
            logger.exception("the HTTP-01 request observer failed")


def _wanted_token(method: bytes, segments: Sequence[bytes]) -> str | None:
    """The token a GET or HEAD asks for, if it asks for one well-formed token."""
    parts = [s for s in segments if s]
    if method in _ALLOWED_METHODS and len(parts) == 1 and _TOKEN.fullmatch(parts[0]):
        return parts[0].decode("ascii")
    return None


def _answer(tokens: Mapping[str, bytes], method: bytes, segments: Sequence[bytes]) -> Answer:
    if method not in _ALLOWED_METHODS:
        return _METHOD_NOT_ALLOWED
    # Proxies add slashes: /<token>/, and //<token> from a ProxyPass whose target ends in
    # a slash while its path does not. Empty segments carry no meaning here.
    parts = [s for s in segments if s]
    body = None
    if len(parts) == 1 and _TOKEN.fullmatch(parts[0]):
        body = tokens.get(parts[0].decode("ascii"))
    elif parts:
        logger.debug("HTTP-01 request for a malformed token: %r", parts[:2])
    if body is None:
        return NOT_FOUND
    logger.debug("Answered an HTTP-01 challenge request")
    return Answer(200, body)


class _ChallengeResource(Resource):
    """``GET|HEAD /<token>`` -> the key authorization; anything else 404 or 405."""

    isLeaf = True

    def __init__(
        self,
        tokens: Mapping[str, bytes],
        observe: Callable[[bool], None] | None = None,
        lookup: Callable[[str], defer.Deferred[bytes | None]] | None = None,
    ) -> None:
        super().__init__()
        self._tokens = tokens
        self._observe = observe
        self._lookup = lookup

    def render(self, request: Any) -> bytes | int:
        try:
            result = answer_or_lookup(
                self._tokens, request.method, request.postpath or [], self._observe, self._lookup
            )
            if isinstance(result, Answer):
                return self._render(request, result)
        except Exception:
            return self._bug(request)
        finished: list[object] = []
        request.notifyFinish().addBoth(finished.append)  # the client went away

        def write(answer: Answer) -> None:
            if finished:
                return
            try:
                body = self._render(request, answer)
            except Exception:
                body = self._bug(request)
            request.write(body)
            request.finish()

        result.addCallback(write).addErrback(
            lambda f: logger.error("Bug answering an HTTP-01 request", exc_info=f.value)
        )
        return NOT_DONE_YET

    def _bug(self, request: Any) -> bytes:
        logger.exception("Bug answering an HTTP-01 request")
        try:
            request.setResponseCode(INTERNAL_ERROR.code)
            request.setHeader(b"content-type", b"text/plain")
        except Exception:
            pass
        return b"" if getattr(request, "method", None) == b"HEAD" else INTERNAL_ERROR.body

    def _render(self, request: Request, result: Answer) -> bytes:
        request.setResponseCode(result.code)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-type", b"text/plain")
        if result.allow:
            request.setHeader(b"allow", result.allow)
        if request.method == b"HEAD":
            # Say the length a GET would get, without a body (and without Twisted's HEAD warning).
            request.setHeader(b"content-length", b"%d" % len(result.body))
            return b""
        return result.body
