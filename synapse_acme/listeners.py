"""Every listener the project opens, in one place: the endpoints, the binding, the errors.

:class:`ListenerService` binds a protocol factory on endpoint strings (``tcp:``, ``tcp6:``,
``unix:``, ``systemd:``) in ``privilegedStartService``, so that ports below 1024 can be bound
before privileges drop, and reports through :meth:`ListenerService.when_listening`: the bound
ports, or one ListenError naming each address in plain words, the OS error, the setting it
comes from and what to do. The standalone HTTP-01 listener and every TLS listener
(:func:`tls_listener`: TLS with the hot-swapping creator, under the connection caps of
:mod:`synapse_acme.limits`) are built on it; :meth:`synapse_acme.runtime.Runtime.when_ready`
waits for all of them.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.internet.address import IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from synapse_acme.errors import ListenError
from synapse_acme.limits import ConnectionLimits, HandshakeDeadlineFactory, LimitedFactory

logger = logging.getLogger(__name__)


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


def bind_failure_message(
    errors: Sequence[tuple[str, Failure]],
    setting: str | None,
    what: str = "HTTP-01 challenge listener",
) -> str:
    """The one error for a listener that could bind nothing: each endpoint in words with its OS
    error, the setting they come from, and what to do for the errors seen (the advice on
    forwarding is for the HTTP-01 listener, whose CA always dials port 80)."""
    detail = "; ".join(f"{endpoint_in_words(d, f)} ({bind_error_in_words(f)})" for d, f in errors)
    text = f"could not open any {what}: {detail}"
    if setting:
        text += f". These come from {setting}"
    codes = {_errno(f) for _, f in errors}
    advice = []
    http01 = what.startswith("HTTP-01")
    if http01 and (errno.EACCES in codes or errno.EPERM in codes):
        advice.append(_LOW_PORT_ADVICE)
    if http01 and errno.EADDRINUSE in codes:
        advice.append(_IN_USE_ADVICE)
    if errno.EADDRNOTAVAIL in codes:
        advice.append(_NO_ADDRESS_ADVICE)
    if advice:
        text += ". " + "; ".join(a[0].upper() + a[1:] for a in advice)
    return text


class ListenerService(service.Service):
    """Binds one protocol factory on several endpoints, tolerating all but total failure: the
    HTTP-01 listener (``http01_server.make_factory`` on ``port``/``bind_addresses`` or
    ``listen``) and each TLS listener (:func:`tls_listener`).

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
        *,
        what: str = "HTTP-01 challenge listener",
        wrap: Callable[[IStreamServerEndpoint], IStreamServerEndpoint] | None = None,
    ) -> None:
        """``setting`` names the configuration the endpoints come from (``acme.port (80) and
        acme.bind_addresses``), so that a failure says what to change; ``what`` names the
        listener in logs and errors; ``wrap`` adds a layer to each endpoint (TLS)."""
        self._reactor = reactor
        self._factory = factory
        self._setting = setting
        self._what = what
        self._wrap = wrap
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
                if self._wrap is not None:
                    endpoint = self._wrap(endpoint)
                port = await endpoint.listen(self._factory)
            except defer.CancelledError:
                self._settle(Failure(ListenError("stopped before the listener was bound")))
                return
            except Exception:
                failure = Failure()
                if _is_dual_stack_overlap(failure, self.ports):
                    logger.info(
                        "%s %s not bound: covered by the IPv6 dual-stack socket",
                        self._what,
                        description,
                    )
                else:
                    errors.append((description, failure))
                continue
            self.ports.append(port)
            logger.info("%s on %s (%s)", self._what, description, port.getHost())
        if self.endpoints and not self.ports:
            message = bind_failure_message(errors, self._setting, self._what)
            self._settle(Failure(ListenError(message)))
            return
        for description, failure in errors:
            logger.warning(
                "%s %s not bound (%s); the others serve",
                self._what,
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


@implementer(IStreamServerEndpoint)
@attrs.frozen
class TLSServerEndpoint:
    """Runs TLS with ``creator`` over any stream server endpoint (tcp:, systemd:, unix:)."""

    endpoint: IStreamServerEndpoint
    creator: IOpenSSLServerConnectionCreator
    limits: ConnectionLimits | None = None  # None: no caps (the caller bounds connections)
    clock: IReactorTime | None = None  # for the caps' handshake deadline and log pacing

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        if self.limits is None or self.clock is None:
            return self.endpoint.listen(TLSMemoryBIOFactory(self.creator, False, protocolFactory))
        # Outside TLS: the connection caps (a flood is dropped before any handshake work);
        # inside: the handshake deadline (TLS tells the protocol it wraps when it is done).
        inner = HandshakeDeadlineFactory(protocolFactory, self.limits.handshake_timeout, self.clock)
        outer = LimitedFactory(
            TLSMemoryBIOFactory(self.creator, False, inner), self.limits, self.clock, "TLS listener"
        )
        return self.endpoint.listen(outer)


def tls_server_endpoint(
    reactor: Any,
    description: str,
    creator: IOpenSSLServerConnectionCreator,
    limits: ConnectionLimits | None = None,
) -> IStreamServerEndpoint:
    """A TLS listener endpoint from a plain endpoint string, e.g. ``"tcp:8448:interface=::"``
    (:func:`server_endpoint`: clear errors, the real family of a ``systemd:`` socket).

    Use ``tcp:``/``systemd:``/``unix:`` descriptions; ``ssl:`` would add a second TLS layer.
    """
    _check_plain(description)
    return _tls_wrapper(reactor, creator, limits)(server_endpoint(reactor, description))


def _check_plain(description: str) -> None:
    if description.split(":", 1)[0].lower() in ("ssl", "tls"):
        raise ValueError(
            f"{description!r}: give a plain endpoint (tcp:...), TLS is added by the creator"
        )


def _tls_wrapper(
    reactor: Any, creator: IOpenSSLServerConnectionCreator, limits: ConnectionLimits | None
) -> Callable[[IStreamServerEndpoint], IStreamServerEndpoint]:
    clock = reactor if IReactorTime.providedBy(reactor) else None
    return lambda endpoint: TLSServerEndpoint(endpoint, creator, limits, clock)


def tls_listener(
    reactor: Any,
    description: str,
    creator: IOpenSSLServerConnectionCreator,
    factory: IProtocolFactory | None = None,
    setting: str | None = None,
    limits: ConnectionLimits | None = None,
) -> ListenerService:
    """A TLS listener with ``creator`` on a plain endpoint description (``tcp:8448``).

    Binds in ``privilegedStartService`` (so port 443 can be bound before dropping privileges);
    :meth:`ListenerService.when_listening` fails with a ListenError naming the address, the OS
    error and ``setting``. Without ``factory`` it serves a one-line page.
    """
    _check_plain(description)
    return ListenerService(
        reactor,
        factory if factory is not None else _default_site(),
        [description],
        setting,
        what="TLS listener",
        wrap=_tls_wrapper(reactor, creator, limits),
    )


def _default_site() -> Site:
    """A one-line page, so a bare ``synapse-acme run`` TLS listener can be checked by hand."""
    return Site(_Hello())


class _Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"synapse-acme: TLS is being served\n"


__all__ = [
    "ListenerService",
    "TLSServerEndpoint",
    "bind_error_in_words",
    "bind_failure_message",
    "endpoint_in_words",
    "server_endpoint",
    "tls_listener",
    "tls_server_endpoint",
]
