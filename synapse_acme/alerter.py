"""Delivers the alerts that :mod:`synapse_acme.alerts` decides on, and remembers what it told.

The :class:`Alerter` receives every published status (it wraps the service's ``on_status``)
and, once an hour, looks again at the last one (an ``expiring`` alert repeats daily even when
nothing changes). Each alert is logged (WARNING; INFO for ``recovered``) and handed to every
:class:`~synapse_acme.interfaces.IAlertSink`; a sink that fails is logged and never stops the
service or the other sinks.

The state (what was sent when) is written to ``alerts.json`` in the storage directory
*before* the alert is delivered: at most once rather than at least once, so that a process
that crashes while delivering cannot send the same alert again at each restart.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from synapse_acme import crypto, fsutil
from synapse_acme.alerts import (
    DEBOUNCE,
    MAX_STATE_FILE,
    RECOVERED,
    Alert,
    AlertState,
    decide,
)
from synapse_acme.errors import SynapseAcmeError
from synapse_acme.interfaces import IAlertSink
from synapse_acme.status import CertificateStatus
from synapse_acme.threaded import Runner

logger = logging.getLogger(__name__)

#: How often the last status is looked at again without a change.
RECHECK_SECONDS = 3600.0
STATE_FILE = "alerts.json"


class Alerter(Service):
    """Decides and delivers alerts for the statuses it is given.

    ``clock`` is the only source of time; ``sinks`` receive each alert (more with
    :meth:`add_sink`); ``state_path`` is where the alert state is kept between runs (None:
    in memory only); ``expiry_days`` starts ``expiring`` alerts; ``runner``, when given, does
    the state file's writes (off a homeserver's reactor thread, see synapse_acme.threaded);
    ``recheck`` is the interval of the periodic look.
    """

    def __init__(
        self,
        clock: IReactorTime,
        sinks: Sequence[IAlertSink] = (),
        *,
        state_path: str | None = None,
        expiry_days: float = 14,
        runner: Runner | None = None,
        recheck: float = RECHECK_SECONDS,
    ) -> None:
        self._clock = clock
        self._sinks: list[IAlertSink] = list(sinks)
        self._state_path = state_path
        self._expiry_window = datetime.timedelta(days=expiry_days)
        self._runner = runner
        self._recheck = recheck
        self._statuses: list[CertificateStatus] | None = None
        self._state = self._load_state()
        self._timer: IDelayedCall | None = None
        self._deliveries: set[defer.Deferred[Any]] = set()
        #: Every alert sent, in order (for status and tests).
        self.sent: list[Alert] = []

    def add_sink(self, sink: IAlertSink) -> None:
        self._sinks.append(sink)

    @property
    def sinks(self) -> list[IAlertSink]:
        return list(self._sinks)

    def statuses_changed(self, statuses: list[CertificateStatus]) -> None:
        """The service's newest statuses (its ``on_status``); never raises. Kept without a
        decision while stopped (the service publishes its last status as it stops)."""
        self._statuses = list(statuses)
        if self.running:
            self._evaluate()

    def startService(self) -> None:
        super().startService()
        where = ", ".join(s.describe() for s in self._sinks) or "only this log"
        logger.info("Certificate alerts (failing, expiring, recovered) go to %s", where)
        self._timer = self._clock.callLater(self._recheck, self._tick)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        pending = list(self._deliveries)
        for d in pending:
            d.cancel()
        return defer.DeferredList(pending, consumeErrors=True).addCallback(lambda _: None)

    # -- internals ----------------------------------------------------------------------------

    def _tick(self) -> None:
        self._timer = self._clock.callLater(self._recheck, self._tick)
        self._evaluate()

    def _evaluate(self) -> None:
        if self._statuses is None:
            return
        try:
            alerts, state = decide(
                self._state,
                self._statuses,
                crypto.now_from_clock(self._clock),
                expiry_window=self._expiry_window,
                debounce=DEBOUNCE,
            )
        except Exception:
            logger.exception("Could not evaluate the certificate alerts")
            return
        if state != self._state:
            self._state = state
            self._save_state(state)
        for alert in alerts:
            self._send(alert)

    def _send(self, alert: Alert) -> None:
        self.sent.append(alert)
        level = logging.INFO if alert.event == RECOVERED else logging.WARNING
        logger.log(level, "Alert (%s): %s", alert.event, alert.text())
        for sink in self._sinks:
            try:
                d = sink.deliver(alert)
            except Exception as e:
                self._failed(Failure(e), sink, alert)
                continue
            self._deliveries.add(d)
            d.addErrback(self._failed, sink, alert)
            d.addBoth(self._done, d)

    def _done(self, result: object, d: defer.Deferred[Any]) -> None:
        self._deliveries.discard(d)

    def _failed(self, failure: Failure, sink: IAlertSink, alert: Alert) -> None:
        if failure.check(defer.CancelledError) and not self.running:
            return
        logger.error(
            "Could not deliver the %s alert for %s to %s: %s",
            alert.event,
            alert.name,
            sink.describe(),
            failure.getErrorMessage(),
            exc_info=None if isinstance(failure.value, SynapseAcmeError) else failure.value,
        )

    def _load_state(self) -> AlertState:
        if self._state_path is None:
            return AlertState()
        try:
            data = fsutil.read_regular(self._state_path, limit=MAX_STATE_FILE)
            return AlertState.parse(data) if data is not None else AlertState()
        except (SynapseAcmeError, ValueError) as e:
            logger.warning(
                "Cannot read the alert state %s (%s); starting afresh", self._state_path, e
            )
            return AlertState()

    def _save_state(self, state: AlertState) -> None:
        path = self._state_path
        if path is None:
            return
        data = state.dump()
        if self._runner is None:
            try:
                fsutil.atomic_write(path, data, fsutil.PRIVATE_FILE_MODE)
            except SynapseAcmeError as e:
                logger.error("Could not write the alert state: %s", e)
            return
        self._runner(fsutil.atomic_write, path, data, fsutil.PRIVATE_FILE_MODE).addErrback(
            lambda f: logger.error("Could not write the alert state: %s", f.getErrorMessage())
        )


__all__ = ["RECHECK_SECONDS", "STATE_FILE", "Alerter"]
