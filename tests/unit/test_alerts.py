"""alerts: the pure alert policy, rule by rule, on a Clock's time."""

from __future__ import annotations

import datetime

import attrs
import pytest
from twisted.internet.task import Clock

from synapse_acme import crypto
from synapse_acme.alerts import (
    EXPIRING,
    FAILING,
    RECOVERED,
    Alert,
    AlertState,
    CertificateAlertState,
    decide,
)
from synapse_acme.status import CertificateStatus, time_from_seconds

DAY = 86400.0
START = 1_800_000_000.0


def clock() -> Clock:
    c = Clock()
    c.advance(START)
    return c


def now(c: Clock) -> datetime.datetime:
    return crypto.now_from_clock(c)


def ok(c: Clock, days_left: float = 60, key: str = "a.example.test") -> CertificateStatus:
    """A certificate whose last attempt succeeded (just now)."""
    return CertificateStatus(
        key=key,
        names=(key,),
        has_certificate=True,
        not_after=time_from_seconds(c.seconds() + days_left * DAY),
        last_success=now(c),
    )


def failed(
    c: Clock, days_left: float | None = 60, failures: int = 1, key: str = "a.example.test"
) -> CertificateStatus:
    """A certificate whose last attempt failed (``days_left`` None: none issued yet)."""
    return CertificateStatus(
        key=key,
        names=(key, f"www.{key}"),
        has_certificate=days_left is not None,
        not_after=time_from_seconds(c.seconds() + days_left * DAY) if days_left else None,
        failures=failures,
        last_error="urn:ietf:params:acme:error:rateLimited: too many certificates",
        last_error_type="rateLimited",
        last_failure=now(c),
        next_attempt=time_from_seconds(c.seconds() + 600),
    )


def events(alerts: list[Alert]) -> list[str]:
    return [a.event for a in alerts]


def test_nothing_to_say_while_everything_works() -> None:
    c = clock()
    alerts, state = decide(AlertState(), [ok(c)], now(c))
    assert alerts == [] and state.of("a.example.test") == CertificateAlertState()


def test_first_failure_after_a_success_is_one_failing_alert() -> None:
    c = clock()
    _, state = decide(AlertState(), [ok(c)], now(c))
    c.advance(DAY)
    alerts, state = decide(state, [failed(c)], now(c))
    assert events(alerts) == [FAILING]
    alert = alerts[0]
    assert alert.name == "a.example.test" and alert.names == (
        "a.example.test",
        "www.a.example.test",
    )
    assert alert.error_type == "rateLimited" and "too many" in (alert.error or "")
    assert alert.next_attempt == time_from_seconds(c.seconds() + 600)
    assert state.of("a.example.test").reported


def test_failing_also_when_nothing_was_ever_issued() -> None:
    c = clock()
    alerts, _ = decide(AlertState(), [failed(c, days_left=None)], now(c))
    assert events(alerts) == [FAILING] and alerts[0].not_after is None
    assert "none was issued yet" in alerts[0].text()


def test_a_flood_of_failures_is_one_notice() -> None:
    """Failures every minute for a day (and restarts: the state is all that is kept)."""
    c = clock()
    state = AlertState()
    sent: list[Alert] = []
    for minute in range(24 * 60 - 1):
        alerts, state = decide(state, [failed(c, failures=minute + 1)], now(c))
        state = AlertState.parse(state.dump())  # a restart after every attempt
        sent += alerts
        c.advance(60)
    assert events(sent) == [FAILING]


def test_expiring_is_daily_while_it_cannot_be_renewed() -> None:
    c = clock()
    state = AlertState()
    sent: list[Alert] = []
    # 20 days left, failing every 10 minutes for 10 days.
    for step in range(10 * 24 * 6):
        alerts, state = decide(
            state, [failed(c, days_left=20 - step / 144, failures=step + 1)], now(c)
        )
        sent += alerts
        c.advance(600)
    kinds = events(sent)
    assert kinds[0] == FAILING  # 20 days left: not yet expiring
    # Within 14 days from day 6 on: one expiring per day, never more (days 6, 7, 8, 9).
    assert kinds[1:] == [EXPIRING] * 4
    days = [(a.at - sent[1].at).total_seconds() / DAY for a in sent[1:]]
    assert days == pytest.approx([0, 1, 2, 3], abs=1 / 144)
    assert "repeats daily" in sent[1].text() and "days left" in sent[1].text()


def test_expiring_replaces_failing_when_both_apply() -> None:
    c = clock()
    alerts, state = decide(AlertState(), [failed(c, days_left=3)], now(c))
    assert events(alerts) == [EXPIRING]
    assert state.of("a.example.test").reported  # so the recovery is reported
    c.advance(3600)
    alerts, state = decide(state, [ok(c)], now(c))
    assert events(alerts) == [RECOVERED]


def test_no_expiring_alert_while_renewal_works_or_for_a_placeholder() -> None:
    c = clock()
    alerts, _ = decide(AlertState(), [ok(c, days_left=2)], now(c))  # short-lived: fine
    assert alerts == []
    placeholder = attrs.evolve(failed(c, days_left=2), placeholder=True)
    alerts, _ = decide(AlertState(), [placeholder], now(c))
    assert events(alerts) == [FAILING] and alerts[0].not_after is None


def test_expired_certificate_says_so() -> None:
    c = clock()
    alerts, _ = decide(AlertState(), [failed(c, days_left=-1)], now(c))
    assert events(alerts) == [EXPIRING] and "EXPIRED since" in alerts[0].text()


def test_recovery_follows_a_reported_failure_only() -> None:
    c = clock()
    alerts, state = decide(AlertState(), [failed(c)], now(c))
    c.advance(60)
    alerts, state = decide(state, [ok(c)], now(c))
    assert events(alerts) == [RECOVERED] and alerts[0].error is None
    assert "RECOVERED" in alerts[0].text()
    assert not state.of("a.example.test").reported
    c.advance(60)
    alerts, state = decide(state, [ok(c)], now(c))
    assert alerts == []  # said once


def test_a_fresh_start_without_an_attempt_is_no_recovery() -> None:
    """After a restart the service has not tried yet: failures 0 and no success."""
    c = clock()
    _, state = decide(AlertState(), [failed(c)], now(c))
    fresh = CertificateStatus(key="a.example.test", names=("a.example.test",))
    alerts, state = decide(state, [fresh], now(c))
    assert alerts == [] and state.of("a.example.test").reported


def test_flapping_is_at_most_one_alert_per_kind_per_day_and_the_last_word_is_right() -> None:
    c = clock()
    state = AlertState()
    sent: list[Alert] = []
    for _ in range(12):  # fail, recover, every hour for 12 hours
        alerts, state = decide(state, [failed(c)], now(c))
        sent += alerts
        c.advance(1800)
        alerts, state = decide(state, [ok(c)], now(c))
        sent += alerts
        c.advance(1800)
    assert events(sent) == [FAILING, RECOVERED]
    # Failing again within the day: held back while the day lasts...
    alerts, state = decide(state, [failed(c)], now(c))
    assert alerts == []
    # ...and sent at the first look after 24 h if it still fails.
    c.advance(DAY - 12 * 3600)
    alerts, state = decide(state, [failed(c)], now(c))
    assert events(alerts) == [FAILING]


def test_a_held_back_recovery_is_sent_when_the_day_is_over() -> None:
    c = clock()
    state = AlertState()
    _, state = decide(state, [failed(c)], now(c))
    c.advance(60)
    _, state = decide(state, [ok(c)], now(c))  # recovered (1), at 60 s
    c.advance(DAY - 59)
    alerts, state = decide(state, [failed(c)], now(c))  # failing again, a day later: sent
    assert events(alerts) == [FAILING]
    c.advance(29)
    alerts, state = decide(state, [ok(c)], now(c))  # recovered within a day of (1): held
    assert alerts == [] and state.of("a.example.test").reported
    c.advance(DAY)
    alerts, state = decide(state, [ok(c)], now(c))
    assert events(alerts) == [RECOVERED]


def test_certificates_are_independent_and_removed_ones_are_forgotten() -> None:
    c = clock()
    a, b = "a.example.test", "b.example.test"
    alerts, state = decide(AlertState(), [failed(c, key=a), failed(c, key=b)], now(c))
    assert sorted(x.key for x in alerts) == [a, b]
    alerts, state = decide(state, [failed(c, key=a)], now(c))
    assert alerts == [] and set(state.certificates) == {a}


def test_a_clock_set_back_does_not_silence_alerts_forever() -> None:
    c = clock()
    future = now(c) + datetime.timedelta(days=365)
    state = AlertState({"a.example.test": CertificateAlertState(failing_at=future)})
    alerts, _ = decide(state, [failed(c)], now(c))
    assert events(alerts) == [FAILING]


def test_state_round_trips_and_bad_files_are_errors() -> None:
    c = clock()
    _, state = decide(AlertState(), [failed(c, days_left=3)], now(c))
    assert AlertState.parse(state.dump()) == state
    for bad in (b"[]", b"{}", b"not json", b'{"certificates": {"k": {"failing_at": 3}}}'):
        with pytest.raises(ValueError):
            AlertState.parse(bad)


def test_webhook_json_has_the_documented_fields() -> None:
    c = clock()
    alerts, _ = decide(AlertState(), [failed(c, days_left=3)], now(c))
    body = alerts[0].to_json("host1")
    assert set(body) >= {"event", "name", "names", "error", "error_type", "not_after", "at", "host"}
    assert body["event"] == "expiring" and body["host"] == "host1"
    assert body["not_after"].endswith("Z") and body["names"][0] == body["name"]
