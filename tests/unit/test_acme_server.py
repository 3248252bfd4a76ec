"""The fake ACME server, driven by hand-signed acme.jws/acme.messages requests (not our client).

Everything runs synchronously: StubTreq + flush(), and a Clock for time.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from typing import Any

import josepy as jose
import pytest
from acme import challenges, crypto_util, messages
from acme import client as acme_client
from acme import jws as acme_jws
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from synapse_acme.testing.acme_server import FakeAcmeServer, ari_cert_id, http01_validator

START = 1_800_000_000.0
UTC = datetime.timezone.utc
PREFIX = "urn:ietf:params:acme:error:"


class Resp:
    def __init__(self, code: int, headers: Headers, body: bytes):
        self.code = code
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode())
        return values[0].decode() if values else None

    def headers_named(self, name: str) -> list[str]:
        return [v.decode() for v in self.headers.getRawHeaders(name.encode(), [])]

    @property
    def location(self) -> str:
        value = self.header("Location")
        assert value, "no Location header"
        return value

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def problem(self) -> str:
        assert self.header("Content-Type") == "application/problem+json", self.body
        typ: str = self.json()["type"]
        return typ.removeprefix(PREFIX)


def ec_key() -> jose.JWKEC:
    return jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))


def key_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class Client:
    """A deliberately small, hand-rolled ACME client for poking the fake."""

    def __init__(self, server: FakeAcmeServer, key: jose.JWK | None = None):
        self.server = server
        self.treq = StubTreq(server.resource)
        self.key = key or ec_key()
        self.alg: jose.JWASignature = (
            jose.RS256 if isinstance(self.key, jose.JWKRSA) else jose.ES256
        )
        self.kid: str | None = None
        self.nonce: str | None = None
        self.dir = self.get(server.directory_url).json()

    def _sync(self, d: Deferred[Any]) -> Any:
        out: list[Any] = []
        d.addBoth(out.append)
        self.treq.flush()
        assert out, "request did not complete"
        if isinstance(out[0], Failure):
            out[0].raiseException()
        return out[0]

    def request(self, method: str, url: str, **kw: Any) -> Resp:
        resp = self._sync(self.treq.request(method, url, **kw))  # type: ignore[attr-defined]
        body = self._sync(self.treq.content(resp))  # type: ignore[attr-defined]
        r = Resp(resp.code, resp.headers, body)
        nonce = r.header("Replay-Nonce")
        if nonce:
            self.nonce = nonce
        return r

    def get(self, url: str) -> Resp:
        return self.request("GET", url)

    def fresh_nonce(self) -> str:
        r = self.request("HEAD", self.dir["newNonce"])
        assert r.code == 200
        assert self.nonce is not None
        return self.nonce

    def sign(
        self,
        url: str,
        payload: Any,
        *,
        key: jose.JWK | None = None,
        use_jwk: bool = False,
        nonce: str | None = None,
        kid: str | None = None,
    ) -> bytes:
        if nonce is None:
            nonce = self.nonce or self.fresh_nonce()
            self.nonce = None
        data = b"" if payload is None else json.dumps(payload).encode()
        key = key or self.key
        alg = jose.RS256 if isinstance(key, jose.JWKRSA) else jose.ES256
        signed = acme_jws.JWS.sign(
            data,
            key=key,
            alg=alg,
            nonce=jose.b64.b64decode(nonce),
            url=url,
            kid=None if use_jwk else (kid or self.kid),
        )
        return signed.json_dumps().encode()

    def post(self, url: str, payload: Any = None, **kw: Any) -> Resp:
        body = kw.pop("body", None)
        if body is None:
            body = self.sign(url, payload, **kw)
        return self.request(
            "POST", url, data=body, headers={b"Content-Type": [b"application/jose+json"]}
        )

    def register(self, **extra: Any) -> Resp:
        payload = {"termsOfServiceAgreed": True, "contact": ["mailto:admin@example.test"]}
        payload.update(extra)
        r = self.post(self.dir["newAccount"], payload, use_jwk=True)
        if r.code in (200, 201):
            self.kid = r.location
        return r

    def new_order(self, names: list[str], **extra: Any) -> Resp:
        payload = {"identifiers": [{"type": "dns", "value": n} for n in names], **extra}
        return self.post(self.dir["newOrder"], payload)

    def answer_all(self, order: dict[str, Any], typ: str = "http-01") -> list[dict[str, Any]]:
        answered = []
        for authz_url in order["authorizations"]:
            authz = self.post(authz_url).json()
            chall = next(c for c in authz["challenges"] if c["type"] == typ)
            r = self.post(chall["url"], {})
            assert r.code == 200, r.body
            answered.append(r.json())
        return answered

    def poll(self, url: str, until: str, limit: int = 10) -> tuple[Resp, int]:
        for i in range(limit):
            r = self.post(url)
            assert r.code == 200, r.body
            if r.json()["status"] == until:
                return r, i
        raise AssertionError(f"{url} never became {until}: {r.json()}")

    def issue(self, names: list[str], **order_extra: Any) -> tuple[dict[str, Any], Resp]:
        """Run the whole flow; returns (final order, certificate response)."""
        r = self.new_order(names, **order_extra)
        assert r.code == 201, r.body
        order_url = r.location
        assert order_url
        self.answer_all(r.json())
        order, _ = self.poll(order_url, "ready")
        csr = crypto_util.make_csr(key_pem(), names)
        r = self.post(order.json()["finalize"], {"csr": jose.encode_csr(_load_csr(csr))})
        assert r.code == 200, r.body
        final, _ = self.poll(order_url, "valid")
        cert = self.post(final.json()["certificate"])
        return final.json(), cert


def _load_csr(pem: bytes) -> x509.CertificateSigningRequest:
    return x509.load_pem_x509_csr(pem)


def _chain(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(START)
    return c


def make(clock: Clock, **kw: Any) -> tuple[FakeAcmeServer, Client]:
    server = FakeAcmeServer(clock, **kw)
    return server, Client(server)


# ---- directory and nonces -------------------------------------------------------------------


def test_directory_shape(clock: Clock) -> None:
    server = FakeAcmeServer(
        clock,
        terms_of_service="https://acme.test/tos",
        profiles={"classic": 90 * 86400, "shortlived": 6 * 86400},
        require_eab={"kid-1": b"secret"},
    )
    client = Client(server)
    r = client.get(server.directory_url)
    assert r.code == 200
    assert r.header("Content-Type") == "application/json"
    assert r.header("Replay-Nonce")
    assert r.header("Link") == '<https://acme.test/directory>;rel="index"'
    d = r.json()
    for k in ("newNonce", "newAccount", "newOrder", "renewalInfo"):
        assert d[k].startswith("https://acme.test/"), k
    assert d["meta"]["termsOfService"] == "https://acme.test/tos"
    assert d["meta"]["externalAccountRequired"] is True
    assert set(d["meta"]["profiles"]) == {"classic", "shortlived"}
    parsed = messages.Directory.from_json(dict(d))
    assert parsed.meta.terms_of_service == "https://acme.test/tos"

    plain = FakeAcmeServer(clock, ari=False, base_url="https://ca.test/acme/")
    d2 = Client(plain).get(plain.directory_url).json()
    assert "renewalInfo" not in d2
    assert d2["newOrder"] == "https://ca.test/acme/new-order"
    assert "externalAccountRequired" not in d2["meta"]


def test_new_nonce_head_and_get(clock: Clock) -> None:
    _server, client = make(clock)
    head = client.request("HEAD", client.dir["newNonce"])
    get = client.get(client.dir["newNonce"])
    assert (head.code, get.code) == (200, 204)
    for r in (head, get):
        assert r.header("Replay-Nonce")
        assert r.header("Cache-Control") == "no-store"
    assert head.header("Replay-Nonce") != get.header("Replay-Nonce")
    post = client.request("PUT", client.dir["newNonce"])
    assert post.code == 405 and post.problem == "malformed"


def test_nonce_reuse_and_unknown_nonce_are_bad_nonce(clock: Clock) -> None:
    _server, client = make(clock)
    nonce = client.fresh_nonce()
    first = client.post(
        client.dir["newAccount"], {"termsOfServiceAgreed": True}, use_jwk=True, nonce=nonce
    )
    assert first.code == 201
    again = client.post(
        client.dir["newAccount"], {"termsOfServiceAgreed": True}, use_jwk=True, nonce=nonce
    )
    assert again.code == 400 and again.problem == "badNonce"
    assert again.header("Replay-Nonce"), "errors carry a fresh nonce too"
    made_up = client.post(
        client.dir["newAccount"], {}, use_jwk=True, nonce="AAAAAAAAAAAAAAAAAAAAAA"
    )
    assert made_up.problem == "badNonce"


# ---- JWS checks -------------------------------------------------------------------------------


def test_bad_signature_is_rejected(clock: Clock) -> None:
    server, client = make(clock)
    url = client.dir["newAccount"]
    body = json.loads(client.sign(url, {"termsOfServiceAgreed": True}, use_jwk=True))
    # Swap the payload: the signature no longer covers it.
    body["payload"] = jose.b64.b64encode(b'{"termsOfServiceAgreed": false}').decode()
    r = client.post(url, body=json.dumps(body).encode())
    assert r.code == 400 and r.problem == "malformed"
    assert "signature" in r.json()["detail"]
    assert server.accounts == {}


def test_signature_by_other_key_than_kid_is_rejected(clock: Clock) -> None:
    _server, client = make(clock)
    client.register()
    r = client.new_order(["a.example.test"])
    assert r.code == 201
    forged = client.post(
        client.dir["newOrder"], {"identifiers": [{"type": "dns", "value": "x.test"}]}, key=ec_key()
    )
    assert forged.code == 400 and forged.problem == "malformed"


def test_url_header_must_match(clock: Clock) -> None:
    _server, client = make(clock)
    body = client.sign(client.dir["newOrder"], {}, use_jwk=True)
    r = client.post(client.dir["newAccount"], body=body)
    assert r.code == 403 and r.problem == "unauthorized"


def test_kid_and_jwk_rules(clock: Clock) -> None:
    _server, client = make(clock)
    # jwk on an account-bound resource
    r = client.post(client.dir["newOrder"], {"identifiers": []}, use_jwk=True)
    assert r.problem == "malformed" and "jwk" in r.json()["detail"]
    # unknown kid
    r = client.post(client.dir["newOrder"], {}, kid="https://acme.test/acct/999")
    assert r.problem == "accountDoesNotExist"
    # kid on newAccount
    client.register()
    r = client.post(client.dir["newAccount"], {})
    assert r.problem == "malformed"


def test_disallowed_algorithms(clock: Clock) -> None:
    _server, client = make(clock)
    url = client.dir["newAccount"]
    nonce = client.fresh_nonce()
    protected = {"alg": "HS256", "nonce": nonce, "url": url, "kid": "x"}
    body = {
        "protected": jose.b64.b64encode(json.dumps(protected).encode()).decode(),
        "payload": jose.b64.b64encode(b"{}").decode(),
        "signature": "AAAA",
    }
    r = client.post(url, body=json.dumps(body).encode())
    assert r.code == 400 and r.problem == "badSignatureAlgorithm"
    assert "ES256" in r.json()["algorithms"]


def test_wrong_content_type_and_garbage_body(clock: Clock) -> None:
    _server, client = make(clock)
    r = client.request(
        "POST",
        client.dir["newAccount"],
        data=b"{}",
        headers={b"Content-Type": [b"application/json"]},
    )
    assert r.code == 415 and r.problem == "malformed"
    r = client.post(client.dir["newAccount"], body=b"not json")
    assert r.code == 400 and r.problem == "malformed"
    r = client.post(client.dir["newAccount"], body=b'{"payload": "", "signatures": []}')
    assert r.code == 400 and r.problem == "malformed"


def test_rsa_account_key_works(clock: Clock) -> None:
    server = FakeAcmeServer(clock)
    client = Client(server, key=jose.JWKRSA(key=rsa.generate_private_key(65537, 2048)))
    assert client.register().code == 201
    assert client.new_order(["rsa.example.test"]).code == 201


# ---- accounts ---------------------------------------------------------------------------------


def test_new_account_existing_and_only_return_existing(clock: Clock) -> None:
    server, client = make(clock, terms_of_service="https://acme.test/tos")
    r = client.register()
    assert r.code == 201
    url = r.location
    assert url in server.accounts and r.json()["status"] == "valid"
    assert r.json()["orders"] == url + "/orders"
    again = client.register()
    assert again.code == 200 and again.header("Location") == url
    other = Client(server)
    r = other.post(other.dir["newAccount"], {"onlyReturnExisting": True}, use_jwk=True)
    assert r.problem == "accountDoesNotExist"
    r = other.post(other.dir["newAccount"], {}, use_jwk=True)
    assert r.code == 403 and r.problem == "userActionRequired"
    r = other.register(contact=["tel:+1555"])
    assert r.problem == "unsupportedContact"
    r = other.register(contact=["mailto:not-an-address"])
    assert r.problem == "invalidContact"
    # POST-as-GET the account, then deactivate it: further requests are refused.
    assert client.post(url).json()["contact"] == ["mailto:admin@example.test"]
    assert client.post(url, {"status": "deactivated"}).json()["status"] == "deactivated"
    r = client.new_order(["a.example.test"])
    assert r.code == 401 and r.problem == "unauthorized"


def test_eab_required_and_verified(clock: Clock) -> None:
    hmac_key = b"0123456789abcdef0123456789abcdef"
    server, client = make(clock, require_eab={"kid-1": hmac_key})
    directory = messages.Directory.from_json(dict(client.dir))

    r = client.register()
    assert r.problem == "externalAccountRequired"

    wrong = messages.ExternalAccountBinding.from_data(
        client.key.public_key(), "kid-1", jose.b64.b64encode(b"x" * 32).decode(), directory
    )
    r = client.register(externalAccountBinding=wrong)
    assert r.code == 403 and r.problem == "unauthorized"

    unknown = messages.ExternalAccountBinding.from_data(
        client.key.public_key(), "kid-2", jose.b64.b64encode(hmac_key).decode(), directory
    )
    assert client.register(externalAccountBinding=unknown).problem == "unauthorized"

    other_key = messages.ExternalAccountBinding.from_data(
        ec_key().public_key(), "kid-1", jose.b64.b64encode(hmac_key).decode(), directory
    )
    assert client.register(externalAccountBinding=other_key).problem == "malformed"

    good = messages.ExternalAccountBinding.from_data(
        client.key.public_key(), "kid-1", jose.b64.b64encode(hmac_key).decode(), directory
    )
    r = client.register(externalAccountBinding=good)
    assert r.code == 201, r.body
    assert server.accounts[r.location].eab_kid == "kid-1"
    assert json.dumps(r.json()).find(hmac_key.decode()) == -1


# ---- the happy path ---------------------------------------------------------------------------


def test_full_issuance_chain_verifies(clock: Clock) -> None:
    seen: list[tuple[str, str, str]] = []

    def validate(identifier: str, token: str, key_authz: str) -> bool:
        seen.append((identifier, token, key_authz))
        return True

    server, client = make(clock, validate=validate, retry_after=3)
    client.register()
    names = ["a.example.test", "b.example.test"]
    r = client.new_order(names)
    assert r.code == 201
    order_url = r.location
    order = r.json()
    assert order["status"] == "pending" and r.header("Retry-After") == "3"
    assert [i["value"] for i in order["identifiers"]] == names
    parsed = messages.Order.from_json(order)
    assert parsed.expires is not None and parsed.expires > datetime.datetime.fromtimestamp(
        START, UTC
    )

    answered = client.answer_all(order)
    assert [a["status"] for a in answered] == ["processing", "processing"]
    # validate() ran once per challenge with the RFC 8555 key authorization
    assert sorted(s[0] for s in seen) == names
    for _identifier, token, key_authz in seen:
        chall = challenges.HTTP01(token=jose.b64.b64decode(token))
        assert key_authz == chall.key_authorization(client.key)

    # one poll still pending (authz_delay_polls=1), then valid
    authz_url = order["authorizations"][0]
    authz, polls = client.poll(authz_url, "valid")
    assert polls == 1
    assert messages.Authorization.from_json(authz.json()).status == messages.STATUS_VALID
    ready, _ = client.poll(order_url, "ready")
    assert ready.header("Location") == order_url

    key = key_pem()
    csr = _load_csr(crypto_util.make_csr(key, names))
    r = client.post(ready.json()["finalize"], {"csr": jose.encode_csr(csr)})
    assert r.code == 200 and r.json()["status"] == "processing"
    assert r.header("Retry-After") == "3"
    final, polls = client.poll(order_url, "valid")
    assert polls == 1
    cert_url = final.json()["certificate"]

    r = client.post(cert_url)
    assert r.code == 200
    assert r.header("Content-Type") == "application/pem-certificate-chain"
    leaf, intermediate = _chain(r.body)
    root = x509.load_pem_x509_certificate(server.root_pem)
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)
    assert intermediate == x509.load_pem_x509_certificate(server.intermediate_pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == names
    assert leaf.public_key() == csr.public_key()
    now = datetime.datetime.fromtimestamp(START, UTC)
    assert leaf.not_valid_before_utc == now - datetime.timedelta(minutes=1)
    assert leaf.not_valid_after_utc == now + datetime.timedelta(days=90)

    # the alternate chain (Link rel=alternate) ends at the other root
    alt_links = [h for h in r.headers_named("Link") if 'rel="alternate"' in h]
    assert len(alt_links) == 1
    alt_url = alt_links[0].split(">")[0].lstrip("<")
    alt = client.post(alt_url)
    alt_leaf, cross = _chain(alt.body)
    assert alt_leaf == leaf
    cross.verify_directly_issued_by(x509.load_pem_x509_certificate(server.alternate_root_pem))
    alt_leaf.verify_directly_issued_by(cross)

    cert_id = ari_cert_id(leaf)
    assert cert_id == acme_client._renewal_info_path_component(leaf)
    assert server.issued[cert_id].order_url == order_url
    assert client.post(f"{client.kid}/orders").json() == {"orders": [order_url]}


def test_zero_delay_polls_settle_immediately(clock: Clock) -> None:
    _server, client = make(clock, authz_delay_polls=0, finalize_delay_polls=0)
    client.register()
    r = client.new_order(["now.example.test"])
    answered = client.answer_all(r.json())
    assert answered[0]["status"] == "valid"
    ready = client.post(r.location).json()
    assert ready["status"] == "ready"
    csr = _load_csr(crypto_util.make_csr(key_pem(), ["now.example.test"]))
    fin = client.post(ready["finalize"], {"csr": jose.encode_csr(csr)})
    assert fin.json()["status"] == "valid" and "certificate" in fin.json()


def test_wildcard_gets_dns01_only(clock: Clock) -> None:
    server, client = make(clock)
    client.register()
    r = client.new_order(["*.example.test", "example.test"])
    authzs = [client.post(u).json() for u in r.json()["authorizations"]]
    assert authzs[0]["wildcard"] is True and authzs[0]["identifier"]["value"] == "example.test"
    assert [c["type"] for c in authzs[0]["challenges"]] == ["dns-01"]
    assert {c["type"] for c in authzs[1]["challenges"]} == {"http-01", "dns-01"}
    c2 = Client(server)
    c2.register()
    r = c2.new_order(["*.w.example.test"])
    c2.answer_all(r.json(), typ="dns-01")
    ready, _ = c2.poll(r.location, "ready")
    csr = _load_csr(crypto_util.make_csr(key_pem(), ["*.w.example.test"]))
    assert c2.post(ready.json()["finalize"], {"csr": jose.encode_csr(csr)}).code == 200


# ---- failures in the flow -----------------------------------------------------------------------


def test_failed_validation_invalidates_authz_and_order(clock: Clock) -> None:
    calls: list[str] = []

    def validate(identifier: str, token: str, key_authz: str) -> bool:
        calls.append(identifier)
        return False

    _server, client = make(clock, validate=validate, authz_delay_polls=0)
    client.register()
    r = client.new_order(["bad.example.test"])
    order_url = r.location
    authz_url = r.json()["authorizations"][0]
    authz = client.post(authz_url).json()
    chall = next(c for c in authz["challenges"] if c["type"] == "http-01")
    first = client.post(chall["url"], {})
    second = client.post(chall["url"], {})
    assert calls == ["bad.example.test"], "validate is called once per challenge"
    assert first.json()["status"] == "invalid"
    assert first.json()["error"]["type"] == PREFIX + "incorrectResponse"
    assert second.json()["status"] == "invalid"
    assert client.post(authz_url).json()["status"] == "invalid"
    order = client.post(order_url).json()
    assert order["status"] == "invalid" and order["error"]["type"] == PREFIX + "unauthorized"


def test_validate_can_return_a_problem_and_a_deferred(clock: Clock) -> None:
    pending: Deferred[Any] = Deferred()
    _server, client = make(clock, validate=lambda i, t, k: pending, authz_delay_polls=0)
    client.register()
    r = client.new_order(["slow.example.test"])
    authz_url = r.json()["authorizations"][0]
    client.answer_all(r.json())
    for _ in range(3):
        assert client.post(authz_url).json()["status"] == "pending"
    pending.callback(messages.Error.with_code("connection", detail="refused"))
    authz = client.post(authz_url).json()
    assert authz["status"] == "invalid"
    failed = [c for c in authz["challenges"] if c["status"] == "invalid"]
    assert failed[0]["error"]["type"] == PREFIX + "connection"


def test_finalize_rules(clock: Clock) -> None:
    _server, client = make(clock)
    client.register()
    r = client.new_order(["a.example.test", "b.example.test"])
    order = r.json()
    good_csr = _load_csr(crypto_util.make_csr(key_pem(), ["a.example.test", "b.example.test"]))
    early = client.post(order["finalize"], {"csr": jose.encode_csr(good_csr)})
    assert early.code == 403 and early.problem == "orderNotReady"
    client.answer_all(order)
    client.poll(r.location, "ready")
    short = _load_csr(crypto_util.make_csr(key_pem(), ["a.example.test"]))
    assert client.post(order["finalize"], {"csr": jose.encode_csr(short)}).problem == "badCSR"
    extra = _load_csr(
        crypto_util.make_csr(key_pem(), ["a.example.test", "b.example.test", "c.example.test"])
    )
    assert client.post(order["finalize"], {"csr": jose.encode_csr(extra)}).problem == "badCSR"
    account_pem = client.key.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    same_key = _load_csr(crypto_util.make_csr(account_pem, ["a.example.test", "b.example.test"]))
    assert client.post(order["finalize"], {"csr": jose.encode_csr(same_key)}).problem == "badCSR"
    assert client.post(order["finalize"], {"csr": "!!"}).problem == "badCSR"
    ok = client.post(order["finalize"], {"csr": jose.encode_csr(good_csr)})
    assert ok.code == 200
    twice = client.post(order["finalize"], {"csr": jose.encode_csr(good_csr)})
    assert twice.problem == "orderNotReady"


def test_identifier_rules(clock: Clock) -> None:
    _server, client = make(clock, blocked_names={"blocked.example.test"})
    client.register()
    r = client.post(client.dir["newOrder"], {"identifiers": [{"type": "ip", "value": "192.0.2.1"}]})
    assert r.code == 400 and r.problem == "rejectedIdentifier"
    assert r.json()["subproblems"][0]["identifier"]["value"] == "192.0.2.1"
    assert client.new_order(["Upper.Example.test"]).problem == "rejectedIdentifier"
    assert client.new_order(["blocked.example.test"]).problem == "rejectedIdentifier"
    r = client.post(client.dir["newOrder"], {"identifiers": [{"type": "email", "value": "a@b.c"}]})
    assert r.problem == "unsupportedIdentifier"
    assert client.new_order([]).problem == "malformed"
    assert (
        client.new_order(["a.example.test"], notAfter="2030-01-01T00:00:00Z").problem == "malformed"
    )


def test_other_accounts_resources_are_forbidden(clock: Clock) -> None:
    server, alice = make(clock)
    alice.register()
    r = alice.new_order(["a.example.test"])
    bob = Client(server)
    bob.register()
    assert bob.post(r.location).problem == "unauthorized"
    assert bob.post(r.json()["authorizations"][0]).problem == "unauthorized"
    assert bob.post("https://acme.test/order/9999").code == 404


def test_order_expires_with_the_clock(clock: Clock) -> None:
    _server, client = make(clock)
    client.register()
    r = client.new_order(["late.example.test"])
    clock.advance(8 * 86400)
    order = client.post(r.location).json()
    assert order["status"] == "invalid"


# ---- profiles and ARI -------------------------------------------------------------------------


def test_profiles_set_lifetime(clock: Clock) -> None:
    _server, client = make(clock, profiles={"classic": 90 * 86400, "shortlived": 6 * 86400})
    client.register()
    order, cert = client.issue(["short.example.test"], profile="shortlived")
    assert order["profile"] == "shortlived"
    leaf = _chain(cert.body)[0]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == datetime.timedelta(
        days=6, minutes=1
    )
    assert client.new_order(["x.example.test"], profile="tlsserver").problem == "invalidProfile"


def test_ari_window_replaces_and_already_replaced(clock: Clock) -> None:
    server, client = make(clock)
    client.register()
    _, cert = client.issue(["ari.example.test"])
    leaf = _chain(cert.body)[0]
    cert_id = ari_cert_id(leaf)
    r = client.get(f"{client.dir['renewalInfo']}/{cert_id}")
    assert r.code == 200 and r.header("Retry-After") == "21600"
    info = messages.RenewalInfo.from_json(r.json())
    nb = leaf.not_valid_before_utc
    life = leaf.not_valid_after_utc - nb
    assert info.suggested_window.start == nb + life / 2
    assert info.suggested_window.end == nb + life * 2 / 3

    assert client.get(f"{client.dir['renewalInfo']}/AAAA.AAAA").code == 404
    assert client.get(f"{client.dir['renewalInfo']}/not-an-id").problem == "malformed"

    r = client.new_order(["ari.example.test"], replaces="AAAA.AAAA")
    assert r.code == 400 and r.problem == "malformed"
    r = client.new_order(["other.example.test"], replaces=cert_id)
    assert r.code == 400 and r.problem == "malformed"
    r = client.new_order(["ari.example.test"], replaces=cert_id)
    assert r.code == 201 and r.json()["replaces"] == cert_id
    assert server.replaced[cert_id] == r.location
    again = client.new_order(["ari.example.test"], replaces=cert_id)
    assert again.code == 409 and again.problem == "alreadyReplaced"
    # without replaces the same order is fine (the client's documented fallback)
    assert client.new_order(["ari.example.test"]).code == 201


def test_custom_ari_window(clock: Clock) -> None:
    start = datetime.datetime(2027, 1, 1, tzinfo=UTC)
    end = datetime.datetime(2027, 1, 2, tzinfo=UTC)
    _server, client = make(clock, ari_window=lambda cert: (start, end), ari_retry_after=60)
    client.register()
    _, cert = client.issue(["rev.example.test"])
    leaf = _chain(cert.body)[0]
    url = f"{client.dir['renewalInfo']}/{ari_cert_id(leaf)}"
    r = client.get(url)
    assert r.json()["suggestedWindow"] == {
        "start": "2027-01-01T00:00:00Z",
        "end": "2027-01-02T00:00:00Z",
    }
    assert r.header("Retry-After") == "60"


# ---- faults -------------------------------------------------------------------------------------


def test_fail_next_fires_once_with_retry_after(clock: Clock) -> None:
    server, client = make(clock)
    client.register()
    server.faults.fail_next(
        "newOrder", 503, "serverInternal", "down for maintenance", retry_after=30
    )
    r = client.new_order(["f.example.test"])
    assert r.code == 503 and r.problem == "serverInternal" and r.header("Retry-After") == "30"
    assert r.header("Replay-Nonce")
    assert client.new_order(["f.example.test"]).code == 201
    server.faults.rate_limit("newOrder", retry_after=120)
    r = client.new_order(["f.example.test"])
    assert r.code == 429 and r.problem == "rateLimited" and r.header("Retry-After") == "120"
    assert client.new_order(["f.example.test"]).code == 201
    assert server.faults.pending() == 0
    with pytest.raises(ValueError):
        server.faults.fail_next("nope")


def test_reject_nonce_and_garbage_fire_once(clock: Clock) -> None:
    server, client = make(clock)
    server.faults.reject_nonce_next()
    assert client.register().problem == "badNonce"
    assert client.register().code == 201
    server.faults.garbage_next("directory", b"<html>oops</html>", "text/html", 502)
    r = client.get(server.directory_url)
    assert (r.code, r.body, r.header("Content-Type")) == (502, b"<html>oops</html>", "text/html")
    assert client.get(server.directory_url).code == 200
    server.faults.drop_nonce_header_next()
    assert client.get(server.directory_url).header("Replay-Nonce") is None
    assert client.get(server.directory_url).header("Replay-Nonce")
    assert server.faults.pending() == 0
    assert server.faults.fired == ["reject_nonces", "garbage:directory", "drop_nonce_headers"]


@pytest.mark.parametrize(
    ("plan", "check"),
    [
        (
            "wrong_key_certificate_next",
            lambda leaf, chain, csr: leaf.public_key() != csr.public_key(),
        ),
        (
            "wrong_names_certificate_next",
            lambda leaf, chain, csr: (
                leaf.extensions.get_extension_for_class(
                    x509.SubjectAlternativeName
                ).value.get_values_for_type(x509.DNSName)
                == ["unexpected.invalid"]
            ),
        ),
        (
            "misordered_chain_next",
            lambda leaf, chain, csr: chain[1].public_key() == csr.public_key(),
        ),
    ],
)
def test_certificate_faults_fire_once(
    clock: Clock, plan: str, check: Callable[[x509.Certificate, list[x509.Certificate], Any], bool]
) -> None:
    server, client = make(clock, authz_delay_polls=0, finalize_delay_polls=0)
    client.register()
    getattr(server.faults, plan)()

    def once() -> tuple[x509.Certificate, list[x509.Certificate], x509.CertificateSigningRequest]:
        r = client.new_order(["c.example.test"])
        client.answer_all(r.json())
        csr = _load_csr(crypto_util.make_csr(key_pem(), ["c.example.test"]))
        fin = client.post(r.json()["finalize"], {"csr": jose.encode_csr(csr)}).json()
        chain = _chain(client.post(fin["certificate"]).body)
        return chain[0], chain, csr

    assert check(*once())
    assert not check(*once())
    assert server.faults.pending() == 0


def test_empty_chain_fires_once(clock: Clock) -> None:
    server, client = make(clock)
    client.register()
    server.faults.empty_chain_next()
    _, cert = client.issue(["e.example.test"])
    assert cert.code == 200 and cert.body == b""
    _, cert = client.issue(["e.example.test"])
    assert len(_chain(cert.body)) == 2


def test_request_log_records_kinds_and_times(clock: Clock) -> None:
    server, client = make(clock)
    client.register()
    clock.advance(5)
    client.new_order(["log.example.test"])
    kinds = server.request_kinds()
    assert kinds[0] == "directory" and kinds[-1] == "newOrder"
    assert server.requests[-1].time == START + 5
    assert server.requests[-1].status == 201


# ---- the HTTP-01 validator helper -------------------------------------------------------------


class _Tokens(Resource):
    isLeaf = True

    def __init__(self, tokens: dict[str, bytes]):
        super().__init__()
        self.tokens = tokens
        self.hosts: list[bytes | None] = []

    def render_GET(self, request: Any) -> bytes:
        self.hosts.append(request.getHeader(b"host"))
        token = request.path.decode().rsplit("/", 1)[-1]
        if token not in self.tokens:
            request.setResponseCode(404)
            return b"no"
        return self.tokens[token]


def test_http01_validator_fetches_with_host_header(clock: Clock) -> None:
    tokens: dict[str, bytes] = {}
    site = _Tokens(tokens)
    web = StubTreq(site)

    def respond(identifier: str, token: str, key_authz: str) -> Deferred[Any]:
        tokens[token] = key_authz.encode() + b"\n"
        d: Deferred[Any] = http01_validator(web, port=5002)(identifier, token, key_authz)
        web.flush()
        return d

    _server, client = make(clock, validate=respond, challenge_types=("http-01",))
    client.register()
    _, cert = client.issue(["h.example.test"])
    assert len(_chain(cert.body)) == 2
    assert site.hosts == [b"h.example.test"]

    # a wrong body and a 404 both fail the challenge with a CA-like problem
    validator = http01_validator(web, port=5002)
    results: list[Any] = []
    tokens["t1"] = b"wrong"
    validator("x.example.test", "t1", "right").addCallback(results.append)
    validator("x.example.test", "missing", "right").addCallback(results.append)
    web.flush()
    assert [r.code for r in results] == ["incorrectResponse", "unauthorized"]


# ---- the fake as a real process ---------------------------------------------------------------


@pytest.mark.integration
def test_runs_as_a_process_over_real_http(tmp_path: Any) -> None:
    import re
    import subprocess
    import sys
    import urllib.request

    # The process binds port 0 itself and says where it listens: no port picked first.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "synapse_acme.testing.acme_server",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--ca-out",
            str(tmp_path),
            "--profile",
            "shortlived=518400",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        ready = re.fullmatch(r"ready (http://127\.0\.0\.1:([1-9][0-9]*))/directory\n", line)
        assert ready is not None, proc.stderr.read() if proc.stderr else line
        base = ready.group(1)
        with urllib.request.urlopen(f"{base}/directory", timeout=10) as r:
            directory = json.loads(r.read())
            assert r.headers["Replay-Nonce"]
        assert directory["renewalInfo"] == f"{base}/renewal-info"
        assert "shortlived" in directory["meta"]["profiles"]
        req = urllib.request.Request(directory["newNonce"], method="HEAD")
        with urllib.request.urlopen(req, timeout=10) as r:
            nonce = r.headers["Replay-Nonce"]
        key = ec_key()
        body = (
            acme_jws.JWS.sign(
                json.dumps({"termsOfServiceAgreed": True}).encode(),
                key=key,
                alg=jose.ES256,
                nonce=jose.b64.b64decode(nonce),
                url=directory["newAccount"],
            )
            .json_dumps()
            .encode()
        )
        req = urllib.request.Request(
            directory["newAccount"],
            data=body,
            method="POST",
            headers={"Content-Type": "application/jose+json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 201
            assert r.headers["Location"].startswith(f"{base}/acct/")
        root = x509.load_pem_x509_certificate((tmp_path / "root.pem").read_bytes())
        inter = x509.load_pem_x509_certificate((tmp_path / "intermediate.pem").read_bytes())
        inter.verify_directly_issued_by(root)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
