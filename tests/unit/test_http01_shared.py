"""HTTP-01 on a shared store: a token put by one process is answered by another, through both
servers (the resource Synapse mounts and the standalone protocol), asynchronously."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet import defer
from zope.interface import implementer

from synapse_acme import http01
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


def test_lookups_are_bounded_shared_per_token_and_shed_beyond_the_queue(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A flood of made-up tokens (the path is public) never has more than LOOKUPS_IN_FLIGHT
    store reads at once; a token asked for several times meanwhile is read once; past the
    queue the answer is 404 at once without asking the store, and it is logged."""
    monkeypatch.setattr(http01, "LOOKUPS_IN_FLIGHT", 2)
    monkeypatch.setattr(http01, "LOOKUPS_WAITING", 3)
    store = SlowStore({TOKEN: KEY_AUTH})
    look = HTTP01Responder(shared=store).lookup()
    assert look is not None
    same = [look(TOKEN) for _ in range(3)]  # one read for the three
    made_up = [look(f"made-up-{i}") for i in range(4)]  # 1 + 4 = 5 = 2 in flight + 3 waiting
    assert [t for _, t in store.pending] == [TOKEN, "made-up-0"]
    with caplog.at_level(logging.WARNING):
        shed = look("one-too-many")
    assert result_of(shed) is None and "answering more with 404 at once" in caplog.text
    assert len(store.pending) == 2
    store.answer_all()  # the two reads end; the waiting ones start, two at a time
    assert [result_of(d) for d in same] == [KEY_AUTH.encode()] * 3
    assert [t for _, t in store.pending] == ["made-up-1", "made-up-2"]
    store.answer_all()
    store.answer_all()
    assert [result_of(d) for d in made_up] == [None] * 4
    assert store.pending == []
