"""Bounds on what a flood of connections can take from the process.

A process has a fixed number of file descriptors (``LimitNOFILE``: often 1024 soft). Without a
cap, 1,200 idle connections to the challenge port take them all: every socket and file
operation then fails with EMFILE, a renewal fails, ``status.json`` cannot be written. So every
standalone listener (HTTP-01 and TLS) is wrapped in a :class:`LimitedFactory`:

- at most ``max_connections`` open at once, and ``max_per_address`` from one peer address;
- when a cap is reached, the connection that has been **idle longest** is dropped to make
  room, not the new one: a flood of idle connections cannot lock a CA's validator (or a real
  client) out, because a fresh connection is always admitted and a working one is never the
  least recently active. A connection that has not sent anything yet counts as active until
  :data:`FIRST_READ_GRACE` seconds after it was accepted: a burst of new connections (a CA
  validating many names at once, from one address) is accepted before any of them is read,
  and a request already waiting in the kernel must not lose its place to the next accept;
- a connection must finish its TLS handshake within ``handshake_timeout`` seconds
  (:class:`HandshakeDeadline`), and an HTTP-01 request head must arrive within
  ``header_timeout`` seconds (the HTTP-01 protocol enforces it).

:func:`raise_fd_limit` lifts the soft descriptor limit to the hard limit at start, and
:func:`fit_to_fd_limit` shrinks the caps if the listeners together could still exhaust it.
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.interfaces import IAddress, IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from synapse_acme.http01_server import IDLE_TIMEOUT

logger = logging.getLogger(__name__)

#: Defaults for each standalone listener (config: ``acme.connection_limits``). 256 is far
#: above what a CA's validators (a handful of connections per challenge) or the TLS clients of
#: one homeserver's standalone listener need, and two listeners plus the process's own files
#: stay well inside a 1024-descriptor limit.
DEFAULT_MAX_CONNECTIONS = 256
#: Half the total: a CA validates every name of a large order at once, from a few addresses
#: (Pebble, validating 20 names, needs more than 32 from one), and the rest stays for others.
DEFAULT_MAX_PER_ADDRESS = 128
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Seconds an HTTP-01 request head may take (the responder's own default).
DEFAULT_HEADER_TIMEOUT = IDLE_TIMEOUT
#: Descriptors kept for everything that is not a listener's connection (store, status, log
#: files, the CA client's connections, the reactor's own).
RESERVED_DESCRIPTORS = 128
#: Seconds a just-accepted connection that has sent nothing yet is treated as active (see the
#: module docstring): long enough for the reactor to read a burst, short against a flood.
FIRST_READ_GRACE = 1.0
#: At most one "cap reached" log line per listener in this many seconds (a flood must not
#: flood the log too).
LOG_EVERY = 60.0


@attrs.frozen
class ConnectionLimits:
    """The caps of one listener (see the module docstring)."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_per_address: int = DEFAULT_MAX_PER_ADDRESS
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    header_timeout: float = DEFAULT_HEADER_TIMEOUT


def _peer(addr: IAddress | None) -> str | None:
    host = getattr(addr, "host", None)
    return host if isinstance(host, str) else None


class _Limited(ProtocolWrapper):
    """One admitted connection: tells its factory when it is active and when it is gone."""

    factory: LimitedFactory
    #: Writes reach the transport unchanged (the HTTP-01 protocol may then send on the socket).
    passes_writes_through = True

    def __init__(self, factory: LimitedFactory, wrapped: Protocol, peer: str | None) -> None:
        super().__init__(factory, wrapped)
        self.peer = peer
        #: When this connection counts as last active: on accept, FIRST_READ_GRACE ahead.
        self.last = factory.clock.seconds() + FIRST_READ_GRACE
        self.read = False  # sent anything yet

    def dataReceived(self, data: bytes) -> None:
        self.factory.touch(self)
        super().dataReceived(data)


class _Queue:
    """Connections in least-recently-active order, kept as two insertion-ordered lists (those
    that have sent something, by last activity; those that have not, by accept time), so the
    longest idle of all is the older of the two heads: admission stays O(1)."""

    def __init__(self) -> None:
        self.fresh: collections.OrderedDict[_Limited, None] = collections.OrderedDict()
        self.active: collections.OrderedDict[_Limited, None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.fresh) + len(self.active)

    def add(self, conn: _Limited) -> None:
        self.fresh[conn] = None

    def touch(self, conn: _Limited) -> None:
        """Move ``conn`` (if still here) to the most recently active end."""
        if self.fresh.pop(conn, 0) is None or self.active.pop(conn, 0) is None:
            self.active[conn] = None

    def discard(self, conn: _Limited) -> None:
        self.fresh.pop(conn, None)
        self.active.pop(conn, None)

    def idlest(self) -> _Limited:
        heads = [next(iter(q)) for q in (self.fresh, self.active) if q]
        return min(heads, key=lambda c: c.last)


if TYPE_CHECKING:  # generic only in type checking: Twisted < 26 cannot subscribe it at run time
    _LimitedBase = WrappingFactory[_Limited]
else:
    _LimitedBase = WrappingFactory


class LimitedFactory(_LimitedBase):
    """Wraps a server factory with the caps of ``limits`` (see the module docstring).

    Admission is O(1): connections are kept in least-recently-active order, and activity moves
    a connection to the end.
    """

    protocol = _Limited

    def __init__(
        self, wrapped: Any, limits: ConnectionLimits, clock: IReactorTime, name: str
    ) -> None:
        super().__init__(wrapped)
        self.limits = limits
        self.clock = clock
        self.name = name
        self._all = _Queue()
        self._by_peer: dict[str, _Queue] = {}
        self.dropped = 0  # connections dropped to make room (for tests and status)
        self._last_log = float("-inf")

    @property
    def open_connections(self) -> int:
        return len(self._all)

    def buildProtocol(self, addr: IAddress | None) -> _Limited | None:  # type: ignore[override]
        peer = _peer(addr)
        if peer is not None:
            mine = self._by_peer.get(peer)
            if mine is not None and len(mine) >= self.limits.max_per_address:
                self._drop(mine.idlest(), f"{self.limits.max_per_address} from {peer}")
        if len(self._all) >= self.limits.max_connections:
            self._drop(self._all.idlest(), f"{self.limits.max_connections} in total")
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            return None
        conn = _Limited(self, wrapped, peer)
        self._all.add(conn)
        if peer is not None:
            self._by_peer.setdefault(peer, _Queue()).add(conn)
        return conn

    def touch(self, conn: _Limited) -> None:
        conn.last = self.clock.seconds()
        conn.read = True
        self._all.touch(conn)
        if conn.peer is not None and conn.peer in self._by_peer:
            self._by_peer[conn.peer].touch(conn)

    def unregisterProtocol(self, p: Any) -> None:
        self._forget(p)
        super().unregisterProtocol(p)

    def _forget(self, conn: _Limited) -> None:
        self._all.discard(conn)
        if conn.peer is not None:
            mine = self._by_peer.get(conn.peer)
            if mine is not None:
                mine.discard(conn)
                if not mine:
                    del self._by_peer[conn.peer]

    def _drop(self, conn: _Limited, cap: str) -> None:
        """Close the longest-idle connection at once (its descriptor is freed now)."""
        self._forget(conn)
        self.dropped += 1
        now = self.clock.seconds()
        if now - self._last_log >= LOG_EVERY:
            self._last_log = now
            logger.warning(
                "%s: connection cap reached (%s); dropping the connections idle longest "
                "(%d dropped so far). A flood? See acme.connection_limits",
                self.name,
                cap,
                self.dropped,
            )
        if conn.transport is not None:
            conn.transport.abortConnection()  # type: ignore[attr-defined]


@implementer(IHandshakeListener)
class HandshakeDeadline(ProtocolWrapper):
    """Inside TLS: aborts a connection whose handshake is not done within the timeout
    (a client that connects and says nothing, or stalls mid-handshake, holds a descriptor)."""

    def __init__(self, factory: HandshakeDeadlineFactory, wrapped: Protocol) -> None:
        super().__init__(factory, wrapped)
        self._timer: IDelayedCall | None = None

    def makeConnection(self, transport: Any) -> None:
        factory: HandshakeDeadlineFactory = self.factory  # type: ignore[assignment]
        self._timer = factory.clock.callLater(factory.timeout, self._expired)
        super().makeConnection(transport)

    def _expired(self) -> None:
        self._timer = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def handshakeCompleted(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        super().connectionLost(reason)


if TYPE_CHECKING:
    _DeadlineBase = WrappingFactory[HandshakeDeadline]
else:
    _DeadlineBase = WrappingFactory


class HandshakeDeadlineFactory(_DeadlineBase):
    protocol = HandshakeDeadline

    def __init__(self, wrapped: Any, timeout: float, clock: IReactorTime) -> None:
        super().__init__(wrapped)
        self.timeout = timeout
        self.clock = clock


def raise_fd_limit() -> tuple[int, int]:
    """Lift the soft descriptor limit to the hard limit; returns (soft, hard) afterwards.

    systemd's default soft limit is 1024 while the hard limit is much higher: the soft one is
    there for old ``select()`` users, which Twisted's epoll reactor is not.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            logger.warning(
                "Could not raise the open-files limit from %d to %d: %s", soft, target, e
            )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


def fit_to_fd_limit(limits: list[ConnectionLimits], soft_limit: int) -> list[ConnectionLimits]:
    """Shrink the caps (proportionally) so that all listeners together leave
    :data:`RESERVED_DESCRIPTORS` free under ``soft_limit``; unchanged if they already do."""
    total = sum(lim.max_connections for lim in limits)
    budget = max(len(limits) * 8, soft_limit - RESERVED_DESCRIPTORS)
    if total <= budget:
        return limits
    out = []
    for lim in limits:
        cap = max(8, lim.max_connections * budget // total)
        out.append(
            attrs.evolve(lim, max_connections=cap, max_per_address=min(lim.max_per_address, cap))
        )
    return out
