"""limits: connection caps with longest-idle eviction, TLS handshake deadlines, fd limits."""

from __future__ import annotations

import resource
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from synapse_acme.limits import (
    FIRST_READ_GRACE,
    ConnectionLimits,
    HandshakeDeadlineFactory,
    LimitedFactory,
    fit_to_fd_limit,
    raise_fd_limit,
)


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class AbortableTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False
        self.protocol: Any = None

    def abortConnection(self) -> None:
        self.aborted = True
        if self.protocol is not None:
            self.protocol.connectionLost(None)


def connect(factory: LimitedFactory, host: str) -> tuple[Any, AbortableTransport]:
    proto = factory.buildProtocol(IPv4Address("TCP", host, 40000))
    assert proto is not None
    transport = AbortableTransport()
    transport.protocol = proto
    proto.makeConnection(transport)
    return proto, transport


def limited(max_connections: int = 4, max_per_address: int = 2) -> LimitedFactory:
    return LimitedFactory(
        Factory.forProtocol(Echo),
        ConnectionLimits(max_connections=max_connections, max_per_address=max_per_address),
        Clock(),
        "test listener",
    )


def test_the_longest_idle_connection_makes_room_for_a_new_one() -> None:
    f = limited(max_connections=3, max_per_address=10)
    conns = [connect(f, f"10.0.0.{i}") for i in range(3)]
    f.clock.advance(FIRST_READ_GRACE + 1)  # type: ignore[attr-defined]
    conns[0][0].dataReceived(b"still here")  # the first is active again: 1 is now the oldest
    new = connect(f, "10.0.0.9")
    assert conns[1][1].aborted and not conns[0][1].aborted and not conns[2][1].aborted
    assert f.open_connections == 3 and f.dropped == 1
    new[0].dataReceived(b"hi")
    assert new[1].value() == b"hi"  # the new connection works


def test_one_address_cannot_take_more_than_its_share() -> None:
    f = limited(max_connections=100, max_per_address=2)
    a1, a2 = connect(f, "10.0.0.1"), connect(f, "10.0.0.1")
    b = connect(f, "10.0.0.2")
    a3 = connect(f, "10.0.0.1")  # the flooder's own oldest goes, nobody else's
    assert a1[1].aborted and not a2[1].aborted and not b[1].aborted and not a3[1].aborted
    assert f.open_connections == 3


def test_a_flood_of_idle_connections_never_locks_out_a_working_client() -> None:
    f = limited(max_connections=50, max_per_address=50)
    for i in range(1200):
        connect(f, "127.0.0.1")
        if i == 600:
            client, transport = connect(f, "127.0.0.1")  # a validator arrives mid-flood
            client.dataReceived(b"GET /token")
            assert transport.value() == b"GET /token" and not transport.aborted
    assert f.open_connections == 50 and f.dropped == 1201 - 50


def test_a_burst_read_later_loses_nothing_to_a_served_idle_connection() -> None:
    # A CA validating many names at once: its new connections are accepted before the reactor
    # reads any of them. A connection already served and idle (keep-alive) makes room first;
    # a request waiting unread keeps its place.
    f = limited(max_connections=100, max_per_address=3)
    served = connect(f, "10.0.0.1")
    served[0].dataReceived(b"GET /a")  # answered, now idle
    burst = [connect(f, "10.0.0.1") for _ in range(3)]  # accepted, not read yet
    assert served[1].aborted and not any(t.aborted for _, t in burst)
    for proto, transport in burst:  # the reactor reads them: both are answered
        proto.dataReceived(b"GET /b")
        assert transport.value() == b"GET /b"


def test_a_silent_connection_past_its_grace_goes_before_an_active_one() -> None:
    clock = Clock()
    f = LimitedFactory(
        Factory.forProtocol(Echo), ConnectionLimits(max_connections=2, max_per_address=2),
        clock, "test listener",
    )  # fmt: skip
    silent = connect(f, "10.0.0.1")  # connects and never says anything (slow-loris)
    clock.advance(FIRST_READ_GRACE / 2)
    working = connect(f, "10.0.0.2")
    working[0].dataReceived(b"x")
    clock.advance(FIRST_READ_GRACE)  # the silent one's grace is over; the working one was
    working[0].dataReceived(b"y")  # active just now
    connect(f, "10.0.0.3")
    assert silent[1].aborted and not working[1].aborted


def test_closed_connections_free_their_place() -> None:
    f = limited(max_connections=2, max_per_address=2)
    a = connect(f, "10.0.0.1")
    a[0].connectionLost(None)
    b, c = connect(f, "10.0.0.1"), connect(f, "10.0.0.1")
    assert not b[1].aborted and not c[1].aborted and f.dropped == 0


def test_handshake_deadline_aborts_a_silent_client_and_spares_a_finished_one() -> None:
    clock = Clock()
    f = HandshakeDeadlineFactory(Factory.forProtocol(Echo), 10.0, clock)
    silent, done = f.buildProtocol(None), f.buildProtocol(None)
    t1, t2 = AbortableTransport(), AbortableTransport()
    t1.protocol, t2.protocol = silent, done
    silent.makeConnection(t1)
    done.makeConnection(t2)
    done.handshakeCompleted()
    clock.advance(10)
    assert t1.aborted and not t2.aborted
    assert clock.getDelayedCalls() == []


def test_fd_limit_is_raised_to_the_hard_limit() -> None:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, before[1]))
        soft, hard = raise_fd_limit()
        assert soft == hard == before[1]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_caps_shrink_to_fit_the_descriptor_limit() -> None:
    two = [ConnectionLimits(max_connections=512, max_per_address=64)] * 2
    fitted = fit_to_fd_limit(two, 1024)
    assert sum(lim.max_connections for lim in fitted) <= 1024 - 128
    assert fit_to_fd_limit(two, 65536) == two
