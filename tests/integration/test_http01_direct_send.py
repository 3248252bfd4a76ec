"""The HTTP-01 listener's straight-to-the-socket writes on real sockets, with a real reactor in
a subprocess: a client that pipelines far more than the kernel's socket buffers hold and does
not read still gets every answer, whole and in order (the rest goes through the transport and
its flow control once the socket is full)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading

import pytest

pytestmark = pytest.mark.integration

_SERVER = textwrap.dedent(
    r"""
    import socket, sys
    from twisted.internet import reactor
    from synapse_acme import http01_server
    from synapse_acme.http01 import HTTP01Responder
    from synapse_acme.limits import ConnectionLimits, LimitedFactory

    # Count the writes that went straight to the socket and those that went through the
    # transport (printed when a connection ends): the test needs both paths taken.
    counts = {"socket": 0, "transport": 0}
    class Counting(http01_server.ChallengeHTTPProtocol):
        def _write(self, data):
            counts["socket" if self._socket is not None else "transport"] += 1
            super()._write(data)
        def connectionLost(self, reason):
            super().connectionLost(reason)
            print(counts["socket"], counts["transport"], flush=True)

    responder = HTTP01Responder()
    responder.start_responding("a.example.test", "tokA", "tokA." + "a" * 40)
    responder.start_responding("b.example.test", "tokB", "tokB." + "b" * 40)
    limits = ConnectionLimits()
    inner = http01_server.make_factory(responder, reactor, limits.header_timeout)
    inner.protocol = Counting
    port = reactor.listenTCP(0, LimitedFactory(inner, limits, reactor, "HTTP-01"),
                             interface="127.0.0.1")
    # Small kernel buffers (accepted sockets inherit them), so they fill after a few hundred
    # answers instead of megabytes.
    port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    print(port.getHost().port, flush=True)
    reactor.run()
    """
)

_PATHS = [b"tokA", b"tokB", b"nothere", b"tokA"]
_BODIES = {b"tokA": b"tokA." + b"a" * 40, b"tokB": b"tokB." + b"b" * 40, b"nothere": b"not found\n"}


def _requests(n: int) -> bytes:
    reqs = [
        b"GET /.well-known/acme-challenge/%s HTTP/1.1\r\nHost: a.example.test\r\n\r\n"
        % _PATHS[i % len(_PATHS)]
        for i in range(n - 1)
    ]
    reqs.append(
        b"GET /.well-known/acme-challenge/tokB HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    return b"".join(reqs)


def _bodies(data: bytes) -> list[bytes]:
    """The bodies of consecutive responses in ``data`` (each framed by Content-Length)."""
    out, at = [], 0
    while at < len(data):
        end = data.index(b"\r\n\r\n", at)
        head = data[at:end]
        assert head.startswith((b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 404 Not Found\r\n")), head
        length = int(head.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
        out.append(data[end + 4 : end + 4 + length])
        at = end + 4 + length
    return out


def test_pipelined_flood_to_a_client_that_does_not_read_gets_every_answer_in_order() -> None:
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        n = 20_000  # ~3.7 MB of answers, ~1.7 MB of requests: far more than the buffers hold
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sender = threading.Thread(target=sock.sendall, args=(_requests(n),))
        sender.start()
        # Not reading: the socket fills, the rest waits in the transport, which then stops
        # reading, so the sender blocks until this side reads.
        sender.join(3.0)
        chunks = []
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        sender.join(30)
        sock.close()
        data = b"".join(chunks)
        bodies = _bodies(data)
        assert len(bodies) == n
        expected = [_BODIES[_PATHS[i % len(_PATHS)]] for i in range(n - 1)] + [_BODIES[b"tokB"]]
        assert bodies == expected
        direct, buffered = map(int, server.stdout.readline().split())
        assert direct > 0 and buffered > 0 and direct + buffered == n
        assert server.poll() is None  # the listener is still up
    finally:
        server.terminate()
        _, err = server.communicate(timeout=10)
    assert b"Traceback" not in err and b"ERROR" not in err, err
