"""Fault matrix, CA side: the REAL service + issuer + client + transport + file store, driven by
a Clock, against the RFC fake CA (``FakeAcmeServer``) reached through ``treq.testing``'s agent,
or against an agent that cannot reach any CA at all.

Proves (docs/RELIABILITY.md rows 2, 3 and the request cap): the old certificate keeps serving,
a bad answer becomes a typed error, nothing is written to the store, retries follow
``policy.BACKOFF_SCHEDULE`` (or the CA's Retry-After), and the service recovers by itself.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import josepy as jose
import pytest
from acme import messages
from cryptography.hazmat.primitives.asymmetric import ec
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent, StubTreq, _SynchronousProducer
from twisted.internet import defer
from twisted.internet import error as terror
from twisted.internet.task import Clock
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from zope.interface import implementer

from synapse_acme import policy
from synapse_acme.acme.client import AcmeClient
from synapse_acme.acme.issuer import AcmeIssuer
from synapse_acme.acme.transport import JWSTransport
from synapse_acme.errors import (
    AcmeError,
    AcmeProtocolError,
    AcmeTransportError,
    SynapseAcmeError,
)
from synapse_acme.http01 import HTTP01Responder
from synapse_acme.interfaces import IIssuer
from synapse_acme.model import CertificateBundle, CertificateSpec
from synapse_acme.names import names_key
from synapse_acme.service import AcmeService
from synapse_acme.status import CertificateStatus
from synapse_acme.store import FileStore
from synapse_acme.testing.acme_server import PEM_CHAIN, FakeAcmeServer
from tests.certs import TestCA

START = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=datetime.timezone.utc)
NAMES = ("matrix.example.test", "example.test")
KEY = names_key(NAMES)
DAY = 86400.0


class NoJitter(random.Random):
    """``random()`` is always 0.5: backoff steps are the table's exact values."""

    def random(self) -> float:
        return 0.5


class _BadGateway(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setResponseCode(502)
        request.setHeader(b"content-type", b"text/html")
        return b"<html><body><h1>502 Bad Gateway</h1></body></html>"


@implementer(IAgent)
class SwitchAgent:
    """An IAgent whose CA is up (the fake server), refusing connections, silent (no answer ever),
    or hidden behind a proxy that answers 502 HTML."""

    def __init__(self, resource: Any) -> None:
        self.up = RequestTraversalAgent(resource)
        self.proxy = RequestTraversalAgent(_BadGateway())
        self.mode = "up"
        self.requests = 0

    def request(
        self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None
    ) -> defer.Deferred[Any]:
        self.requests += 1
        if self.mode == "refused":
            return defer.fail(terror.ConnectionRefusedError("127.0.0.1:443"))
        if self.mode == "silent":
            return defer.Deferred()  # the transport's clock timeout ends it
        agent = self.proxy if self.mode == "proxy502" else self.up
        return agent.request(method, uri, headers, bodyProducer)

    def flush(self) -> None:
        self.up.flush()
        self.proxy.flush()


@implementer(IIssuer)
class RecordingIssuer:
    """Passes through to the real issuer, keeping every outcome (bundle or Failure)."""

    def __init__(self, inner: AcmeIssuer) -> None:
        self.inner = inner
        self.outcomes: list[Any] = []

    def issue(self, names: Any, key_pem: bytes, replaces: str | None = None) -> Any:
        d = self.inner.issue(names, key_pem, replaces)

        def record(result: Any) -> Any:
            self.outcomes.append(result)
            return result

        return d.addBoth(record)

    def renewal_info(self, chain_pem: bytes, directory: str | None = None) -> Any:
        return self.inner.renewal_info(chain_pem, directory)


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file and directory under ``root``: content and mode (to prove nothing was written)."""
    out: dict[str, tuple[bytes, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            out[os.path.relpath(p, root) + "/"] = (b"", os.stat(p).st_mode)
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (fh.read(), os.stat(p).st_mode)
    return out


class World:
    """The whole stack in memory, one Clock; the store is a real FileStore under tmp_path."""

    def __init__(self, tmp: Path, **server_kw: Any) -> None:
        self.clock = Clock()
        self.clock.advance(START.timestamp())
        self.responder = HTTP01Responder()
        # No ARI: the old certificate comes from another CA, whose window this one cannot know.
        server_kw.setdefault("ari", False)
        self.server = FakeAcmeServer(self.clock, validate=self._validate, **server_kw)
        self.agent = SwitchAgent(self.server.resource)
        key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
        # Bodies are produced synchronously, as StubTreq does, so nothing waits on a real reactor.
        http = HTTPClient(self.agent, data_to_body_producer=_SynchronousProducer)
        transport = JWSTransport(http, self.clock, key, self.server.directory_url)
        self.issuer = RecordingIssuer(
            AcmeIssuer(
                client=AcmeClient(transport),
                responders=[self.responder],
                clock=self.clock,
                account_key=key,
                trust=self.server.trust,
                tos_agreed=True,
                poll_interval=0.5,
            )
        )
        self.root = tmp / "store"
        self.store = FileStore(str(self.root))
        # An old certificate with 10 days left: due for renewal (1/3 of 90 days), still valid.
        self.old: CertificateBundle = TestCA(now=START).issue(
            list(NAMES),
            not_before=START - datetime.timedelta(days=80),
            not_after=START + datetime.timedelta(days=10),
        )
        self.store.save(KEY, self.old)
        self.service = AcmeService(
            [CertificateSpec(names=NAMES)],
            self.store,
            self.issuer,
            self.clock,
            check_interval=600.0,
            check_jitter=0.0,
            rand=NoJitter(),
        )

    def _validate(self, identifier: str, token: str, key_authorization: str) -> Any:
        if self.responder.tokens().get(token) == key_authorization.encode():
            return True
        return messages.Error.with_code("unauthorized", detail="not served")

    def served(self) -> bytes | None:
        bundle = self.service.current(KEY)
        return bundle.chain_pem if bundle is not None else None

    @property
    def m(self) -> CertificateStatus:
        return self.service.status_of(KEY)

    def until_retry(self) -> float:
        """Seconds until the next attempt in force (0 if none is scheduled)."""
        at = self.m.next_attempt
        return 0.0 if at is None else max(0.0, at.timestamp() - self.clock.seconds())

    def settle(self, limit: float = 120.0, step: float = 0.05) -> None:
        """Move the clock in small steps (flushing the in-memory HTTP) until no issuance runs."""
        end = self.clock.seconds() + limit
        while True:
            self.agent.flush()
            busy = self.m.issuing or self.service._running_check is not None
            if not busy or self.clock.seconds() > end:
                break
            self.clock.advance(step)
        self.agent.flush()

    def start(self) -> None:
        self.service.startService()
        self.clock.advance(0)
        self.settle()


# -- 2. the CA unreachable for a simulated day ----------------------------------------------------


def _expected_attempts(period: float, cost: float) -> int:
    """Attempts in ``period`` seconds if each failure takes ``cost`` seconds of clock time and
    the service waits ``backoff_delay(n)`` after the n-th failure (no jitter)."""
    t, n = 0.0, 0
    while t <= period:
        n += 1
        t += cost + policy.backoff_delay(n, None, 0.5)
    return n


@pytest.mark.parametrize("mode", ["refused", "silent", "proxy502"])
def test_ca_unreachable_for_a_day(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    w = World(tmp_path)
    before = snapshot(w.root)
    w.agent.mode = mode
    caplog.set_level(logging.INFO, logger="synapse_acme.service")
    w.start()
    served = []
    # A day in one-minute steps (the transport's 45 s timeout runs on the same clock).
    for _ in range(int(DAY // 60)):
        w.clock.advance(60)
        w.agent.flush()
        served.append(w.served())
    assert all(chain == w.old.chain_pem for chain in served)
    assert snapshot(w.root) == before  # nothing written while the CA was away
    attempts = [r for r in caplog.records if r.getMessage().startswith("Obtaining a certificate")]
    failures = [o for o in w.issuer.outcomes if isinstance(o, defer.Failure)]
    assert len(failures) == len(attempts)
    expected_type = AcmeError if mode == "proxy502" else AcmeTransportError
    assert all(isinstance(f.value, expected_type) for f in failures), failures[0]
    # The count follows the table: exact without a timeout; within one attempt when each
    # failure also costs the 45 s timeout plus a 45 s ARI probe at some ticks.
    cost = 45.0 if mode == "silent" else 0.0
    expected = _expected_attempts(DAY, cost)
    assert abs(len(attempts) - expected) <= (0 if mode != "silent" else 1), (
        len(attempts),
        expected,
    )
    assert len(attempts) == w.m.failures
    # The CA comes back: the very next attempt succeeds, and only one more attempt is made.
    w.agent.mode = "up"
    w.clock.advance(w.until_retry())
    w.settle()
    assert w.served() != w.old.chain_pem
    assert len(w.issuer.outcomes) == len(attempts) + 1
    assert isinstance(w.issuer.outcomes[-1], CertificateBundle)
    assert w.m.failures == 0
    loaded: list[Any] = []
    w.store.load(KEY).addCallback(loaded.append)
    assert loaded[0].chain_pem == w.service.current(KEY).chain_pem  # type: ignore[union-attr]
    _figures[f"unreachable_{mode}"] = {"attempts_in_a_day": len(attempts), "expected": expected}


def test_stop_while_the_ca_is_silent_is_prompt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The periodic check waits on a silent CA (the ARI fetch of the stored certificate, behind
    the real transport's timeout); a forced renewal waits beside it. stopService cancels both
    and fires without the clock moving, and reports neither as a CA failure."""
    w = World(tmp_path)
    w.agent.mode = "silent"
    caplog.set_level(logging.INFO, logger="synapse_acme")
    w.service.startService()
    w.clock.advance(0)
    renewal = w.service.renew(KEY, force=True)
    w.agent.flush()
    assert w.service._running_check is not None and w.m.issuing
    assert w.agent.requests >= 1
    started = w.clock.seconds()
    stopped = w.service.stopService()
    w.agent.flush()
    assert stopped.called and w.clock.seconds() == started
    [(key, result)] = renewal.result
    assert key == KEY and isinstance(result, defer.Failure)
    assert w.clock.getDelayedCalls() == []  # the transport's timeouts went with the requests
    assert w.served() == w.old.chain_pem and w.m.failures == 0 and w.m.last_error is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


# -- 3. bad answers: typed error, old certificate kept, nothing written ---------------------------

_HTML = b"<html><body>502 Bad Gateway</body></html>"
_BAD_URL_ORDER = json.dumps(
    {
        "status": "ready",
        "identifiers": [{"type": "dns", "value": n} for n in NAMES],
        "authorizations": [],
        "finalize": "file:///etc/passwd",
    }
).encode()

# (id, plan, expected class, expected code or message fragment, expected backoff delay or None)
FAULTS: list[tuple[str, Any, type[Exception], str, float | None]] = [
    ("429 rateLimited + Retry-After", lambda f: f.rate_limit("newOrder", 3600.0), AcmeError,
     "rateLimited", 3600.0),
    ("500 serverInternal", lambda f: f.fail_next("newOrder", 500), AcmeError, "serverInternal",
     None),
    ("503 + Retry-After at finalize",
     lambda f: f.fail_next("finalize", 503, "serverInternal", retry_after=900.0), AcmeError,
     "serverInternal", 900.0),
    ("503 HTML page, no problem document",
     lambda f: f.garbage_next("newOrder", _HTML, "text/html", 503), AcmeError,
     "HTTP 503 without a problem document",
     None),
    ("truncated JSON order", lambda f: f.garbage_next("order", b'{"status": "valid", "cert',
     "application/json"), AcmeProtocolError, "does not parse", None),
    ("non-JSON authorization", lambda f: f.garbage_next("authz", b"Service Unavailable",
     "application/json"), AcmeProtocolError, "does not parse", None),
    ("JSON array as account", lambda f: f.garbage_next("newAccount", b"[]",
     "application/json"), AcmeProtocolError, "expected a JSON object", None),
    ("HTML directory (wrong content type)",
     lambda f: f.garbage_next("directory", _HTML, count=2),  # the ARI probe takes one
     AcmeProtocolError, "expected content type application/json", None),
    ("JSON where the PEM chain belongs", lambda f: f.garbage_next("certificate", b'{"a": 1}',
     "application/json"), AcmeProtocolError, "expected content type", None),
    ("302 redirect", lambda f: f.garbage_next("newOrder", b"", "text/html", 302),
     AcmeProtocolError, "unexpected HTTP status 302", None),
    ("order pointing at file:///", lambda f: f.garbage_next("order", _BAD_URL_ORDER,
     "application/json"), AcmeProtocolError, "not an http(s) URL", None),
    ("2 MiB answer", lambda f: f.garbage_next("order", b'{"a": "' + b"x" * (2 << 20) + b'"}',
     "application/json"), AcmeProtocolError, "larger than", None),
    ("certificate for the wrong key", lambda f: f.wrong_key_certificate_next(),
     AcmeProtocolError, "unusable", None),
    ("certificate for the wrong names", lambda f: f.wrong_names_certificate_next(),
     AcmeProtocolError, "unusable", None),
    ("empty chain", lambda f: f.empty_chain_next(), AcmeProtocolError, "no PEM certificate",
     None),
    ("truncated PEM chain", lambda f: f.garbage_next("certificate",
     b"-----BEGIN CERTIFICATE-----\nMIIBkTCB+wIJAKHBfp\n", PEM_CHAIN), AcmeProtocolError,
     "unusable", None),
    ("misordered chain", lambda f: f.misordered_chain_next(), AcmeProtocolError, "unusable",
     None),
    ("leaf marked CA:TRUE", lambda f: f.ca_leaf_next(), AcmeProtocolError, "CA:TRUE", None),
    ("leaf without serverAuth", lambda f: f.client_auth_leaf_next(), AcmeProtocolError,
     "does not include serverAuth", None),
    ("leaf without its intermediate", lambda f: f.leaf_only_next(), AcmeProtocolError,
     "without any intermediate", None),
    ("chain to an unknown root", lambda f: f.foreign_root_next(), AcmeProtocolError,
     "does not reach a trusted root (the fake CA's roots)", None),
    ("badNonce storm beyond the retry limit", lambda f: f.reject_nonce_next(100), AcmeError,
     "badNonce", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("plan", "exc_type", "what", "delay"),
    [pytest.param(*f[1:], id=f[0]) for f in FAULTS],
)
def test_bad_answer_is_typed_keeps_old_writes_nothing(
    tmp_path: Path, plan: Any, exc_type: type[Exception], what: str, delay: float | None
) -> None:
    w = World(tmp_path)
    before = snapshot(w.root)
    plan(w.server.faults)
    w.start()
    assert w.server.faults.pending() == 0 or what == "badNonce"  # the fault really fired
    [outcome] = w.issuer.outcomes
    assert isinstance(outcome, defer.Failure), outcome
    err = outcome.value
    assert isinstance(err, exc_type) and isinstance(err, SynapseAcmeError), repr(err)
    code = getattr(err, "code", None)
    assert what == code or what in str(err), str(err)
    assert w.served() == w.old.chain_pem
    assert snapshot(w.root) == before
    assert w.m.last_error_type is not None and w.m.failures == 1
    assert w.m.next_attempt is not None
    waited = w.until_retry()
    assert waited == pytest.approx(
        delay if delay is not None else policy.backoff_delay(1, None, 0.5), abs=1.0
    )
    # It recovers by itself at the next attempt (the fault plan is used up by then).
    w.server.faults.reject_nonces = 0
    w.clock.advance(waited)
    w.settle()
    assert isinstance(w.issuer.outcomes[-1], CertificateBundle), w.issuer.outcomes[-1]
    assert w.served() != w.old.chain_pem and snapshot(w.root) != before


# -- the global per-CA request cap ----------------------------------------------------------------


def test_request_cap_queues_never_drops() -> None:
    clock = Clock()
    clock.advance(START.timestamp())
    server = FakeAcmeServer(clock)
    stub = StubTreq(server.resource)
    key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    assert JWSTransport.__attrs_attrs__.max_requests_per_minute.default == 1200
    transport = JWSTransport(
        stub,  # type: ignore[arg-type]
        clock,
        key,
        server.directory_url,
        max_requests_per_minute=300,
    )
    results: list[Any] = []
    for _ in range(1000):
        transport.get(server.directory_url).addBoth(results.append)
    stub.flush()
    assert transport.limiter.queued == 700
    while len(results) < 1000 and clock.seconds() < START.timestamp() + 600:
        clock.advance(1)
        stub.flush()
    assert len(results) == 1000 and all(r.status == 200 for r in results)
    times = sorted(r.time for r in server.requests)
    assert len(times) == 1000
    worst = max(sum(1 for t in times[i:] if t < start + 60) for i, start in enumerate(times))
    assert worst == 300
    assert times[-1] - times[0] == pytest.approx(180.0)
    # A cancelled waiter leaves the queue.
    for _ in range(301):
        transport.get(server.directory_url).addErrback(lambda f: None)
    queued = transport.limiter.queued
    d = transport.get(server.directory_url)
    d.addErrback(lambda f: f.trap(defer.CancelledError))
    d.cancel()
    assert transport.limiter.queued == queued
    _figures["request_cap"] = {
        "requests": 1000,
        "max_in_60s": worst,
        "span_s": times[-1] - times[0],
    }


_figures: dict[str, Any] = {}


def teardown_module() -> None:
    if _figures and os.environ.get("FAULTS_FIGURES"):
        with open(os.environ["FAULTS_FIGURES"], "a", encoding="utf-8") as f:
            f.write(json.dumps({"test_ca_faults": _figures}) + "\n")
