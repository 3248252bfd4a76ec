"""The HTTP-01 challenge responder: a live token map, what it answers, the resource, the listener.

:func:`answer` decides every reply. The resource serves it on every Synapse HTTP listener
(mounted at ``/.well-known/acme-challenge``); the standalone listener serves it through the
small protocol in :mod:`synapse_acme.http01_server`. Both read the responder's map on each
request instead of being rebuilt per challenge, and neither raises: a bug costs one 500,
never a dead listener.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import re
import socket
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.internet.address import IPv6Address
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from zope.interface import implementer

from synapse_acme.errors import ListenError
from synapse_acme.interfaces import IResponder

logger = logging.getLogger(__name__)

# RFC 8555 §8.3: the token is base64url; real CAs send 43 characters. 256 bounds the work
# done for junk requests while leaving room for any CA.
_TOKEN = re.compile(rb"[A-Za-z0-9_-]{1,256}")
_ALLOWED_METHODS = (b"GET", b"HEAD")


def _valid_token(token: str) -> bool:
    return isinstance(token, str) and _TOKEN.fullmatch(token.encode("ascii", "replace")) is not None


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
        if token.startswith(PROBE_PREFIX) and _valid_token(token):
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
    with :func:`probe_answer`.
    """

    challenge_type = "http-01"
    probe_secret: bytes | None = attrs.field(default=None, repr=False, kw_only=True)
    _tokens: dict[str, bytes] = attrs.field(factory=dict, init=False)

    def start_responding(self, identifier: str, token: str, key_authorization: str) -> None:
        """Serve ``key_authorization`` at ``/.well-known/acme-challenge/<token>`` from now on.

        Raises ValueError for a token no HTTP-01 resource could serve (not base64url), so an
        issuance fails with a clear reason instead of a validation timeout.
        """
        if not _valid_token(token):
            raise ValueError(f"HTTP-01 token is not base64url (1-256 characters): {token!r}")
        self._tokens[token] = key_authorization.encode("ascii")
        logger.debug("Answering the HTTP-01 challenge for %s (token %s)", identifier, token)

    def stop_responding(self, identifier: str, token: str) -> None:
        """Stop serving ``token``; an unknown token is not an error."""
        if self._tokens.pop(token, None) is not None:
            logger.debug("Stopped answering the HTTP-01 challenge for %s", identifier)

    def tokens(self) -> Mapping[str, bytes]:
        """A read-only live view of the tokens being answered (values: the response bodies),
        answering probe tokens too when the responder has a ``probe_secret``."""
        view = types.MappingProxyType(self._tokens)
        return view if self.probe_secret is None else _WithProbes(view, self.probe_secret)

    def resource(self) -> IResource:
        """The resource to mount as the ``acme-challenge`` child of ``.well-known``."""
        return _ChallengeResource(self.tokens())


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


def answer(tokens: Mapping[str, bytes], method: bytes, segments: Sequence[bytes]) -> Answer:
    """The answer to ``method`` on ``/.well-known/acme-challenge/<segments...>``.

    ``segments`` are the percent-decoded path segments below ``acme-challenge``. The one
    decision both servers share: the resource Synapse mounts and the standalone listener's
    protocol (:mod:`synapse_acme.http01_server`).
    """
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

    def __init__(self, tokens: Mapping[str, bytes]) -> None:
        super().__init__()
        self._tokens = tokens

    def render(self, request: Any) -> bytes:
        try:
            return self._render(request)
        except Exception:
            logger.exception("Bug answering an HTTP-01 request")
            try:
                request.setResponseCode(INTERNAL_ERROR.code)
                request.setHeader(b"content-type", b"text/plain")
            except Exception:
                pass
            return b"" if getattr(request, "method", None) == b"HEAD" else INTERNAL_ERROR.body

    def _render(self, request: Request) -> bytes:
        result = answer(self._tokens, request.method, request.postpath or [])
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


_NO_SYSTEMD_SOCKET = (
    "no listening socket inherited for {description!r}: this process was not started with "
    "LISTEN_FDS/LISTEN_PID for it, or without LISTEN_FDNAMES, which Twisted requires "
    "(systemd socket units set it; systemd-socket-activate needs --fdname=NAME)"
)


def server_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """``serverFromString``, with clear errors and the real address family for ``systemd:``.

    Twisted adopts an inherited socket with the family the string names; ``ListenStream=80``
    gives an IPv6 socket, and ``domain=INET`` would then report nonsense addresses, so the
    family is taken from the socket itself. A missing socket is a ListenError saying why.
    """
    try:
        endpoint = serverFromString(reactor, description)
    except (IndexError, KeyError) as e:
        if description.strip().startswith("systemd:"):
            raise ListenError(_NO_SYSTEMD_SOCKET.format(description=description)) from e
        raise
    if isinstance(endpoint, AdoptedStreamServerEndpoint):
        endpoint = _with_real_family(reactor, endpoint, description)
    return endpoint


def _with_real_family(
    reactor: Any, endpoint: AdoptedStreamServerEndpoint, description: str
) -> AdoptedStreamServerEndpoint:
    fileno = endpoint.fileno
    try:
        # A dup so that closing the probe leaves the inherited descriptor alone.
        with socket.socket(fileno=os.dup(fileno)) as probe:
            family = probe.family
            listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as e:
        raise ListenError(f"{description}: inherited descriptor {fileno} is not a socket") from e
    if not listening:
        raise ListenError(f"{description}: inherited socket {fileno} is not listening")
    if family != endpoint.addressFamily:
        logger.info("%s: the inherited socket is %s; using that family", description, family.name)
        endpoint = AdoptedStreamServerEndpoint(reactor, fileno, family)
    return endpoint


def _is_dual_stack_overlap(failure: Failure, bound: Sequence[IListeningPort]) -> bool:
    """True for EADDRINUSE on an IPv4 wildcard whose port a bound ``::`` socket already takes."""
    err = failure.value
    if not isinstance(err, CannotListenError) or err.interface not in ("", "0.0.0.0"):
        return False
    if getattr(err.socketError, "errno", None) != errno.EADDRINUSE:
        return False
    for port in bound:
        host = port.getHost()
        if isinstance(host, IPv6Address) and host.host == "::" and host.port == err.port:
            return True
    return False


def endpoint_in_words(description: str, failure: Failure) -> str:
    """An endpoint in plain words: ``port 80 on ::``, not ``tcp6:port=80:interface=\\:\\:``."""
    err = failure.value
    if isinstance(err, CannotListenError):
        host = err.interface or "every address"
        return f"port {err.port} on {host}"
    return description


def _errno(failure: Failure) -> int | None:
    err = failure.value
    if isinstance(err, CannotListenError):
        err = err.socketError
    code = getattr(err, "errno", None)
    return code if isinstance(code, int) else None


def bind_error_in_words(failure: Failure) -> str:
    err = failure.value
    if isinstance(err, CannotListenError):
        err = err.socketError
    if isinstance(err, OSError) and err.strerror:
        name = errno.errorcode.get(err.errno, "") if err.errno is not None else ""
        return f"{err.strerror}, {name}" if name else err.strerror
    return str(err) or type(err).__name__


# What to do about the usual reasons, by errno (the deploy pages show each way, tested).
_LOW_PORT_ADVICE = (
    "ports below 1024 need privileges. Either give a port such as 8009 and let the web server "
    "forward /.well-known/acme-challenge to it (docs/deploy-nginx.md, docs/deploy-apache.md), "
    "or start with authbind (docs/deploy-authbind.md), or start as root with `synapse-acme run "
    "--user USER`, which binds first and then drops root (docs/deploy-root-drop.md), or let "
    "systemd hand over the socket through listen: ['systemd:...'] "
    "(docs/deploy-systemd-socket.md)"
)
_IN_USE_ADVICE = (
    "another program listens there (often the web server: `ss -ltnp` shows which). Let it "
    "forward /.well-known/acme-challenge to synapse-acme on a port such as 8009 "
    "(docs/deploy-nginx.md, docs/deploy-apache.md), or stop it"
)
_NO_ADDRESS_ADVICE = "the address is not one of this host's: give one it has, or '::'"


def bind_failure_message(errors: Sequence[tuple[str, Failure]], setting: str | None) -> str:
    """The one error for a listener that could bind nothing: each endpoint in words with its OS
    error, the setting they come from, and what to do for the errors seen."""
    detail = "; ".join(f"{endpoint_in_words(d, f)} ({bind_error_in_words(f)})" for d, f in errors)
    text = f"could not open any HTTP-01 challenge listener: {detail}"
    if setting:
        text += f". These come from {setting}"
    codes = {_errno(f) for _, f in errors}
    advice = []
    if errno.EACCES in codes or errno.EPERM in codes:
        advice.append(_LOW_PORT_ADVICE)
    if errno.EADDRINUSE in codes:
        advice.append(_IN_USE_ADVICE)
    if errno.EADDRNOTAVAIL in codes:
        advice.append(_NO_ADDRESS_ADVICE)
    if advice:
        text += ". " + "; ".join(a[0].upper() + a[1:] for a in advice)
    return text


class HTTP01ListenerService(service.Service):
    """Binds the HTTP-01 server (``http01_server.make_factory``) on several endpoints,
    tolerating all but total failure.

    Binding happens in ``privilegedStartService`` (port 80 before privileges drop). A host
    without IPv6 fails ``::`` and keeps ``0.0.0.0``; on Linux ``::`` is dual-stack and the
    ``0.0.0.0`` bind fails with EADDRINUSE, which is expected.
    """

    def __init__(
        self,
        reactor: Any,
        factory: IProtocolFactory,
        endpoints: Sequence[str],
        setting: str | None = None,
    ) -> None:
        """``setting`` names the configuration the endpoints come from (``acme.port (80) and
        acme.bind_addresses``), so that a failure says what to change."""
        self._reactor = reactor
        self._factory = factory
        self._setting = setting
        self.endpoints: list[str] = list(endpoints)
        #: The bound ports, in endpoint order (``getHost().port`` gives the number for port 0).
        self.ports: list[IListeningPort] = []
        self._binding: defer.Deferred[None] | None = None
        self._outcome: list[IListeningPort] | Failure | None = None
        self._waiters: list[defer.Deferred[list[IListeningPort]]] = []

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self._binding is None:
            self._binding = defer.ensureDeferred(self._bind_all())

    def startService(self) -> None:
        super().startService()
        if self._binding is None:  # not started through a parent's privilegedStartService
            self._binding = defer.ensureDeferred(self._bind_all())

    def when_listening(self) -> defer.Deferred[list[IListeningPort]]:
        """Deferred firing with the bound ports once binding is done, or failing with
        ListenError if no endpoint could be bound (each address in words, the OS error, the
        setting and the ways to fix it). The waiter reports that failure: this service logs
        only the endpoints it could not bind while others work."""
        d: defer.Deferred[list[IListeningPort]] = defer.Deferred()
        if self._outcome is None:
            self._waiters.append(d)
        elif isinstance(self._outcome, Failure):
            d.errback(self._outcome)
        else:
            d.callback(list(self._outcome))
        return d

    async def _bind_all(self) -> None:
        errors: list[tuple[str, Failure]] = []
        for description in self.endpoints:
            try:
                endpoint = server_endpoint(self._reactor, description)
                port = await endpoint.listen(self._factory)
            except defer.CancelledError:
                self._settle(Failure(ListenError("stopped before the listener was bound")))
                return
            except Exception:
                failure = Failure()
                if _is_dual_stack_overlap(failure, self.ports):
                    logger.info(
                        "HTTP-01 listener %s not bound: covered by the IPv6 dual-stack socket",
                        description,
                    )
                else:
                    errors.append((description, failure))
                continue
            self.ports.append(port)
            logger.info("HTTP-01 challenge listener on %s (%s)", description, port.getHost())
        if self.endpoints and not self.ports:
            self._settle(Failure(ListenError(bind_failure_message(errors, self._setting))))
            return
        for description, failure in errors:
            logger.warning(
                "HTTP-01 listener %s not bound (%s); the others serve challenges",
                endpoint_in_words(description, failure),
                bind_error_in_words(failure),
            )
        self._settle(list(self.ports))

    def _settle(self, outcome: list[IListeningPort] | Failure) -> None:
        self._outcome = outcome
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(list(outcome))

    def stopService(self) -> defer.Deferred[None]:
        """Deferred firing once every bound port has stopped listening."""
        super().stopService()
        binding, self._binding = self._binding, None
        if binding is not None and not binding.called:
            binding.cancel()
        ports, self.ports = self.ports, []
        self._outcome = None
        stops = [defer.maybeDeferred(port.stopListening) for port in ports]
        done = defer.DeferredList(stops, consumeErrors=True)
        return done.addCallback(lambda _: None)
