"""http01 behaviour that deployments depend on: slashes added by proxies, and ``systemd:``
endpoints (clear error without an inherited socket, the socket's real address family)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor

from synapse_acme.errors import ListenError
from synapse_acme.http01 import HTTP01Responder
from synapse_acme.listeners import LISTEN_BACKLOG, _with_real_family, server_endpoint, with_backlog
from tests.deferreds import result_of
from tests.unit.test_http01 import KEY_AUTH, SERVERS, TOKEN, _request, serve


@pytest.fixture(params=SERVERS)
def site_root(request: pytest.FixtureRequest) -> Any:
    r = HTTP01Responder()
    r.start_responding("a.example.test", TOKEN, KEY_AUTH)
    return serve(request.param, r)


@pytest.mark.parametrize(
    "path",
    [
        f"/.well-known/acme-challenge/{TOKEN}",
        f"/.well-known/acme-challenge/{TOKEN}/",
        f"/.well-known/acme-challenge//{TOKEN}",  # ProxyPass target with a trailing slash
        f"/.well-known/acme-challenge//{TOKEN}//",
    ],
)
def test_slashes_added_by_proxies(site_root: Any, path: str) -> None:
    status, _, body = _request(site_root, "GET", "http://example.test" + path)
    assert (status, body) == (200, KEY_AUTH.encode())


@pytest.mark.parametrize(
    "path",
    [
        "/.well-known/acme-challenge/",
        "/.well-known/acme-challenge//",
        f"/.well-known/acme-challenge/x/{TOKEN}",
        f"/.well-known/acme-challenge/{TOKEN}/x",
        f"/.well-known/acme-challenge{TOKEN}",  # glued by a slash on one side only
    ],
)
def test_other_paths_404(site_root: Any, path: str) -> None:
    assert _request(site_root, "GET", "http://example.test" + path)[0] == 404


def test_systemd_endpoint_without_inherited_socket_says_why() -> None:
    # The test process inherited no LISTEN_FDS.
    with pytest.raises(ListenError) as info:
        server_endpoint(MemoryReactor(), "systemd:domain=INET:index=0")
    assert "LISTEN_FDNAMES" in str(info.value) and "--fdname" in str(info.value)
    with pytest.raises(ListenError):
        server_endpoint(MemoryReactor(), "systemd:domain=INET6:name=synapse-acme-http")


def test_tcp_endpoint_unchanged() -> None:
    endpoint = server_endpoint(MemoryReactor(), "tcp:8009:interface=127.0.0.1")
    assert not isinstance(endpoint, AdoptedStreamServerEndpoint)


def test_own_sockets_listen_with_a_deep_backlog() -> None:
    # Twisted's default backlog (50) overflowed under a CA's burst of validation connections
    # (the dropped SYNs came back a second later). Every socket we bind gets LISTEN_BACKLOG,
    # unless the operator's endpoint string sets its own.
    reactor = MemoryReactor()
    for description in ("tcp:8009:interface=127.0.0.1", r"tcp6:port=80:interface=\:\:"):
        server_endpoint(reactor, description).listen(Factory())
    server_endpoint(reactor, "tcp:8010:backlog=7").listen(Factory())
    server_endpoint(reactor, "unix:/run/synapse-acme/http.sock").listen(Factory())
    got = [(port, backlog, interface) for port, _, backlog, interface in reactor.tcpServers]
    assert got == [(8009, LISTEN_BACKLOG, "127.0.0.1"), (80, LISTEN_BACKLOG, "::"), (8010, 7, "")]
    assert [backlog for _, _, backlog, _, _ in reactor.unixServers] == [LISTEN_BACKLOG]
    assert LISTEN_BACKLOG >= 1024
    # Inherited sockets keep the backlog their owner (systemd) gave them.
    assert with_backlog("systemd:domain=INET:index=0") == "systemd:domain=INET:index=0"


def _connects_queued(description: str, attempts: int) -> int:
    """How many connections in a row the kernel queues on ``description``'s socket while
    nothing accepts them (a busy reactor), before the first one that is not answered within
    0.5 s (its SYN dropped: the client would try again only after 1 s)."""
    reactor = EPollReactor()  # real sockets, never run: nothing is accepted
    port = result_of(server_endpoint(reactor, description).listen(Factory()))
    clients: list[socket.socket] = []
    try:
        for _ in range(attempts):
            try:
                clients.append(
                    socket.create_connection(("127.0.0.1", port.getHost().port), timeout=0.5)
                )
            except OSError:
                break
        return len(clients)
    finally:
        for c in clients:
            c.close()
        port.stopListening()
        reactor.runUntilCurrent()  # closes the listening socket


def test_a_burst_of_connections_waits_in_the_queue_instead_of_being_dropped() -> None:
    # Twisted's own default: the burst overflows the queue after about 50.
    assert _connects_queued("tcp:0:interface=127.0.0.1:backlog=50", 300) < 300
    assert _connects_queued("tcp:0:interface=127.0.0.1", 300) == 300


def test_inherited_socket_family_wins() -> None:
    reactor = MemoryReactor()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        said_inet6 = AdoptedStreamServerEndpoint(reactor, listening.fileno(), socket.AF_INET6)
        fixed = _with_real_family(reactor, said_inet6, "systemd:domain=INET6:index=0")
        assert fixed.addressFamily == socket.AF_INET and fixed.fileno == listening.fileno()
        right = AdoptedStreamServerEndpoint(reactor, listening.fileno(), socket.AF_INET)
        assert _with_real_family(reactor, right, "d") is right


def test_inherited_descriptor_must_be_a_listening_socket() -> None:
    reactor = MemoryReactor()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as idle:
        endpoint = AdoptedStreamServerEndpoint(reactor, idle.fileno(), socket.AF_INET)
        with pytest.raises(ListenError, match="not listening"):
            _with_real_family(reactor, endpoint, "systemd:domain=INET:index=0")
