"""HTTP-01 on a shared store: a token put by one process is answered by another, through both
servers (the resource Synapse mounts and the standalone protocol), asynchronously."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet import defer
from zope.interface import implementer

from synapse_acme.errors import StoreError
from synapse_acme.http01 import HTTP01Responder
from synapse_acme.interfaces import IChallengeStore
from synapse_acme.testing.store import MemoryStore
from tests.deferreds import result_of
from tests.http_raw import connect, parse_responses
from tests.unit.test_http01 import KEY_AUTH, PREFIX, SERVERS, TOKEN, _request, serve


@implementer(IChallengeStore)
class SlowStore:
    """A challenge store whose lookups wait until the test answers them (a database)."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.pending: list[tuple[defer.Deferred[str | None], str]] = []
        self.error: Exception | None = None

    def put_challenge(self, token: str, key_authorization: str) -> defer.Deferred[None]:
        self.answers[token] = key_authorization
        return defer.succeed(None)

    def get_challenge(self, token: str) -> defer.Deferred[str | None]:
        if self.error is not None:
            return defer.fail(self.error)
        d: defer.Deferred[str | None] = defer.Deferred()
        self.pending.append((d, token))
        return d

    def remove_challenge(self, token: str) -> defer.Deferred[None]:
        self.answers.pop(token, None)
        return defer.succeed(None)

    def answer_all(self) -> None:
        pending, self.pending = self.pending, []
        for d, token in pending:
            d.callback(self.answers.get(token))


@pytest.mark.parametrize("kind", SERVERS)
def test_a_token_put_by_one_process_is_answered_by_another(kind: str) -> None:
    store = MemoryStore()
    orderer = HTTP01Responder(shared=store)
    hits: list[bool] = []
    other = HTTP01Responder(shared=store.another_handle(), on_request=hits.append)
    result_of(orderer.start_responding("a.example.test", TOKEN, KEY_AUTH))
    assert result_of(store.get_challenge(TOKEN)) == KEY_AUTH
    server = serve(kind, other)
    assert _request(server, "GET", PREFIX + TOKEN)[::2] == (200, KEY_AUTH.encode())
    code, headers, body = _request(server, "HEAD", PREFIX + TOKEN)
    assert (code, body, headers[b"Content-Length"]) == (200, b"", [b"%d" % len(KEY_AUTH)])
    result_of(orderer.stop_responding("a.example.test", TOKEN))
    assert result_of(store.get_challenge(TOKEN)) is None
    # Unknown (or no longer wanted): the same 404 as without a shared store.
    assert _request(server, "GET", PREFIX + TOKEN)[::2] == (404, b"not found\n")
    assert _request(server, "GET", PREFIX + "never-put")[::2] == (404, b"not found\n")
    assert hits == [True, True, False, False]


@pytest.mark.parametrize("kind", SERVERS)
def test_a_store_that_cannot_be_read_gives_the_same_404(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = SlowStore({})
    store.error = StoreError("PostgreSQL store: connection refused")
    server = serve(kind, HTTP01Responder(shared=store))
    with caplog.at_level(logging.WARNING):
        assert _request(server, "GET", PREFIX + TOKEN)[::2] == (404, b"not found\n")
    assert "connection refused" in caplog.text


def test_resource_answers_when_the_lookup_completes() -> None:
    store = SlowStore({TOKEN: KEY_AUTH})
    responder = HTTP01Responder(shared=store)
    stub = StubTreq(serve("resource", responder))
    results: list[Any] = []
    d = stub.get(PREFIX + TOKEN)
    d.addCallback(lambda r: stub.content(r).addCallback(lambda b: results.append((r.code, b))))
    stub.flush()
    assert results == [] and len(store.pending) == 1  # the reactor was not held meanwhile
    store.answer_all()
    stub.flush()
    assert results == [(200, KEY_AUTH.encode())]


def test_protocol_keeps_pipelined_answers_in_order_while_looking_up() -> None:
    store = SlowStore({TOKEN: KEY_AUTH})
    responder = HTTP01Responder(shared=store)
    responder.start_responding("b.example.test", "local", "local.thumb")
    proto, transport = connect(serve("protocol", responder))
    req = "GET /.well-known/acme-challenge/{} HTTP/1.1\r\nHost: h\r\n\r\n"
    proto.dataReceived((req.format(TOKEN) + req.format("local") + req.format("gone")).encode())
    assert transport.value() == b""  # the first answer waits for the store; the rest behind it
    store.answer_all()  # TOKEN found
    store.answer_all()  # "gone" (asked once "local" was answered from memory)
    responses = parse_responses(transport.value(), ["GET", "GET", "GET"])
    assert [(c, b) for c, _, b in responses] == [
        (200, KEY_AUTH.encode()),
        (200, b"local.thumb"),
        (404, b"not found\n"),
    ]
    assert not transport.disconnecting


def test_protocol_lookup_for_a_client_that_left_writes_nothing() -> None:
    store = SlowStore({TOKEN: KEY_AUTH})
    proto, transport = connect(serve("protocol", HTTP01Responder(shared=store)))
    proto.dataReceived(
        f"GET /.well-known/acme-challenge/{TOKEN} HTTP/1.1\r\nHost: h\r\n\r\n".encode()
    )
    proto.connectionLost()
    store.answer_all()
    assert transport.value() == b""
