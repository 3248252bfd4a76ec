"""http01 behaviour that deployments depend on: slashes added by proxies, and ``systemd:``
endpoints (clear error without an inherited socket, the socket's real address family)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.testing import MemoryReactor

from synapse_acme.errors import ListenError
from synapse_acme.http01 import HTTP01Responder
from synapse_acme.listeners import _with_real_family, server_endpoint
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
