"""AcmeIssuer end to end against the fake RFC 8555 server, driven by a Clock (no real time)."""

from __future__ import annotations

import datetime
import itertools
from typing import Any

import attrs
import josepy as jose
import pytest
from acme import messages
from cryptography.hazmat.primitives.asymmetric import ec
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from synapse_acme import crypto
from synapse_acme.acme.client import AcmeClient
from synapse_acme.acme.issuer import AcmeIssuer
from synapse_acme.acme.transport import JWSTransport
from synapse_acme.errors import AcmeError, AcmeProtocolError, AcmeTransportError, ChallengeFailed
from synapse_acme.interfaces import IIssuer, IPreparingIssuer, IResponder
from synapse_acme.model import CertificateBundle
from synapse_acme.names import names_key
from synapse_acme.testing.acme_server import FakeAcmeServer
from tests.deferreds import result_of

START = 1_800_000_000.0


@implementer(IResponder)
@attrs.define
class RecordingResponder:
    """Serves key authorizations from a dict, like the real HTTP-01 resource, and logs calls."""

    challenge_type: str = "http-01"
    live: dict[str, str] = attrs.field(factory=dict)
    calls: list[tuple[str, str, str]] = attrs.field(factory=list)

    def start_responding(self, identifier: str, token: str, key_authorization: str) -> None:
        self.calls.append(("start", identifier, token))
        self.live[token] = key_authorization

    def stop_responding(self, identifier: str, token: str) -> None:
        self.calls.append(("stop", identifier, token))
        self.live.pop(token, None)


class World:
    def __init__(self, issuer_kw: dict[str, Any] | None = None, **server_kw: Any) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.responder = RecordingResponder()
        # The CA checks that the answer is being served at the moment it validates.
        server_kw.setdefault("validate", self.validate)
        self.server = FakeAcmeServer(self.clock, **server_kw)
        self.stub = StubTreq(self.server.resource)
        self.key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
        transport = JWSTransport(
            self.stub,  # type: ignore[arg-type]
            self.clock,
            self.key,
            self.server.directory_url,
        )
        self.issuer = AcmeIssuer(
            client=AcmeClient(transport),
            responders=[self.responder],
            clock=self.clock,
            account_key=self.key,
            trust=self.server.trust,
            contact=("mailto:admin@example.test",),
            tos_agreed=True,
            **(issuer_kw or {}),
        )

    def validate(self, identifier: str, token: str, key_authorization: str) -> Any:
        if self.responder.live.get(token) == key_authorization:
            return True
        return messages.Error.with_code("unauthorized", detail=f"wrong answer for {identifier}")

    def run(self, d: defer.Deferred[Any], step: float = 0.05, limit: float = 600.0) -> Any:
        end = self.clock.seconds() + limit
        while True:
            self.stub.flush()
            if d.called or self.clock.seconds() > end:
                break
            self.clock.advance(step)
        return result_of(d)

    def issue(self, names: list[str], replaces: str | None = None) -> CertificateBundle:
        key_pem = crypto.generate_private_key_pem()
        bundle: CertificateBundle = self.run(self.issuer.issue(names, key_pem, replaces))
        assert bundle.key_pem == key_pem
        return bundle

    def kinds(self, kind: str) -> list[float]:
        return [r.time for r in self.server.requests if r.kind == kind]


def test_issuer_provides_iissuer() -> None:
    assert verifyObject(IIssuer, World().issuer)
    assert verifyObject(IPreparingIssuer, World().issuer)


def test_prepare_registers_the_account_once_ahead_of_the_orders() -> None:
    recorded: list[str] = []
    w = World(issuer_kw={"on_account": recorded.append})
    # Orders started while the registration runs wait for it instead of registering again.
    key_pem = crypto.generate_private_key_pem()
    prepared = w.issuer.prepare()
    ordered = w.issuer.issue(["a.example.test"], key_pem)
    assert w.run(prepared) is None
    assert w.run(ordered).key_pem == key_pem
    assert len(w.kinds("newAccount")) == 1 and len(recorded) == 1
    before = len(w.server.requests)
    assert w.run(w.issuer.prepare()) is None  # the account exists: no request at all
    assert len(w.server.requests) == before


def test_full_issuance() -> None:
    w = World()
    bundle = w.issue(["A.example.test", "b.example.test"])
    chain = crypto.parse_chain(bundle.chain_pem)
    assert crypto.certificate_names(chain[0]) == ["a.example.test", "b.example.test"]
    assert bundle.chain_pem.endswith(w.server.intermediate_pem)
    now = datetime.datetime.fromtimestamp(w.clock.seconds(), tz=datetime.timezone.utc)
    crypto.validate_bundle(bundle, ["a.example.test", "b.example.test"], now)
    md = bundle.metadata
    assert md["names"] == ["a.example.test", "b.example.test"]
    assert md["issuer_directory"] == w.server.directory_url
    assert md["order_url"] in w.server.orders
    assert md["ari_cert_id"] in w.server.issued
    assert md["certificate_url"] == w.server.issued[md["ari_cert_id"]].url
    assert datetime.datetime.fromisoformat(md["issued_at"]) == now
    # Every answer was withdrawn, and started before the CA looked at it.
    assert w.responder.live == {}
    assert [c[0] for c in w.responder.calls].count("start") == 2
    assert [c[0] for c in w.responder.calls].count("stop") == 2
    # Pebble-speed CA: issuance finishes in well under a second of clock time.
    assert w.clock.seconds() - START < 2.0
    # Finalized straight after the last authorization turned valid: no extra order fetch.
    kinds = [r.kind for r in w.server.requests]
    assert kinds[kinds.index("finalize") - 1] == "authz"


def test_account_registered_once_for_concurrent_issuances() -> None:
    w = World()
    key_pem = crypto.generate_private_key_pem()
    d1 = w.issuer.issue(["a.example.test"], key_pem)
    d2 = w.issuer.issue(["b.example.test"], key_pem)
    b1, b2 = w.run(d1), w.run(d2)
    assert crypto.certificate_names(crypto.parse_chain(b1.chain_pem)[0]) == ["a.example.test"]
    assert crypto.certificate_names(crypto.parse_chain(b2.chain_pem)[0]) == ["b.example.test"]
    assert len(w.kinds("newAccount")) == 1
    assert len(w.server.accounts) == 1


def test_invalid_authorization_is_challenge_failed_with_problem() -> None:
    w = World(
        validate=lambda ident, token, ka: messages.Error.with_code(
            "connection", detail=f"could not connect to {ident}"
        )
    )
    with pytest.raises(ChallengeFailed) as err:
        w.issue(["a.example.test"])
    assert err.value.identifier == "a.example.test"
    assert err.value.error is not None
    assert err.value.error.code == "connection"
    assert "could not connect" in err.value.error.detail
    assert w.responder.live == {}


def test_retry_after_is_honoured_when_polling() -> None:
    w = World(retry_after=7.0, authz_delay_polls=2, finalize_delay_polls=2)
    w.issue(["a.example.test"])
    polls = w.kinds("authz")
    # The first look, the answer (whose Retry-After counts too), then polls spaced by it.
    gaps = [b - a for a, b in itertools.pairwise(polls)]
    assert len(gaps) >= 2 and all(g >= 7.0 for g in gaps), gaps
    orders = w.kinds("order")
    order_gaps = [b - a for a, b in itertools.pairwise(orders)]
    assert order_gaps and all(g >= 7.0 for g in order_gaps[1:]), order_gaps


def test_poll_interval_used_without_retry_after() -> None:
    w = World(issuer_kw={"poll_interval": 2.0}, authz_delay_polls=12)
    w.issue(["a.example.test"])
    polls = w.kinds("authz")
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(polls)]
    # short first polls (Pebble validates in milliseconds), doubling up to poll_interval
    assert gaps[0] < 0.1, gaps
    assert gaps == sorted(gaps), gaps
    # (the test clock moves in 50 ms steps, so a wait ends up to 50 ms late)
    assert 2.0 <= gaps[-1] <= 2.05 and max(gaps) <= 2.05, gaps
    assert sum(1 for g in gaps if g < 2.0) <= 8, gaps  # a slow CA costs a handful of polls


def test_bad_nonce_storm_is_survived() -> None:
    w = World()
    w.server.faults.reject_nonce_next(8)
    w.issue(["a.example.test"])
    assert w.server.faults.pending() == 0


def test_already_replaced_retries_without_replaces() -> None:
    w = World()
    first = w.issue(["a.example.test"])
    cert_id = first.metadata["ari_cert_id"]
    second = w.issue(["a.example.test"], replaces=cert_id)
    assert w.server.orders[second.metadata["order_url"]].replaces == cert_id
    third = w.issue(["a.example.test"], replaces=cert_id)  # 409 alreadyReplaced, then plain
    assert w.server.orders[third.metadata["order_url"]].replaces is None
    assert any(r.kind == "newOrder" and r.status == 409 for r in w.server.requests)


def test_account_forgotten_by_the_ca_is_registered_again() -> None:
    recorded: list[str] = []
    w = World(issuer_kw={"on_account": recorded.append})
    w.issue(["a.example.test"])
    w.server.accounts.clear()
    w.issue(["a.example.test"])
    assert len(w.kinds("newAccount")) == 2
    # Each account URL the CA gave was passed on, for the store's account record.
    assert len(recorded) == 2 and recorded[-1] in w.server.accounts


def test_account_url_is_reported_once_and_a_failing_recorder_does_not_fail_issuance(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[str] = []

    def broken(url: str) -> None:
        calls.append(url)
        raise OSError("disk full")

    w = World(issuer_kw={"on_account": broken})
    w.issue(["a.example.test"])
    w.issue(["b.example.test"])
    assert calls == list(w.server.accounts)  # once: the second issuance knew the account
    assert "could not record the ACME account" in caplog.text


def test_explanatory_text_around_the_chain_is_dropped() -> None:
    """The bundle handed on holds bare PEM blocks only: what the store accepts."""
    w = World()
    w.server.faults.annotated_chain_next()
    bundle = w.issue(["a.example.test"])
    assert b"subject=" not in bundle.chain_pem
    assert len(crypto.parse_chain(bundle.chain_pem, strict=True)) == 2
    assert w.server.faults.pending() == 0


def test_rate_limit_surfaces_with_retry_after() -> None:
    w = World()
    w.server.faults.rate_limit("newOrder", retry_after=3600.0)
    with pytest.raises(AcmeError) as err:
        w.issue(["a.example.test"])
    assert (err.value.code, err.value.status, err.value.retry_after) == ("rateLimited", 429, 3600)


def test_order_not_ready_at_finalize_is_retried() -> None:
    w = World()
    w.server.faults.fail_next("finalize", 403, "orderNotReady")
    bundle = w.issue(["a.example.test"])
    assert bundle.metadata["ari_cert_id"] in w.server.issued
    assert len(w.kinds("finalize")) == 2


def test_server_error_at_finalize_is_acme_error() -> None:
    w = World()
    w.server.faults.fail_next("finalize", 500, "serverInternal")
    with pytest.raises(AcmeError) as err:
        w.issue(["a.example.test"])
    assert err.value.code == "serverInternal" and err.value.status == 500


def test_wrong_key_certificate_is_refused() -> None:
    w = World()
    w.server.faults.wrong_key_certificate_next()
    with pytest.raises(AcmeProtocolError, match="does not match"):
        w.issue(["a.example.test"])


def test_wrong_names_certificate_is_refused() -> None:
    w = World()
    w.server.faults.wrong_names_certificate_next()
    with pytest.raises(AcmeProtocolError, match=r"does not cover a\.example\.test"):
        w.issue(["a.example.test"])


def test_preferred_chain_picks_the_alternate() -> None:
    w = World(issuer_kw={"preferred_chain": "Fake ACME Alternate Root X2"})
    bundle = w.issue(["a.example.test"])
    assert bundle.chain_pem.endswith(w.server.alternate_intermediate_pem)


def test_unknown_preferred_chain_falls_back_to_default() -> None:
    w = World(issuer_kw={"preferred_chain": "No Such Root"})
    bundle = w.issue(["a.example.test"])
    assert bundle.chain_pem.endswith(w.server.intermediate_pem)


def test_no_usable_challenge_is_protocol_error() -> None:
    w = World(challenge_types=("dns-01",))
    with pytest.raises(AcmeProtocolError, match="offers dns-01, we answer http-01"):
        w.issue(["a.example.test"])
    assert w.responder.calls == []


def _with_alpn(w: World, preferences: dict[str, list[str]]) -> RecordingResponder:
    """Give ``w``'s issuer a tls-alpn-01 responder too (answers checked by the same map)."""
    alpn = RecordingResponder(challenge_type="tls-alpn-01", live=w.responder.live)
    w.issuer = attrs.evolve(
        w.issuer, responders=[w.responder, alpn], challenge_preferences=preferences
    )
    return alpn


def test_challenge_preference_per_certificate() -> None:
    """Without a preference the responders' order decides; a certificate's preference
    narrows and reorders them, and the CA's order of offers never matters."""
    w = World(challenge_types=("tls-alpn-01", "dns-01", "http-01"))
    alpn = _with_alpn(w, {names_key(["b.example.test"]): ["tls-alpn-01", "http-01"]})
    w.issue(["a.example.test"])
    assert [c[0] for c in w.responder.calls] == ["start", "stop"] and alpn.calls == []
    w.issue(["b.example.test"])
    assert [c[1] for c in alpn.calls] == ["b.example.test", "b.example.test"]
    assert len(w.responder.calls) == 2


def test_tls_alpn_01_offered_by_the_ca_is_answered() -> None:
    """The CA's tls-alpn-01 (which certbot's library no longer decodes) reaches the responder
    with the key authorization, and the issuance completes."""
    w = World(challenge_types=("http-01", "tls-alpn-01"))
    alpn = _with_alpn(w, {names_key(["a.example.test"]): ["tls-alpn-01"]})
    bundle = w.issue(["a.example.test"])
    assert crypto.certificate_names(crypto.parse_chain(bundle.chain_pem)[0]) == ["a.example.test"]
    assert [c[0] for c in alpn.calls] == ["start", "stop"] and w.responder.calls == []


def test_no_offered_challenge_among_the_preferred_names_both_sides() -> None:
    w = World(challenge_types=("http-01", "dns-01"))
    _with_alpn(w, {names_key(["a.example.test"]): ["tls-alpn-01"]})
    with pytest.raises(
        AcmeProtocolError,
        match="the CA offers http-01, dns-01, we answer tls-alpn-01 \\(the challenges setting",
    ):
        w.issue(["a.example.test"])
    assert w.responder.calls == []


def test_validation_that_never_finishes_times_out_and_withdraws() -> None:
    w = World(issuer_kw={"poll_timeout": 30.0}, validate=lambda *a: defer.Deferred())
    with pytest.raises(AcmeProtocolError, match="still pending after 30 s"):
        w.issue(["a.example.test"])
    assert w.responder.live == {}
    assert w.clock.seconds() - START < 40


def test_cancel_withdraws_answers() -> None:
    w = World(validate=lambda *a: defer.Deferred())
    d = w.issuer.issue(["a.example.test", "b.example.test"], crypto.generate_private_key_pem())
    for _ in range(20):
        w.stub.flush()
        w.clock.advance(0.1)
    assert len(w.responder.live) == 2
    d.cancel()
    w.stub.flush()
    with pytest.raises(defer.CancelledError):
        result_of(d)
    assert w.responder.live == {}


def test_profile_is_requested_and_recorded() -> None:
    w = World(issuer_kw={"profile": "shortlived"}, profiles={"shortlived": 6 * 86400})
    bundle = w.issue(["a.example.test"])
    leaf = crypto.parse_chain(bundle.chain_pem)[0]
    assert crypto.not_after(leaf) - crypto.not_before(leaf) <= datetime.timedelta(days=6, hours=1)
    assert bundle.metadata["profile"] == "shortlived"


def test_renewal_info_for_issued_certificate() -> None:
    w = World()
    bundle = w.issue(["a.example.test"])
    window = w.run(w.issuer.renewal_info(bundle.chain_pem))
    leaf = crypto.parse_chain(bundle.chain_pem)[0]
    assert crypto.not_before(leaf) < window.start < window.end < crypto.not_after(leaf)
    assert window.retry_after == w.server.ari_retry_after


def test_renewal_info_none_without_ari_or_for_placeholder() -> None:
    w = World(ari=False)
    bundle = w.issue(["a.example.test"])
    assert w.run(w.issuer.renewal_info(bundle.chain_pem)) is None
    w2 = World()
    now = datetime.datetime.fromtimestamp(START, tz=datetime.timezone.utc)
    placeholder = crypto.make_placeholder_bundle(["a.example.test"], now)
    assert w2.run(w2.issuer.renewal_info(placeholder.chain_pem)) is None


def test_missing_replay_nonce_headers_fall_back_to_new_nonce() -> None:
    w = World()
    # directory, then two newNonce answers without a nonce; the third one has it.
    w.server.faults.drop_nonce_header_next(3)
    w.issue(["a.example.test"])
    assert w.server.faults.pending() == 0
    assert len(w.kinds("newNonce")) == 3


def test_new_nonce_never_giving_a_nonce_is_protocol_error() -> None:
    w = World()
    w.server.faults.drop_nonce_header_next(100)
    with pytest.raises(AcmeProtocolError, match="newNonce gave no usable Replay-Nonce"):
        w.issue(["a.example.test"])
    assert len(w.kinds("newNonce")) == 3


def test_proxy_html_instead_of_order_is_protocol_error() -> None:
    w = World()
    w.server.faults.garbage_next("order")
    with pytest.raises(AcmeProtocolError, match="expected content type application/json") as err:
        w.issue(["a.example.test"])
    assert err.value.url is not None and "/order/" in err.value.url
    assert w.responder.live == {}


def test_invalid_name_fails_the_deferred() -> None:
    w = World()
    d = w.issuer.issue(["not a name!"], crypto.generate_private_key_pem())
    with pytest.raises(ValueError, match="not a valid DNS name"):
        w.run(d)
    assert w.kinds("newOrder") == []


def _failing_reads(monkeypatch: pytest.MonkeyPatch, method: str, fail_calls: set[int]) -> list[int]:
    """Make the ``fail_calls``-th calls (1-based) of AcmeClient.<method> fail as a lost request."""
    calls: list[int] = []
    original = getattr(AcmeClient, method)

    def flaky(self: AcmeClient, url: str) -> Any:
        calls.append(len(calls) + 1)
        if len(calls) in fail_calls:
            return defer.fail(AcmeTransportError("no answer within 45 s", url))
        return original(self, url)

    monkeypatch.setattr(AcmeClient, method, flaky)
    return calls


def test_a_lost_poll_is_polled_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    w = World(authz_delay_polls=1)
    # call 1 reads the authorization before answering; calls 2 and 3 are polls
    calls = _failing_reads(monkeypatch, "get_authorization", {2, 3})
    bundle = w.issue(["a.example.test"])
    assert crypto.certificate_names(crypto.parse_chain(bundle.chain_pem)[0]) == ["a.example.test"]
    assert len(calls) >= 4
    retries = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
    assert len(retries) == 2 and "no answer within 45 s" in retries[0], retries


def test_a_lost_order_poll_is_polled_again(monkeypatch: pytest.MonkeyPatch) -> None:
    w = World(finalize_delay_polls=2)
    calls = _failing_reads(monkeypatch, "get_order", {1})
    w.issue(["a.example.test"])
    assert len(calls) >= 2


def test_a_poll_lost_three_times_fails_the_issuance(monkeypatch: pytest.MonkeyPatch) -> None:
    w = World(authz_delay_polls=1)
    _failing_reads(monkeypatch, "get_authorization", {2, 3, 4})
    with pytest.raises(AcmeTransportError, match="no answer within 45 s"):
        w.issue(["a.example.test"])
    assert w.responder.live == {}  # the answer was withdrawn


def test_withdrawing_an_answer_is_awaited_even_when_the_authorization_is_cancelled() -> None:
    # A sibling authorization failed and this one is cancelled while its responder deletes a
    # DNS record: the issuance must not report (and the process exit) before that is done.
    from twisted.internet.defer import CancelledError, Deferred

    from synapse_acme.acme.issuer import _withdraw

    stopping: Deferred[None] = Deferred()

    class SlowResponder:
        challenge_type = "dns-01"

        def stop_responding(self, identifier: str, token: str) -> Deferred[None]:
            return stopping

    d = Deferred.fromCoroutine(_withdraw(SlowResponder(), "a.example", "t"))  # type: ignore[arg-type]
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    d.cancel()
    assert outcome == []
    stopping.callback(None)
    assert outcome[0].check(CancelledError)
