"""The provisioning service, driven by a Clock, an in-memory store and a fake issuer."""

from __future__ import annotations

import datetime
import logging
import re
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer

from synapse_acme import crypto, policy
from synapse_acme import service as service_mod
from synapse_acme.errors import AcmeError, AcmeTransportError, PreflightFailed, StoreError
from synapse_acme.interfaces import ICertificateConsumer
from synapse_acme.model import CertificateBundle, CertificateSpec, RenewalWindow
from synapse_acme.names import names_key
from synapse_acme.service import AcmeService
from synapse_acme.status import CertificateStatus, format_time
from synapse_acme.testing.issuer import FakeIssuer, PreparingFakeIssuer
from synapse_acme.testing.store import MemoryStore
from tests.certs import TestCA, leaf_serial
from tests.deferreds import outcome_of

START = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=datetime.timezone.utc)
NAMES = ("matrix.example.test", "example.test")
KEY = names_key(NAMES)
DAY = 86400.0


@implementer(ICertificateConsumer)
class Recorder:
    def __init__(self) -> None:
        self.changes: list[tuple[str, CertificateBundle]] = []

    def certificate_changed(self, key: str, bundle: CertificateBundle) -> None:
        self.changes.append((key, bundle))


class World:
    def __init__(self, specs: tuple[tuple[str, ...], ...] = (NAMES,), **kw: Any) -> None:
        self.clock = Clock()
        self.clock.advance(START.timestamp())
        self.ca = TestCA(now=START)
        self.store = MemoryStore()
        self.issuer = kw.pop("issuer_class", FakeIssuer)(ca=self.ca, clock=self.clock)
        self.consumer = Recorder()
        self.statuses: list[list[CertificateStatus]] = []
        kw.setdefault("check_interval", 600.0)
        kw.setdefault("check_jitter", 0.0)
        self.service = AcmeService(
            [CertificateSpec(names=n) for n in specs],
            self.store,
            self.issuer,
            self.clock,
            on_status=self.statuses.append,
            **kw,
        )
        self.service.add_consumer(self.consumer)

    def start(self) -> None:
        self.service.startService()
        self.clock.advance(0)

    def now(self) -> datetime.datetime:
        return crypto.now_from_clock(self.clock)

    def stored(self, key: str = KEY) -> CertificateBundle | None:
        return outcome_of(self.store.load(key))


def test_first_start_issues_in_background_and_tells_consumers() -> None:
    w = World()
    w.service.startService()
    # Nothing is issued synchronously inside startService: the host's start is never blocked.
    assert w.issuer.calls == []
    w.clock.advance(0)
    assert w.issuer.calls == [(NAMES, None)]
    stored = w.stored()
    assert stored is not None
    assert [k for k, _ in w.consumer.changes] == [KEY]
    assert w.consumer.changes[0][1] == stored
    crypto.validate_bundle(stored, NAMES, w.now())
    status = w.service.status()[0]
    assert status.names == tuple(NAMES)
    assert status.failures == 0 and status.last_error is None
    # 90-day certificate, no ARI: renewal with a third of the lifetime left (30 days), which
    # reprovision_threshold (30 days) caps to exactly 30 days before notAfter.
    assert format_time(status.renew_at) == "2026-12-31T12:00:00Z"
    # The status file is written once per burst of changes, a moment later.
    assert w.statuses == []
    w.clock.advance(service_mod.STATUS_COALESCE_SECONDS)
    assert len(w.statuses) == 1 and w.statuses[0][0].last_success is not None


def test_status_is_published_once_per_burst_and_flushed_at_stop() -> None:
    w = World(specs=tuple((f"n{i}.example.test",) for i in range(5)))
    w.service.startService()
    w.clock.advance(0)
    w.clock.advance(1)  # five certificates finished; one write for the lot
    assert len(w.statuses) == 1 and len(w.statuses[0]) == 5
    assert all(s.last_success is not None for s in w.statuses[0])
    w.service.renew(None, force=True)
    w.clock.advance(0)
    assert len(w.statuses) == 1  # changed, not yet written ...
    outcome_of(w.service.stopService())
    assert len(w.statuses) == 2  # ... and stopService does not lose it


def test_stored_certificate_is_served_at_once_without_issuing() -> None:
    w = World()
    bundle = w.ca.issue(list(NAMES))
    outcome_of(w.store.save(KEY, bundle))
    w.start()
    assert w.consumer.changes == [(KEY, bundle)]
    assert w.issuer.calls == []
    assert w.service.current(KEY) == bundle


def test_expired_stored_certificate_is_served_and_replaced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = World()
    old = w.ca.issue(
        list(NAMES),
        not_before=START - datetime.timedelta(days=100),
        not_after=START - datetime.timedelta(days=1),
    )
    outcome_of(w.store.save(KEY, old))
    with caplog.at_level(logging.WARNING):
        w.start()
    assert "EXPIRED" in caplog.text
    assert w.consumer.changes[0] == (KEY, old)
    assert len(w.issuer.calls) == 1
    assert w.service.current(KEY) != old


def test_placeholder_is_served_then_replaced() -> None:
    w = World()
    placeholder = crypto.make_placeholder_bundle(list(NAMES), START)
    outcome_of(w.store.save(KEY, placeholder))
    w.start()
    assert w.consumer.changes[0] == (KEY, placeholder)
    current = w.service.current(KEY)
    assert current is not None and not current.metadata.get("placeholder")
    assert len(w.consumer.changes) == 2
    # The flag travels with the bundle it describes: the real one is no placeholder, and
    # the periodic check sees it as a certificate with a renewal moment, not one to replace.
    (status,) = w.service.status()
    assert status.has_certificate and not status.placeholder
    w.clock.advance(3600)
    assert len(w.issuer.calls) == 1


def test_failure_keeps_old_certificate_logs_type_and_backs_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = World()
    old = w.ca.issue(
        list(NAMES),
        not_before=START - datetime.timedelta(days=80),
        not_after=START + datetime.timedelta(days=10),
    )
    outcome_of(w.store.save(KEY, old))
    limited = AcmeError(
        "urn:ietf:params:acme:error:rateLimited", "too many certificates", 429, retry_after=7200
    )
    w.issuer.fail_next(limited)
    with caplog.at_level(logging.ERROR):
        w.start()
    assert len(w.issuer.calls) == 1
    assert w.service.current(KEY) == old
    assert w.stored() == old
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "rateLimited" in errors[0] and "next attempt at" in errors[0]
    status = w.service.status()[0]
    assert status.last_error_type == "rateLimited"
    assert status.failures == 1
    # Retry-After (2 h) wins over the first backoff step; no attempt before it.
    w.clock.advance(7199)
    assert len(w.issuer.calls) == 1
    w.clock.advance(2)
    assert len(w.issuer.calls) == 2
    assert w.service.current(KEY) != old
    assert w.service.status()[0].failures == 0


def test_ca_down_for_a_day_follows_backoff_table_then_recovers() -> None:
    w = World()
    old = w.ca.issue(
        list(NAMES),
        not_before=START - datetime.timedelta(days=80),
        not_after=START + datetime.timedelta(days=10),
    )
    outcome_of(w.store.save(KEY, old))
    down = [AcmeTransportError("connection refused", "https://ca.test/dir")] * 1000
    w.issuer.fail_next(*down)
    w.start()
    # Simulate a day in one-minute steps; the certificate served never changes.
    for _ in range(int(DAY // 60)):
        w.clock.advance(60)
        assert w.service.current(KEY) == old
    attempts = len(w.issuer.calls)
    # Expected from the table alone (jitter is small): walk the schedule over a day.
    expected, t, n = 1, 0.0, 0
    while True:
        n += 1
        t += policy.backoff_delay(n, None, 0.5)
        if t > DAY:
            break
        expected += 1
    assert abs(attempts - expected) <= 2, (attempts, expected)
    assert attempts < 60  # front-loaded, then hours: no tight loop
    # The CA comes back: the next attempt succeeds.
    w.issuer.failures.clear()
    w.clock.advance(policy.BACKOFF_SCHEDULE[-1] * 1.5)
    assert w.service.current(KEY) != old
    assert w.service.status()[0].failures == 0


def test_concurrent_requests_share_one_order() -> None:
    w = World()
    w.issuer.hold = True
    w.start()
    assert len(w.issuer.calls) == 1
    d1 = w.service.renew(KEY, force=True)
    d2 = w.service.renew(KEY, force=True)
    w.clock.advance(600)  # a periodic check while the order is in flight
    assert len(w.issuer.calls) == 1
    w.issuer.release()
    r1, r2 = outcome_of(d1), outcome_of(d2)
    assert r1[0][1] == r2[0][1] == w.service.current(KEY)


def test_waiter_can_cancel_without_stopping_the_issuance() -> None:
    w = World()
    w.issuer.hold = True
    w.start()
    d = w.service.renew(KEY, force=True)
    d.cancel()
    [(key, result)] = outcome_of(d)
    assert key == KEY and result.check(defer.CancelledError)
    # The shared issuance goes on for the other waiters (here: the startup check).
    w.issuer.release()
    assert len(w.issuer.calls) == 1
    assert w.service.current(KEY) is not None


def test_renews_in_window_with_replaces_and_new_key() -> None:
    w = World()
    w.start()
    first = w.service.current(KEY)
    assert first is not None
    w.clock.advance(59 * DAY)
    assert len(w.issuer.calls) == 1
    w.clock.advance(2 * DAY)
    assert len(w.issuer.calls) == 2
    second = w.service.current(KEY)
    assert second is not None and leaf_serial(second) != leaf_serial(first)
    assert w.issuer.calls[1][1] == first.metadata["ari_cert_id"]
    assert second.key_pem != first.key_pem
    assert w.stored() == second


def test_short_lived_certificate_is_not_renewed_every_check() -> None:
    # A 6-day certificate with reprovision_threshold 30 days must not be re-issued each tick.
    w = World(threshold_days=30)
    w.issuer.lifetime = datetime.timedelta(days=6)
    w.start()
    w.clock.pump([600.0] * int(2.9 * DAY / 600))
    assert len(w.issuer.calls) == 1
    w.clock.pump([600.0] * int(0.2 * DAY / 600))
    assert len(w.issuer.calls) == 2


def test_ari_window_drives_renewal() -> None:
    w = World()
    w.start()
    first = w.service.current(KEY)
    assert first is not None
    cert_id = first.metadata["ari_cert_id"]
    start = START + datetime.timedelta(days=5)
    w.issuer.windows[cert_id] = RenewalWindow(start, start + datetime.timedelta(hours=1))
    w.clock.advance(600)  # the next check fetches the window
    renew_at = w.service.status_of(KEY).renew_at
    assert renew_at is not None and start <= renew_at <= start + datetime.timedelta(hours=1)
    w.clock.pump([600.0] * int(5 * DAY / 600 + 12))
    assert len(w.issuer.calls) == 2
    assert w.issuer.calls[1][1] == cert_id


def test_issued_certificate_that_cannot_be_saved_is_saved_later_not_reordered() -> None:
    w = World()
    w.store.fail_next_save(StoreError("no space left on device"))
    w.start()
    assert len(w.issuer.calls) == 1
    assert w.stored() is None
    assert w.service.status()[0].last_error is not None
    w.clock.advance(policy.backoff_delay(1, None, 0.5) * 1.2)
    assert len(w.issuer.calls) == 1  # not ordered again
    assert w.stored() is not None
    assert w.service.current(KEY) == w.stored()


def test_three_certificates_are_independent() -> None:
    specs = (("a.example.test",), ("b.example.test",), ("c.example.test", "d.example.test"))
    w = World(specs=specs)
    w.issuer.fail_next(AcmeError("urn:ietf:params:acme:error:rejectedIdentifier", "no", 400))
    w.start()
    assert len(w.issuer.calls) == 3
    got = {k for k, _ in w.consumer.changes}
    assert got == {names_key(s) for s in specs[1:]}
    assert w.service.status()[0].last_error_type == "rejectedIdentifier"


def test_stop_cancels_in_flight_and_goes_quiet() -> None:
    w = World()
    w.issuer.hold = True
    w.start()
    d = w.service.stopService()
    assert outcome_of(d) is None
    assert w.clock.getDelayedCalls() == []


def test_tick_survives_unexpected_errors(caplog: pytest.LogCaptureFixture) -> None:
    w = World()
    w.issuer.fail_next(RuntimeError("boom"))
    with caplog.at_level(logging.ERROR):
        w.start()
    assert "boom" in caplog.text
    # The periodic check is still scheduled and the retry happens.
    assert w.clock.getDelayedCalls()
    w.clock.advance(policy.backoff_delay(1, None, 0.5) * 1.2)
    assert w.service.current(KEY) is not None


# -- checks never overlap; stopping cancels instead of waiting -------------------------------


def _store_due_certificate(w: World) -> CertificateBundle:
    """A stored certificate with 10 days left: due for renewal, so a check fetches its ARI
    window and then orders."""
    old = w.ca.issue(
        list(NAMES),
        not_before=START - datetime.timedelta(days=80),
        not_after=START + datetime.timedelta(days=10),
    )
    outcome_of(w.store.save(KEY, old))
    return old


def test_checks_never_overlap_while_one_hangs() -> None:
    w = World()
    _store_due_certificate(w)
    w.issuer.hold_renewal_info = True  # the CA accepts the request and never answers
    w.start()
    assert w.issuer.renewal_info_calls == 1
    # Ten check intervals later the first check is still waiting: no second check was
    # started beside it, nothing was ordered, and no check timer is waiting to pile up.
    w.clock.advance(10 * 600)
    assert w.issuer.renewal_info_calls == 1
    assert w.issuer.calls == []
    assert w.clock.getDelayedCalls() == []
    # The answer comes: the check goes on (orders the due certificate), and only then is the
    # next check scheduled, a full interval after this one ended.
    w.issuer.release_renewal_info()
    assert len(w.issuer.calls) == 1
    w.clock.advance(service_mod.STATUS_COALESCE_SECONDS)
    [tick] = w.clock.getDelayedCalls()
    assert tick.getTime() == pytest.approx(w.clock.seconds() - 0.5 + 600)
    w.clock.advance(600)
    assert w.issuer.renewal_info_calls == 2  # the renewed certificate's window
    assert len(w.clock.getDelayedCalls()) == 0  # that check hangs again: nothing queued
    assert outcome_of(w.service.stopService()) is None


@pytest.mark.parametrize(
    "cancel_error",
    [None, AcmeTransportError("ResponseNeverReceived (CancelledError: )", "https://ca.test/d")],
    ids=["CancelledError", "as-transport-error"],
)
def test_stop_is_prompt_with_a_hung_ari_fetch(
    cancel_error: BaseException | None, caplog: pytest.LogCaptureFixture
) -> None:
    w = World(specs=(NAMES, ("other.example.test",)))
    _store_due_certificate(w)
    outcome_of(w.store.save(names_key(("other.example.test",)), w.ca.issue(["other.example.test"])))
    w.issuer.hold_renewal_info = True
    w.issuer.cancel_error = cancel_error
    w.start()
    [(held, _)] = w.issuer.pending_renewal_info
    with caplog.at_level(logging.INFO):
        d = w.service.stopService()
        # Fired at once, on the same clock second: the fetch was cancelled, not waited for.
        assert outcome_of(d) is None
    assert held.called
    # The cancelled fetch is neither reported as a CA problem nor followed by the next
    # certificate's fetch or by an order; nothing is left scheduled.
    assert w.issuer.renewal_info_calls == 1
    assert w.issuer.calls == []
    assert w.clock.getDelayedCalls() == []
    assert "ARI" not in caplog.text and "Unexpected" not in caplog.text


@pytest.mark.parametrize(
    "cancel_error",
    [None, AcmeTransportError("ResponseNeverReceived (CancelledError: )", "https://ca.test/d")],
    ids=["CancelledError", "as-transport-error"],
)
def test_stop_cancels_a_hung_issuance_without_reporting_a_failure(
    cancel_error: BaseException | None, caplog: pytest.LogCaptureFixture
) -> None:
    w = World()
    w.issuer.hold = True
    w.issuer.cancel_error = cancel_error
    w.start()
    assert len(w.issuer.pending) == 1
    with caplog.at_level(logging.INFO):
        assert outcome_of(w.service.stopService()) is None
    assert w.clock.getDelayedCalls() == []
    status = w.service.status()[0]
    assert status.failures == 0 and status.last_error is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "cancelled" in caplog.text and "next attempt" not in caplog.text


# -- one-shot mode ---------------------------------------------------------------------------


def test_one_shot_does_only_what_is_asked_and_schedules_nothing() -> None:
    w = World(one_shot=True)
    old = _store_due_certificate(w)
    w.start()
    # Loaded and served, but no check, no ARI fetch and no order of its own.
    assert w.service.current(KEY) == old
    assert w.issuer.calls == [] and w.issuer.renewal_info_calls == 0
    assert w.clock.getDelayedCalls() == []
    [(key, bundle)] = outcome_of(w.service.renew(None, force=False))
    assert key == KEY and bundle == w.service.current(KEY) != old
    assert w.issuer.calls == [(NAMES, None)]
    assert w.issuer.renewal_info_calls == 0
    # The status is written at once (no coalescing timer) and nothing is left scheduled.
    assert w.clock.getDelayedCalls() == []
    assert len(w.statuses) == 1 and w.statuses[0][0].last_success is not None
    assert outcome_of(w.service.stopService()) is None
    w.clock.advance(100 * DAY)
    assert len(w.issuer.calls) == 1


def test_one_shot_failure_is_recorded_without_next_attempt_and_left_to_the_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = World(one_shot=True)
    old = _store_due_certificate(w)
    limited = AcmeError(
        "urn:ietf:params:acme:error:rateLimited", "too many certificates", 429, retry_after=7200
    )
    w.issuer.fail_next(limited)
    w.start()
    with caplog.at_level(logging.DEBUG, logger="synapse_acme.service"):
        [(key, result)] = outcome_of(w.service.renew(KEY, force=True))
    assert key == KEY and result.check(AcmeError)
    # Recorded for `status`: the error and its type, but no next attempt (nothing retries).
    for status in (w.service.status()[0], w.statuses[-1][0]):
        assert status.last_error_type == "rateLimited"
        assert status.last_error == str(limited)
        assert status.failures == 1
        assert status.next_attempt is None
    assert w.service._managed[KEY].next_attempt == 0.0  # none stored, not only none shown
    assert w.clock.getDelayedCalls() == []
    # The caller reports it (the CLI's FAILED line): the service logs it at DEBUG only, and
    # promises no next attempt.
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and "Failed" in r.message]
    assert "next attempt" not in caplog.text
    assert "no retry is scheduled" in caplog.text
    # What happened, what is kept, and when the CA allows the next try (its Retry-After).
    assert w.service.failure_summary(KEY) == (
        f"{limited} (error type rateLimited); the previous certificate is kept; "
        "the CA asks not to try again before 2026-11-01T14:00:00Z"
    )
    assert w.service.current(KEY) == old and w.stored() == old
    w.clock.advance(DAY)
    assert len(w.issuer.calls) == 1


def test_failure_summary_says_what_is_kept() -> None:
    w = World(one_shot=True)
    w.issuer.fail_next(AcmeTransportError("no answer within 2 s", "https://ca.test/dir"))
    w.start()
    assert w.service.failure_summary(KEY) is None
    [(_, result)] = outcome_of(w.service.renew(KEY))
    assert result.check(AcmeTransportError)
    summary = w.service.failure_summary(KEY)
    assert summary is not None
    assert summary.endswith("(error type AcmeTransportError); there is still no certificate")
    # A success clears it.
    outcome_of(w.service.renew(KEY))
    assert w.service.failure_summary(KEY) is None
    # Issued but not saved: said so, and that a one-shot process does not keep it.
    w.store.fail_next_save(StoreError("no space left on device"))
    [(_, result)] = outcome_of(w.service.renew(KEY, force=True))
    assert result.check(StoreError)
    assert w.service.failure_summary(KEY) == (
        "no space left on device (error type StoreError); the certificate was issued but "
        "could not be saved (it is lost when this process exits)"
    )


def test_running_service_still_promises_the_next_attempt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = World()
    w.issuer.fail_next(AcmeTransportError("no answer within 2 s", "https://ca.test/dir"))
    with caplog.at_level(logging.ERROR):
        w.start()
    [error] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert re.search(
        r"still serving no certificate; next attempt at 2026-11-01T12:0\S+Z \(in \d+ s\)$", error
    ), error
    assert w.service.status()[0].next_attempt is not None
    # The retry, the next periodic check and the coalesced status write.
    assert sorted(c.func.__name__ for c in w.clock.getDelayedCalls()) == [
        "_retry",
        "_tick",
        "_write_status",
    ]


def test_no_order_before_the_challenge_listener_is_ready() -> None:
    bound: defer.Deferred[Any] = defer.Deferred()
    w = World(ready=lambda: bound)
    w.start()
    assert w.issuer.calls == []  # waiting for the listener: nothing ordered yet
    bound.callback([])
    assert w.issuer.calls == [(NAMES, None)]


def test_a_listener_that_cannot_bind_fails_each_attempt_without_an_order() -> None:
    from synapse_acme.errors import ListenError

    error = ListenError("could not open any HTTP-01 challenge listener: port 80 on :: (...)")
    w = World(ready=lambda: defer.fail(error))
    w.start()
    w.clock.advance(3 * DAY)  # every retry of the back-off table meanwhile
    assert w.issuer.calls == []  # the CA never saw an order
    [status] = w.service.status()
    assert status.last_error_type == "ListenError"
    assert "port 80 on ::" in status.last_error
    assert status.failures > 1 and status.next_attempt is not None
    # A forced renewal (renew --force handed over) does not get past it either.
    assert isinstance(outcome_of(w.service.renew(force=True))[0][1].value, ListenError)
    assert w.issuer.calls == []


def _held_preflight() -> tuple[list[defer.Deferred[None]], Any]:
    checks: list[defer.Deferred[None]] = []

    def before_order(spec: CertificateSpec, previous: Any) -> defer.Deferred[None]:
        checks.append(defer.Deferred())
        return checks[-1]

    return checks, before_order


def test_the_account_is_set_up_while_the_preflight_runs() -> None:
    bound: defer.Deferred[Any] = defer.Deferred()
    checks, before_order = _held_preflight()
    w = World(issuer_class=PreparingFakeIssuer, ready=lambda: bound, before_order=before_order)
    w.start()
    assert w.issuer.preparing == [] and checks == []  # nothing reaches the CA before ready
    bound.callback([])
    # Both at once: the account (a first start registers it) and the preflight.
    assert len(w.issuer.preparing) == 1 and len(checks) == 1
    checks[0].callback(None)
    assert w.issuer.calls == []  # no order before the account exists
    w.issuer.preparing[0].callback(None)
    assert w.issuer.calls == [(NAMES, None)]
    assert w.stored() is not None


def test_a_failed_preflight_is_reported_even_when_the_registration_fails_too() -> None:
    checks, before_order = _held_preflight()
    w = World(issuer_class=PreparingFakeIssuer, before_order=before_order)
    w.start()
    w.issuer.preparing[0].errback(AcmeTransportError("cannot reach the ACME server"))
    checks[0].errback(PreflightFailed([(NAMES[0], "not-forwarded", "404 from 127.0.0.1")]))
    [status] = w.service.status()
    assert status.last_error_type == "PreflightFailed" and w.issuer.calls == []


def test_a_registration_that_fails_fails_the_attempt_without_an_order() -> None:
    checks, before_order = _held_preflight()
    w = World(issuer_class=PreparingFakeIssuer, before_order=before_order)
    w.start()
    checks[0].callback(None)
    w.issuer.preparing[0].errback(AcmeTransportError("cannot reach the ACME server"))
    [status] = w.service.status()
    assert status.last_error_type == "AcmeTransportError" and w.issuer.calls == []
    assert status.next_attempt is not None  # and the back-off table goes on as for any error


def test_stopping_during_the_preflight_cancels_the_registration() -> None:
    checks, before_order = _held_preflight()
    w = World(issuer_class=PreparingFakeIssuer, before_order=before_order)
    w.start()
    assert len(checks) == 1  # the preflight is still running
    [preparing] = w.issuer.preparing
    outcome_of(w.service.stopService())
    assert w.issuer.cancelled == [preparing] and w.issuer.calls == []
