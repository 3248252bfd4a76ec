"""When to tell the operator: the alert policy, pure and clock-driven.

Let's Encrypt no longer sends expiry emails and certificate lifetimes keep shrinking, so a
renewal that fails quietly is the likeliest way a homeserver loses federation. This module
decides, from the frozen :class:`~synapse_acme.status.CertificateStatus` values the service
publishes, which alerts to send; :mod:`synapse_acme.alerter` delivers them.

Three kinds of alert per certificate (:func:`decide`):

- ``failing``: its last attempt failed and no failure has been reported since it last
  succeeded (also when no certificate was ever issued: a homeserver on its placeholder
  cannot federate);
- ``expiring``: its last attempt failed and it expires within ``expiry_window`` (14 days):
  repeated once a day while that lasts. At the moment both apply, only ``expiring`` is sent
  (it says everything ``failing`` would);
- ``recovered``: it was renewed after a reported failure.

Never a flood: at most one alert per (certificate, kind) per :data:`DEBOUNCE` (24 h),
whatever the number of failed attempts or restarts, since the state (:class:`AlertState`)
is kept in a file across restarts. An alert held back by that rule is not lost when its
condition lasts: the next evaluation after the 24 h sends it (so the last word the admins
read always matches the state, a day late at worst when a certificate flaps).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from synapse_acme.status import CertificateStatus, format_time, parse_time

FAILING = "failing"
EXPIRING = "expiring"
RECOVERED = "recovered"
KINDS = (FAILING, EXPIRING, RECOVERED)

#: At most one alert per certificate and kind in this long.
DEBOUNCE = datetime.timedelta(hours=24)
#: ``expiring`` alerts start this many days before expiry (``alerts.expiry_days``).
DEFAULT_EXPIRY_DAYS = 14

#: The largest alert state file read (a few hundred bytes per certificate).
MAX_STATE_FILE = 1024 * 1024


@attrs.frozen
class Alert:
    """One alert about one certificate: what happened, and what the operator needs to act.

    ``key`` is the store key, ``names`` the certificate's names (the first is its primary
    name), ``at`` when it was decided; ``error``/``error_type`` the current failure (None for
    ``recovered``); ``not_after`` when the certificate in use expires (None if there is none);
    ``next_attempt`` the retry in force; ``failures`` attempts failed in a row.
    """

    event: str
    key: str
    names: tuple[str, ...]
    at: datetime.datetime
    error: str | None = None
    error_type: str | None = None
    not_after: datetime.datetime | None = None
    next_attempt: datetime.datetime | None = None
    failures: int = 0

    @property
    def name(self) -> str:
        return self.names[0] if self.names else self.key

    def to_json(self, host: str) -> dict[str, Any]:
        """The webhook's JSON body; ``host`` names the machine that sends it."""
        return {
            "event": self.event,
            "name": self.name,
            "names": list(self.names),
            "error": self.error,
            "error_type": self.error_type,
            "not_after": format_time(self.not_after),
            "at": format_time(self.at),
            "host": host,
            "failures": self.failures,
            "next_attempt": format_time(self.next_attempt),
        }

    def text(self) -> str:
        """The alert as a short message for a human (a Matrix notice, a log line)."""
        names = ", ".join(self.names)
        expiry = _expiry(self.not_after, self.at)
        if self.event == RECOVERED:
            return (
                f"synapse-acme: RECOVERED: the TLS certificate for {names} was renewed; "
                f"it is {expiry}."
            )
        error = f"{self.error} (error type {self.error_type})"
        retry = ""
        if self.next_attempt is not None:
            retry = f" Next attempt at {format_time(self.next_attempt)}."
        tail = f"{retry} `synapse-acme status` shows the details."
        if self.event == EXPIRING:
            return (
                f"synapse-acme: EXPIRING: the TLS certificate for {names} is {expiry} and "
                f"cannot be renewed: {error}; {self.failures} attempt(s) failed in a row."
                f"{tail} This notice repeats daily until it is renewed."
            )
        serving = f"the certificate in use is {expiry}" if self.not_after else "none was issued yet"
        return (
            f"synapse-acme: FAILING: obtaining the TLS certificate for {names} failed: {error}; "
            f"{serving}.{tail}"
        )


def _expiry(not_after: datetime.datetime | None, now: datetime.datetime) -> str:
    if not_after is None:
        return "missing"
    left = not_after - now
    when = format_time(not_after)
    if left <= datetime.timedelta(0):
        return f"EXPIRED since {when}"
    if left < datetime.timedelta(days=1):
        return f"valid until {when} (less than a day left)"
    return f"valid until {when} ({left.days} days left)"


@attrs.frozen
class CertificateAlertState:
    """What was told about one certificate: ``reported`` (a failure was reported and its
    recovery not yet), and when each kind of alert was last sent."""

    reported: bool = False
    failing_at: datetime.datetime | None = None
    expiring_at: datetime.datetime | None = None
    recovered_at: datetime.datetime | None = None

    def sent_at(self, kind: str) -> datetime.datetime | None:
        value: datetime.datetime | None = getattr(self, f"{kind}_at")
        return value

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reported": self.reported}
        for kind in KINDS:
            out[f"{kind}_at"] = format_time(self.sent_at(kind))
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CertificateAlertState:
        if not isinstance(data, Mapping):
            raise ValueError(f"expected an object, got {data!r}")
        return cls(
            reported=bool(data.get("reported", False)),
            **{f"{kind}_at": parse_time(data.get(f"{kind}_at")) for kind in KINDS},
        )


@attrs.frozen
class AlertState:
    """The alert state of every certificate, by store key: kept across restarts
    (``alerts.json`` in the storage directory) so that a crash loop cannot flood."""

    certificates: Mapping[str, CertificateAlertState] = attrs.field(factory=dict)

    def of(self, key: str) -> CertificateAlertState:
        return self.certificates.get(key, CertificateAlertState())

    def dump(self) -> bytes:
        data = {key: state.to_json() for key, state in sorted(self.certificates.items())}
        return json.dumps({"certificates": data}, indent=2).encode("utf-8")

    @classmethod
    def parse(cls, data: bytes) -> AlertState:
        """The inverse of :meth:`dump`; ValueError if ``data`` is not one."""
        doc = json.loads(data)
        if not isinstance(doc, Mapping) or not isinstance(doc.get("certificates"), Mapping):
            raise ValueError("expected an object with a 'certificates' object")
        return cls(
            {
                str(key): CertificateAlertState.from_json(value)
                for key, value in doc["certificates"].items()
            }
        )


def decide(
    state: AlertState,
    statuses: Sequence[CertificateStatus],
    now: datetime.datetime,
    *,
    expiry_window: datetime.timedelta = datetime.timedelta(days=DEFAULT_EXPIRY_DAYS),
    debounce: datetime.timedelta = DEBOUNCE,
) -> tuple[list[Alert], AlertState]:
    """The alerts to send now, and the state after sending them (see the module docstring).

    Pure: the same arguments give the same answer. Certificates no longer in ``statuses``
    drop out of the state.
    """
    alerts: list[Alert] = []
    after: dict[str, CertificateAlertState] = {}
    for status in statuses:
        before = state.of(status.key)
        alert, after[status.key] = _decide_one(before, status, now, expiry_window, debounce)
        if alert is not None:
            alerts.append(alert)
    return alerts, AlertState(after)


def _decide_one(
    st: CertificateAlertState,
    s: CertificateStatus,
    now: datetime.datetime,
    expiry_window: datetime.timedelta,
    debounce: datetime.timedelta,
) -> tuple[Alert | None, CertificateAlertState]:
    def allowed(kind: str) -> bool:
        last = st.sent_at(kind)
        # A time ahead of the clock (the clock was set back) must not silence alerts forever.
        return last is None or not (now - debounce < last <= now)

    def alert(kind: str) -> Alert:
        usable = s.has_certificate and not s.placeholder
        return Alert(
            event=kind,
            key=s.key,
            names=s.names,
            at=now,
            error=s.last_error if kind != RECOVERED else None,
            error_type=s.last_error_type if kind != RECOVERED else None,
            not_after=s.not_after if usable else None,
            next_attempt=s.next_attempt if kind != RECOVERED else None,
            failures=s.failures,
        )

    failed = s.failures > 0 and s.last_error is not None
    if failed:
        expiring = (
            s.has_certificate
            and not s.placeholder
            and s.not_after is not None
            and s.not_after - now <= expiry_window
        )
        if expiring and allowed(EXPIRING):
            return alert(EXPIRING), attrs.evolve(st, reported=True, expiring_at=now)
        if not st.reported and allowed(FAILING):
            return alert(FAILING), attrs.evolve(st, reported=True, failing_at=now)
        return None, st
    if st.reported and s.failures == 0 and s.last_success is not None:
        if allowed(RECOVERED):
            return alert(RECOVERED), attrs.evolve(st, reported=False, recovered_at=now)
    return None, st


__all__ = [
    "DEBOUNCE",
    "DEFAULT_EXPIRY_DAYS",
    "EXPIRING",
    "FAILING",
    "KINDS",
    "MAX_STATE_FILE",
    "RECOVERED",
    "Alert",
    "AlertState",
    "CertificateAlertState",
    "decide",
]
