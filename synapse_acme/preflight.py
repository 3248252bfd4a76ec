"""Preflight: before an order, prove that the CA's HTTP-01 request for each name reaches us.

A failed validation counts against the CA's limits (Let's Encrypt: 5 per name per account per
hour); this check costs nothing. For each name it does what the CA's validator does: look up
the name's addresses, connect to port 80 of the address the CA would use, and ``GET
/.well-known/acme-challenge/<probe>`` with ``Host: <name>``. The name passes only when the
answer is ``200`` with the exact body that this process's responder serves for the probe
token; anything else is a :class:`Verdict` naming the cause and the address:

- ``dns``: the name has no A/AAAA record (NXDOMAIN, no address, the DNS server failed);
- ``unreachable``: connection refused, no route, or no answer within the timeout;
- ``not-forwarded``: an HTTP status other than 200 (the web server on port 80 does not
  forward ``/.well-known/acme-challenge/`` to synapse-acme);
- ``redirected``: a redirect (the CA follows it, this check does not, so it proves nothing);
- ``other-answer``: a ``200`` with another body (another host or another ACME client).

Like Let's Encrypt's validator, the first IPv6 address is tried first when the name has one,
and the first IPv4 address only if that connection fails.

How the probe is known to the responder: inside the process that serves challenges, a random
token is registered with the :class:`~synapse_acme.http01.HTTP01Responder` for the duration of
the probe, with a random body. ``synapse-acme check`` run beside a process that already serves
challenges (``run`` or the homeserver) uses a token with :data:`~synapse_acme.http01.PROBE_PREFIX`
instead, which every responder of the store answers with an HMAC under a key derived from the
account key: proof without talking to that process.

Name resolution: :func:`system_lookup` asks the host's resolver (getaddrinfo, through
``reactor.nameResolver``, which runs it in the reactor's thread pool, so the reactor never
blocks); :func:`dns_server_lookup` asks one DNS server directly with ``twisted.names`` (fully
asynchronous), for hosts whose ``/etc/hosts`` or split-horizon DNS answer differently from the
public DNS the CA uses, and for tests against a CA's DNS stub.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IReactorTime, IResolutionReceiver
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IResponse
from zope.interface import implementer

from synapse_acme.errors import PreflightFailed
from synapse_acme.http01 import PROBE_PREFIX, HTTP01Responder, probe_answer, probe_secret_from_key

logger = logging.getLogger(__name__)

OK = "ok"
SKIPPED = "skipped"
DNS = "dns"
UNREACHABLE = "unreachable"
NOT_FORWARDED = "not-forwarded"
REDIRECTED = "redirected"
OTHER_ANSWER = "other-answer"

#: The probe's answer is a key authorization of ~90 bytes; a page of another server is cut here.
MAX_BODY = 4096
#: Shown of another server's body in a verdict.
SHOWN_BODY = 60
#: The default of ``preflight.timeout``: per name, for the lookup and the fetch together. A
#: validator's request is answered in milliseconds; 10 s also covers a slow DNS lookup.
DEFAULT_TIMEOUT = 10.0

#: ``lookup(name)`` fires with the name's addresses (text, any order) or fails with
#: :class:`LookupFailed`.
Lookup = Callable[[str], "Deferred[list[str]]"]
#: ``agent_for(address)`` is an agent whose every request connects to ``address``.
AgentFor = Callable[[str], IAgent]


class LookupFailed(Exception):
    """The name could not be looked up (the DNS server failed or did not answer)."""


@attrs.frozen
class Verdict:
    """The preflight result for one name: ``kind`` (one of the constants above), the address
    probed (if any) and one sentence for the operator."""

    name: str
    kind: str
    message: str
    address: str | None = None

    @property
    def ok(self) -> bool:
        return self.kind in (OK, SKIPPED)


def failed_error(verdicts: Sequence[Verdict]) -> PreflightFailed | None:
    """The error for the names that failed, or None if every name passed."""
    bad = [v for v in verdicts if not v.ok]
    if not bad:
        return None
    return PreflightFailed(
        [(v.name, v.kind, v.message) for v in bad],
    )


@attrs.define
class Preflight:
    """Probes names the way the CA's HTTP-01 validator would (see the module docstring).

    ``clock`` bounds each name's check to ``timeout`` seconds; ``lookup`` finds addresses;
    ``agent_for`` connects to one address (see :func:`direct_agent`); ``port`` is the port
    probed (80 in production; a CA's validator port in tests). The probe is answered by
    ``responder`` (a random token registered for the probe's duration), or, with
    ``probe_secret`` and no responder, by whichever process serves challenges for the store
    (see :func:`synapse_acme.http01.probe_answer`).
    """

    clock: IReactorTime
    lookup: Lookup
    agent_for: AgentFor
    responder: HTTP01Responder | None = None
    probe_secret: bytes | None = attrs.field(default=None, repr=False)
    port: int = 80
    timeout: float = DEFAULT_TIMEOUT

    def check(self, names: Sequence[str]) -> Deferred[list[Verdict]]:
        """Deferred firing with one :class:`Verdict` per name, in order (never fails: every
        problem is a verdict). The names are probed at once."""
        ds = [Deferred.fromCoroutine(self._check_name(name)) for name in names]
        return defer.gatherResults(ds)

    def require(self, names: Sequence[str]) -> Deferred[None]:
        """Deferred firing with None when every name passes; otherwise failing with
        :class:`~synapse_acme.errors.PreflightFailed` naming each failed name and why."""

        def verdict(verdicts: list[Verdict]) -> None:
            problem = failed_error(verdicts)
            if problem is not None:
                raise problem
            logger.debug("Preflight passed for %s", ", ".join(names))

        return self.check(names).addCallback(verdict)

    # -- one name ---------------------------------------------------------------------------

    async def _check_name(self, name: str) -> Verdict:
        if name.startswith("*."):
            return Verdict(name, SKIPPED, "a wildcard name is not validated over HTTP-01")
        d = Deferred.fromCoroutine(self._lookup_and_probe(name))
        d.addTimeout(self.timeout, self.clock)  # cancels the lookup or fetch, then withdraws
        try:
            return await d
        except defer.TimeoutError:
            return Verdict(
                name,
                UNREACHABLE,
                f"no answer within {self.timeout:g} s (looking up {name} and fetching the probe "
                f"from port {self.port}): a firewall that drops packets, or a server that "
                "accepts the connection and never answers",
            )

    async def _lookup_and_probe(self, name: str) -> Verdict:
        try:
            found = await self.lookup(name)
        except LookupFailed as e:
            return Verdict(name, DNS, f"{name} could not be looked up: {e}")
        v6 = [a for a in found if ipaddress.ip_address(a).version == 6]
        v4 = [a for a in found if ipaddress.ip_address(a).version == 4]
        if not v6 and not v4:
            return Verdict(
                name,
                DNS,
                f"{name} has no A or AAAA record, so the CA cannot find this host: add an A "
                "(and/or AAAA) record pointing at it",
            )
        token, body, disarm = self._arm(name)
        try:
            if v6:
                first = await self._probe(name, v6[0], token, body)
                if first.kind != UNREACHABLE or not v4:
                    return first
                # The CA falls back to IPv4 only when the IPv6 connection fails.
                second = await self._probe(name, v4[0], token, body)
                if second.ok:
                    logger.warning(
                        "Preflight for %s: the IPv6 address %s did not answer (%s); the CA "
                        "falls back to IPv4, which works. Fix or remove the AAAA record",
                        name, v6[0], first.message,
                    )  # fmt: skip
                    return second
                return attrs.evolve(
                    second, message=f"{second.message}; and over IPv6: {first.message}"
                )
            return await self._probe(name, v4[0], token, body)
        finally:
            disarm()

    def _arm(self, name: str) -> tuple[str, bytes, Callable[[], object]]:
        """A probe token, the body proving that our responder answered, and how to stop."""
        if self.responder is not None:
            token = secrets.token_urlsafe(32)
            body = f"{token}.{secrets.token_urlsafe(32)}"
            responder = self.responder
            ident = f"preflight {name}"
            responder.start_responding(ident, token, body)
            return token, body.encode("ascii"), lambda: responder.stop_responding(ident, token)
        if self.probe_secret is None:
            raise ValueError("a Preflight needs a responder or a probe secret")
        token = PROBE_PREFIX + secrets.token_urlsafe(32)
        return token, probe_answer(self.probe_secret, token), lambda: None

    async def _probe(self, name: str, address: str, token: str, body: bytes) -> Verdict:
        host = name if self.port == 80 else f"{name}:{self.port}"
        where = f"{_bracket(address)} port {self.port}"
        url = f"http://{host}/.well-known/acme-challenge/{token}"
        agent = self.agent_for(address)
        try:
            response: IResponse = await agent.request(
                b"GET",
                url.encode("ascii"),
                Headers({b"user-agent": [b"synapse-acme preflight"]}),
            )
        except (error.ConnectError, error.ConnectionLost, OSError) as e:
            return Verdict(name, UNREACHABLE, _unreachable(name, where, e), address)
        except (ResponseNeverReceived, ResponseFailed) as e:
            reasons = "; ".join(r.getErrorMessage() for r in e.reasons) or "no reason"
            return Verdict(
                name,
                UNREACHABLE,
                f"{name} resolves to {address}; {where} accepted the connection but sent no "
                f"HTTP answer ({reasons}): is it an HTTP server?",
                address,
            )
        got = await _read_limited(response, MAX_BODY)
        code = response.code
        if code == 200 and got.strip() == body:
            return Verdict(name, OK, f"synapse-acme answered at {where}", address)
        if code == 200:
            return Verdict(
                name,
                OTHER_ANSWER,
                f"{name} resolves to {address}, and something else than this synapse-acme "
                f"answered at {where} (HTTP 200 with {_shown(got)}): the name points at another "
                "host, or another program answers challenges there (another ACME client's "
                "webroot, an old synapse-acme): point the name at this host, or forward "
                "/.well-known/acme-challenge/ to synapse-acme",
                address,
            )
        if 300 <= code < 400:
            location = response.headers.getRawHeaders(b"location", [b"?"])[0]
            return Verdict(
                name,
                REDIRECTED,
                f"{where} answered HTTP {code} redirecting to {location.decode('latin-1')}: "
                "the CA would follow that redirect, the preflight does not, so it cannot prove "
                "synapse-acme answers. Forward /.well-known/acme-challenge/ on port 80 to "
                "synapse-acme without a redirect, or turn the preflight off "
                "(preflight: {enabled: false})",
                address,
            )
        return Verdict(
            name,
            NOT_FORWARDED,
            f"{name} resolves to {address}, and {where} answered HTTP {code} for the probe: the "
            "web server there does not forward /.well-known/acme-challenge/ to synapse-acme "
            "(nginx: location /.well-known/acme-challenge/ { proxy_pass http://127.0.0.1:8009; })"
            ", or the name points at another host",
            address,
        )


def probe_secret_for(account_key: Any) -> bytes:
    """The store's probe secret, from its account key (a ``josepy.JWK``): every process that
    serves the store's challenges reads that key, and nothing else needs it."""
    from cryptography.hazmat.primitives import serialization

    der = account_key.key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return probe_secret_from_key(der)


def _bracket(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _shown(body: bytes) -> str:
    if not body:
        return "an empty body"
    text = body[:SHOWN_BODY].decode("utf-8", "replace")
    more = "..." if len(body) > SHOWN_BODY else ""
    return f"the body {text!r}{more}"


def _unreachable(name: str, where: str, e: BaseException) -> str:
    if isinstance(e, error.ConnectionRefusedError):
        why = "connection refused: nothing listens there (port closed)"
    elif isinstance(e, error.TimeoutError):
        why = "the connection timed out (a firewall dropping packets?)"
    elif isinstance(e, error.NoRouteError):
        why = "no route to that address"
    else:
        why = str(e) or type(e).__name__
    return (
        f"{name} resolves to {where.split(' port ')[0]}, and nothing answers on {where} ({why}): "
        "if that is not this host's (public) address, the name resolves elsewhere; otherwise "
        "open that port (firewall, port forwarding) to synapse-acme or the web server that "
        "forwards /.well-known/acme-challenge/ to it"
    )


class _LimitedBody(Protocol):
    def __init__(self, limit: int, done: Deferred[bytes]) -> None:
        self._limit = limit
        self._done = done
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self._size >= self._limit:
            return
        self._parts.append(data[: self._limit - self._size])
        self._size += len(self._parts[-1])
        if self._size >= self._limit and self.transport is not None:
            self.transport.loseConnection()  # enough to tell it is not our answer

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._done.called:
            self._done.callback(b"".join(self._parts))


def _read_limited(response: IResponse, limit: int) -> Deferred[bytes]:
    """Deferred firing with at most ``limit`` bytes of the body (what arrived if cut off)."""
    done: Deferred[bytes] = Deferred()
    response.deliverBody(_LimitedBody(limit, done))
    return done


# -- connecting to the address the CA would use -----------------------------------------------


@implementer(IAgentEndpointFactory)
@attrs.frozen
class _FixedAddress:
    """Connects every request to one address, whatever host the URL names (its Host header
    stays the name, as the CA sends it)."""

    reactor: Any
    address: str
    timeout: float

    def endpointForURI(self, uri: Any) -> Any:
        endpoint = TCP6ClientEndpoint if ":" in self.address else TCP4ClientEndpoint
        return endpoint(self.reactor, self.address, uri.port, timeout=self.timeout)


def direct_agent(reactor: Any, connect_timeout: float = DEFAULT_TIMEOUT) -> AgentFor:
    """``agent_for`` for production: a plain Twisted Agent per address, no connection pool
    (each probe is one request), no proxy, no redirects followed."""

    def agent_for(address: str) -> IAgent:
        return Agent.usingEndpointFactory(reactor, _FixedAddress(reactor, address, connect_timeout))

    return agent_for


# -- looking up names ----------------------------------------------------------------------------


@implementer(IResolutionReceiver)
class _Collect:
    def __init__(self, done: Deferred[list[str]]) -> None:
        self._done = done
        self._found: list[str] = []

    def resolutionBegan(self, resolution: object) -> None:
        pass

    def addressResolved(self, address: object) -> None:
        if isinstance(address, (IPv4Address, IPv6Address)) and address.host not in self._found:
            self._found.append(address.host)

    def resolutionComplete(self) -> None:
        self._done.callback(self._found)


def system_lookup(reactor: Any) -> Lookup:
    """Addresses from the host's resolver (``/etc/hosts``, then DNS: getaddrinfo in the
    reactor's thread pool). A name that does not resolve fires with ``[]``."""

    def lookup(name: str) -> Deferred[list[str]]:
        done: Deferred[list[str]] = Deferred()
        reactor.nameResolver.resolveHostName(_Collect(done), name, 80)
        return done

    return lookup


async def _unwrapped(d: Deferred[Any]) -> Any:
    """What ``d`` fires with; twisted.names wraps a failure (also a cancellation, when the
    service stops) in a ``FirstError``: the wrapped exception is raised instead."""
    try:
        return await d
    except defer.FirstError as e:
        e.subFailure.raiseException()


def dns_server_lookup(reactor: Any, host: str, port: int = 53) -> Lookup:
    """Addresses from one DNS server asked directly (A and AAAA, ``twisted.names``): what a
    CA's recursive resolver sees, without this host's ``/etc/hosts``. NXDOMAIN fires with
    ``[]``; a server failure or no answer fails with :class:`LookupFailed`."""
    from twisted.names import client
    from twisted.names import error as dns_error

    resolver = client.Resolver(servers=[(host, port)], reactor=reactor)

    async def one(name: str, query: Callable[..., Deferred[Any]], rtype: type) -> list[str]:
        try:
            answers, _authority, _additional = await _unwrapped(query(name, timeout=(1, 3)))
        except dns_error.DomainError:
            return []  # NXDOMAIN
        except (dns_error.DNSServerError, dns_error.DNSQueryRefusedError) as e:
            why = f"the DNS server {host}:{port} failed ({type(e).__name__})"
            raise LookupFailed(why) from None
        except defer.TimeoutError:
            raise LookupFailed(f"the DNS server {host}:{port} did not answer") from None
        except dns_error.DNSNameError:
            return []
        return [r.payload.dottedQuad() if hasattr(r.payload, "dottedQuad") else
                _ipv6(r.payload) for r in answers if isinstance(r.payload, rtype)]  # fmt: skip

    async def both(name: str) -> list[str]:
        from twisted.names import dns

        v6 = await one(name, resolver.lookupIPV6Address, dns.Record_AAAA)
        v4 = await one(name, resolver.lookupAddress, dns.Record_A)
        return v6 + v4

    return lambda name: Deferred.fromCoroutine(both(name))


def _ipv6(record: Any) -> str:
    import socket

    return socket.inet_ntop(socket.AF_INET6, record.address)


def lookup_from_setting(reactor: Any, resolver: tuple[str, int] | None) -> Lookup:
    """The lookup ``preflight.resolver`` asks for: None is the system's resolver."""
    if resolver is None:
        return system_lookup(reactor)
    return dns_server_lookup(reactor, *resolver)


__all__ = [
    "DNS",
    "NOT_FORWARDED",
    "OK",
    "OTHER_ANSWER",
    "REDIRECTED",
    "SKIPPED",
    "UNREACHABLE",
    "LookupFailed",
    "Preflight",
    "Verdict",
    "direct_agent",
    "dns_server_lookup",
    "failed_error",
    "lookup_from_setting",
    "probe_secret_for",
    "system_lookup",
]
