"""The webhook alert sink: each alert POSTed as JSON to ``alert_webhook``.

Body (``Content-Type: application/json``)::

    {"event": "failing", "name": "example.org", "names": ["example.org"],
     "error": "...", "error_type": "rateLimited", "not_after": "2026-12-31T12:00:00Z",
     "at": "2026-12-20T08:00:00Z", "host": "matrix1", "failures": 3,
     "next_attempt": "2026-12-20T08:10:00Z"}

Any 2xx answer is a delivery. No answer within ``timeout`` seconds, a connection error, a
429 or a 5xx is retried after ``backoff`` (1 s, then 5 s: three attempts in all); any other
answer fails at once. It never blocks the reactor and never raises into the service: the
:class:`~synapse_acme.alerter.Alerter` logs a delivery that failed. The URL's path and query
may hold a token (Slack, Matrix hookshot), so messages name only its scheme, host and port.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Sequence

import attrs
import treq
from treq.client import HTTPClient
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from zope.interface import implementer

from synapse_acme.alerts import Alert
from synapse_acme.errors import SynapseAcmeError
from synapse_acme.interfaces import IAlertSink, IReactor

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
#: Waits before the second and the third attempt.
DEFAULT_BACKOFF: tuple[float, ...] = (1.0, 5.0)
#: How much of an error answer's body is kept for the log line.
_ERROR_BODY_BYTES = 200


class WebhookError(SynapseAcmeError):
    """The webhook did not accept an alert (its answer, or the transport error)."""


def public_part(url: str) -> str:
    """``scheme://host[:port]`` of ``url``: what log lines may show of a webhook URL."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}/..."


def make_webhook_client(reactor: IReactor) -> HTTPClient:
    """A treq client with the system's trust store and no kept-alive connections (an alert
    is rare: nothing to keep open)."""
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


@implementer(IAlertSink)
@attrs.define(eq=False)
class WebhookSink:
    """POSTs each alert to ``url`` through ``http`` (a treq client), timed on ``clock``;
    ``host`` is put in each body (the sending machine's name)."""

    url: str = attrs.field(repr=False)
    http: HTTPClient
    clock: IReactorTime
    host: str
    timeout: float = DEFAULT_TIMEOUT
    backoff: Sequence[float] = DEFAULT_BACKOFF

    def describe(self) -> str:
        return f"the webhook {public_part(self.url)}"

    def deliver(self, alert: Alert) -> defer.Deferred[None]:
        stop = _Stop()
        work = defer.Deferred.fromCoroutine(self._deliver(alert, stop))

        def cancel(_: defer.Deferred[None]) -> None:
            stop.cancelled = True
            work.cancel()

        result: defer.Deferred[None] = defer.Deferred(cancel)
        work.addBoth(lambda outcome: None if result.called else result.callback(outcome))
        return result

    async def _deliver(self, alert: Alert, stop: _Stop) -> None:
        body = json.dumps(alert.to_json(self.host)).encode("utf-8")
        waits = list(self.backoff)
        while True:
            try:
                await self._post(body, stop)
                return
            except _Retryable as e:
                if not waits:
                    raise WebhookError(f"{self.describe()}: {e} (gave up after retries)") from None
                delay = waits.pop(0)
                logger.info("%s: %s; retrying in %g s", self.describe(), e, delay)
                try:
                    await task.deferLater(self.clock, delay, lambda: None)
                except Exception:
                    if stop.cancelled:
                        raise defer.CancelledError() from None
                    raise

    async def _post(self, body: bytes, stop: _Stop) -> None:
        """One attempt, within ``timeout`` from the request to the last byte of the answer."""
        kept: list[bytes] = []
        size = [0]
        timed_out = [False]

        def keep(chunk: bytes) -> None:
            if size[0] < _ERROR_BODY_BYTES:
                kept.append(chunk[: _ERROR_BODY_BYTES - size[0]])
            size[0] += len(chunk)

        async def post() -> int:
            response = await self.http.post(
                self.url,
                data=body,
                headers=Headers({b"Content-Type": [b"application/json"]}),
            )
            await treq.collect(response, keep)
            return int(response.code)

        attempt = defer.Deferred.fromCoroutine(post())

        def expire() -> None:
            timed_out[0] = True
            attempt.cancel()

        deadline = self.clock.callLater(self.timeout, expire)
        try:
            code = await attempt
        except Exception as e:  # refused, TLS, DNS, cancelled by the deadline or by stop
            if stop.cancelled:
                raise defer.CancelledError() from None
            if timed_out[0]:
                raise _Retryable(f"no answer within {self.timeout:g} s") from None
            raise _Retryable(f"{type(e).__name__}: {e}") from None
        finally:
            if deadline.active():
                deadline.cancel()
        if 200 <= code < 300:
            return
        text = b"".join(kept).decode("utf-8", "replace").strip()
        message = f"HTTP {code}" + (f": {text}" if text else "")
        if code == 429 or code >= 500:
            raise _Retryable(message)
        raise WebhookError(f"{self.describe()}: {message}")


class _Stop:
    """Set when the caller cancelled the delivery: nothing is retried after that."""

    cancelled = False


class _Retryable(Exception):
    pass


__all__ = [
    "DEFAULT_BACKOFF",
    "DEFAULT_TIMEOUT",
    "WebhookError",
    "WebhookSink",
    "make_webhook_client",
    "public_part",
]
