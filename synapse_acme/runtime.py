"""Wiring: turns an :class:`~synapse_acme.config.AcmeConfig` into running parts.

The only place that knows which implementation goes with which contract; the standalone runner,
the CLI's one-shot commands and the Synapse module all build through :func:`build_runtime`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import attrs
import josepy as jose
from cryptography import x509
from treq.client import HTTPClient
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorCore, IReactorTime

from synapse_acme import crypto, fsutil, policy
from synapse_acme.account import (
    AccountRecorder,
    issuer_account_paths,
    key_thumbprint,
    load_or_create_account_key,
    missing_key_directory,
)
from synapse_acme.acme.client import AcmeClient
from synapse_acme.acme.issuer import AcmeIssuer
from synapse_acme.acme.transport import JWSTransport, make_http_client
from synapse_acme.acme.trust import IssuerTrust, load_issuer_trust
from synapse_acme.config import CHALLENGE_TYPES, AcmeConfig, IssuerConfig
from synapse_acme.dns01 import dns01_responder, thread_runner
from synapse_acme.errors import BundleError, ConfigError
from synapse_acme.fallback import FallbackIssuer, NamedIssuer
from synapse_acme.http01 import HTTP01Responder
from synapse_acme.http01_server import make_factory
from synapse_acme.interfaces import IIssuer, IReactor, IResponder
from synapse_acme.interprocess import StoreLock, StoreLockService
from synapse_acme.limits import ConnectionLimits, LimitedFactory, fit_to_fd_limit, raise_fd_limit
from synapse_acme.listeners import ListenerService, tls_listener
from synapse_acme.metrics import (
    AcmeMetrics,
    ReactorThreadCollector,
    RegistryMembership,
    metrics_site,
    own_registry,
)
from synapse_acme.model import CertificateBundle, CertificateSpec
from synapse_acme.names import canonical_names, names_key
from synapse_acme.preflight import Preflight, direct_agent, lookup_from_setting, probe_secret_for
from synapse_acme.service import AcmeService, Coordination
from synapse_acme.status import CertificateStatus, dump_status_file
from synapse_acme.store import FileStore
from synapse_acme.tls import HotSwapTLS

if TYPE_CHECKING:
    # Imported where used, so that `synapse-acme issue` loads only what it runs: a dry run is
    # rare, the database optional, a one-shot exports no metrics and sends no alerts, and the
    # exporter, the TLS-ALPN-01 responder, the file watcher and the threaded store serve only
    # some setups.
    from prometheus_client import CollectorRegistry

    from synapse_acme.alerter import Alerter
    from synapse_acme.dryrun import ListableStore
    from synapse_acme.export import FileExporter
    from synapse_acme.pgstore import PostgresBackend
    from synapse_acme.sharedstore import SharedStore
    from synapse_acme.threaded import Runner
    from synapse_acme.tlsalpn01 import TLSALPN01Responder
    from synapse_acme.watch import FileWatcher

logger = logging.getLogger(__name__)

STATUS_FILE = "status.json"


@attrs.define(eq=False)
class Runtime:
    """Everything :func:`build_runtime` made; start and stop it through ``service``."""

    config: AcmeConfig
    service: MultiService
    acme: AcmeService | None  # None with external_certificates: another tool issues
    responder: HTTP01Responder
    tls: HotSwapTLS
    store: FileStore | None  # None with external_certificates or database
    exporter: FileExporter | None = None
    #: The shared PostgreSQL store (``database``), None with the file store.
    backend: PostgresBackend | None = None
    http01_listener: ListenerService | None = None
    #: Every listener this runtime opens (HTTP-01 first, then each TLS listener).
    listeners: list[ListenerService] = attrs.field(factory=list)
    watcher: FileWatcher | None = None
    preflight: Preflight | None = None  # None when acme.preflight.enabled is false
    alerter: Alerter | None = None  # None when acme.alerts.enabled is false, or one-shot
    serves_tls: bool = False  # runtime.tls is served (tls_listen, or the host's listeners)
    #: The metrics of this runtime (counted always; exported on ``metrics_listen`` or, with
    #: ``metrics_registry``, in the host's registry). Its gauges read :meth:`status`.
    metrics: AcmeMetrics = attrs.field(factory=AcmeMetrics)
    #: Where ``metrics`` is registered: a registry of its own for ``metrics_listen``, or the
    #: host's (Synapse: the global one) while the runtime runs; None when not exported.
    metrics_registry: CollectorRegistry | None = None

    def __attrs_post_init__(self) -> None:
        self.metrics.status_source = self.status

    def status(self) -> list[CertificateStatus]:
        """Every managed certificate's status now, with what is served and exported (empty
        with ``external_certificates``: nothing is managed here)."""
        if self.acme is None:
            return []
        exporters = {self.exporter.key: self.exporter} if self.exporter is not None else {}
        return complete_status(self.acme.status(), self.tls if self.serves_tls else None, exporters)

    def when_ready(self) -> Deferred[None]:
        """The one readiness signal: a Deferred firing with ``None`` once every listener is
        bound, or failing with the first ListenError (each names the address, the OS error and
        the setting). ``run``, the one-shot commands and the Synapse module await it after
        ``privilegedStartService`` (or ``startService``)."""
        waits = [listener.when_listening() for listener in self.listeners]
        done = gatherResults(waits, consumeErrors=True)
        return done.addCallbacks(lambda _: None, lambda f: f.value.subFailure)


def status_path(config: AcmeConfig) -> str:
    return os.path.join(config.storage, STATUS_FILE)


def complete_status(
    statuses: list[CertificateStatus],
    tls: HotSwapTLS | None,
    exporters: Mapping[str, FileExporter],
) -> list[CertificateStatus]:
    """The service's ``statuses`` with, per certificate, what the TLS listeners serve and what
    the export holds, so ``synapse-acme status`` can compare stored/exported/served (``tls``
    is None when no TLS listener serves them)."""
    out = []
    for status in statuses:
        served = tls.current(status.key) if tls is not None else None
        leaf = _leaf(served.chain_pem) if served is not None else None
        exporter = exporters.get(status.key)
        out.append(
            attrs.evolve(
                status,
                served_serial=f"{leaf.serial_number:x}" if leaf is not None else None,
                served_not_after=crypto.not_after(leaf) if leaf is not None else None,
                export=exporter.status() if exporter is not None else None,
            )
        )
    return out


def _leaf(chain_pem: bytes) -> x509.Certificate | None:
    try:
        return crypto.parse_chain(chain_pem)[0]
    except BundleError:
        return None


def _status_writer(
    config: AcmeConfig,
    tls: HotSwapTLS | None,
    exporters: dict[str, FileExporter],
    runner: Runner | None,
) -> Callable[[list[CertificateStatus]], None]:
    """Writes ``status.json``: the service's status, completed by :func:`complete_status`."""
    path = status_path(config)

    def write(statuses: list[CertificateStatus]) -> None:
        data = dump_status_file(complete_status(statuses, tls, exporters))
        if runner is None:
            fsutil.atomic_write(path, data, 0o600)
        else:
            runner(fsutil.atomic_write, path, data, 0o600).addErrback(
                lambda f: logger.error("Could not write %s: %s", path, f.getErrorMessage())
            )

    return write


def build_runtime(
    config: AcmeConfig,
    reactor: IReactor,
    *,
    standalone_listener: bool = True,
    http_client: HTTPClient | None = None,
    runner: Runner | None = None,
    one_shot: bool = False,
    host_serves_tls: bool = False,
    metrics_registry: CollectorRegistry | None = None,
) -> Runtime:
    """Build the provisioning service and its collaborators for ``config``.

    ``reactor`` provides time, TCP, DNS, shutdown triggers and calls from threads
    (:class:`~synapse_acme.interfaces.IReactor`). ``http_client``: the treq client for the CA
    (tests stub the CA with one); default: :func:`~synapse_acme.acme.transport.make_http_client`.
    ``standalone_listener`` opens the HTTP-01 listener(s) of ``acme.port``/``acme.listen``;
    an embedding host that mounts :meth:`HTTP01Responder.resource` itself passes False.
    ``runner``: where the running service's file writes (store saves, exports, the status file)
    happen; a homeserver passes a :class:`~synapse_acme.threaded.BlockingRunner` so that no
    fsync blocks its reactor. Start-up work (recovery, the repair of the exported files) is
    done at once, before anything reads the files.
    ``one_shot`` builds the :class:`AcmeService` in one-shot mode (the CLI's ``issue`` and
    ``renew``): no periodic check, ARI fetch or retry timer; the caller reports failures.
    ``host_serves_tls``: the embedding host serves :attr:`Runtime.tls` on its own TLS listeners
    (the Synapse module). Otherwise it gets the certificates only if ``tls_listen`` is set, so
    nothing claims to serve a certificate that no listener serves.
    ``metrics_registry``: the host's Prometheus registry (Synapse passes prometheus_client's
    global ``REGISTRY``, which its ``metrics`` listener serves from a thread of its own); the
    runtime's metrics are in it while the runtime runs. ``metrics_listen`` serves them from a
    registry of the runtime's own, not in one-shot mode.

    Nothing is ordered before the standalone HTTP-01 listener is bound: the service waits for
    it, and if it cannot be bound each attempt fails with that error without reaching the CA.

    The built runtime manages ``config.storage``: it holds the store's lock (see
    :mod:`synapse_acme.interprocess`) until ``service`` stops, and raises StoreBusy if another
    process holds it. With ``database`` there is no such lock: every process shares the
    database, and orders under its issuance lock (:mod:`synapse_acme.sharedstore`, whose
    start-up work, bounded by ``database.connect_timeout``, is done here).
    """
    assert IReactorTime.providedBy(reactor) or hasattr(reactor, "seconds")
    check_startable(config)
    if config.external_certificates:
        return _build_external(config, reactor, one_shot, metrics_registry)
    # Before anything is chmod-ed or created in it: run as root, a store that belongs to
    # another user (or a symlink to one) would otherwise be taken over, keys and all.
    fsutil.check_owned_by_us(config.storage, "the storage directory")
    fsutil.ensure_private_dir(config.storage)
    lock: StoreLock | None = None
    shared: SharedStore | None = None
    if config.database is not None:
        from synapse_acme.sharedstore import open_shared_store

        keys = [names_key(canonical_names(spec.names)) for spec in config.certificate_specs()]
        shared = open_shared_store(config, reactor, keys)
    else:
        # Only the process holding the lock may recover, order and save (StoreBusy otherwise).
        lock = StoreLock.acquire(config.storage)
    try:
        return _build_managing(
            config,
            reactor,
            lock,
            standalone_listener,
            http_client,
            runner,
            one_shot,
            host_serves_tls,
            metrics_registry,
            shared,
        )
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build_managing(
    config: AcmeConfig,
    reactor: IReactor,
    lock: StoreLock | None,
    standalone_listener: bool,
    http_client: HTTPClient | None,
    runner: Runner | None,
    one_shot: bool,
    host_serves_tls: bool,
    metrics_registry: CollectorRegistry | None,
    shared: SharedStore | None = None,
) -> Runtime:
    """The provisioning runtime on the file store (holding its ``lock``), or on the shared
    database store (``shared``, no lock)."""
    metrics = AcmeMetrics()
    cas = config.issuer_list()
    store: FileStore | None = None
    if shared is None:
        store = FileStore(config.storage)
        for line in store.recover():
            logger.warning("Store recovery: %s", line)
        account_keys = [_account_key(config, index, ca) for index, ca in enumerate(cas)]
    else:
        account_keys = [shared.account_key]  # config.py allows one CA with a database
    # Its probe secret lets `synapse-acme check` prove that this process answers challenges.
    responder = HTTP01Responder(
        probe_secret=probe_secret_for(account_keys[0]),
        on_request=metrics.challenge_request,
        shared=shared.backend if shared is not None else None,
    )
    specs = config.certificate_specs()
    keys = [names_key(canonical_names(spec.names)) for spec in specs]
    required = {k: canonical_names(spec.names) for k, spec in zip(keys, specs, strict=True)}
    tls = HotSwapTLS(
        default_key=keys[0], clock=reactor, required_names=required, on_swap=metrics.tls_swapped
    )
    serves_tls = host_serves_tls or bool(config.tls_listen)
    if serves_tls:
        from synapse_acme.tlsalpn01 import TLSALPN01Responder
    responders = challenge_responders(
        responder,
        TLSALPN01Responder(tls=tls, clock=reactor) if serves_tls else None,
        (
            dns01_responder(config.dns01, reactor, thread_runner(reactor))
            if config.dns01 is not None
            else None
        ),
    )
    preferences = challenge_preferences(
        config,
        responders,
        # With a database any process on it answers HTTP-01 (tokens are in the database),
        # while tls-alpn-01 only reaches the process that ordered.
        http01_served=(
            not standalone_listener or bool(config.http01_endpoints()) or shared is not None
        ),
    )
    named = [
        NamedIssuer(
            ca.url,
            _acme_issuer(
                config,
                reactor,
                index,
                ca,
                key,
                _IssuerParts(
                    list(responders.values()),
                    preferences,
                    metrics,
                    http_client,
                    runner,
                    shared.account_recorder(ca.url) if shared is not None else None,
                ),
            ),
        )
        for index, (ca, key) in enumerate(zip(cas, account_keys, strict=True))
    ]
    issuer: IIssuer = named[0].issuer
    if len(named) > 1:
        # A one-shot command makes one attempt: there every failure asks the next CA.
        budget = 1 if one_shot else policy.FALLBACK_AFTER_FAILURES
        issuer = FallbackIssuer(named, budget=budget)
    exporters: dict[str, FileExporter] = {}
    write_status = _status_writer(config, tls if serves_tls else None, exporters, runner)
    alerter = None if one_shot else make_alerter(config, reactor, runner)
    on_status = write_status if alerter is None else _both(write_status, alerter.statuses_changed)
    listener = http01_listener_for(config, reactor, responder) if standalone_listener else None
    # The preflight probes HTTP-01: only for certificates validated that way first (with
    # dns-01 or tls-alpn-01 the CA looks elsewhere).
    probe = config.preflight.enabled and any(t[0] == "http-01" for t in preferences.values())
    preflight = None
    if probe and shared is None:
        preflight = make_preflight(config, reactor, responder)
    elif probe:  # the probe may reach any process on the database: all answer the secret's
        preflight = make_preflight(config, reactor, None, responder.probe_secret)
    service_store: ListableStore
    coordination = None
    if shared is not None:
        from synapse_acme.sharedstore import holder_id

        assert config.database is not None
        service_store = shared.backend
        coordination = Coordination(shared.backend, holder_id(), config.database.lease)
    elif runner is not None:
        from synapse_acme.threaded import ThreadedStore

        assert store is not None
        service_store = ThreadedStore(store, runner)
    else:
        assert store is not None
        service_store = store
    acme = AcmeService(
        specs,
        service_store,
        issuer,
        reactor,
        threshold_days=config.reprovision_threshold,
        check_interval=config.check_interval,
        check_jitter=config.check_jitter,
        on_status=on_status,
        one_shot=one_shot,
        ready=listener.when_listening if listener is not None else None,
        before_order=_before_order(
            config, reactor, responder, preflight, http_client, service_store, preferences
        ),
        on_result=metrics.issuance_finished,
        coordination=coordination,
    )
    if serves_tls:
        acme.add_consumer(tls)

    root = MultiService()
    if lock is not None:
        StoreLockService(lock).setServiceParent(root)  # first in, so it is stopped last
    if shared is not None and not one_shot:
        from synapse_acme.sharedstore import SharedStoreService

        SharedStoreService(shared.backend, acme).setServiceParent(root)  # stopped last
    elif shared is not None:  # a one-shot command follows nothing; it only closes at the end
        _Closing(shared.backend).setServiceParent(root)
    exporter = None
    if config.tls_certificate_path and config.tls_private_key_path:
        from synapse_acme.export import FileExporter

        exporter = FileExporter(
            key=keys[0],
            cert_path=config.tls_certificate_path,
            key_path=config.tls_private_key_path,
            storage=config.storage,
            clock=None if one_shot else reactor,  # a one-shot command reports, never retries
            on_state=lambda _: write_status(acme.status()),
            runner=runner,
            log_failures=not one_shot,  # the one-shot command prints one FAILED line instead
        )
        exporters[exporter.key] = exporter
        # Before anything reads the files: they hold the store's certificate as one pair.
        exporter.repair(
            _stored(store, exporter.key)
            if store is not None
            else shared_bundle(shared, exporter.key)
        )
        exporter.setServiceParent(root)  # stopped after the provisioning service
        acme.add_consumer(exporter)
    if alerter is not None:
        alerter.setServiceParent(root)
    if listener is not None:
        listener.setServiceParent(root)
    listeners = [listener] if listener is not None else []
    listeners += _add_tls_listeners(config, reactor, tls, root)
    acme.setServiceParent(root)
    registry = _export_metrics(
        config, reactor, metrics, root, listeners, one_shot, metrics_registry
    )
    return Runtime(
        config=config,
        service=root,
        acme=acme,
        responder=responder,
        tls=tls,
        store=store,
        backend=shared.backend if shared is not None else None,
        exporter=exporter,
        http01_listener=listener,
        listeners=listeners,
        serves_tls=serves_tls,
        preflight=preflight,
        metrics=metrics,
        metrics_registry=registry,
        alerter=alerter,
    )


def make_alerter(config: AcmeConfig, reactor: IReactor, runner: Runner | None) -> Alerter | None:
    """The alerter of ``acme.alerts`` (None when off), with the ``alert_webhook`` sink if set;
    a homeserver adds its own sinks (synapse_acme.synapse.notices)."""
    if not config.alerts.enabled:
        return None
    from synapse_acme.alerter import STATE_FILE as ALERT_STATE_FILE
    from synapse_acme.alerter import Alerter

    alerter = Alerter(
        reactor,
        state_path=os.path.join(config.storage, ALERT_STATE_FILE),
        expiry_days=config.alerts.expiry_days,
        runner=runner,
    )
    if config.alert_webhook is not None:
        from synapse_acme.webhook import WebhookSink, make_webhook_client

        alerter.add_sink(
            WebhookSink(
                url=config.alert_webhook,
                http=make_webhook_client(reactor),
                clock=reactor,
                host=socket.gethostname(),
            )
        )
    return alerter


def _both(
    first: Callable[[list[CertificateStatus]], None],
    second: Callable[[list[CertificateStatus]], None],
) -> Callable[[list[CertificateStatus]], None]:
    def both(statuses: list[CertificateStatus]) -> None:
        first(statuses)
        second(statuses)

    return both


def challenge_responders(
    http01: HTTP01Responder,
    tls_alpn01: TLSALPN01Responder | None,
    dns01: IResponder | None = None,
) -> dict[str, IResponder]:
    """The responders this setup has, by challenge type, in the default preference order
    (:data:`~synapse_acme.config.CHALLENGE_TYPES`'s). A new challenge type joins here."""
    found: dict[str, IResponder] = {"http-01": http01}
    if tls_alpn01 is not None:
        found["tls-alpn-01"] = tls_alpn01
    if dns01 is not None:
        found["dns-01"] = dns01
    return {t: found[t] for t in CHALLENGE_TYPES if t in found}


def challenge_preferences(
    config: AcmeConfig, responders: Mapping[str, IResponder], *, http01_served: bool
) -> dict[str, tuple[str, ...]]:
    """Each certificate's challenge types, preferred first, by its names key.

    A certificate's own ``challenges``, else the block's, else what this setup can answer:
    ``http-01`` if this process serves it (its HTTP-01 listener, or the host's listeners),
    then ``tls-alpn-01`` if it serves TLS; with neither, ``http-01`` (answered elsewhere,
    as before there was a choice). ConfigError, naming the key, for a type without a
    responder here."""
    default = tuple(t for t in responders if t != "http-01" or http01_served) or ("http-01",)
    specs = config.certificate_specs()
    main = 1 if config.domain is not None else 0
    out: dict[str, tuple[str, ...]] = {}
    for index, spec in enumerate(specs):
        setting = "challenges"
        types = config.challenges
        if spec.challenges is not None:
            setting = f"certificates[{index - main}].challenges"
            types = spec.challenges
        if types is None:
            types = default
        for typ in types:
            if typ not in responders:
                raise ConfigError(
                    config.key(setting),
                    f"{typ} cannot be answered here: {_needs(typ, config)}",
                    list(types),
                )
        out[names_key(canonical_names(spec.names))] = tuple(types)
    return out


def _needs(typ: str, config: AcmeConfig) -> str:
    """What makes a challenge type answerable, for the error above."""
    if typ == "dns-01":
        return f"it needs the DNS server that updates the zone: set {config.key('dns01')}"
    if typ == "tls-alpn-01":
        return (
            f"it is answered by the TLS listeners synapse-acme serves: set "
            f"{config.key('tls_listen')} (standalone), or use the Synapse module with a "
            "`tls: true` listener"
        )
    return "no responder for it is configured"


def _account_key(config: AcmeConfig, index: int, ca: IssuerConfig) -> jose.JWK:
    """The account key at CA number ``index`` of ``acme.issuers`` (see
    :func:`synapse_acme.account.issuer_account_paths`); created only for a CA that never had
    an account in this store."""
    key_file, account_dir = issuer_account_paths(
        index, ca.url, config.account_key_file, config.storage
    )
    if index > 0:
        fsutil.ensure_private_dir(os.path.dirname(account_dir), follow=False)
        fsutil.ensure_private_dir(account_dir, follow=False)
    # Never a silent new account for a store that had one (see synapse_acme.account).
    return load_or_create_account_key(key_file, storage=account_dir)


@attrs.frozen
class _IssuerParts:
    """What every CA's issuer shares: the responders and preferences, the metrics, the HTTP
    client (tests) and the host's thread runner."""

    responders: list[IResponder]
    preferences: dict[str, tuple[str, ...]]
    metrics: AcmeMetrics
    http_client: HTTPClient | None
    runner: Runner | None
    #: Records the account URL somewhere else than ``account.json`` (the database); None:
    #: the file store's :class:`~synapse_acme.account.AccountRecorder`.
    record_account: Callable[[str], object] | None = None


def _acme_issuer(
    config: AcmeConfig,
    reactor: IReactor,
    index: int,
    ca: IssuerConfig,
    account_key: jose.JWK,
    parts: _IssuerParts,
) -> AcmeIssuer:
    """The issuer for CA number ``index`` of the list, with its own account, HTTPS trust,
    chain trust, EAB and profile; its account URL is recorded in its own ``account.json``."""
    http_client, runner = parts.http_client, parts.runner
    _, account_dir = issuer_account_paths(index, ca.url, config.account_key_file, config.storage)
    recorder = AccountRecorder(account_dir, ca.url, key_thumbprint(account_key))
    on_account: Callable[[str], object] = recorder
    if parts.record_account is not None:
        on_account = parts.record_account
    elif runner is not None:  # reads (and rarely writes) account.json: not on the host's reactor

        def on_account(url: str) -> object:
            return runner(recorder, url).addErrback(
                lambda f: logger.error("Could not record the ACME account: %s", f.value)
            )

    http = http_client if http_client is not None else make_http_client(reactor, ca.ca_bundle)
    transport = JWSTransport(
        http,
        reactor,
        account_key,
        ca.url,
        timeout=config.request_timeout,
        max_requests_per_minute=config.max_requests_per_minute,
        untrusted_hint=_untrusted_hint(ca),
        on_response=parts.metrics.ca_response,
    )
    return AcmeIssuer(
        client=AcmeClient(transport),
        responders=parts.responders,
        challenge_preferences=parts.preferences,
        clock=reactor,
        account_key=account_key,
        trust=_issuer_trust(ca),
        contact=config.contact,
        tos_agreed=config.terms_of_service_agreed,
        eab=(ca.eab.kid, ca.eab.hmac_key) if ca.eab is not None else None,
        eab_setting=ca.key("eab"),
        profile=ca.profile,
        poll_interval=config.poll_interval,
        poll_timeout=config.poll_timeout,
        on_account=on_account,
    )


def http01_listener_for(
    config: AcmeConfig, reactor: IReactor, responder: HTTP01Responder
) -> ListenerService | None:
    """The standalone HTTP-01 listener of ``acme.port``/``acme.listen`` serving ``responder``
    (not yet started), or None when the configuration has none."""
    endpoints = config.http01_endpoints()
    if not endpoints:
        return None
    http_limits, _ = _listener_limits(config, True)
    factory = LimitedFactory(
        make_factory(responder, reactor, http_limits.header_timeout),
        http_limits,
        reactor,
        "HTTP-01 listener",
    )
    return ListenerService(reactor, factory, endpoints, setting=_listener_setting(config))


def make_preflight(
    config: AcmeConfig,
    reactor: IReactor,
    responder: HTTP01Responder | None,
    probe_secret: bytes | None = None,
) -> Preflight:
    """The preflight of ``acme.preflight`` (port, timeout, resolver), answered by ``responder``
    or, without one, by the process holding ``probe_secret`` (see synapse_acme.preflight)."""
    settings = config.preflight
    return Preflight(
        clock=reactor,
        lookup=lookup_from_setting(reactor, settings.resolver),
        agent_for=direct_agent(reactor, settings.timeout),
        responder=responder,
        probe_secret=probe_secret,
        port=settings.port,
        timeout=settings.timeout,
    )


def _before_order(
    config: AcmeConfig,
    reactor: IReactor,
    responder: HTTP01Responder,
    preflight: Preflight | None,
    http_client: HTTPClient | None,
    store: ListableStore,
    preferences: Mapping[str, tuple[str, ...]],
) -> Callable[[CertificateSpec, CertificateBundle | None], Deferred[None]] | None:
    """What must pass before each order: the preflight (it probes the HTTP-01 path, so only
    for certificates that prefer ``http-01``), then (with ``dry_run_on_change``) a dry run when
    the names or the CA differ from the last issuance. None when nothing."""
    dry = None
    if config.dry_run_on_change:
        from synapse_acme.dryrun import DryRunOnChange

        dry = DryRunOnChange(config, reactor, responder, store=store, http_client=http_client)
    if preflight is None and dry is None:
        return None

    async def check(spec: CertificateSpec, previous: CertificateBundle | None) -> None:
        types = preferences.get(names_key(canonical_names(spec.names)), ("http-01",))
        if preflight is not None and types[0] == "http-01":
            await preflight.require(spec.names)
        if dry is not None:
            await dry.before_order(spec, previous)

    return lambda spec, previous: Deferred.fromCoroutine(check(spec, previous))


def check_startable(config: AcmeConfig) -> None:
    """ConfigError, naming the key, for what would make a start fail after files were written
    (or write them where nobody asked for them); nothing is touched before it passes."""
    if not config.certificate_specs():
        raise ConfigError(
            config.key("domain"),
            "not set, so there is no certificate to manage: set domain (or certificates)",
            has_value=False,
        )
    if not config.external_certificates:
        check_account_key_directory(config)


def check_account_key_directory(config: AcmeConfig) -> None:
    """ConfigError naming ``account_key_file`` if its directory is missing and outside the
    storage directory (see :func:`synapse_acme.account.missing_key_directory`)."""
    missing = missing_key_directory(config.account_key_file, config.storage)
    if missing is not None:
        raise ConfigError(
            config.key("account_key_file"),
            f"its directory {missing} does not exist, and synapse-acme creates directories only "
            f"inside the storage directory ({config.storage}): create that directory, or remove "
            "account_key_file to keep the key in the storage directory (the default)",
            config.account_key_file,
        )


def _listener_setting(config: AcmeConfig) -> str:
    """Where the standalone listener's endpoints come from, for its bind errors."""
    if config.listen is not None:
        return f"{config.key('listen')} ({', '.join(config.listen)})"
    return (
        f"{config.key('port')} ({config.port}) and {config.key('bind_addresses')} "
        f"({', '.join(config.bind_addresses)})"
    )


def _untrusted_hint(ca: IssuerConfig) -> str:
    """What to do when the CA's HTTPS certificate does not verify: the setting that decides."""
    if ca.ca_bundle is not None:
        return (
            f"the CA's HTTPS certificate is not signed by a certificate in "
            f"{ca.key('ca_bundle')} ({ca.ca_bundle}): put the CA's root certificate "
            f"(PEM) there, or check {ca.key('url')}"
        )
    return (
        "the CA's HTTPS certificate is not trusted by this system's trust store: for a private "
        f"CA (step-ca, Pebble) set {ca.key('ca_bundle')} to a PEM file with its root "
        f"certificate; otherwise check {ca.key('url')} and the system clock"
    )


def _stored(store: FileStore, key: str) -> CertificateBundle | None:
    """The store's bundle for ``key`` (the file store answers at once), None if absent or
    unreadable (an unreadable one is reported by the service when it loads the store)."""
    result: list[CertificateBundle | None] = []
    store.load(key).addCallbacks(result.append, lambda f: result.append(None))
    return result[0] if result else None


def shared_bundle(shared: SharedStore | None, key: str) -> CertificateBundle | None:
    """What the shared store held for ``key`` at start (None if nothing, or unreadable)."""
    return shared.bundles.get(key) if shared is not None else None


class _Closing(Service):
    """Closes the shared store's connections when a one-shot runtime stops."""

    def __init__(self, backend: PostgresBackend) -> None:
        self._backend = backend

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self._backend.close().addErrback(lambda _: None)


def _add_tls_listeners(
    config: AcmeConfig, reactor: IReactor, tls: HotSwapTLS, root: MultiService
) -> list[ListenerService]:
    listeners: list[ListenerService] = []
    if not config.tls_listen:
        return listeners
    _, tls_limits = _listener_limits(config, bool(config.http01_endpoints()))
    for endpoint in config.tls_listen:
        setting = f"{config.key('tls_listen')} ({endpoint})"
        listener = tls_listener(reactor, endpoint, tls, setting=setting, limits=tls_limits)
        listener.setServiceParent(root)
        listeners.append(listener)
    return listeners


def _export_metrics(
    config: AcmeConfig,
    reactor: IReactor,
    metrics: AcmeMetrics,
    root: MultiService,
    listeners: list[ListenerService],
    one_shot: bool,
    host_registry: CollectorRegistry | None,
) -> CollectorRegistry | None:
    """Export ``metrics``: into ``host_registry`` while ``root`` runs, and on each
    ``metrics_listen`` endpoint (added to ``listeners``, so :meth:`Runtime.when_ready` covers
    them). A one-shot command exports nothing: it is gone before anyone scrapes it."""
    registry = None
    if host_registry is not None:
        # The host serves its registry from another thread: read the status on the reactor.
        collector = ReactorThreadCollector(metrics, reactor)
        RegistryMembership(host_registry, collector).setServiceParent(root)
        registry = host_registry
    if config.metrics_listen and not one_shot:
        own = own_registry(metrics)
        _, limits = _listener_limits(config, bool(config.http01_endpoints()))
        listener = ListenerService(
            reactor,
            LimitedFactory(metrics_site(own), limits, reactor, "metrics listener"),
            list(config.metrics_listen),
            setting=f"{config.key('metrics_listen')} ({', '.join(config.metrics_listen)})",
            what="metrics listener",
        )
        listener.setServiceParent(root)
        listeners.append(listener)
        registry = registry if registry is not None else own
    return registry


def _issuer_trust(ca: IssuerConfig) -> IssuerTrust:
    """The roots issued chains must reach: the system store, ``ca_bundle`` (a private CA
    serves its API under the root it issues from) and ``issuer_roots``."""
    files = [
        (ca.key(key), path)
        for key, path in (("ca_bundle", ca.ca_bundle), ("issuer_roots", ca.issuer_roots))
        if path is not None
    ]
    return load_issuer_trust(files)


def _listener_limits(config: AcmeConfig, http01: bool) -> tuple[ConnectionLimits, ConnectionLimits]:
    """The caps of the HTTP-01 and TLS listeners, after lifting the process's descriptor
    limit; shrunk if all the listeners together could still exhaust it (see limits.py)."""
    soft, hard = raise_fd_limit()
    base = config.connection_limits
    listeners = (
        (len(config.http01_endpoints()) if http01 else 0)
        + len(config.tls_listen)
        + len(config.metrics_listen)
    )
    fitted = fit_to_fd_limit([base] * max(1, listeners), soft)[0]
    if fitted != base:
        logger.warning(
            "The open-files limit is %d (hard %d): each listener takes at most %d connections "
            "(raise LimitNOFILE to lift this)",
            soft,
            hard,
            fitted.max_connections,
        )
    else:
        logger.debug("open-files limit %d (hard %d)", soft, hard)
    return fitted, fitted


def _build_external(
    config: AcmeConfig,
    reactor: IReactor,
    one_shot: bool,
    metrics_registry: CollectorRegistry | None,
) -> Runtime:
    """Certificates kept by another tool (certbot): watch the two files and hot-swap them."""
    assert config.tls_certificate_path and config.tls_private_key_path  # config.py checks
    spec = config.certificate_specs()[0]
    key = names_key(spec.names)
    metrics = AcmeMetrics()
    tls = HotSwapTLS(
        default_key=key,
        clock=reactor,
        required_names={key: spec.names},
        on_swap=metrics.tls_swapped,
    )
    from synapse_acme.watch import FileWatcher

    root = MultiService()
    watcher = FileWatcher(
        cert_path=config.tls_certificate_path,
        key_path=config.tls_private_key_path,
        key=key,
        consumer=tls,
        clock=reactor,
        interval=config.watch_interval,
    )
    watcher.setServiceParent(root)
    listeners = _add_tls_listeners(config, reactor, tls, root)
    registry = _export_metrics(
        config, reactor, metrics, root, listeners, one_shot, metrics_registry
    )
    return Runtime(
        config=config,
        service=root,
        acme=None,
        responder=HTTP01Responder(),
        tls=tls,
        store=None,
        watcher=watcher,
        listeners=listeners,
        metrics=metrics,
        metrics_registry=registry,
    )


__all__ = [
    "IReactorCore",
    "Runtime",
    "build_runtime",
    "challenge_preferences",
    "challenge_responders",
    "http01_listener_for",
    "make_alerter",
    "make_preflight",
    "status_path",
]
