"""The standalone listener's HTTP/1.1 protocol: framing, persistence, refusals, timeouts, flow
control. What it answers is shared with the resource and tested in test_http01.py for both."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from twisted.internet.task import Clock

from synapse_acme import http01_server
from synapse_acme.http01 import HTTP01Responder
from synapse_acme.http01_server import IDLE_TIMEOUT, MAX_HEAD, MAX_HEADERS, make_factory
from tests.http_raw import connect, parse_responses

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEY_AUTH = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
PATH = "/.well-known/acme-challenge/" + TOKEN
GET = f"GET {PATH} HTTP/1.1\r\nHost: a.example.test\r\n\r\n".encode()


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(1_700_000_000)
    return c


@pytest.fixture
def factory(clock: Clock) -> Any:
    r = HTTP01Responder()
    r.start_responding("a.example.test", TOKEN, KEY_AUTH)
    return make_factory(r, clock)


def _send(factory: Any, data: bytes, methods: list[str]) -> tuple[list[Any], Any]:
    proto, transport = connect(factory)
    proto.dataReceived(data)
    return parse_responses(transport.value(), methods), transport


# -- framing and persistence ----------------------------------------------------------------


def test_answer_has_date_type_length_and_stays_open(factory: Any) -> None:
    [(code, headers, body)], transport = _send(factory, GET, ["GET"])
    assert (code, body) == (200, KEY_AUTH.encode())
    assert headers[b"Date"] == [b"Tue, 14 Nov 2023 22:13:20 GMT"]  # the injected clock
    assert headers[b"Content-Type"] == [b"text/plain"]
    assert headers[b"Content-Length"] == [str(len(KEY_AUTH)).encode()]
    assert b"Connection" not in headers
    assert not transport.disconnecting


def test_pipelined_requests_answered_in_order(factory: Any) -> None:
    other = b"GET /.well-known/acme-challenge/nope HTTP/1.1\r\nHost: h\r\n\r\n"
    head = f"HEAD {PATH} HTTP/1.1\r\nHost: h\r\n\r\n".encode()
    responses, transport = _send(factory, GET + other + head + GET, ["GET", "GET", "HEAD", "GET"])
    assert [(c, b) for c, _, b in responses] == [
        (200, KEY_AUTH.encode()),
        (404, b"not found\n"),
        (200, b""),
        (200, KEY_AUTH.encode()),
    ]
    assert not transport.disconnecting


def test_one_byte_at_a_time(factory: Any) -> None:
    proto, transport = connect(factory)
    for i in range(len(GET)):
        proto.dataReceived(GET[i : i + 1])
    [(code, _, body)] = parse_responses(transport.value(), ["GET"])
    assert (code, body) == (200, KEY_AUTH.encode())


@pytest.mark.parametrize(
    "version, connection, stays_open, says",
    [
        ("HTTP/1.1", None, True, None),
        ("HTTP/1.1", "close", False, b"close"),
        ("HTTP/1.1", "Keep-Alive, Close", False, b"close"),
        ("HTTP/1.0", None, False, b"close"),
        ("HTTP/1.0", "keep-alive", True, b"keep-alive"),
        ("HTTP/1.0", "Keep-Alive", True, b"keep-alive"),
    ],
)
def test_persistence_follows_rfc9112(
    factory: Any, version: str, connection: str | None, stays_open: bool, says: bytes | None
) -> None:
    extra = f"Connection: {connection}\r\n" if connection else ""
    data = f"GET {PATH} {version}\r\nHost: h\r\n{extra}\r\n".encode()
    [(code, headers, _)], transport = _send(factory, data, ["GET"])
    assert code == 200
    assert headers.get(b"Connection") == ([says] if says else None)
    assert transport.disconnecting is not stays_open


def test_http10_needs_no_host(factory: Any) -> None:
    [(code, _, body)], _ = _send(factory, f"GET {PATH} HTTP/1.0\r\n\r\n".encode(), ["GET"])
    assert (code, body) == (200, KEY_AUTH.encode())


@pytest.mark.parametrize(
    "target",
    [
        PATH + "?x=1",
        "http://a.example.test" + PATH,
        "http://a.example.test:80" + PATH + "?q",
        PATH.replace("acme-challenge", "acme%2Dchallenge"),
    ],
)
def test_target_forms(factory: Any, target: str) -> None:
    data = f"GET {target} HTTP/1.1\r\nHost: h\r\n\r\n".encode()
    [(code, _, body)], _ = _send(factory, data, ["GET"])
    assert (code, body) == (200, KEY_AUTH.encode())


def test_stray_crlf_and_bare_lf(factory: Any) -> None:
    data = b"\r\n" + GET + f"GET {PATH} HTTP/1.1\nHost: h\n\n".encode()
    responses, _ = _send(factory, data, ["GET", "GET"])
    assert [c for c, _, _ in responses] == [200, 200]


# -- refusals: answered, then the connection closes ---------------------------------------


@pytest.mark.parametrize(
    "data, code",
    [
        (b"GET /x\r\n\r\n", 400),  # HTTP/0.9
        (b"GET  /x HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"G\x00T /x HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET /\x7fx HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET /x HTTP/x\r\nHost: h\r\n\r\n", 400),
        (b"GET /x HTTP/2.0\r\nHost: h\r\n\r\n", 505),
        (b"GET /x HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost : h\r\n\r\n", 400),  # space before the colon
        (b"GET /x HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n", 400),  # obs-fold
        (b"GET /x HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost: h\r\nNoColon\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost: h\r\nContent-Length: 1, 1\r\n\r\n", 400),
    ],
)
def test_malformed_requests_refused_and_closed(factory: Any, data: bytes, code: int) -> None:
    [(got, headers, _)], transport = _send(factory, data + GET, ["GET"])
    assert got == code  # the GET after it is never read
    assert headers[b"Connection"] == [b"close"]
    assert transport.disconnecting


def test_head_too_large_is_431_before_it_ends(factory: Any) -> None:
    proto, transport = connect(factory)
    proto.dataReceived(b"GET /x HTTP/1.1\r\nHost: h\r\nX: " + b"a" * MAX_HEAD)
    [(code, _, _)] = parse_responses(transport.value(), ["GET"])
    assert code == 431 and transport.disconnecting


def test_too_many_fields_is_431(factory: Any) -> None:
    fields = b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_HEADERS))
    [(code, _, _)], transport = _send(
        factory, b"GET /x HTTP/1.1\r\nHost: h\r\n" + fields + b"\r\n", ["GET"]
    )
    assert code == 431 and transport.disconnecting


@pytest.mark.parametrize(
    "field", [b"Content-Length: 47", b"Transfer-Encoding: chunked", b"Transfer-Encoding: x"]
)
def test_a_body_is_never_read_as_a_request(factory: Any, field: bytes) -> None:
    # A smuggled request in the body must not be answered: one answer, then close.
    smuggled = GET
    data = b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: h\r\n" + field + b"\r\n\r\n" + smuggled
    [(code, headers, _)], transport = _send(factory, data, ["POST"])
    assert code == 405 and headers[b"Allow"] == [b"GET, HEAD"]
    assert headers[b"Connection"] == [b"close"] and transport.disconnecting


def test_get_with_empty_body_keeps_the_connection(factory: Any) -> None:
    data = f"GET {PATH} HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n".encode() + GET
    responses, transport = _send(factory, data, ["GET", "GET"])
    assert [c for c, _, _ in responses] == [200, 200] and not transport.disconnecting


def test_nothing_read_after_close(factory: Any) -> None:
    proto, transport = connect(factory)
    proto.dataReceived(b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    proto.dataReceived(GET)
    [(code, _, _)] = parse_responses(transport.value(), ["GET"])
    assert code == 404 and transport.disconnecting


# -- timeouts ------------------------------------------------------------------------------


def test_idle_connection_dropped(factory: Any, clock: Clock) -> None:
    _, transport = connect(factory)
    clock.advance(IDLE_TIMEOUT - 0.1)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting and transport.value() == b""


def test_slow_head_does_not_extend_the_deadline(factory: Any, clock: Clock) -> None:
    proto, transport = connect(factory)
    for byte in GET[:-2]:  # one byte a second, never finishing: a slowloris
        proto.dataReceived(bytes([byte]))
        clock.advance(1)
        if transport.disconnecting:
            break
    assert transport.disconnecting and transport.value() == b""
    assert clock.seconds() - 1_700_000_000 <= IDLE_TIMEOUT + 1


def test_each_answer_restarts_the_idle_timer(factory: Any, clock: Clock) -> None:
    proto, transport = connect(factory)
    for _ in range(3):
        clock.advance(IDLE_TIMEOUT - 1)
        proto.dataReceived(GET)
    assert not transport.disconnecting
    proto.connectionLost()
    assert not clock.getDelayedCalls()  # the timer goes with the connection


# -- flow control and bugs -----------------------------------------------------------------


def test_stops_reading_while_the_client_does_not(factory: Any) -> None:
    proto, transport = connect(factory)
    assert transport.producer is proto and transport.streaming
    proto.pauseProducing()  # the transport's write buffer is full
    assert transport.producerState == "paused"  # so reading stopped too
    proto.dataReceived(GET + GET)
    assert transport.value() == b""
    proto.resumeProducing()
    assert transport.producerState == "producing"
    responses = parse_responses(transport.value(), ["GET", "GET"])
    assert [c for c, _, _ in responses] == [200, 200]


class _Exploding(dict):  # type: ignore[type-arg]
    def get(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")


def test_a_bug_costs_a_500_and_the_connection(caplog: pytest.LogCaptureFixture) -> None:
    factory = http01_server.ChallengeHTTPFactory(_Exploding(), Clock())
    [(code, headers, body)], transport = _send(factory, GET, ["GET"])
    assert (code, body) == (500, b"internal error\n")
    assert headers[b"Connection"] == [b"close"] and transport.disconnecting
    assert "Bug answering an HTTP-01 request" in caplog.text


def test_requests_logged_at_debug_only(factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="synapse_acme")
    _send(factory, GET + b"GET /nope HTTP/1.1\r\n\r\n", ["GET", "GET"])
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert (logging.DEBUG, f"GET {PATH.encode()!r} -> 200") in lines
    assert all(level == logging.DEBUG for level, _ in lines), lines
    assert not factory.noisy


def test_huge_content_length_is_a_body_not_a_bug(factory: Any) -> None:
    data = b"GET /x HTTP/1.1\r\nHost: h\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n"
    [(code, headers, _)], transport = _send(factory, data, ["GET"])
    assert code == 404 and headers[b"Connection"] == [b"close"] and transport.disconnecting


def test_oversized_head_after_a_head_request_still_gets_a_body(factory: Any) -> None:
    # The refusal names the method of the oversized request, not of the HEAD before it.
    head = f"HEAD {PATH} HTTP/1.1\r\nHost: h\r\n\r\n".encode()
    big = b"GET /x HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD + 10)
    responses, transport = _send(factory, head + big, ["HEAD", "GET"])
    assert [(c, b) for c, _, b in responses] == [
        (200, b""),
        (431, b"request header fields too large\n"),
    ]
    assert transport.disconnecting


# -- prebuilt responses and straight-to-the-socket writes ---------------------------------------


def test_a_response_is_built_once_per_date_second_and_follows_the_live_map(clock: Clock) -> None:
    responder = HTTP01Responder()
    responder.start_responding("a.example.test", TOKEN, KEY_AUTH)
    factory = make_factory(responder, clock)
    [(_, first, body)], _ = _send(factory, GET, ["GET"])
    again, _ = _send(factory, GET, ["GET"])
    assert again[0][2] == body == KEY_AUTH.encode()
    ok = http01_server.Answer(200, KEY_AUTH.encode())
    assert factory.response(ok, False, True, False) is factory.response(ok, False, True, False)
    # the next second: a new Date, and a new response
    clock.advance(1)
    [(_, later, _)], _ = _send(factory, GET, ["GET"])
    assert later[b"Date"] != first[b"Date"]
    # a changed answer for the same token is served at once, not the cached one
    responder.start_responding("a.example.test", TOKEN, "changed")
    [(_, _, changed)], _ = _send(factory, GET, ["GET"])
    assert changed == b"changed"


def test_the_response_cache_is_bounded(factory: Any) -> None:
    for i in range(3 * http01_server._MAX_RESPONSES):
        factory.response(http01_server.Answer(200, b"%d" % i), False, True, False)
        assert len(factory._responses) <= http01_server._MAX_RESPONSES


def test_writes_go_straight_to_a_socket_only_under_plain_tcp() -> None:
    import socket

    from twisted.internet import tcp
    from twisted.internet.testing import StringTransport
    from twisted.protocols.policies import ProtocolWrapper

    from synapse_acme.limits import _Limited

    a, b = socket.socketpair()
    try:
        plain = tcp.Server.__new__(tcp.Server)  # a real TCP transport's class, not started
        plain.socket = a
        assert http01_server._plain_socket(plain) is a

        def wrapped(cls: type[ProtocolWrapper]) -> ProtocolWrapper:
            w = cls.__new__(cls)
            w.transport = plain
            return w

        # the connection caps pass writes through; any other wrapper (TLS is one) may not
        assert http01_server._plain_socket(wrapped(_Limited)) is a
        assert http01_server._plain_socket(wrapped(ProtocolWrapper)) is None
        plain.TLS = True  # after startTLS the socket carries TLS records
        assert http01_server._plain_socket(plain) is None
        assert http01_server._plain_socket(StringTransport()) is None
    finally:
        a.close()
        b.close()
