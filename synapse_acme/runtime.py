"""Wiring: turns an :class:`~synapse_acme.config.AcmeConfig` into running parts.

The only place that knows which implementation goes with which contract; the standalone runner,
the CLI's one-shot commands and the Synapse module all build through :func:`build_runtime`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import attrs
import josepy as jose
from cryptography import x509
from treq.client import HTTPClient
from twisted.application.service import MultiService
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
from synapse_acme.config import AcmeConfig, IssuerConfig
from synapse_acme.errors import BundleError, ConfigError
from synapse_acme.export import FileExporter
from synapse_acme.fallback import FallbackIssuer, NamedIssuer
from synapse_acme.http01 import HTTP01Responder
from synapse_acme.http01_server import make_factory
from synapse_acme.interfaces import IIssuer, IReactor
from synapse_acme.interprocess import StoreLock, StoreLockService
from synapse_acme.limits import ConnectionLimits, LimitedFactory, fit_to_fd_limit, raise_fd_limit
from synapse_acme.listeners import ListenerService, tls_listener
from synapse_acme.model import CertificateBundle, CertificateSpec
from synapse_acme.names import canonical_names, names_key
from synapse_acme.preflight import Preflight, direct_agent, lookup_from_setting, probe_secret_for
from synapse_acme.service import AcmeService
from synapse_acme.status import CertificateStatus, dump_status_file
from synapse_acme.store import FileStore
from synapse_acme.threaded import Runner, ThreadedStore
from synapse_acme.tls import HotSwapTLS
from synapse_acme.watch import FileWatcher

if TYPE_CHECKING:  # imported where used: a dry run is rare
    from synapse_acme.dryrun import ListableStore

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
    store: FileStore | None
    exporter: FileExporter | None = None
    http01_listener: ListenerService | None = None
    #: Every listener this runtime opens (HTTP-01 first, then each TLS listener).
    listeners: list[ListenerService] = attrs.field(factory=list)
    watcher: FileWatcher | None = None
    preflight: Preflight | None = None  # None when acme.preflight.enabled is false
    serves_tls: bool = False  # runtime.tls is served (tls_listen, or the host's listeners)

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

    Nothing is ordered before the standalone HTTP-01 listener is bound: the service waits for
    it, and if it cannot be bound each attempt fails with that error without reaching the CA.

    The built runtime manages ``config.storage``: it holds the store's lock (see
    :mod:`synapse_acme.interprocess`) until ``service`` stops, and raises StoreBusy if another
    process holds it.
    """
    assert IReactorTime.providedBy(reactor) or hasattr(reactor, "seconds")
    check_startable(config)
    if config.external_certificates:
        return _build_external(config, reactor)
    # Before anything is chmod-ed or created in it: run as root, a store that belongs to
    # another user (or a symlink to one) would otherwise be taken over, keys and all.
    fsutil.check_owned_by_us(config.storage, "the storage directory")
    fsutil.ensure_private_dir(config.storage)
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
        )
    except BaseException:
        lock.release()
        raise


def _build_managing(
    config: AcmeConfig,
    reactor: IReactor,
    lock: StoreLock,
    standalone_listener: bool,
    http_client: HTTPClient | None,
    runner: Runner | None,
    one_shot: bool,
    host_serves_tls: bool,
) -> Runtime:
    store = FileStore(config.storage)
    for line in store.recover():
        logger.warning("Store recovery: %s", line)
    cas = config.issuer_list()
    account_keys = [_account_key(config, index, ca) for index, ca in enumerate(cas)]
    # Its probe secret lets `synapse-acme check` prove that this process answers challenges.
    responder = HTTP01Responder(probe_secret=probe_secret_for(account_keys[0]))
    named = [
        NamedIssuer(
            ca.url,
            _acme_issuer(config, reactor, index, ca, key, responder, http_client, runner),
        )
        for index, (ca, key) in enumerate(zip(cas, account_keys, strict=True))
    ]
    issuer: IIssuer = named[0].issuer
    if len(named) > 1:
        # A one-shot command makes one attempt: there every failure asks the next CA.
        budget = 1 if one_shot else policy.FALLBACK_AFTER_FAILURES
        issuer = FallbackIssuer(named, budget=budget)
    specs = config.certificate_specs()
    keys = [names_key(canonical_names(spec.names)) for spec in specs]
    required = {k: canonical_names(spec.names) for k, spec in zip(keys, specs, strict=True)}
    tls = HotSwapTLS(default_key=keys[0], clock=reactor, required_names=required)
    serves_tls = host_serves_tls or bool(config.tls_listen)
    exporters: dict[str, FileExporter] = {}
    write_status = _status_writer(config, tls if serves_tls else None, exporters, runner)
    listener = http01_listener_for(config, reactor, responder) if standalone_listener else None
    preflight = make_preflight(config, reactor, responder) if config.preflight.enabled else None
    service_store = ThreadedStore(store, runner) if runner is not None else store
    acme = AcmeService(
        specs,
        service_store,
        issuer,
        reactor,
        threshold_days=config.reprovision_threshold,
        check_interval=config.check_interval,
        check_jitter=config.check_jitter,
        on_status=write_status,
        one_shot=one_shot,
        ready=listener.when_listening if listener is not None else None,
        before_order=_before_order(
            config, reactor, responder, preflight, http_client, service_store
        ),
    )
    if serves_tls:
        acme.add_consumer(tls)

    root = MultiService()
    StoreLockService(lock).setServiceParent(root)  # first in, so it is stopped last
    exporter = None
    if config.tls_certificate_path and config.tls_private_key_path:
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
        exporter.repair(_stored(store, exporter.key))
        exporter.setServiceParent(root)  # stopped after the provisioning service
        acme.add_consumer(exporter)
    if listener is not None:
        listener.setServiceParent(root)
    listeners = [listener] if listener is not None else []
    listeners += _add_tls_listeners(config, reactor, tls, root)
    acme.setServiceParent(root)
    return Runtime(
        config=config,
        service=root,
        acme=acme,
        responder=responder,
        tls=tls,
        store=store,
        exporter=exporter,
        http01_listener=listener,
        listeners=listeners,
        serves_tls=serves_tls,
        preflight=preflight,
    )


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


def _acme_issuer(
    config: AcmeConfig,
    reactor: IReactor,
    index: int,
    ca: IssuerConfig,
    account_key: jose.JWK,
    responder: HTTP01Responder,
    http_client: HTTPClient | None,
    runner: Runner | None,
) -> AcmeIssuer:
    """The issuer for CA number ``index`` of the list, with its own account, HTTPS trust,
    chain trust, EAB and profile; its account URL is recorded in its own ``account.json``."""
    _, account_dir = issuer_account_paths(index, ca.url, config.account_key_file, config.storage)
    recorder = AccountRecorder(account_dir, ca.url, key_thumbprint(account_key))
    on_account: Callable[[str], object] = recorder
    if runner is not None:  # reads (and rarely writes) account.json: not on the host's reactor

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
    )
    return AcmeIssuer(
        client=AcmeClient(transport),
        responders=[responder],
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
) -> Callable[[CertificateSpec, CertificateBundle | None], Deferred[None]] | None:
    """What must pass before each order: the preflight, then (with ``dry_run_on_change``) a
    dry run when the names or the CA differ from the last issuance. None when nothing."""
    dry = None
    if config.dry_run_on_change:
        from synapse_acme.dryrun import DryRunOnChange

        dry = DryRunOnChange(config, reactor, responder, store=store, http_client=http_client)
    if preflight is None and dry is None:
        return None

    async def check(spec: CertificateSpec, previous: CertificateBundle | None) -> None:
        if preflight is not None:
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
    listeners = (len(config.http01_endpoints()) if http01 else 0) + len(config.tls_listen)
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


def _build_external(config: AcmeConfig, reactor: IReactor) -> Runtime:
    """Certificates kept by another tool (certbot): watch the two files and hot-swap them."""
    assert config.tls_certificate_path and config.tls_private_key_path  # config.py checks
    spec = config.certificate_specs()[0]
    key = names_key(spec.names)
    tls = HotSwapTLS(default_key=key, clock=reactor, required_names={key: spec.names})
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
    return Runtime(
        config=config,
        service=root,
        acme=None,
        responder=HTTP01Responder(),
        tls=tls,
        store=None,
        watcher=watcher,
        listeners=listeners,
    )


__all__ = [
    "IReactorCore",
    "Runtime",
    "build_runtime",
    "http01_listener_for",
    "make_preflight",
    "status_path",
]
