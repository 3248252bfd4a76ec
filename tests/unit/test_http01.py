"""HTTP-01 responder and what it answers, through both servers (the resource mounted in a
twisted.web Site as Synapse does, and the standalone listener's protocol), and the listener
service (all in memory)."""

from __future__ import annotations

import errno
import logging
import string
import urllib.parse
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.logger import globalLogPublisher
from twisted.web import pages
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from synapse_acme import listeners
from synapse_acme.errors import ListenError
from synapse_acme.http01 import (
    HTTP01Responder,
    _ChallengeResource,
)
from synapse_acme.http01_server import ChallengeHTTPFactory, make_factory
from synapse_acme.interfaces import IResponder
from synapse_acme.listeners import ListenerService
from tests.http_raw import raw_request

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEY_AUTH = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
PREFIX = "http://example.test/.well-known/acme-challenge/"


def _request(
    server: Any, method: str, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    """Run one request synchronously; (status, headers, body). ``server`` is a resource tree
    (run through StubTreq) or the standalone protocol's factory (raw bytes, parsed by the
    stdlib's http.client)."""
    if isinstance(server, ChallengeHTTPFactory):
        return raw_request(server, method, url, headers)
    stub = StubTreq(server)
    results: list[Any] = []
    failures: list[Any] = []
    d = stub.request(method, url, headers=headers)
    d.addCallback(lambda r: stub.content(r).addCallback(lambda body: results.append((r, body))))
    d.addErrback(failures.append)
    stub.flush()
    assert not failures, failures[0].getTraceback()
    response, body = results[0]
    return response.code, dict(response.headers.getAllRawHeaders()), body


@pytest.fixture
def responder() -> HTTP01Responder:
    r = HTTP01Responder()
    r.start_responding("a.example.test", TOKEN, KEY_AUTH)
    return r


class _Dir(Resource):
    """A tree level that 404s what it does not hold, as Synapse's own tree does."""

    def getChild(self, path: bytes, request: Any) -> Any:
        return pages.notFound()

    def render(self, request: Any) -> Any:
        return pages.notFound().render(request)


def mounted(responder: HTTP01Responder) -> Resource:
    """The resource at /.well-known/acme-challenge of an otherwise empty tree, as Synapse's
    ``register_web_resource`` mounts it."""
    root = _Dir()
    well_known = _Dir()
    root.putChild(b".well-known", well_known)
    well_known.putChild(b"acme-challenge", responder.resource())
    return root


def serve(kind: str, responder: HTTP01Responder) -> Any:
    """The responder behind one of the two servers that answer challenges."""
    if kind == "resource":
        return mounted(responder)
    return make_factory(responder, Clock())


SERVERS = ["resource", "protocol"]


@pytest.fixture(params=SERVERS)
def site_root(request: pytest.FixtureRequest, responder: HTTP01Responder) -> Any:
    return serve(request.param, responder)


# -- the responder --------------------------------------------------------------------------


def test_responder_provides_interface(responder: HTTP01Responder) -> None:
    assert verifyObject(IResponder, responder)
    assert responder.challenge_type == "http-01"


def test_tokens_is_a_live_read_only_view(responder: HTTP01Responder) -> None:
    view = responder.tokens()
    assert dict(view) == {TOKEN: KEY_AUTH.encode()}
    with pytest.raises(TypeError):
        view["x"] = b"y"  # type: ignore[index]
    responder.start_responding("b.example.test", "tok2", "tok2.thumb")
    assert set(view) == {TOKEN, "tok2"}
    responder.stop_responding("b.example.test", "tok2")
    assert set(view) == {TOKEN}


def test_stop_unknown_token_is_fine(responder: HTTP01Responder) -> None:
    assert responder.stop_responding("a.example.test", "never-started") is None
    assert TOKEN in responder.tokens()


@pytest.mark.parametrize("token", ["", "a/b", "a.b", "tok en", "é", "x" * 257, "..", "a%2Fb"])
def test_start_refuses_tokens_no_resource_could_serve(token: str) -> None:
    with pytest.raises(ValueError, match="not base64url"):
        HTTP01Responder().start_responding("a.example.test", token, "k")


# -- what both servers answer ----------------------------------------------------------------


def test_get_serves_key_authorization(site_root: Any) -> None:
    code, headers, body = _request(site_root, "GET", PREFIX + TOKEN)
    assert (code, body) == (200, KEY_AUTH.encode())
    assert headers[b"Content-Type"] == [b"text/plain"]
    assert headers[b"Cache-Control"] == [b"no-store"]


def test_head_has_headers_and_length_but_no_body(site_root: Any) -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        code, headers, body = _request(site_root, "HEAD", PREFIX + TOKEN)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert (code, body) == (200, b"")
    assert headers[b"Content-Length"] == [str(len(KEY_AUTH)).encode()]
    assert headers[b"Content-Type"] == [b"text/plain"]
    assert not [e for e in events if "eat it" in str(e.get("log_format", ""))]


def test_trailing_slash_tolerated(site_root: Any) -> None:
    assert _request(site_root, "GET", PREFIX + TOKEN + "/")[::2] == (200, KEY_AUTH.encode())


def test_stopped_token_is_404(responder: HTTP01Responder, site_root: Any) -> None:
    responder.stop_responding("a.example.test", TOKEN)
    assert _request(site_root, "GET", PREFIX + TOKEN)[0] == 404


@pytest.mark.parametrize(
    "path",
    [
        "",
        ".well-known",
        ".well-known/",
        ".well-known/acme-challenge",
        ".well-known/acme-challenge/",
        ".well-known/acme-challenge/unknown-token",
        ".well-known/acme-challenge/" + TOKEN + "/extra",
        ".well-known/acme-challenge/" + TOKEN + "/x/",
        ".well-known/acme-challenge/" + TOKEN + "%2F",
        ".well-known/acme-challenge/..%2F" + TOKEN,
        ".well-known/acme-challenge/" + "a" * 300,
        ".well-known/acme-challenge/%00",
        ".well-known/acme-challenge/%C3%A9",
        ".well-known/matrix/server",
        "_matrix/federation/v1/version",
        TOKEN,
        "acme-challenge/" + TOKEN,
    ],
)
def test_everything_else_is_404(site_root: Any, path: str) -> None:
    assert _request(site_root, "GET", "http://example.test/" + path)[0] == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_405(site_root: Any, method: str) -> None:
    code, headers, _ = _request(site_root, method, PREFIX + TOKEN)
    assert code == 405
    assert headers[b"Allow"] == [b"GET, HEAD"]


def test_any_host_and_forwarded_headers(site_root: Any) -> None:
    headers = {
        "Host": "other.example:8080",
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-Proto": "https",
    }
    assert _request(site_root, "GET", PREFIX + TOKEN, headers)[::2] == (200, KEY_AUTH.encode())


def test_resource_mounts_anywhere_like_synapse_does(responder: HTTP01Responder) -> None:
    # Synapse's register_web_resource puts the resource at /.well-known/acme-challenge of
    # its own tree, next to /.well-known/matrix.
    root = mounted(responder)
    assert _request(root, "GET", PREFIX + TOKEN)[::2] == (200, KEY_AUTH.encode())
    responder.start_responding("b.example.test", "later", "later.thumb")
    assert _request(root, "GET", PREFIX + "later")[::2] == (200, b"later.thumb")


class _ExplodingTokens(dict):  # type: ignore[type-arg]
    def get(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")


def test_a_bug_gives_500_not_an_exception(caplog: pytest.LogCaptureFixture) -> None:
    resource = _ChallengeResource(_ExplodingTokens())
    for method in ("GET", "HEAD"):
        code, _, body = _request(resource, method, "http://x/" + TOKEN)
        assert code == 500
        assert body == (b"" if method == "HEAD" else b"internal error\n")
    assert "Bug answering an HTTP-01 request" in caplog.text


_TOKEN_ALPHABET = string.ascii_letters + string.digits + "_-"


@settings(max_examples=2000, deadline=None)
@given(
    live=st.lists(st.text(_TOKEN_ALPHABET, min_size=1, max_size=12), max_size=3, unique=True),
    segments=st.lists(
        st.one_of(
            st.sampled_from([".well-known", "acme-challenge", "", "..", "."]),
            st.text(_TOKEN_ALPHABET, min_size=1, max_size=12),
            st.text(max_size=12),
        ),
        max_size=5,
    ),
    pick_live=st.booleans(),
    trailing=st.booleans(),
    method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "FOO"]),
    host=st.text(string.ascii_letters + string.digits + ".-:[]", max_size=20),
    forwarded=st.text(string.printable.strip(), max_size=20),
    kind=st.sampled_from(SERVERS),
)
def test_fuzz_paths_methods_headers(
    live: list[str],
    segments: list[str],
    pick_live: bool,
    trailing: bool,
    method: str,
    host: str,
    forwarded: str,
    kind: str,
) -> None:
    responder = HTTP01Responder()
    for token in live:
        responder.start_responding("a.example.test", token, token + ".thumb")
    if pick_live and live:
        segments = [".well-known", "acme-challenge", live[0]] + ([""] if trailing else [])
    path = "/".join(urllib.parse.quote(s, safe="") for s in segments)
    headers = {"X-Forwarded-For": forwarded, "X-Forwarded-Host": forwarded}
    if host:
        headers["Host"] = host
    code, _, body = _request(serve(kind, responder), method, "http://h.test/" + path, headers)

    assert code in (200, 404, 405)
    if code == 200:
        assert method in ("GET", "HEAD")
        # 200 only for exactly /.well-known/acme-challenge/<live token>[/]
        parts = path.split("/")
        if parts and parts[-1] == "" and len(parts) == 4:
            parts = parts[:-1]
        assert parts[:2] == [".well-known", "acme-challenge"] and len(parts) == 3
        assert parts[2] in live
        assert body == (b"" if method == "HEAD" else (parts[2] + ".thumb").encode())
    elif pick_live and live and method in ("GET", "HEAD"):
        pytest.fail(f"live token {live[0]!r} not served: {code}")


# -- the listener service ---------------------------------------------------------------------


class _Port:
    def __init__(self, host: Any) -> None:
        self.host = host
        self.stopped = False

    def getHost(self) -> Any:
        return self.host

    def stopListening(self) -> defer.Deferred[None]:
        self.stopped = True
        return defer.succeed(None)


class _BindReactor(MemoryReactor):
    """MemoryReactor whose listenTCP can refuse interfaces, like a real kernel would."""

    def __init__(self, refuse: dict[str, int] | None = None, dual_stack: bool = False) -> None:
        super().__init__()
        self.refuse = refuse or {}
        self.dual_stack = dual_stack
        self.ports: list[_Port] = []

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        taken = (
            self.dual_stack
            and interface == "0.0.0.0"
            and any(p.getHost().host == "::" for p in self.ports)
        )
        if interface in self.refuse or taken:
            code = errno.EADDRINUSE if taken else self.refuse[interface]
            raise CannotListenError(interface, port, OSError(code, "refused"))
        address = super().listenTCP(port, factory, backlog, interface).getHost()
        fake = _Port(address)
        self.ports.append(fake)
        return fake


ENDPOINTS = [r"tcp6:port=80:interface=\:\:", "tcp:port=80:interface=0.0.0.0"]


def _start(reactor: Any, endpoints: list[str]) -> tuple[ListenerService, list[Any]]:
    svc = ListenerService(reactor, make_factory(HTTP01Responder(), Clock()), endpoints)
    results: list[Any] = []
    svc.privilegedStartService()
    svc.startService()
    svc.when_listening().addBoth(results.append)
    return svc, results


def test_listener_binds_every_endpoint_in_privileged_start() -> None:
    reactor = _BindReactor()
    svc = ListenerService(reactor, make_factory(HTTP01Responder(), Clock()), ENDPOINTS)
    svc.privilegedStartService()
    assert [(p, i) for p, _, _, i in reactor.tcpServers] == [(80, "::"), (80, "0.0.0.0")]
    svc.startService()  # does not bind twice
    assert len(reactor.tcpServers) == 2
    ports: list[Any] = []
    svc.when_listening().addCallback(ports.append)
    assert ports == [svc.ports] and len(svc.ports) == 2


def test_dual_stack_overlap_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="synapse_acme.listeners")
    svc, results = _start(_BindReactor(dual_stack=True), ENDPOINTS)
    assert results == [svc.ports] and len(svc.ports) == 1
    overlap = [r for r in caplog.records if "dual-stack" in r.getMessage()]
    assert [r.levelno for r in overlap] == [logging.INFO]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_no_ipv6_host_warns_and_keeps_ipv4(caplog: pytest.LogCaptureFixture) -> None:
    svc, results = _start(_BindReactor(refuse={"::": errno.EAFNOSUPPORT}), ENDPOINTS)
    assert results == [svc.ports]
    assert [p.getHost().host for p in svc.ports] == ["0.0.0.0"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # The address in words, not endpoint syntax, and the OS error with its errno name.
    assert len(warnings) == 1 and "port 80 on ::" in warnings[0]
    assert "refused, EAFNOSUPPORT" in warnings[0]


def test_nothing_bound_fails_naming_endpoints() -> None:
    refuse = {"::": errno.EACCES, "0.0.0.0": errno.EACCES}
    reactor = _BindReactor(refuse=refuse)
    svc = ListenerService(
        reactor,
        make_factory(HTTP01Responder(), Clock()),
        [*ENDPOINTS, "bogus:nonsense"],
        setting="acme.port (80) and acme.bind_addresses (::, 0.0.0.0)",
    )
    results: list[Any] = []
    svc.privilegedStartService()
    svc.when_listening().addBoth(results.append)
    assert len(results) == 1
    failure = results[0]
    assert failure.check(ListenError)
    message = str(failure.value)
    # Each address in plain words with its OS error, the setting, and the ways out of EACCES.
    assert "port 80 on :: (refused, EACCES)" in message
    assert "port 80 on 0.0.0.0 (refused, EACCES)" in message
    assert "bogus:nonsense" in message
    assert "acme.port (80) and acme.bind_addresses" in message
    for fix in ("8009", "authbind", "--user", "systemd", "docs/deploy-authbind.md"):
        assert fix in message, fix
    assert "interface=" not in message
    # a late caller gets the same failure
    late: list[Any] = []
    svc.when_listening().addErrback(late.append)
    assert late and late[0].check(ListenError)


def test_no_endpoints_is_an_idle_success() -> None:
    _svc, results = _start(_BindReactor(), [])
    assert results == [[]]


def test_stop_service_closes_every_port() -> None:
    reactor = _BindReactor()
    svc, _ = _start(reactor, ENDPOINTS)
    fired: list[Any] = []
    svc.stopService().addCallback(fired.append)
    assert fired == [None]
    assert all(p.stopped for p in reactor.ports) and len(reactor.ports) == 2
    assert svc.ports == []


def test_stop_waits_for_slow_port_close() -> None:
    closing: defer.Deferred[None] = defer.Deferred()

    class SlowPort(_Port):
        def stopListening(self) -> defer.Deferred[None]:
            self.stopped = True
            return closing

    class SlowReactor(_BindReactor):
        def listenTCP(self, *args: Any, **kwargs: Any) -> Any:
            port = super().listenTCP(*args, **kwargs)
            return SlowPort(port.getHost())

    svc, _ = _start(SlowReactor(), ENDPOINTS[:1])
    fired: list[Any] = []
    svc.stopService().addCallback(fired.append)
    assert fired == []
    closing.callback(None)
    assert fired == [None]


def test_stop_while_binding_cancels_and_fails_waiters(monkeypatch: pytest.MonkeyPatch) -> None:
    pending: defer.Deferred[Any] = defer.Deferred()

    class _NeverListening:
        def listen(self, factory: Any) -> defer.Deferred[Any]:
            return pending

    monkeypatch.setattr(listeners, "serverFromString", lambda reactor, text: _NeverListening())
    svc = ListenerService(_BindReactor(), make_factory(HTTP01Responder(), Clock()), ["tcp:80"])
    svc.privilegedStartService()
    results: list[Any] = []
    svc.when_listening().addBoth(results.append)
    assert results == []
    stopped: list[Any] = []
    svc.stopService().addCallback(stopped.append)
    assert stopped == [None]
    assert results and results[0].check(ListenError)
