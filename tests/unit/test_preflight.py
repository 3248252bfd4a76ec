"""The preflight (synapse_acme.preflight): each verdict from a real responder resource or a
stand-in server reached through treq's in-memory agent, timeouts on a Clock, and the service
placing no order when it fails."""

from __future__ import annotations

from typing import Any

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.web.iweb import IAgent
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from zope.interface import implementer

from synapse_acme import preflight as pf
from synapse_acme.errors import PreflightFailed
from synapse_acme.http01 import PROBE_PREFIX, HTTP01Responder, probe_answer
from synapse_acme.model import CertificateSpec
from synapse_acme.preflight import Preflight, Verdict
from synapse_acme.service import AcmeService
from synapse_acme.testing.issuer import FakeIssuer
from synapse_acme.testing.store import MemoryStore
from tests.certs import TestCA
from tests.deferreds import outcome_of

NAME = "pf.example.test"
TIMEOUT = 5.0


def site(challenge: IResource) -> Resource:
    """A root with ``challenge`` at /.well-known/acme-challenge (as a proxy would forward)."""
    root, well_known = Resource(), Resource()
    root.putChild(b".well-known", well_known)
    well_known.putChild(b"acme-challenge", challenge)
    return root


class Fixed(Resource):
    isLeaf = True

    def __init__(self, code: int, body: bytes, location: bytes | None = None) -> None:
        super().__init__()
        self.code, self.body, self.location = code, body, location

    def render(self, request: Request) -> bytes:
        request.setResponseCode(self.code)
        if self.location is not None:
            request.setHeader(b"location", self.location)
        return self.body


#: A web server that does not forward the challenge path: its own 404 for everything.
NGINX_404 = Fixed(404, b"<html><center><h1>404 Not Found</h1></center></html>")


@implementer(IAgent)
class Failing:
    """An agent whose connection fails the way the kernel says (refused, no route)."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def request(self, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return defer.fail(self.exc)


@implementer(IAgent)
class Silent:
    """An agent whose server accepts and never answers (cancellable, like Twisted's)."""

    def __init__(self) -> None:
        self.cancelled = 0

    def request(self, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        def cancel(_: Any) -> None:
            self.cancelled += 1

        return defer.Deferred(cancel)


def make(
    agents: dict[str, IAgent],
    addresses: list[str] | Exception | None = None,
    responder: HTTP01Responder | None = None,
    **kw: Any,
) -> tuple[Preflight, Clock, list[str]]:
    clock = Clock()
    seen: list[str] = []

    def lookup(name: str) -> defer.Deferred[list[str]]:
        if isinstance(addresses, Exception):
            return defer.fail(addresses)
        if addresses is None:
            return defer.Deferred()  # a DNS server that never answers
        return defer.succeed(list(addresses))

    def agent_for(address: str) -> IAgent:
        seen.append(address)
        return agents[address]

    kw.setdefault("responder", responder)
    return Preflight(clock, lookup, agent_for, timeout=TIMEOUT, **kw), clock, seen


def ours(responder: HTTP01Responder) -> RequestTraversalAgent:
    """synapse-acme's own challenge resource behind a forwarding proxy."""
    return RequestTraversalAgent(site(responder.resource()))


def check_one(p: Preflight, clock: Clock | None = None, name: str = NAME) -> Verdict:
    d = p.check([name])
    if clock is not None:
        clock.advance(TIMEOUT)
    [verdict] = outcome_of(d)
    return verdict


def test_our_responder_answering_passes_and_the_probe_is_withdrawn() -> None:
    responder = HTTP01Responder()
    p, _, seen = make({"192.0.2.1": ours(responder)}, ["192.0.2.1"], responder)
    v = check_one(p)
    assert (v.kind, v.ok, v.address) == (pf.OK, True, "192.0.2.1")
    assert seen == ["192.0.2.1"]
    assert dict(responder.tokens()) == {}  # registered only while probing


def test_each_probe_has_its_own_token_and_body() -> None:
    responder = HTTP01Responder()
    bodies: list[bytes] = []

    class Spy(Resource):
        isLeaf = True

        def render(self, request: Request) -> bytes:
            token = (request.postpath or [b""])[0].decode()
            bodies.append(responder.tokens()[token])
            return bodies[-1]

    p, _, _ = make({"192.0.2.1": RequestTraversalAgent(site(Spy()))}, ["192.0.2.1"], responder)
    assert check_one(p).ok and check_one(p).ok
    assert len(set(bodies)) == 2 and all(len(b) > 80 for b in bodies)


@pytest.mark.parametrize(
    ("addresses", "text"),
    [
        ([], "has no A or AAAA record"),
        (pf.LookupFailed("the DNS server 192.0.2.53:53 failed (DNSServerError)"), "DNSServerError"),
    ],
)
def test_a_name_that_does_not_resolve(addresses: Any, text: str) -> None:
    p, _, seen = make({}, addresses, HTTP01Responder())
    v = check_one(p)
    assert v.kind == pf.DNS and text in v.message and not v.ok
    assert seen == []


def test_connection_refused_names_the_address_and_port() -> None:
    refused = Failing(error.ConnectionRefusedError("refused"))
    p, _, _ = make({"127.0.0.2": refused}, ["127.0.0.2"], HTTP01Responder(), port=5002)
    v = check_one(p)
    assert v.kind == pf.UNREACHABLE
    assert "resolves to 127.0.0.2" in v.message
    assert "127.0.0.2 port 5002 (connection refused" in v.message
    assert "the name resolves elsewhere" in v.message


def test_the_proxy_not_forwarding_the_path() -> None:
    p, _, _ = make({"192.0.2.1": RequestTraversalAgent(NGINX_404)}, ["192.0.2.1"])
    p.responder = HTTP01Responder()
    v = check_one(p)
    assert v.kind == pf.NOT_FORWARDED
    assert "answered HTTP 404" in v.message
    assert "does not forward /.well-known/acme-challenge/" in v.message


def test_something_else_answering() -> None:
    other = RequestTraversalAgent(site(Fixed(200, b"webroot of another client")))
    p, _, _ = make({"192.0.2.1": other}, ["192.0.2.1"], HTTP01Responder())
    v = check_one(p)
    assert v.kind == pf.OTHER_ANSWER
    assert "something else than this synapse-acme answered" in v.message
    assert "'webroot of another client'" in v.message


def test_another_synapse_acme_does_not_pass() -> None:
    # Another process's responder answers challenges, but not our probe token: a 404.
    p, _, _ = make({"192.0.2.1": ours(HTTP01Responder())}, ["192.0.2.1"], HTTP01Responder())
    assert check_one(p).kind == pf.NOT_FORWARDED


def test_a_redirect_is_not_followed() -> None:
    moved = RequestTraversalAgent(site(Fixed(301, b"", b"https://pf.example.test/x")))
    p, _, _ = make({"192.0.2.1": moved}, ["192.0.2.1"], HTTP01Responder())
    v = check_one(p)
    assert v.kind == pf.REDIRECTED and "https://pf.example.test/x" in v.message


def test_a_silent_server_times_out_on_the_clock_and_the_probe_is_withdrawn() -> None:
    responder = HTTP01Responder()
    silent = Silent()
    p, clock, _ = make({"192.0.2.1": silent}, ["192.0.2.1"], responder)
    d = p.check([NAME])
    clock.advance(TIMEOUT - 0.1)
    assert not d.called and len(responder.tokens()) == 1
    clock.advance(0.1)
    [v] = outcome_of(d)
    assert v.kind == pf.UNREACHABLE and f"no answer within {TIMEOUT:g} s" in v.message
    assert silent.cancelled == 1
    assert dict(responder.tokens()) == {}


def test_a_dns_server_that_never_answers_times_out() -> None:
    p, clock, _ = make({}, None, HTTP01Responder())
    v = check_one(p, clock)
    assert v.kind == pf.UNREACHABLE and "looking up" in v.message


def test_ipv6_first_then_ipv4_only_when_the_connection_fails() -> None:
    responder = HTTP01Responder()
    refused = Failing(error.ConnectionRefusedError("refused"))
    p, _, seen = make(
        {"2001:db8::1": refused, "192.0.2.1": ours(responder)},
        ["192.0.2.1", "2001:db8::1"],
        responder,
    )
    assert check_one(p).ok
    assert seen == ["2001:db8::1", "192.0.2.1"]
    # An IPv6 server that answers wrongly is the CA's verdict too: no fallback.
    p, _, seen = make(
        {"2001:db8::1": RequestTraversalAgent(NGINX_404), "192.0.2.1": ours(responder)},
        ["192.0.2.1", "2001:db8::1"],
        responder,
    )
    v = check_one(p)
    assert v.kind == pf.NOT_FORWARDED and "[2001:db8::1] port 80" in v.message
    assert seen == ["2001:db8::1"]


def test_wildcards_are_skipped() -> None:
    p, _, seen = make({}, ["192.0.2.1"], HTTP01Responder())
    v = check_one(p, name="*.pf.example.test")
    assert v.kind == pf.SKIPPED and v.ok and seen == []


def test_require_fails_naming_every_failed_name() -> None:
    responder = HTTP01Responder()
    p, _, _ = make({"192.0.2.1": ours(responder)}, ["192.0.2.1"], responder)
    assert outcome_of(p.require([NAME, "b." + NAME])) is None
    p, _, _ = make({"192.0.2.1": RequestTraversalAgent(NGINX_404)}, ["192.0.2.1"], responder)
    failure = outcome_of(p.require([NAME, "b." + NAME]))
    assert isinstance(failure.value, PreflightFailed)
    assert [(n, k) for n, k, _ in failure.value.failures] == [
        (NAME, pf.NOT_FORWARDED),
        ("b." + NAME, pf.NOT_FORWARDED),
    ]
    assert "nothing was ordered from the CA" in str(failure.value)


def test_probe_tokens_are_answered_by_whoever_holds_the_secret() -> None:
    # `synapse-acme check` beside a running process: no token is registered anywhere.
    running = HTTP01Responder(probe_secret=b"s" * 32)
    p, _, _ = make({"192.0.2.1": ours(running)}, ["192.0.2.1"], None, probe_secret=b"s" * 32)
    assert check_one(p).ok
    p, _, _ = make({"192.0.2.1": ours(running)}, ["192.0.2.1"], None, probe_secret=b"t" * 32)
    assert check_one(p).kind == pf.OTHER_ANSWER
    # A responder without the secret does not answer probe tokens at all.
    token = PROBE_PREFIX + "abc"
    assert token not in HTTP01Responder().tokens()
    assert running.tokens()[token] == probe_answer(b"s" * 32, token)
    assert list(running.tokens()) == []  # never listed


def test_a_failed_preflight_places_no_order_and_backs_off() -> None:
    clock = Clock()
    clock.advance(1_800_000_000)
    issuer = FakeIssuer(ca=TestCA(), clock=clock)
    calls: list[tuple[str, ...]] = []
    result: list[Any] = [PreflightFailed([(NAME, pf.NOT_FORWARDED, "HTTP 404")])]

    def before_order(spec: CertificateSpec, previous: Any) -> defer.Deferred[None]:
        calls.append(spec.names)
        return defer.fail(result[0]) if result[0] is not None else defer.succeed(None)

    service = AcmeService(
        [CertificateSpec(names=(NAME,))],
        MemoryStore(),
        issuer,
        clock,
        check_jitter=0.0,
        before_order=before_order,
    )
    service.startService()
    clock.advance(0)
    assert calls == [(NAME,)] and issuer.calls == []
    [status] = service.status()
    assert status.last_error_type == "PreflightFailed"
    assert "nothing was ordered from the CA" in (status.last_error or "")
    assert status.next_attempt is not None  # the normal back-off table
    result[0] = None  # fixed: the retry orders
    clock.advance(3600)
    assert issuer.calls == [((NAME,), None)]
    assert service.status()[0].failures == 0
    outcome_of(service.stopService())


def test_a_dns_lookup_cancelled_at_stop_is_a_plain_cancellation() -> None:
    # twisted.names wraps failures, a cancellation too, in FirstError, whose text is a whole
    # traceback; stopping mid-preflight must log a cancellation, not that (found by the CLI
    # fuzz test: `run` stopped during a preflight DNS query).
    from twisted.python.failure import Failure

    from synapse_acme.preflight import _unwrapped

    wrapped: defer.Deferred[object] = defer.fail(
        defer.FirstError(Failure(defer.CancelledError()), 0)
    )
    outcome: list[Failure] = []
    defer.Deferred.fromCoroutine(_unwrapped(wrapped)).addErrback(outcome.append)
    [failure] = outcome
    assert failure.check(defer.CancelledError) and not failure.check(defer.FirstError)
    answered: list[object] = []
    defer.Deferred.fromCoroutine(_unwrapped(defer.succeed(("a", [], [])))).addCallback(
        answered.append
    )
    assert answered == [("a", [], [])]
