"""When to renew and how long to wait after a failure: pure decisions, no Twisted, no I/O.

Every input (times, randomness) comes in as an argument so the rules are table-testable.
The defaults follow what the best ACME clients agree on (certmagic, RFC 9773 ARI):

* ARI window offered by the CA: renew at a uniformly random moment inside it.
* Otherwise renew with 1/3 of the lifetime left (90-day cert: 30 days before expiry),
  or 1/2 for short-lived certificates (under 10 days: a 6-day cert renews with 3 days left),
  so a CA outage of a day or two never lets a short certificate expire.
* Synapse's ``reprovision_threshold`` only *caps* how early we renew: it never forces
  re-issuing a fresh short-lived certificate on every check.
* Whatever the plan, a certificate in its last 1/12 of life (or expired) renews now.
"""

from __future__ import annotations

import datetime
import random

from synapse_acme.errors import (
    AcmeError,
    AcmeProtocolError,
    ChallengeFailed,
    ConfigError,
)

# Lifetime fraction left at renewal time when the CA gives no ARI window.
RENEW_FRACTION_LEFT = 1 / 3
# Certificates shorter than this renew with half their life left (Let's Encrypt "shortlived").
SHORT_LIVED = datetime.timedelta(days=10)
RENEW_FRACTION_LEFT_SHORT = 1 / 2
# Last resort: with less than this fraction of the lifetime left we renew regardless of any
# ARI window or threshold (a CA's window may be wrong; a certificate must not lapse).
EMERGENCY_FRACTION_LEFT = 1 / 12

# Delay (seconds) before retry number N after N consecutive failures: front-loaded like
# certmagic (quick retries catch transient DNS/network trouble), then hours so a long CA
# outage costs a handful of requests per day. The last entry repeats forever.
BACKOFF_SCHEDULE: tuple[float, ...] = (
    60.0,  # 1 min
    120.0,  # 2 min
    120.0,
    300.0,  # 5 min
    600.0,  # 10 min
    600.0,
    1200.0,  # 20 min
    1800.0,  # 30 min
    3600.0,  # 1 h
    3600.0,
    7200.0,  # 2 h
    10800.0,  # 3 h
    21600.0,  # 6 h: the cap
)
# Retrying a failed export (disk full, a permission fixed by hand) costs nothing at the CA, and
# the homeserver may be about to restart onto the old files: start at seconds, cap at an hour.
EXPORT_RETRY_SCHEDULE: tuple[float, ...] = (
    10.0,
    30.0,
    60.0,  # 1 min
    120.0,
    300.0,  # 5 min
    600.0,
    1800.0,  # 30 min
    3600.0,  # 1 h: the cap
)
# Jitter spreads retries from many servers hitting the same CA outage (+-10%).
BACKOFF_JITTER = 0.1
# A CA's Retry-After is honoured, but a day at most: we ask again and get a fresh answer.
MAX_RETRY_AFTER = 86400.0

Rand = random.Random | float | None


# A global cap on request starts to one CA (one transport) in any 60 s of clock time. Let's
# Encrypt allows 20 requests/s per IP on its API: 1200/min is that rate averaged over a minute.
# It never slows a normal issuance (about a dozen requests), 20 parallel ones through a badNonce
# storm, or 100 certificates at once (~900 requests), yet keeps a bug or a flood of certificates
# from hammering the CA. Requests over the cap wait in order; none is dropped.
MAX_REQUESTS_PER_MINUTE = 1200  # acme.max_requests_per_minute

# One request to the CA, connect to last body byte. Let's Encrypt answers in well under a
# second; a CA that has not answered in 45 s (certbot's default) is not going to.
DEFAULT_REQUEST_TIMEOUT = 45.0  # acme.request_timeout


# -- several CAs (acme.issuers) ----------------------------------------------------------------

# ACME problem types (RFC 8555 section 6.7, RFC 8657) that mean "this CA will not issue this
# certificate to this account", however often it is asked: the next CA is asked at once.
REFUSED_FOR_GOOD: frozenset[str] = frozenset(
    {
        "rejectedIdentifier",  # the CA's policy refuses the name
        "unsupportedIdentifier",
        "caa",  # the domain's CAA records forbid this CA
        "unauthorized",  # at the order: this account may not have these names
        "externalAccountRequired",
        "userActionRequired",  # new terms to accept by hand
        "badPublicKey",
        "badSignatureAlgorithm",
        "badCSR",
        "unsupportedContact",
        "invalidContact",
    }
)
# A CA that fails in a way that may pass (unreachable, rateLimited, a server error, a failed
# validation) is asked again on the service's next attempts (its backoff: 1 min, 2 min, 2 min,
# ...), and the next CA only on this many failures in a row for one certificate: a CA that is
# down for a few minutes keeps its certificates, one that is down for longer hands over after
# about five minutes. A one-shot `issue`/`renew` makes one attempt, so there it is 1.
FALLBACK_AFTER_FAILURES = 3


def refused_for_good(error: BaseException) -> bool:
    """True if ``error`` from one CA means that CA will not issue this certificate (the next
    CA is asked at once): a problem of :data:`REFUSED_FOR_GOOD` for the order (a failed
    challenge only for ``caa`` and ``rejectedIdentifier``: an ``unauthorized`` challenge is
    usually our own answer, which the next CA would refuse too), a setting the CA refuses
    (ConfigError: EAB, terms) or an answer that breaks the protocol or gives an unusable
    chain (AcmeProtocolError). Anything else may pass: it counts towards
    :data:`FALLBACK_AFTER_FAILURES`."""
    if isinstance(error, (ConfigError, AcmeProtocolError)):
        return True
    if isinstance(error, ChallengeFailed):
        return error.error is not None and error.error.code in ("caa", "rejectedIdentifier")
    return isinstance(error, AcmeError) and error.code in REFUSED_FOR_GOOD


def hands_over(error: BaseException, failures_in_a_row: int, budget: int) -> bool:
    """True if the next CA should be asked now, after the current one failed with ``error``
    for the ``failures_in_a_row``-th time in a row for this certificate (``error`` included),
    given a ``budget`` of such failures (:data:`FALLBACK_AFTER_FAILURES`, 1 in one-shot)."""
    return refused_for_good(error) or failures_in_a_row >= budget


def _unit(rand: Rand) -> float:
    """A number in [0, 1): ``rand`` itself if a float, a draw from it if a Random,
    a draw from the stdlib's generator if ``None``."""
    if rand is None:
        return random.random()
    if isinstance(rand, random.Random):
        return rand.random()
    value = float(rand)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"random fraction must be within [0, 1], got {value!r}")
    return value


def _clamp(
    when: datetime.datetime, low: datetime.datetime, high: datetime.datetime
) -> datetime.datetime:
    return max(low, min(when, high))


def renewal_time(
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    *,
    threshold: datetime.timedelta | None = None,
    ari_window: tuple[datetime.datetime, datetime.datetime] | None = None,
    rand: Rand = None,
) -> datetime.datetime:
    """The moment a certificate valid ``[not_before, not_after]`` should be renewed.

    ``ari_window`` (start, end) from the CA wins: a uniformly random time inside it (RFC 9773),
    ``rand`` supplying the randomness (a ``random.Random``, a fraction in [0, 1], or ``None``).
    Otherwise the lifetime rule applies, with ``threshold`` as an upper bound on the lead time:
    ``renew_at = not_after - min(lifetime_lead, threshold)``. The result is always within
    ``[not_before, not_after]``; a time in the past simply means "now".
    """
    if not_after < not_before:
        raise ValueError(f"certificate ends ({not_after}) before it starts ({not_before})")
    if ari_window is not None:
        start, end = ari_window
        if end < start:
            start, end = end, start  # a CA bug; the window is still meaningful
        when = start + (end - start) * _unit(rand)
        return _clamp(when, not_before, not_after)
    lifetime = not_after - not_before
    fraction = RENEW_FRACTION_LEFT_SHORT if lifetime < SHORT_LIVED else RENEW_FRACTION_LEFT
    lead = lifetime * fraction
    if threshold is not None:
        if threshold < datetime.timedelta(0):
            raise ValueError(f"renewal threshold must not be negative, got {threshold}")
        lead = min(lead, threshold)
    return _clamp(not_after - lead, not_before, not_after)


def needs_renewal(
    now: datetime.datetime,
    renew_at: datetime.datetime,
    not_after: datetime.datetime,
    *,
    not_before: datetime.datetime | None = None,
    emergency_fraction: float = EMERGENCY_FRACTION_LEFT,
) -> bool:
    """True if a certificate should be renewed at ``now``.

    Due when ``now`` reached ``renew_at`` or the certificate expired. With ``not_before``
    known, also when less than ``emergency_fraction`` of the lifetime is left (overrides an
    ARI window that ends too late).
    """
    if now >= renew_at or now >= not_after:
        return True
    if not_before is not None and not_after > not_before:
        left = not_after - now
        return left < (not_after - not_before) * emergency_fraction
    return False


def backoff_delay(
    failures: int,
    retry_after: float | None = None,
    rand: Rand = None,
    schedule: tuple[float, ...] = BACKOFF_SCHEDULE,
) -> float:
    """Seconds to wait after ``failures`` consecutive failures (0 if none).

    The ``schedule`` step (:data:`BACKOFF_SCHEDULE` for the CA, :data:`EXPORT_RETRY_SCHEDULE`
    for exports) with +-10% jitter (``rand`` 0.5 means none), but never less than the CA's
    ``retry_after`` (capped at :data:`MAX_RETRY_AFTER`).
    """
    if failures < 0:
        raise ValueError(f"failures must not be negative, got {failures}")
    if failures == 0:
        base = 0.0
    else:
        step = schedule[min(failures, len(schedule)) - 1]
        base = step * (1.0 + BACKOFF_JITTER * (2.0 * _unit(rand) - 1.0))
    if retry_after is not None and retry_after > 0:
        base = max(base, min(float(retry_after), MAX_RETRY_AFTER))
    return base


def next_check_delay(interval: float, jitter_fraction: float, rand: Rand = None) -> float:
    """Seconds until the next periodic check: ``interval`` +- ``jitter_fraction`` of it.

    Jitter keeps many servers started together from checking (and renewing) in lockstep.
    ``rand`` 0.5 means no jitter. Never below 1 second, so a bad value cannot spin.
    """
    if interval <= 0:
        raise ValueError(f"check interval must be positive, got {interval!r}")
    if not 0.0 <= jitter_fraction < 1.0:
        raise ValueError(f"jitter fraction must be within [0, 1), got {jitter_fraction!r}")
    delay = interval * (1.0 + jitter_fraction * (2.0 * _unit(rand) - 1.0))
    return max(1.0, delay)
