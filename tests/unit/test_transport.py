"""JWSTransport against tiny in-memory resources: nonces, badNonce, problems, Retry-After."""

from __future__ import annotations

import email.utils
import json
from collections.abc import Callable
from typing import Any

import josepy as jose
import pytest
from acme import jws, messages
from cryptography.hazmat.primitives.asymmetric import ec
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.web import resource, server
from twisted.web.iweb import IAgent
from zope.interface import implementer

from synapse_acme.acme.transport import (
    MAX_BAD_NONCE_RETRIES,
    AcmeResponse,
    JWSTransport,
    jws_algorithm,
    make_http_client,
    parse_links,
    parse_retry_after,
)
from synapse_acme.errors import AcmeError, AcmeProtocolError, AcmeTransportError, ConfigError
from tests.deferreds import result_of

BASE = "https://ca.test"
DIRECTORY_URL = f"{BASE}/directory"
START = 1_700_000_000.0


class FakeCA(resource.Resource):
    """Directory, newNonce, and one POST endpoint whose answer the test chooses.

    Every POST is JWS-verified (signature, nonce issued by us and unused, url header).
    """

    isLeaf = True

    def __init__(self, account_key: jose.JWK) -> None:
        super().__init__()
        self.account_key = account_key.public_key()
        self.counter = 0
        self.issued: set[str] = set()
        self.heads = 0
        self.bad_nonces_left = 0
        self.posts: list[dict[str, Any]] = []
        self.answer: Callable[[server.Request], bytes] = self.json_ok
        self.directory: dict[str, Any] = {
            "newNonce": f"{BASE}/nonce",
            "newAccount": f"{BASE}/acct",
            "newOrder": f"{BASE}/order",
        }

    def nonce(self, request: server.Request) -> None:
        self.counter += 1
        value = jose.encode_b64jose(f"nonce-{self.counter}".encode())
        self.issued.add(value)
        request.setHeader(b"Replay-Nonce", value.encode())

    def json_ok(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"ok": true}'

    def render_GET(self, request: server.Request) -> bytes:
        if request.path == b"/directory":
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps(self.directory).encode()
        return self.answer(request)

    def render_HEAD(self, request: server.Request) -> bytes:
        self.heads += 1
        self.nonce(request)
        return b""

    def render_POST(self, request: server.Request) -> bytes:
        body = request.content.read()
        signed = jws.JWS.json_loads(body)
        header = signed.signature.combined
        assert signed.verify(self.account_key), "bad signature"
        assert header.url == BASE + request.path.decode(), "url header mismatch"
        nonce = jose.encode_b64jose(header.nonce)
        self.posts.append(
            {"payload": signed.payload, "kid": header.kid, "jwk": header.jwk, "nonce": nonce}
        )
        fresh = nonce in self.issued
        self.issued.discard(nonce)
        self.nonce(request)
        if not fresh or self.bad_nonces_left > 0:
            self.bad_nonces_left = max(0, self.bad_nonces_left - 1)
            request.setResponseCode(400)
            request.setHeader(b"Content-Type", b"application/problem+json")
            return json.dumps(
                {"type": "urn:ietf:params:acme:error:badNonce", "detail": "stale"}
            ).encode()
        return self.answer(request)


def make(answer: Callable[[server.Request], bytes] | None = None, **kw: Any):
    key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    ca = FakeCA(key)
    if answer is not None:
        ca.answer = answer
    stub = StubTreq(ca)
    clock = Clock()
    clock.advance(START)
    transport = JWSTransport(stub, clock, key, DIRECTORY_URL, **kw)  # type: ignore[arg-type]
    return ca, stub, clock, transport


def run(stub: StubTreq, d: defer.Deferred[Any]) -> Any:
    stub.flush()
    return result_of(d)


def problem(status: int, typ: str, extra: dict[str, Any] | None = None, headers=None):
    def answer(request: server.Request) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/problem+json")
        for k, v in (headers or {}).items():
            request.setHeader(k, v)
        return json.dumps({"type": typ, "detail": "nope", **(extra or {})}).encode()

    return answer


def test_directory_is_fetched_once_and_parsed() -> None:
    _ca, stub, _, transport = make()
    d1 = transport.directory()
    d2 = transport.directory()
    first, second = run(stub, d1), run(stub, d2)
    assert isinstance(first, messages.Directory)
    assert first["newOrder"] == f"{BASE}/order"
    assert first is second


def test_directory_missing_urls_is_protocol_error() -> None:
    ca, stub, _, transport = make()
    del ca.directory["newNonce"]
    with pytest.raises(AcmeProtocolError, match="newNonce"):
        run(stub, transport.directory())


def test_post_signs_with_jwk_then_kid_and_reuses_nonces() -> None:
    ca, stub, _, transport = make()
    resp = run(stub, transport.post(f"{BASE}/acct", messages.NewRegistration(), kid=None))
    assert resp.json == {"ok": True}
    assert ca.posts[0]["jwk"] is not None and ca.posts[0]["kid"] is None
    run(stub, transport.post(f"{BASE}/thing", None, kid=f"{BASE}/acct/1"))
    assert ca.posts[1]["kid"] == f"{BASE}/acct/1" and ca.posts[1]["jwk"] is None
    assert ca.posts[1]["payload"] == b""  # POST-as-GET
    # One HEAD for the first nonce; the second POST used the nonce from the first answer.
    assert ca.heads == 1


def test_bad_nonce_is_retried_with_fresh_nonce() -> None:
    ca, stub, _, transport = make()
    ca.bad_nonces_left = 3
    resp = run(stub, transport.post(f"{BASE}/x", None, kid="k"))
    assert resp.status == 200
    assert len(ca.posts) == 4
    assert len({p["nonce"] for p in ca.posts}) == 4


def test_bad_nonce_gives_up_after_limit() -> None:
    ca, stub, _, transport = make()
    ca.bad_nonces_left = 1000
    with pytest.raises(AcmeError) as err:
        run(stub, transport.post(f"{BASE}/x", None, kid="k"))
    assert err.value.code == "badNonce"
    assert len(ca.posts) == MAX_BAD_NONCE_RETRIES + 1


def test_problem_document_becomes_typed_error() -> None:
    sub = {
        "type": "urn:ietf:params:acme:error:rejectedIdentifier",
        "detail": "no",
        "identifier": {"type": "dns", "value": "bad.test"},
    }
    answer = problem(
        403,
        "urn:ietf:params:acme:error:rejectedIdentifier",
        {"subproblems": [sub]},
    )
    _, stub, _, transport = make(answer)
    with pytest.raises(AcmeError) as err:
        run(stub, transport.post(f"{BASE}/order", None, kid="k"))
    e = err.value
    assert (e.code, e.status, e.url, e.detail) == (
        "rejectedIdentifier",
        403,
        f"{BASE}/order",
        "nope",
    )
    assert e.subproblems == (sub,)


def test_rate_limit_retry_after_seconds() -> None:
    answer = problem(
        429, "urn:ietf:params:acme:error:rateLimited", headers={b"Retry-After": b"120"}
    )
    _, stub, _, transport = make(answer)
    with pytest.raises(AcmeError) as err:
        run(stub, transport.get(f"{BASE}/ari"))
    assert err.value.code == "rateLimited"
    assert err.value.retry_after == 120.0


def test_retry_after_http_date_uses_the_clock() -> None:
    when = email.utils.formatdate(START + 90, usegmt=True).encode()

    def answer(request: server.Request) -> bytes:
        request.setHeader(b"Retry-After", when)
        request.setHeader(b"Content-Type", b"application/json")
        return b"{}"

    _, stub, _, transport = make(answer)
    resp = run(stub, transport.get(f"{BASE}/ari"))
    assert resp.retry_after == 90.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [("5", 5.0), (" 0 ", 0.0), ("soon", None), (None, None), ("-3", None)],
)
def test_parse_retry_after_values(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, START) == expected


def test_parse_retry_after_past_date_is_zero() -> None:
    assert parse_retry_after(email.utils.formatdate(START - 100, usegmt=True), START) == 0.0


def test_wrong_content_type_is_protocol_error() -> None:
    def answer(request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/html")
        return b"<html>hello</html>"

    _, stub, _, transport = make(answer)
    with pytest.raises(AcmeProtocolError, match="expected content type application/json") as err:
        run(stub, transport.post(f"{BASE}/order/1", None, kid="k"))
    assert err.value.url == f"{BASE}/order/1"


@pytest.mark.parametrize(("body", "why"), [(b"{not json", "does not parse"), (b"[1]", "object")])
def test_bad_json_is_protocol_error(body: bytes, why: str) -> None:
    def answer(request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return body

    _, stub, _, transport = make(answer)
    with pytest.raises(AcmeProtocolError, match=why) as err:
        run(stub, transport.get(f"{BASE}/thing"))
    assert err.value.url == f"{BASE}/thing"


def test_pem_content_type_is_checked() -> None:
    def answer(request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/pem-certificate-chain")
        request.setHeader(b"Link", b'<https://ca.test/cert/1/alt/1>;rel="alternate"')
        return b"-----BEGIN CERTIFICATE-----\n"

    _, stub, _, transport = make(answer)
    resp = run(
        stub, transport.post(f"{BASE}/cert/1", None, "k", "application/pem-certificate-chain")
    )
    assert resp.body.startswith(b"-----BEGIN")
    assert resp.links("alternate") == [f"{BASE}/cert/1/alt/1"]
    with pytest.raises(AcmeProtocolError, match="expected content type application/json"):
        run(stub, transport.post(f"{BASE}/cert/1", None, "k"))


def test_5xx_without_problem_is_about_blank_with_retry_after() -> None:
    def answer(request: server.Request) -> bytes:
        request.setResponseCode(503)
        request.setHeader(b"Retry-After", b"30")
        request.setHeader(b"Content-Type", b"text/html")
        return b"<h1>down for maintenance</h1>"

    _, stub, _, transport = make(answer)
    with pytest.raises(AcmeError) as err:
        run(stub, transport.get(f"{BASE}/x"))
    assert (err.value.type, err.value.status, err.value.retry_after) == ("about:blank", 503, 30.0)
    assert "maintenance" in err.value.detail


def test_404_without_problem_is_protocol_error() -> None:
    def answer(request: server.Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"Content-Type", b"text/html")
        return b"not here"

    _, stub, _, transport = make(answer)
    with pytest.raises(AcmeProtocolError) as err:
        run(stub, transport.get(f"{BASE}/x"))
    assert err.value.status == 404 and err.value.url == f"{BASE}/x"


def test_timeout_is_transport_error() -> None:
    waiting: list[server.Request] = []

    def answer(request: server.Request) -> Any:
        waiting.append(request)
        return server.NOT_DONE_YET

    _, stub, clock, transport = make(answer, timeout=10.0)
    d = transport.get(f"{BASE}/slow")
    stub.flush()
    assert waiting and not d.called
    clock.advance(10.5)
    with pytest.raises(AcmeTransportError, match="no answer within 10 s") as err:
        result_of(d)
    assert err.value.url == f"{BASE}/slow"


@implementer(IAgent)
class RefusingAgent:
    def request(self, method, uri, headers=None, bodyProducer=None):  # type: ignore[no-untyped-def]
        return defer.fail(ConnectionRefusedError("127.0.0.1", 1))


def test_connection_refused_is_transport_error() -> None:
    key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    transport = JWSTransport(HTTPClient(RefusingAgent()), Clock(), key, DIRECTORY_URL)
    with pytest.raises(AcmeTransportError, match="cannot reach the ACME server") as err:
        result_of(transport.directory())
    assert err.value.url == DIRECTORY_URL


@implementer(IAgent)
class UntrustedAgent:
    """What treq's agent fails with when the CA's certificate chains to no trusted root."""

    def request(self, method, uri, headers=None, bodyProducer=None):  # type: ignore[no-untyped-def]
        from OpenSSL import SSL
        from twisted.python.failure import Failure
        from twisted.web._newclient import ResponseNeverReceived

        reason = SSL.Error([("SSL routines", "", "certificate verify failed")])
        return defer.fail(ResponseNeverReceived([Failure(reason)]))


def test_untrusted_ca_names_the_setting_that_decides_trust() -> None:
    key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    hint = "not signed by a certificate in acme.ca_bundle (/etc/ca.pem)"
    transport = JWSTransport(
        HTTPClient(UntrustedAgent()), Clock(), key, DIRECTORY_URL, untrusted_hint=hint
    )
    with pytest.raises(AcmeTransportError) as err:
        result_of(transport.directory())
    text = str(err.value)
    assert "certificate verify failed" in text and text.endswith(hint)
    assert DIRECTORY_URL in text
    # Any other transport failure gets no such hint.
    refusing = JWSTransport(
        HTTPClient(RefusingAgent()), Clock(), key, DIRECTORY_URL, untrusted_hint=hint
    )
    with pytest.raises(AcmeTransportError) as err:
        result_of(refusing.directory())
    assert hint not in str(err.value)


def test_failed_directory_fetch_is_not_cached() -> None:
    ca, stub, _, transport = make()
    saved = ca.directory.pop("newNonce")
    with pytest.raises(AcmeProtocolError):
        run(stub, transport.directory())
    ca.directory["newNonce"] = saved
    assert run(stub, transport.directory())["newNonce"] == saved


def test_parse_links_handles_several_and_relative() -> None:
    links = parse_links(
        ('<https://ca.test/a>;rel="alternate", </b>; rel=alternate', '<../up>;rel="up"'),
        "https://ca.test/cert/1",
    )
    assert links == [
        ("alternate", "https://ca.test/a"),
        ("alternate", "https://ca.test/b"),
        ("up", "https://ca.test/up"),
    ]


def test_response_location_is_absolute() -> None:
    resp = AcmeResponse(
        url="https://ca.test/new-order",
        status=201,
        headers={"location": ("/order/7",)},
        body=b"",
    )
    assert resp.location == "https://ca.test/order/7"


def test_jws_algorithm_per_key_type() -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    assert jws_algorithm(jose.JWKEC(key=ec.generate_private_key(ec.SECP384R1()))) is jose.ES384
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert jws_algorithm(jose.JWKRSA(key=rsa_key)) is jose.RS256


def test_make_http_client_trusts_only_the_bundle(tmp_path) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from tests.certs import TestCA  # type: ignore[import-not-found]

    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(TestCA().root_pem)
    client = make_http_client(MemoryReactorClock(), str(bundle))
    assert isinstance(client, HTTPClient)
    (tmp_path / "empty.pem").write_bytes(b"nothing")
    with pytest.raises(ConfigError, match=r"acme\.ca_bundle: the file holds no PEM certificate"):
        make_http_client(MemoryReactorClock(), str(tmp_path / "empty.pem"))
    with pytest.raises(ConfigError, match=r"acme\.ca_bundle: cannot read"):
        make_http_client(MemoryReactorClock(), str(tmp_path / "missing.pem"))
