"""Renewal timing and backoff: table tests plus a few hypothesis invariants."""

from __future__ import annotations

import datetime
import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from synapse_acme import policy

UTC = datetime.timezone.utc
T0 = datetime.datetime(2026, 1, 1, tzinfo=UTC)
DAY = datetime.timedelta(days=1)
HOUR = datetime.timedelta(hours=1)


def days(n: float) -> datetime.timedelta:
    return datetime.timedelta(days=n)


@pytest.mark.parametrize(
    ("lifetime_days", "threshold_days", "renew_after_days"),
    [
        (90, None, 60),  # 1/3 left: 30 days before expiry
        (90, 30, 60),  # Synapse's default threshold agrees with the rule
        (90, 10, 80),  # a smaller threshold renews later
        (90, 60, 60),  # a larger threshold never renews earlier than the rule
        (45, None, 30),  # Let's Encrypt's new default
        (45, 30, 30),  # threshold 30 must not make a 45-day cert renew after 15 days
        (6, None, 3),  # shortlived: half the lifetime left
        (6, 30, 3),  # threshold 30 days does not force renewal of a fresh 6-day cert
        (9.9, None, 4.95),  # still short-lived
        (10, None, 10 * 2 / 3),  # 10 days is no longer short-lived
        (90, 0, 90),  # threshold 0: at expiry (the emergency rule catches it earlier)
    ],
)
def test_renewal_time_table(
    lifetime_days: float, threshold_days: float | None, renew_after_days: float
) -> None:
    nb = T0
    na = T0 + days(lifetime_days)
    threshold = days(threshold_days) if threshold_days is not None else None
    got = policy.renewal_time(nb, na, threshold=threshold, rand=0.0)
    assert abs(got - (nb + days(renew_after_days))) < datetime.timedelta(seconds=1)


def test_fresh_short_lived_cert_is_not_due_with_threshold() -> None:
    na = T0 + days(6)
    renew_at = policy.renewal_time(T0, na, threshold=days(30))
    for hours_in in (0, 1, 24, 71):
        now = T0 + HOUR * hours_in
        assert not policy.needs_renewal(now, renew_at, na, not_before=T0)
    assert policy.needs_renewal(T0 + HOUR * 72, renew_at, na, not_before=T0)


def test_ari_window_is_respected_and_random_within() -> None:
    nb, na = T0, T0 + days(90)
    start, end = T0 + days(50), T0 + days(52)
    rng = random.Random(4)
    picks = [
        policy.renewal_time(nb, na, threshold=days(30), ari_window=(start, end), rand=rng)
        for _ in range(200)
    ]
    assert all(start <= p <= end for p in picks)
    # actually spread over the window, not a fixed point
    assert max(picks) - min(picks) > days(1.5)
    assert policy.renewal_time(nb, na, ari_window=(start, end), rand=0.0) == start
    assert policy.renewal_time(nb, na, ari_window=(start, end), rand=1.0) == end
    assert policy.renewal_time(nb, na, ari_window=(start, end), rand=0.5) == start + DAY


def test_ari_window_overrides_threshold_and_lifetime_rule() -> None:
    """A CA asking for early renewal (e.g. before revocation) is obeyed, even right now."""
    nb, na = T0, T0 + days(90)
    early = (T0 + HOUR, T0 + 2 * HOUR)
    got = policy.renewal_time(nb, na, threshold=days(1), ari_window=early, rand=0.5)
    assert got == T0 + 1.5 * HOUR


def test_ari_window_outside_validity_is_clamped() -> None:
    nb, na = T0, T0 + days(90)
    assert policy.renewal_time(nb, na, ari_window=(na + DAY, na + 2 * DAY), rand=0.3) == na
    assert policy.renewal_time(nb, na, ari_window=(nb - 2 * DAY, nb - DAY), rand=0.3) == nb


def test_expired_cert_needs_renewal_now() -> None:
    na = T0 + days(90)
    far_future_plan = na + days(10)  # whatever the plan says
    assert policy.needs_renewal(na, far_future_plan, na)
    assert policy.needs_renewal(na + DAY, far_future_plan, na)


def test_emergency_overrides_a_late_plan() -> None:
    nb, na = T0, T0 + days(90)
    late_plan = na - HOUR  # e.g. an ARI window at the very end
    assert not policy.needs_renewal(na - days(8), late_plan, na, not_before=nb)
    assert policy.needs_renewal(na - days(7), late_plan, na, not_before=nb)  # < 7.5 days left
    # without not_before there is no lifetime to compare to: only the plan and expiry count
    assert not policy.needs_renewal(na - days(7), late_plan, na)


def test_due_exactly_at_renew_at() -> None:
    na = T0 + days(90)
    renew_at = policy.renewal_time(T0, na)
    assert not policy.needs_renewal(renew_at - datetime.timedelta(seconds=1), renew_at, na)
    assert policy.needs_renewal(renew_at, renew_at, na)


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError):
        policy.renewal_time(T0, T0 - DAY)
    with pytest.raises(ValueError):
        policy.renewal_time(T0, T0 + DAY, threshold=-DAY)
    with pytest.raises(ValueError):
        policy.renewal_time(T0, T0 + DAY, ari_window=(T0, T0), rand=1.5)
    with pytest.raises(ValueError):
        policy.backoff_delay(-1)
    with pytest.raises(ValueError):
        policy.next_check_delay(0, 0.1, 0.5)
    with pytest.raises(ValueError):
        policy.next_check_delay(600, 1.0, 0.5)


# -- backoff ---------------------------------------------------------------------------------


def test_backoff_schedule_is_front_loaded_monotone_and_capped() -> None:
    s = policy.BACKOFF_SCHEDULE
    assert s[0] == 60.0
    assert all(a <= b for a, b in itertools.pairwise(s))
    assert s[-1] == 6 * 3600.0
    # minutes first: the first five retries happen within 20 minutes
    assert sum(s[:5]) <= 20 * 60


def test_backoff_delay_follows_table_without_jitter() -> None:
    for n, step in enumerate(policy.BACKOFF_SCHEDULE, start=1):
        assert policy.backoff_delay(n, None, 0.5) == step
    assert policy.backoff_delay(0, None, 0.5) == 0.0
    assert policy.backoff_delay(100, None, 0.5) == policy.BACKOFF_SCHEDULE[-1]
    assert policy.backoff_delay(10_000, None, 0.5) == 6 * 3600.0


def test_backoff_jitter_is_small() -> None:
    rng = random.Random(1)
    for n in (1, 5, 13, 50):
        step = policy.BACKOFF_SCHEDULE[min(n, len(policy.BACKOFF_SCHEDULE)) - 1]
        values = [policy.backoff_delay(n, None, rng) for _ in range(100)]
        assert all(step * 0.9 <= v <= step * 1.1 for v in values)
        assert len(set(values)) > 1
    assert policy.backoff_delay(1, None, 0.0) == 54.0
    assert policy.backoff_delay(1, None, 1.0) == 66.0


def test_retry_after_is_honoured_and_capped() -> None:
    assert policy.backoff_delay(1, 7200.0, 0.5) == 7200.0  # longer than the table: wins
    assert policy.backoff_delay(13, 5.0, 0.5) == 21600.0  # shorter: the table wins
    assert policy.backoff_delay(0, 30.0, 0.5) == 30.0  # even with no failure counted
    assert policy.backoff_delay(1, 30 * 86400.0, 0.5) == policy.MAX_RETRY_AFTER
    assert policy.backoff_delay(1, -5.0, 0.5) == 60.0  # nonsense is ignored
    # Retry-After is not jittered below itself
    assert policy.backoff_delay(1, 7200.0, 0.0) == 7200.0


def test_a_day_of_failures_costs_few_attempts() -> None:
    t, n = 0.0, 0
    while t < 86400:
        n += 1
        t += policy.backoff_delay(n, None, 0.5)
    assert 15 <= n <= 25


def test_next_check_delay() -> None:
    assert policy.next_check_delay(600, 0.1, 0.5) == 600
    assert policy.next_check_delay(600, 0.1, 0.0) == 540
    assert policy.next_check_delay(600, 0.1, 1.0) == 660
    assert policy.next_check_delay(600, 0.0, random.Random(3)) == 600
    rng = random.Random(7)
    values = [policy.next_check_delay(600, 0.2, rng) for _ in range(100)]
    assert all(480 <= v <= 720 for v in values) and len(set(values)) > 50
    assert policy.next_check_delay(0.01, 0.5, 0.0) == 1.0


# -- invariants ------------------------------------------------------------------------------

_times = st.datetimes(
    min_value=datetime.datetime(2000, 1, 1),
    max_value=datetime.datetime(2100, 1, 1),
    timezones=st.just(UTC),
)
_durations = st.timedeltas(min_value=datetime.timedelta(0), max_value=days(3650))


@given(
    nb=_times,
    life=_durations,
    threshold=st.none() | _durations,
    window=st.none() | st.tuples(_times, _times),
    r=st.floats(min_value=0.0, max_value=1.0),
)
def test_renew_at_always_within_validity(
    nb: datetime.datetime,
    life: datetime.timedelta,
    threshold: datetime.timedelta | None,
    window: tuple[datetime.datetime, datetime.datetime] | None,
    r: float,
) -> None:
    na = nb + life
    got = policy.renewal_time(nb, na, threshold=threshold, ari_window=window, rand=r)
    assert nb <= got <= na
    if window is None:
        # never earlier than the lifetime rule would have it
        rule = policy.renewal_time(nb, na)
        assert got >= rule
        if threshold is not None:
            assert got >= na - threshold


@given(nb=_times, life=_durations, threshold=st.none() | _durations)
def test_not_due_right_after_issuance_unless_tiny(
    nb: datetime.datetime, life: datetime.timedelta, threshold: datetime.timedelta | None
) -> None:
    """A freshly issued certificate (one second old) is never due unless the plan says 'now'."""
    na = nb + life
    renew_at = policy.renewal_time(nb, na, threshold=threshold)
    now = nb + datetime.timedelta(seconds=1)
    if renew_at > now and na - now >= life * policy.EMERGENCY_FRACTION_LEFT:
        assert not policy.needs_renewal(now, renew_at, na, not_before=nb)


@given(
    failures=st.integers(min_value=1, max_value=10_000),
    retry_after=st.none() | st.floats(min_value=0, max_value=1e9),
    r=st.floats(min_value=0.0, max_value=1.0),
)
def test_backoff_is_bounded(failures: int, retry_after: float | None, r: float) -> None:
    got = policy.backoff_delay(failures, retry_after, r)
    assert 60 * 0.9 <= got <= max(6 * 3600 * 1.1, policy.MAX_RETRY_AFTER)
    if retry_after is not None:
        assert got >= min(retry_after, policy.MAX_RETRY_AFTER)
