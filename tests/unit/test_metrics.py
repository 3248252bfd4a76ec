"""synapse_acme.metrics: gauges read from the status at scrape time, counters counted where the
events happen, and a runtime's metrics exported without colliding with another runtime's."""

from __future__ import annotations

import datetime
import errno
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.web.resource import Resource

from synapse_acme import crypto
from synapse_acme.config import AcmeConfig, parse_acme_config
from synapse_acme.errors import ListenError
from synapse_acme.http01 import HTTP01Responder, answer
from synapse_acme.limits import LimitedFactory
from synapse_acme.metrics import (
    METRICS,
    AcmeMetrics,
    ReactorThreadCollector,
    RegistryMembership,
    metrics_site,
    own_registry,
)
from synapse_acme.runtime import build_runtime
from synapse_acme.status import CertificateStatus
from synapse_acme.testing.acme_server import FakeAcmeServer, http01_validator
from synapse_acme.tls import HotSwapTLS
from tests.certs import TestCA
from tests.deferreds import failure_of, result_of

START = 1_800_000_000.0
UTC = datetime.timezone.utc


def at(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, tz=UTC)


def samples(registry: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, as Prometheus would read it: (name, labels) -> value."""
    text = generate_latest(registry).decode("utf-8")
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_gauges_are_the_status_values_at_scrape_time() -> None:
    statuses = [
        CertificateStatus(
            key="a.example.test",
            names=("a.example.test", "b.example.test"),
            has_certificate=True,
            not_after=at(START + 90 * 86400),
            served_not_after=at(START + 60 * 86400),
            renew_at=at(START + 60 * 86400),
            next_attempt=at(START + 300),
            failures=2,
            last_failure=at(START - 10),
        ),
        # Nothing stored yet, no failure: only what is known is exported.
        CertificateStatus(key="c.example.test", names=("c.example.test",)),
    ]
    current = [statuses]
    metrics = AcmeMetrics(lambda: current[0])
    found = samples(own_registry(metrics))
    a = (("name", "a.example.test"),)
    assert found[("synapse_acme_certificate_not_after_seconds", a)] == START + 90 * 86400
    assert found[("synapse_acme_served_not_after_seconds", a)] == START + 60 * 86400
    # A retry is in force: it is the next attempt, not the planned renewal.
    assert found[("synapse_acme_next_renewal_seconds", a)] == START + 300
    assert found[("synapse_acme_last_failure_timestamp_seconds", a)] == START - 10
    assert found[("synapse_acme_consecutive_failures", a)] == 2
    assert found[("synapse_acme_certificate_placeholder", a)] == 0
    c = (("name", "c.example.test"),)
    assert found[("synapse_acme_consecutive_failures", c)] == 0
    for name in (
        "synapse_acme_certificate_not_after_seconds",
        "synapse_acme_served_not_after_seconds",
        "synapse_acme_next_renewal_seconds",
        "synapse_acme_last_failure_timestamp_seconds",
    ):
        assert (name, c) not in found
    # Read at scrape time: a new status is seen by the next scrape, with nothing to update.
    current[0] = [
        CertificateStatus(
            key="a.example.test",
            names=("a.example.test",),
            has_certificate=True,
            not_after=at(START + 180 * 86400),
            renew_at=at(START + 120 * 86400),
        )
    ]
    found = samples(own_registry(metrics))
    assert found[("synapse_acme_certificate_not_after_seconds", a)] == START + 180 * 86400
    assert found[("synapse_acme_next_renewal_seconds", a)] == START + 120 * 86400
    assert ("synapse_acme_served_not_after_seconds", a) not in found


def test_counters_start_at_zero_and_keep_labels_low_cardinality() -> None:
    metrics = AcmeMetrics()
    found = samples(own_registry(metrics))
    assert found[("synapse_acme_issuance_total", (("result", "success"),))] == 0
    assert found[("synapse_acme_issuance_total", (("result", "failure"),))] == 0
    assert found[("synapse_acme_challenge_requests_total", (("result", "hit"),))] == 0
    assert found[("synapse_acme_challenge_requests_total", (("result", "miss"),))] == 0
    assert found[("synapse_acme_tls_swaps_total", ())] == 0
    metrics.ca_response("newOrder", 201)
    metrics.ca_response("newOrder", 201)
    metrics.ca_response("https://ca.example/acme/order/1", 200)  # never a URL as a label
    metrics.ca_response("finalize", None)  # no answer at all
    metrics.issuance_finished("a", False)
    found = samples(own_registry(metrics))
    req = "synapse_acme_ca_requests_total"
    assert found[(req, (("endpoint", "newOrder"), ("status", "201")))] == 2
    assert found[(req, (("endpoint", "other"), ("status", "200")))] == 1
    assert found[(req, (("endpoint", "finalize"), ("status", "error")))] == 1
    assert found[("synapse_acme_issuance_total", (("result", "failure"),))] == 1
    # No _created series, and every exported name is a documented one.
    assert {name for name, _ in found} <= set(METRICS)


def test_challenge_requests_are_counted_by_the_one_answer_function() -> None:
    metrics = AcmeMetrics()
    responder = HTTP01Responder(on_request=metrics.challenge_request)
    responder.start_responding("a.example.test", "tok", "tok.thumb")
    tokens = responder.tokens()
    assert answer(tokens, b"GET", [b"tok"], metrics.challenge_request).code == 200
    assert answer(tokens, b"GET", [b"other"], metrics.challenge_request).code == 404
    assert answer(tokens, b"GET", [b"bad/../x"], metrics.challenge_request).code == 404
    # The resource Synapse mounts counts through the same function.
    root = Resource()
    well_known = Resource()
    root.putChild(b".well-known", well_known)
    well_known.putChild(b"acme-challenge", responder.resource())
    stub = StubTreq(root)
    response = result_of(stub.get("http://a.example.test/.well-known/acme-challenge/tok"))
    assert response.code == 200
    found = samples(own_registry(metrics))
    assert found[("synapse_acme_challenge_requests_total", (("result", "hit"),))] == 2
    assert found[("synapse_acme_challenge_requests_total", (("result", "miss"),))] == 2


def test_each_tls_swap_is_counted() -> None:
    clock = Clock()
    clock.advance(START)
    metrics = AcmeMetrics()
    tls = HotSwapTLS(
        clock=clock,
        required_names={"a": ["a.example.test"]},
        on_swap=metrics.tls_swapped,
    )
    ca = TestCA(now=at(START))
    tls.set_bundle("a", ca.issue(["a.example.test"]))
    tls.set_bundles({"a": ca.issue(["a.example.test"])})
    tls.certificate_changed("a", ca.issue(["other.example.test"]))  # refused: not a swap
    assert samples(own_registry(metrics))[("synapse_acme_tls_swaps_total", ())] == 2


def test_a_second_runtime_in_the_host_registry_is_left_out_not_fatal() -> None:
    registry = CollectorRegistry()
    first, second = AcmeMetrics(), AcmeMetrics()
    one, two = RegistryMembership(registry, first), RegistryMembership(registry, second)
    one.startService()
    two.startService()  # the same names: logged, not raised
    first.tls_swapped()
    assert samples(registry)[("synapse_acme_tls_swaps_total", ())] == 1
    two.stopService()
    one.stopService()
    assert samples(registry) == {}
    two.startService()  # once the first is gone, the next one is exported
    assert ("synapse_acme_tls_swaps_total", ()) in samples(registry)
    two.stopService()


class _SilentReactor:
    """A reactor that never runs what it is handed (a stalled one)."""

    def callFromThread(self, f: Any, *args: Any) -> None:
        pass


class _PromptReactor:
    """Runs what another thread hands it at once, as a live reactor thread would."""

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)


def test_a_scrape_from_another_thread_reads_the_status_on_the_reactor() -> None:
    status = CertificateStatus(
        key="a.example.test", names=("a.example.test",), has_certificate=True, not_after=at(START)
    )
    metrics = AcmeMetrics(lambda: [status])
    metrics.tls_swapped()
    results: dict[str, Any] = {}

    def scrape(name: str, reactor: Any) -> None:
        collector = ReactorThreadCollector(metrics, reactor, wait=0.2)
        registry = CollectorRegistry()
        registry.register(collector)
        results[name] = samples(registry)

    for name, reactor in (("prompt", _PromptReactor()), ("stalled", _SilentReactor())):
        thread = threading.Thread(target=scrape, args=(name, reactor))
        thread.start()
        thread.join(10)
    a = ("synapse_acme_certificate_not_after_seconds", (("name", "a.example.test"),))
    assert results["prompt"][a] == START
    # A stalled reactor costs the gauges of that scrape, never the scrape.
    assert a not in results["stalled"]
    assert results["stalled"][("synapse_acme_tls_swaps_total", ())] == 1


def metrics_only_config(tmp_path: Path, metrics_listen: Any) -> AcmeConfig:
    """A block whose only listener is ``metrics_listen`` (no HTTP-01 port)."""
    block = {"enabled": True, "domain": "m.example.test", "url": "https://ca.example.test/dir"}
    return parse_acme_config(
        {**block, "port": 0, "metrics_listen": metrics_listen}, base_dir=str(tmp_path)
    )


def test_metrics_listen_is_a_listener_of_the_runtime_and_serves_the_metrics(
    tmp_path: Path,
) -> None:
    config = metrics_only_config(tmp_path, "tcp:9109:interface=127.0.0.1")  # one string
    assert config.metrics_listen == ("tcp:9109:interface=127.0.0.1",)
    reactor = MemoryReactorClock()
    runtime = build_runtime(config, reactor, http_client=object())  # type: ignore[arg-type]
    runtime.service.privilegedStartService()
    runtime.service.startService()
    try:
        assert [lst.endpoints for lst in runtime.listeners] == [["tcp:9109:interface=127.0.0.1"]]
        assert result_of(runtime.when_ready()) is None
        [(port, factory, _, interface)] = reactor.tcpServers
        assert (port, interface) == (9109, "127.0.0.1")
        assert isinstance(factory, LimitedFactory)  # the connection caps apply here too
        assert runtime.metrics_registry is not None
        site = metrics_site(runtime.metrics_registry)
        stub = StubTreq(site.resource)
        response = result_of(stub.get("http://127.0.0.1:9109/metrics"))
        assert response.code == 200
        body = result_of(response.text())
        assert 'synapse_acme_issuance_total{result="success"} 0.0' in body
        assert result_of(stub.get("http://127.0.0.1:9109/")).code == 404
    finally:
        runtime.service.stopService()
    # A one-shot command serves no metrics: it is gone before anyone scrapes it.
    once = build_runtime(config, MemoryReactorClock(), http_client=object(), one_shot=True)  # type: ignore[arg-type]
    try:
        assert once.listeners == [] and once.metrics_registry is None
    finally:
        once.service.stopService()


def test_metrics_listen_refuses_ssl() -> None:
    from synapse_acme.errors import ConfigError

    with pytest.raises(ConfigError, match="metrics_listen"):
        parse_acme_config(
            {"enabled": True, "domain": "m.example.test", "metrics_listen": ["ssl:9109"]}
        )


class _ThreadClock(Clock):
    """A Clock that is also the reactor thread (what a host's exposition thread calls into)."""

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)


def test_a_whole_issuance_is_counted_and_the_gauges_match_the_certificate(
    tmp_path: Path,
) -> None:
    """The real runtime against the fake CA (through treq's stub) on a Clock, exported into a
    host's registry as in Synapse: every counter is counted at its source, and the gauges say
    what the stored and the served certificate say."""
    clock = _ThreadClock()
    clock.advance(START)
    root = Resource()
    well_known = Resource()
    root.putChild(b".well-known", well_known)
    web = StubTreq(root)  # the homeserver's listeners, where the CA validates
    server = FakeAcmeServer(clock, validate=http01_validator(web), challenge_types=("http-01",))
    ca = StubTreq(server.resource)
    roots = tmp_path / "roots.pem"
    roots.write_bytes(server.root_pem)
    config = parse_acme_config(
        {
            "enabled": True,
            "domain": "m.example.test",
            "url": server.directory_url,
            "issuer_roots": str(roots),
            "terms_of_service_agreed": True,
            "preflight": False,
            "poll_interval": 0.1,
            "storage": str(tmp_path / "store"),
        },
        base_dir=str(tmp_path),
    )
    runtime = build_runtime(
        config,
        clock,  # type: ignore[arg-type]
        standalone_listener=False,
        http_client=ca,  # type: ignore[arg-type]
        host_serves_tls=True,
        metrics_registry=CollectorRegistry(),
    )
    well_known.putChild(b"acme-challenge", runtime.responder.resource())
    runtime.service.startService()
    try:
        assert runtime.acme is not None
        for _ in range(400):
            ca.flush()
            web.flush()
            if runtime.acme.status()[0].has_certificate:
                break
            clock.advance(0.1)
        [status] = runtime.status()
        assert status.has_certificate and not status.placeholder
        assert runtime.metrics_registry is not None
        found = samples(runtime.metrics_registry)
    finally:
        runtime.service.stopService()
    name = (("name", "m.example.test"),)
    stored = result_of(runtime.store.load(status.key)) if runtime.store is not None else None
    assert stored is not None
    leaf = crypto.parse_chain(stored.chain_pem)[0]
    not_after = crypto.not_after(leaf).timestamp()
    assert found[("synapse_acme_certificate_not_after_seconds", name)] == not_after
    assert found[("synapse_acme_served_not_after_seconds", name)] == not_after
    assert status.renew_at is not None
    assert found[("synapse_acme_next_renewal_seconds", name)] == status.renew_at.timestamp()
    assert found[("synapse_acme_consecutive_failures", name)] == 0
    assert found[("synapse_acme_issuance_total", (("result", "success"),))] == 1
    assert found[("synapse_acme_issuance_total", (("result", "failure"),))] == 0
    assert found[("synapse_acme_tls_swaps_total", ())] == 1
    assert found[("synapse_acme_challenge_requests_total", (("result", "hit"),))] >= 1
    requests = {
        dict(labels)["endpoint"]
        for (metric, labels), value in found.items()
        if metric == "synapse_acme_ca_requests_total" and value > 0
    }
    # (No newNonce: the fake CA sends a nonce with every answer, the directory's included.)
    assert {
        "directory",
        "newAccount",
        "newOrder",
        "authorization",
        "challenge",
        "finalize",
        "certificate",
    } <= requests
    assert "other" not in requests
    # One count per answer of the CA: the fake CA saw exactly as many requests.
    total = sum(v for (m, _), v in found.items() if m == "synapse_acme_ca_requests_total")
    assert total == len(server.requests)


class _PortTakenReactor(MemoryReactorClock):
    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        raise CannotListenError(interface, port, OSError(errno.EADDRINUSE, "in use"))


def test_a_metrics_port_that_cannot_be_bound_is_a_listen_error_naming_the_key(
    tmp_path: Path,
) -> None:
    config = metrics_only_config(tmp_path, ["tcp:9109:interface=127.0.0.1"])
    runtime = build_runtime(config, _PortTakenReactor(), http_client=object())  # type: ignore[arg-type]
    runtime.service.startService()
    try:
        error = failure_of(runtime.when_ready(), ListenError)
        assert "could not open any metrics listener: port 9109 on 127.0.0.1" in str(error)
        assert "acme.metrics_listen (tcp:9109:interface=127.0.0.1)" in str(error)
    finally:
        runtime.service.stopService()


def test_an_observer_that_fails_never_costs_an_answer_or_a_swap() -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("observer bug")

    tokens = {"tok": b"tok.thumb"}
    assert answer(tokens, b"GET", [b"tok"], broken).body == b"tok.thumb"
    clock = Clock()
    clock.advance(START)
    tls = HotSwapTLS(clock=clock, on_swap=broken)
    bundle = TestCA(now=at(START)).issue(["a.example.test"])
    tls.set_bundle("a", bundle)
    assert tls.current("a") is bundle
