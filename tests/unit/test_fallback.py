"""Several CAs (acme.issuers): the FallbackIssuer alone and under the service, on a Clock."""

from __future__ import annotations

import datetime
import logging
from typing import Any

import pytest
from twisted.internet.task import Clock

from synapse_acme import crypto, policy
from synapse_acme.account import ca_dir_name, issuer_account_paths
from synapse_acme.errors import (
    AccountRefused,
    AcmeError,
    AcmeProtocolError,
    AcmeTransportError,
    ChallengeFailed,
    ConfigError,
)
from synapse_acme.fallback import FallbackIssuer, NamedIssuer
from synapse_acme.model import CertificateSpec
from synapse_acme.names import names_key
from synapse_acme.service import AcmeService
from synapse_acme.testing.issuer import FakeIssuer, PreparingFakeIssuer
from synapse_acme.testing.store import MemoryStore
from tests.certs import TestCA
from tests.deferreds import outcome_of

START = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=datetime.timezone.utc)
NAMES = ("matrix.example.test",)
KEY = names_key(NAMES)
URLS = ("https://first.example/dir", "https://second.example/dir", "https://third.example/dir")
DAY = 86400.0


def _key() -> bytes:
    return crypto.generate_private_key_pem("ecdsa-p256")


def _problem(code: str) -> AcmeError:
    return AcmeError(f"urn:ietf:params:acme:error:{code}", "no", status=403)


class World:
    def __init__(self, cas: int = 2, *, budget: int = policy.FALLBACK_AFTER_FAILURES) -> None:
        self.clock = Clock()
        self.clock.advance(START.timestamp())
        self.ca = TestCA(now=START)
        self.fakes = [FakeIssuer(ca=self.ca, clock=self.clock, directory=url) for url in URLS[:cas]]
        self.issuer = FallbackIssuer(
            [NamedIssuer(url, fake) for url, fake in zip(URLS[:cas], self.fakes, strict=True)],
            budget=budget,
        )
        self.store = MemoryStore()
        self.service = AcmeService(
            [CertificateSpec(names=NAMES)], self.store, self.issuer, self.clock, check_jitter=0.0
        )

    def asked(self) -> list[int]:
        """How many issuances each CA was asked for."""
        return [len(f.calls) for f in self.fakes]

    def issue(self) -> Any:
        return outcome_of(self.issuer.issue(NAMES, _key(), None))


@pytest.mark.parametrize(
    ("error", "for_good"),
    [
        (_problem("rejectedIdentifier"), True),
        (_problem("caa"), True),
        (_problem("unauthorized"), True),
        (AccountRefused("acme.eab", "refused", _problem("unauthorized")), True),
        (ConfigError("acme.terms_of_service_agreed", "agree", False), True),
        (AcmeProtocolError("the issued certificate is unusable"), True),
        (ChallengeFailed("a.example", _problem("caa")), True),
        (ChallengeFailed("a.example", _problem("unauthorized")), False),
        (ChallengeFailed("a.example", _problem("connection")), False),
        (ChallengeFailed("a.example", None), False),
        (AcmeTransportError("connection refused", "https://ca/dir"), False),
        (_problem("rateLimited"), False),
        (_problem("serverInternal"), False),
        (RuntimeError("a bug"), False),
    ],
)
def test_which_errors_hand_over_at_once(error: BaseException, for_good: bool) -> None:
    assert policy.refused_for_good(error) is for_good
    assert policy.hands_over(error, 1, 3) is for_good
    assert policy.hands_over(error, 3, 3)  # the budget is spent either way
    assert policy.hands_over(error, 1, 1)  # one-shot: every failure asks the next CA


def test_a_refusal_for_good_asks_the_next_ca_at_once(caplog: pytest.LogCaptureFixture) -> None:
    w = World()
    w.fakes[0].fail_next(_problem("rejectedIdentifier"))
    with caplog.at_level(logging.WARNING, "synapse_acme.fallback"):
        bundle = w.issue()
    assert w.asked() == [1, 1]
    assert bundle.metadata["issuer_directory"] == URLS[1]
    assert bundle.metadata["issuer_fallbacks"] == 1
    assert "CA 1 of 2 (https://first.example/dir) failed" in caplog.text
    assert "issued by CA 2 of 2" in caplog.text


def test_the_first_ca_that_works_issues_and_says_so() -> None:
    w = World(cas=3)
    w.fakes[0].fail_next(_problem("caa"))
    w.fakes[1].fail_next(AccountRefused("acme.issuers[1].eab", "x", _problem("unauthorized")))
    bundle = w.issue()
    assert w.asked() == [1, 1, 1]
    assert (bundle.metadata["issuer_directory"], bundle.metadata["issuer_fallbacks"]) == (
        URLS[2],
        2,
    )


def test_the_last_cas_error_is_raised_when_all_fail() -> None:
    w = World()
    w.fakes[0].fail_next(_problem("caa"))
    w.fakes[1].fail_next(_problem("rejectedIdentifier"))
    failure = w.issue()
    assert isinstance(failure.value, AcmeError) and failure.value.code == "rejectedIdentifier"


def test_replaces_goes_only_to_the_first_ca() -> None:
    w = World()
    w.fakes[0].fail_next(_problem("caa"))
    outcome_of(w.issuer.issue(NAMES, _key(), "cert-id"))
    assert [f.calls for f in w.fakes] == [[(NAMES, "cert-id")], [(NAMES, None)]]


def test_renewal_info_asks_the_ca_that_issued() -> None:
    w = World()
    chain = outcome_of(w.fakes[1].issue(NAMES, _key(), None)).chain_pem
    assert outcome_of(w.issuer.renewal_info(chain, URLS[1])) is None
    assert [f.renewal_info_directories for f in w.fakes] == [[], [URLS[1]]]
    # A certificate from a CA no longer listed (or of unknown origin): nobody is asked.
    assert outcome_of(w.issuer.renewal_info(chain, "https://gone.example/dir")) is None
    assert outcome_of(w.issuer.renewal_info(chain, None)) is None
    assert [f.renewal_info_calls for f in w.fakes] == [0, 1]


def test_the_service_hands_over_after_the_budget_and_renewals_start_at_the_first() -> None:
    """A first CA that cannot be reached keeps the certificate for FALLBACK_AFTER_FAILURES
    attempts (the service's backoff: about five minutes), then the second CA issues; the
    status shows that CA and the fallback; the next renewal asks the first CA again."""
    w = World()
    down = AcmeTransportError("connection refused", URLS[0])
    w.fakes[0].fail_next(*[down] * 10)
    w.service.startService()
    w.clock.advance(0)
    for attempt in range(1, policy.FALLBACK_AFTER_FAILURES):
        assert w.asked() == [attempt, 0]
        status = w.service.status()[0]
        assert (status.failures, status.has_certificate) == (attempt, False)
        assert w.issuer.failures(NAMES, 0) == attempt
        w.clock.advance(policy.backoff_delay(attempt, rand=1.0) + 1)
    assert w.asked() == [policy.FALLBACK_AFTER_FAILURES, 1]
    status = w.service.status()[0]
    assert status.has_certificate and status.failures == 0
    assert (status.ca_url, status.fallbacks) == (URLS[1], 1)
    assert w.issuer.failures(NAMES, 0) == 0  # a success clears the count
    # The first CA is back; the renewal (90-day certificate: due after 60 days) asks it first.
    w.fakes[0].failures.clear()
    w.clock.advance(61 * DAY)
    assert w.asked() == [policy.FALLBACK_AFTER_FAILURES + 1, 1]
    status = w.service.status()[0]
    assert (status.ca_url, status.fallbacks) == (URLS[0], 0)
    stored = outcome_of(w.store.load(KEY))
    assert stored is not None and stored.metadata["issuer_directory"] == URLS[0]
    w.service.stopService()


def test_a_second_ca_that_also_fails_may_pass_keeps_its_own_budget() -> None:
    w = World(budget=2)
    down = AcmeTransportError("connection refused", "x")
    w.fakes[0].fail_next(down, down, down)
    w.fakes[1].fail_next(_problem("rateLimited"))
    assert isinstance(w.issue().value, AcmeTransportError)  # first CA: 1 of 2
    assert w.asked() == [1, 0]
    failure = w.issue()  # first CA: 2 of 2, hands over; second CA: 1 of 2
    assert isinstance(failure.value, AcmeError) and failure.value.code == "rateLimited"
    assert w.asked() == [2, 1]
    bundle = w.issue()  # first CA hands over at once; the second issues
    assert w.asked() == [3, 2] and bundle.metadata["issuer_fallbacks"] == 1


def test_the_account_set_up_ahead_is_the_first_cas_and_its_failure_is_not_final() -> None:
    clock = Clock()
    first, second = (
        PreparingFakeIssuer(ca=TestCA(now=START), clock=clock, directory=url) for url in URLS[:2]
    )
    both = FallbackIssuer([NamedIssuer(URLS[0], first), NamedIssuer(URLS[1], second)])
    d = both.prepare()
    assert len(first.preparing) == 1 and second.preparing == []  # every issuance asks it first
    first.preparing[0].errback(AcmeTransportError("cannot reach the ACME server"))
    assert outcome_of(d) is None  # issue() may still get it from the second CA
    # Only one CA: its failure is the issuance's, as the service would get it from issue().
    alone = FallbackIssuer([NamedIssuer(URLS[0], first)])
    d = alone.prepare()
    first.preparing[1].errback(AcmeTransportError("cannot reach the ACME server"))
    assert isinstance(outcome_of(d).value, AcmeTransportError)
    # A first CA that cannot set up ahead (a plain IIssuer): nothing to wait for.
    plain = FallbackIssuer([NamedIssuer(URLS[0], World(cas=1).fakes[0])])
    assert outcome_of(plain.prepare()) is None


def test_one_ca_is_passed_through_and_bad_arguments_refused() -> None:
    w = World(cas=1)
    w.fakes[0].fail_next(_problem("caa"))
    assert w.issue().value.code == "caa"
    bundle = w.issue()
    assert bundle.metadata["issuer_fallbacks"] == 0
    with pytest.raises(ValueError):
        FallbackIssuer([])
    with pytest.raises(ValueError):
        FallbackIssuer([NamedIssuer(URLS[0], w.fakes[0])], budget=0)


@pytest.mark.parametrize(
    ("url", "name"),
    [
        (
            "https://acme-v02.api.letsencrypt.org/directory",
            "acme-v02.api.letsencrypt.org_directory",
        ),
        ("https://acme.zerossl.com/v2/DV90", "acme.zerossl.com_v2_dv90"),
        ("https://127.0.0.1:14000/dir", "127.0.0.1_14000_dir"),
        ("https://ca.internal:9000/acme/../acme/directory", "ca.internal_9000_acme_acme_directory"),
        ("https://[::1]:9000/dir", "1_9000_dir"),
        ("https://", "ca"),
    ],
)
def test_each_ca_has_a_path_safe_account_directory(url: str, name: str) -> None:
    assert ca_dir_name(url) == name
    assert "/" not in name and ".." not in name
    assert issuer_account_paths(0, url, "/k/account.key", "/s") == ("/k/account.key", "/s")
    assert issuer_account_paths(1, url, "/k/account.key", "/s") == (
        f"/s/accounts/{name}/account.key",
        f"/s/accounts/{name}",
    )
