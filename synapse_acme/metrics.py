"""Prometheus metrics: what an operator's monitoring reads to be told in time.

Two kinds, kept apart on purpose:

- **Gauges are computed at scrape time** from the frozen
  :class:`~synapse_acme.status.CertificateStatus` values (``Runtime.status()``: stored, served,
  next renewal, last failure), so a gauge can never be stale:
  there is nothing to update and nothing to forget to update.
- **Counters are counted at their source** through small callbacks handed to the parts that see
  the event: the ACME transport (one count per answer of the CA), the HTTP-01 answer function
  (hit or miss), the hot-swapping TLS creator (each swap) and the provisioning service (each
  issuance's result). The ACME layer imports nothing from here: it gets a plain callable.

One :class:`AcmeMetrics` per runtime is one prometheus_client collector. The standalone
runner serves it from its own :class:`~prometheus_client.CollectorRegistry` on ``metrics_listen``
(so several runtimes in one process, as in tests, never collide); inside Synapse it is added to
``prometheus_client``'s global ``REGISTRY``, which Synapse's ``metrics`` listener serves, while
the runtime runs (:class:`RegistryMembership`). Synapse serves that listener from a thread of its
own: the collector then reads the status on the reactor thread (:class:`ReactorThreadCollector`).

Counters are plain integers in this object rather than prometheus_client ``Counter`` objects:
no ``_created`` series, and nothing registered globally at import. Every method that counts is
called on the reactor thread; a scrape copies the counts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python import threadable
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from synapse_acme.status import CertificateStatus

if TYPE_CHECKING:
    # prometheus_client is imported where a collection or a registry needs it: a one-shot
    # command (`synapse-acme issue`) counts but never exports, and skips its import.
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, Metric

logger = logging.getLogger(__name__)

PREFIX = "synapse_acme_"

#: The ``endpoint`` label of ``synapse_acme_ca_requests_total``: the kind of ACME resource
#: requested (the directory's names, and the per-order resources), never a URL, so the label
#: stays low-cardinality. Anything else is counted as ``other``.
CA_ENDPOINTS = frozenset(
    {
        "directory",
        "newNonce",
        "newAccount",
        "newOrder",
        "order",
        "authorization",
        "challenge",
        "finalize",
        "certificate",
        "renewalInfo",
        "revokeCert",
        "keyChange",
        "other",
    }
)
#: The ``status`` label of a CA request that got no HTTP answer (timeout, refused, TLS failure).
NO_ANSWER = "error"
#: How long a scrape from another thread waits for the reactor to read the status.
REACTOR_WAIT = 5.0

#: Every metric this module exports: name -> (type, help). The dashboard and the alert rules
#: in contrib/prometheus/ may use only these (tests/unit/test_metrics.py checks them).
METRICS: dict[str, tuple[str, str]] = {
    "synapse_acme_certificate_not_after_seconds": (
        "gauge",
        "Unix time when the stored certificate expires.",
    ),
    "synapse_acme_served_not_after_seconds": (
        "gauge",
        "Unix time when the certificate the TLS listeners serve now expires.",
    ),
    "synapse_acme_next_renewal_seconds": (
        "gauge",
        "Unix time of the next renewal attempt: the retry in force after a failure, else the "
        "planned renewal (ARI window or policy).",
    ),
    "synapse_acme_last_failure_timestamp_seconds": (
        "gauge",
        "Unix time when the last failed issuance attempt started.",
    ),
    "synapse_acme_consecutive_failures": (
        "gauge",
        "Failed issuance attempts in a row (0 after a success).",
    ),
    "synapse_acme_certificate_placeholder": (
        "gauge",
        "1 while the stored certificate is the self-signed placeholder written at first start.",
    ),
    "synapse_acme_issuance_total": (
        "counter",
        "Issuance attempts by result (success, failure).",
    ),
    "synapse_acme_ca_requests_total": (
        "counter",
        "Answers from the ACME CA by resource kind and HTTP status (error: no answer).",
    ),
    "synapse_acme_challenge_requests_total": (
        "counter",
        "Requests to /.well-known/acme-challenge/ by result (hit: a token was answered).",
    ),
    "synapse_acme_tls_swaps_total": (
        "counter",
        "Certificates swapped into the running TLS listeners (the first install included).",
    ),
}


def _seconds(value: Any) -> float | None:
    return value.timestamp() if value is not None else None


class AcmeMetrics:
    """The metrics of one runtime: a prometheus_client collector (``collect``/``describe``).

    ``status`` returns every managed certificate's status now (``Runtime.status``); it can be
    set after construction (:attr:`status_source`), since the runtime is built after the parts
    that count. ``name`` in every gauge is the certificate's primary name (its first name).
    """

    def __init__(self, status: Callable[[], Sequence[CertificateStatus]] | None = None) -> None:
        self.status_source = status
        self._issuance = {"success": 0, "failure": 0}
        self._challenges = {"hit": 0, "miss": 0}
        self._ca: dict[tuple[str, str], int] = {}
        self._swaps = 0

    # -- counting (reactor thread) --------------------------------------------------------------

    def ca_response(self, endpoint: str, status: int | None) -> None:
        """One answer of the CA (``status`` None: none came). For the transport's observer."""
        label = endpoint if endpoint in CA_ENDPOINTS else "other"
        key = (label, str(status) if status is not None else NO_ANSWER)
        self._ca[key] = self._ca.get(key, 0) + 1

    def challenge_request(self, hit: bool) -> None:
        """One request under ``/.well-known/acme-challenge/``: answered with a token or not."""
        self._challenges["hit" if hit else "miss"] += 1

    def tls_swapped(self) -> None:
        """The TLS creator now serves a new set of certificates."""
        self._swaps += 1

    def issuance_finished(self, key: str, success: bool) -> None:
        """One issuance attempt for the certificate ``key`` ended."""
        self._issuance["success" if success else "failure"] += 1

    # -- the collector ----------------------------------------------------------------------

    def describe(self) -> list[Metric]:
        """The families without samples: what registering checks for duplicate names
        (without reading the status)."""
        return [*self._gauges([]), *self._counters(with_counts=False)]

    def collect(self) -> list[Metric]:
        statuses: Sequence[CertificateStatus] = []
        if self.status_source is not None:
            try:
                statuses = self.status_source()
            except Exception:
                logger.exception("metrics: could not read the certificate status")
        return [*self._gauges(statuses), *self._counters()]

    def collect_counters(self) -> list[Metric]:
        """Only the counters (safe to read from any thread): what a scrape gets when the
        status cannot be read in time."""
        return self._counters()

    def _gauges(self, statuses: Sequence[CertificateStatus]) -> list[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        gauges = {
            name: GaugeMetricFamily(name, doc, labels=["name"])
            for name, (kind, doc) in METRICS.items()
            if kind == "gauge"
        }
        for status in statuses:
            name = status.names[0] if status.names else status.key
            stored = status.has_certificate
            values = {
                "synapse_acme_certificate_not_after_seconds": (
                    _seconds(status.not_after) if stored else None
                ),
                "synapse_acme_served_not_after_seconds": _seconds(status.served_not_after),
                "synapse_acme_next_renewal_seconds": _seconds(
                    status.next_attempt if status.next_attempt is not None else status.renew_at
                ),
                "synapse_acme_last_failure_timestamp_seconds": _seconds(status.last_failure),
                "synapse_acme_consecutive_failures": float(status.failures),
                "synapse_acme_certificate_placeholder": (
                    float(status.placeholder) if stored else None
                ),
            }
            for metric, value in values.items():
                if value is not None:
                    gauges[metric].add_metric([name], value)
        return list(gauges.values())

    def _counters(self, with_counts: bool = True) -> list[Metric]:
        from prometheus_client.core import CounterMetricFamily

        def family(metric: str, labels: list[str]) -> CounterMetricFamily:
            # prometheus_client adds the _total suffix to a counter's samples itself.
            return CounterMetricFamily(
                metric.removesuffix("_total"), METRICS[metric][1], labels=labels
            )

        issuance = family("synapse_acme_issuance_total", ["result"])
        ca = family("synapse_acme_ca_requests_total", ["endpoint", "status"])
        challenges = family("synapse_acme_challenge_requests_total", ["result"])
        swaps = family("synapse_acme_tls_swaps_total", [])
        if with_counts:
            for result, count in list(self._issuance.items()):
                issuance.add_metric([result], count)
            for (endpoint, status), count in sorted(self._ca.items()):
                ca.add_metric([endpoint, status], count)
            for result, count in list(self._challenges.items()):
                challenges.add_metric([result], count)
            swaps.add_metric([], self._swaps)
        return [issuance, ca, challenges, swaps]


class ReactorThreadCollector:
    """``metrics`` for an exposition that runs in a thread of its own (Synapse's ``metrics``
    listener): the status is read on the reactor thread, the only one that changes it, and a
    scrape waits for it at most :data:`REACTOR_WAIT` seconds (a stalled reactor then yields
    the counters only, logged)."""

    def __init__(
        self, metrics: AcmeMetrics, reactor: IReactorFromThreads, wait: float = REACTOR_WAIT
    ) -> None:
        self._metrics = metrics
        self._reactor = reactor
        self._wait = wait

    def describe(self) -> list[Metric]:
        return self._metrics.describe()

    def collect(self) -> list[Metric]:
        if threadable.isInIOThread():
            return self._metrics.collect()
        done = threading.Event()
        result: list[list[Metric]] = []

        def read() -> None:
            try:
                result.append(self._metrics.collect())
            finally:
                done.set()

        self._reactor.callFromThread(read)
        if done.wait(self._wait) and result:
            return result[0]
        logger.warning(
            "metrics: the reactor did not answer within %g s; this scrape has the counters only",
            self._wait,
        )
        return self._metrics.collect_counters()


class RegistryMembership(Service):
    """Keeps ``collector`` in ``registry`` while this service runs (Synapse: the global
    ``REGISTRY``, which the runtime does not own). A second runtime in the same process (never
    the case in Synapse, which loads the module once) would export the same names: it is left
    out, with a warning, instead of failing the start."""

    def __init__(self, registry: CollectorRegistry, collector: Any) -> None:
        self._registry = registry
        self._collector = collector
        self._registered = False

    def startService(self) -> None:
        super().startService()
        try:
            self._registry.register(self._collector)
        except ValueError as e:  # "Duplicated timeseries": another runtime exports them
            logger.warning("metrics: not exported, another synapse-acme runtime does: %s", e)
            return
        self._registered = True

    def stopService(self) -> None:
        super().stopService()
        if self._registered:
            self._registry.unregister(self._collector)
            self._registered = False


class MetricsPage(Resource):
    """``GET /metrics``: the registry in Prometheus' text format, rendered on the reactor
    thread (prometheus_client's own Twisted resource renders in a thread pool)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return generate_latest(self._registry)


def metrics_site(registry: CollectorRegistry, timeout: float = 120.0) -> Site:
    """The site of a ``metrics_listen`` listener: ``/metrics``, and 404 elsewhere. ``timeout``
    closes a connection idle that long (Prometheus keeps one open between scrapes)."""
    root = Resource()
    root.putChild(b"metrics", MetricsPage(registry))
    root.putChild(b"", notFound())
    site = Site(root, timeout=timeout)
    site.noisy = False
    site.displayTracebacks = False
    return site


def own_registry(metrics: AcmeMetrics) -> CollectorRegistry:
    """A registry holding only ``metrics`` (the standalone runner's ``/metrics``)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=True)
    registry.register(metrics)
    return registry


__all__ = [
    "CA_ENDPOINTS",
    "METRICS",
    "NO_ANSWER",
    "AcmeMetrics",
    "MetricsPage",
    "ReactorThreadCollector",
    "RegistryMembership",
    "metrics_site",
    "own_registry",
]
