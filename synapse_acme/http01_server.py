"""The standalone challenge listener's HTTP server: a small, strict HTTP/1.1 protocol.

``synapse-acme run`` (and anything using :func:`make_factory`) serves only
``GET|HEAD /.well-known/acme-challenge/<token>`` on a port that faces the internet. That needs a
fraction of HTTP: no bodies, no uploads, no chunked coding, no upgrades. This protocol parses
exactly that fraction and refuses the rest with a 4xx and a closed connection, instead of
building a full ``twisted.web`` Request per hit, so it answers more requests per second than
``twisted.web.server.Site`` with the same resource (measured with wrk: docs/BENCHMARKS.md,
section 2, has the current figures). What it answers, and when, is decided by the same
function as the resource Synapse mounts (:func:`synapse_acme.http01.answer`).

Rules (RFC 9112 where it says MUST, strict where it allows a choice):

- A request head is at most :data:`MAX_HEAD` bytes and :data:`MAX_HEADERS` fields, else 431.
- Request line ``METHOD SP target SP HTTP/1.x``; a malformed one is 400, another version 505.
- Header fields: token name, colon, value without control characters; obs-fold, whitespace
  before the colon, or a repeated/missing Host (HTTP/1.1) is 400.
- A request announcing a body (Content-Length > 0, any Transfer-Encoding) is answered and the
  connection closed: the body is never read, so it can never be mistaken for a request.
- Persistent connections as RFC 9112 section 9.3 says (1.1 unless ``close``; 1.0 only with
  ``keep-alive``); pipelined requests are answered in order, with flow control: when the
  client stops reading, this stops reading too.
- A connection idle for :data:`IDLE_TIMEOUT` seconds, or one sending a head slower than that,
  is dropped (the timer restarts only when a whole request has been answered).
- Nothing raised while answering escapes: it costs one 500 and the connection, never the
  listener.

Per request it does as little as the rules allow (the listener's throughput is measured in
docs/BENCHMARKS.md, section 2): the header block is checked by one regular expression and
only the four fields that matter are looked at; each distinct response (status, body, the
Date second, connection mode) is built once and reused; and a response is written straight
to the socket with one ``send`` when the socket takes it whole, as it almost always does,
instead of waiting a reactor turn in the transport's buffer (two ``epoll_ctl`` calls and a
second wake-up). When the socket does not take all of it, the rest, and everything after it
on that connection, goes through the transport as before, so the transport's flow control
(``pauseProducing``) still applies.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet import defer, tcp
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from zope.interface import implementer

from synapse_acme.http01 import (
    INTERNAL_ERROR,
    NOT_FOUND,
    Answer,
    HTTP01Responder,
    answer_or_lookup,
)

logger = logging.getLogger(__name__)

#: Largest request head (request line + header fields) accepted, in bytes.
MAX_HEAD = 8192
#: Most header fields accepted in one request.
MAX_HEADERS = 100
#: Seconds a connection may stay without a complete request before it is dropped (the
#: default of ``acme.connection_limits.header_timeout``). A CA's validation request arrives
#: within milliseconds of connecting.
IDLE_TIMEOUT = 10.0

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}")
_TARGET = re.compile(rb"[\x21-\x7e]{1,8000}")
# The header block (the head after the request line): every line a token name, a colon (no
# whitespace before it: that and obs-fold fail here) and a value without control characters
# but HTAB, ended by LF or CRLF (the last one by the end of the head).
_FIELDS = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\r?(?:\n|\Z))*")
# The only fields that change the answer (a name is case-insensitive).
_WANTED = re.compile(
    rb"^(host|connection|content-length|transfer-encoding):([^\r\n]*)", re.IGNORECASE | re.MULTILINE
)
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")
_ABSOLUTE = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")
_PREFIX = (b".well-known", b"acme-challenge")

_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    505: b"HTTP Version Not Supported",
}


class _Refuse(Exception):
    """A request this server will not parse: answered with ``code`` and the connection closed."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


@implementer(IPushProducer)
class ChallengeHTTPProtocol(Protocol):
    """One connection to the challenge listener (built by :class:`ChallengeHTTPFactory`)."""

    factory: ChallengeHTTPFactory

    def __init__(self) -> None:
        self._buffer = b""
        self._paused = False
        self._closing = False
        self._timeout: IDelayedCall | None = None
        self._method = b""  # of the request being answered
        # A token being looked up in the shared store: reading stops until it is answered,
        # so pipelined answers keep their order.
        self._looking_up = False
        #: The socket responses are sent on directly, or None: through the transport.
        self._socket: socket.socket | None = None

    # -- connection ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self._socket = _plain_socket(self.transport)
        self._timeout = self.factory.clock.callLater(self.factory.idle_timeout, self._timed_out)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closing = True
        self._buffer = b""
        self._socket = None
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None

    def _timed_out(self) -> None:
        self._timeout = None
        logger.debug("HTTP-01 connection idle for %ss, dropped", self.factory.idle_timeout)
        self._closing = True
        self.transport.abortConnection()  # type: ignore[union-attr]

    # -- IPushProducer: the transport's write buffer is full / drained -------------------------

    def pauseProducing(self) -> None:
        self._paused = True
        self.transport.pauseProducing()  # type: ignore[union-attr]  # stop reading

    def resumeProducing(self) -> None:
        self._paused = False
        if self._closing or self._looking_up:
            return
        self.transport.resumeProducing()  # type: ignore[union-attr]
        self.dataReceived(b"")

    def stopProducing(self) -> None:
        self._closing = True

    # -- requests --------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        data = self._buffer + data if self._buffer else data
        try:
            while not self._paused and not self._closing and not self._looking_up:
                if data[:1] in (b"\r", b"\n"):
                    data = data.lstrip(b"\r\n")  # RFC 9112 2.2: stray CRLFs before a request
                end = _HEAD_END.search(data)
                if end is None or end.start() > MAX_HEAD:
                    if end is None and len(data) <= MAX_HEAD + 4:
                        break  # wait for the rest of the head
                    self._method = data.split(b" ", 1)[0][:32]
                    raise _Refuse(431, f"request head over {MAX_HEAD} bytes")
                head, data = data[: end.start()], data[end.end() :]
                self._answer(head)
        except _Refuse as e:
            data = b""
            logger.debug("HTTP-01 request refused (%s): %s", e.code, e)
            # A HEAD gets no body even when refused, or a client would read it as the next answer.
            self._send(_refusal(e), self._method, False)
        except Exception:
            data = b""
            logger.exception("Bug answering an HTTP-01 request")
            self._send(INTERNAL_ERROR, self._method, False)
        self._buffer = data

    def _answer(self, head: bytes) -> None:
        eol = head.find(b"\n")
        if eol < 0:
            request_line, fields = head, b""
        else:
            request_line, fields = head[:eol].rstrip(b"\r"), head[eol + 1 :]
        parts = request_line.split(b" ")
        self._method = parts[0]
        if len(parts) != 3:
            raise _Refuse(400, "malformed request line")
        method, target, version = parts
        if not _METHOD.fullmatch(method) or not _TARGET.fullmatch(target):
            raise _Refuse(400, "malformed request line")
        v = _VERSION.fullmatch(version)
        if v is None:
            raise _Refuse(400, "malformed HTTP version")
        if v.group(1) != b"1":
            raise _Refuse(505, f"HTTP version {version.decode('ascii')} not supported")
        http11 = v.group(2) != b"0"
        if eol >= 0 and fields.count(b"\n") + 1 > MAX_HEADERS:
            raise _Refuse(431, f"over {MAX_HEADERS} header fields")
        if not _FIELDS.fullmatch(fields):
            # includes obs-fold, "Name :", control characters in a value
            raise _Refuse(400, "malformed header field")
        hosts = 0
        connection = b""
        has_body = False
        for name, value in _WANTED.findall(fields):
            lname = name.lower()
            if lname == b"host":
                hosts += 1
            elif lname == b"connection":
                connection += b"," + value.lower()
            elif lname == b"content-length":
                length = value.strip()
                if not length.isdigit():
                    raise _Refuse(400, "malformed Content-Length")
                # (no int(): a 5,000-digit length would raise; any non-zero means a body)
                has_body = has_body or length.strip(b"0") != b""
            else:  # transfer-encoding
                has_body = True
        if hosts > 1 or (http11 and hosts == 0):
            raise _Refuse(400, "an HTTP/1.1 request needs exactly one Host field")
        if connection:
            tokens = {t.strip() for t in connection.split(b",")}
            keep = (b"close" not in tokens) if http11 else (b"keep-alive" in tokens)
        else:
            keep = http11
        keep = keep and not has_body
        result = self._route(method, target)
        if isinstance(result, Answer):
            self._reply(result, method, target, keep, http11)
            return
        outcome: list[Answer | Failure] = []
        result.addBoth(outcome.append)
        if outcome:  # answered at once: go on in this loop
            self._looked_up(outcome[0], method, target, keep, http11)
            return
        self._looking_up = True
        self.transport.pauseProducing()  # type: ignore[union-attr]

        def later(_: object) -> None:
            self._looking_up = False
            if self._closing:
                return  # the client went away meanwhile
            self._looked_up(outcome[0], method, target, keep, http11)
            if not self._closing and not self._paused:
                self.transport.resumeProducing()  # type: ignore[union-attr]
                self.dataReceived(b"")  # what was pipelined behind it

        result.addCallback(later)

    def _looked_up(
        self, outcome: Answer | Failure, method: bytes, target: bytes, keep: bool, http11: bool
    ) -> None:
        if isinstance(outcome, Failure):  # answer_or_lookup turns every error into a 404
            logger.error("Bug answering an HTTP-01 request", exc_info=outcome.value)
            self._send(INTERNAL_ERROR, method, False)
            return
        self._reply(outcome, method, target, keep, http11)

    def _reply(
        self, result: Answer, method: bytes, target: bytes, keep: bool, http11: bool
    ) -> None:
        self._send(result, method, keep, http10_keep_alive=keep and not http11)
        if keep and self._timeout is not None:
            self._timeout.reset(self.factory.idle_timeout)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s %r -> %s", method.decode("ascii"), target, result.code)

    def _route(self, method: bytes, target: bytes) -> Answer | defer.Deferred[Answer]:
        if target[:1] != b"/":
            absolute = _ABSOLUTE.match(target)
            if absolute is None:
                return NOT_FOUND  # "*" (OPTIONS) or junk: nothing lives there
            target = target[absolute.end() :] or b"/"
        path = target.split(b"?", 1)[0]
        segments = path[1:].split(b"/")
        if b"%" in path:
            segments = [unquote_to_bytes(s) for s in segments]
        if len(segments) < 2 or (segments[0], segments[1]) != _PREFIX:
            return NOT_FOUND
        return answer_or_lookup(
            self.factory.tokens, method, segments[2:], self.factory.observe, self.factory.lookup
        )

    def _send(
        self,
        result: Answer,
        method: bytes,
        keep: bool,
        http10_keep_alive: bool = False,
    ) -> None:
        self._write(self.factory.response(result, method == b"HEAD", keep, http10_keep_alive))
        if not keep:
            self._closing = True
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _write(self, data: bytes) -> None:
        """Send ``data`` on the socket at once if it takes all of it, else (and from then on)
        through the transport, which keeps the order: whatever the socket took went first."""
        sock = self._socket
        if sock is not None:
            try:
                sent = sock.send(data)
            except OSError:  # full (EAGAIN) or broken: the transport finds out on its own
                sent = 0
            if sent == len(data):
                return
            self._socket = None
            data = data[sent:]
        self.transport.write(data)  # type: ignore[union-attr]


def _plain_socket(transport: Any) -> socket.socket | None:
    """The TCP or UNIX socket under ``transport`` when bytes written to the transport reach it
    unchanged (no TLS; only wrappers that say they pass bytes through, such as the connection
    caps of :mod:`synapse_acme.limits`), else None."""
    while isinstance(transport, ProtocolWrapper):
        if not getattr(transport, "passes_writes_through", False):
            return None
        transport = transport.transport
    if not isinstance(transport, tcp.Connection) or transport.TLS:
        return None
    return transport.getHandle()


def _refusal(e: _Refuse) -> Answer:
    return Answer(e.code, _REASONS.get(e.code, b"Error").lower() + b"\n")


class ChallengeHTTPFactory(ServerFactory[ChallengeHTTPProtocol]):
    """Builds :class:`ChallengeHTTPProtocol` connections answering from ``tokens`` (a live map,
    such as :meth:`HTTP01Responder.tokens`); ``observe`` is told of each challenge request
    (see :func:`synapse_acme.http01.answer`); ``lookup`` finds a token not in ``tokens`` in the
    shared store (:meth:`HTTP01Responder.lookup`)."""

    protocol = ChallengeHTTPProtocol
    noisy = False  # no "Starting factory" log line per port

    def __init__(
        self,
        tokens: Mapping[str, bytes],
        clock: IReactorTime,
        idle_timeout: float = IDLE_TIMEOUT,
        observe: Callable[[bool], None] | None = None,
        lookup: Callable[[str], defer.Deferred[bytes | None]] | None = None,
    ) -> None:
        self.tokens = tokens
        self.observe = observe
        self.lookup = lookup
        self.clock = clock
        self.idle_timeout = idle_timeout
        self._date_second = -1
        self._date = b""
        self._responses: dict[tuple[int, bytes, bytes | None, bool, bool, bool], bytes] = {}

    def date(self) -> bytes:
        """The ``Date`` field value for now, formatted once per second."""
        now = int(self.clock.seconds())
        if now != self._date_second:
            self._date_second = now
            self._date = datetimeToString(now)
            self._responses.clear()
        return self._date

    def response(self, result: Answer, head: bool, keep: bool, http10_keep_alive: bool) -> bytes:
        """The whole response (status line, fields, body unless ``head``) for ``result``, built
        once per Date second and reused (at most :data:`_MAX_RESPONSES` kept)."""
        date = self.date()
        key = (result.code, result.body, result.allow, head, keep, http10_keep_alive)
        data = self._responses.get(key)
        if data is None:
            if len(self._responses) >= _MAX_RESPONSES:
                self._responses.clear()
            data = self._responses[key] = _build_response(
                result, date, head, keep, http10_keep_alive
            )
        return data


#: Distinct responses a factory keeps (a handful of tokens, 404, 405, refusals, per mode).
_MAX_RESPONSES = 64


def _build_response(
    result: Answer, date: bytes, head: bool, keep: bool, http10_keep_alive: bool
) -> bytes:
    fields = [
        b"HTTP/1.1 %d %s" % (result.code, _REASONS.get(result.code, b"Error")),
        b"Date: " + date,
        b"Content-Type: text/plain",
        b"Cache-Control: no-store",
        b"Content-Length: %d" % len(result.body),
    ]
    if result.allow:
        fields.append(b"Allow: " + result.allow)
    if not keep:
        fields.append(b"Connection: close")
    elif http10_keep_alive:
        fields.append(b"Connection: keep-alive")
    # A HEAD gets the length a GET would get, without the body.
    return b"\r\n".join(fields) + b"\r\n\r\n" + (b"" if head else result.body)


def make_factory(
    responder: HTTP01Responder, clock: IReactorTime, idle_timeout: float = IDLE_TIMEOUT
) -> ChallengeHTTPFactory:
    """The protocol factory the standalone HTTP-01 listener serves ``responder`` with;
    ``idle_timeout`` bounds how long a request head may take (and idling between requests)."""
    return ChallengeHTTPFactory(
        responder.tokens(), clock, idle_timeout, responder.on_request, responder.lookup()
    )
