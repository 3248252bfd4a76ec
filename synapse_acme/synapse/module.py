"""The Synapse module: automatic certificates inside a running homeserver.

Why a module: Synapse's built-in ACME support (v1 only) was removed in 1.30, and Let's Encrypt
switched ACME v1 off in 2021. As a module we answer HTTP-01 challenges on Synapse's own
listeners, provision from the process that runs background tasks, and hot-swap the certificate
of Synapse's TLS listeners without a restart. Everything that touches Synapse internals lives in
:mod:`synapse_acme.synapse.glue`; this file uses only the public module API and the glue.

Configure in homeserver.yaml::

    modules:
      - module: synapse_acme.synapse.AcmeModule
        config:
          contact: admin@example.org
          terms_of_service_agreed: true
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python import runtime
from twisted.python.failure import Failure
from zope.interface import implementer

from synapse_acme import crypto, fsutil
from synapse_acme.config import MODULE_NAME, AcmeConfig, choose_block, parse_acme_config
from synapse_acme.errors import BundleError, ConfigError, StoreBusy, StoreError, SynapseAcmeError
from synapse_acme.interfaces import ICertificateConsumer, IReactor
from synapse_acme.interprocess import RenewRequestWatcher, renew_request_path
from synapse_acme.model import CertificateBundle
from synapse_acme.names import canonical_names, names_key
from synapse_acme.pairs import read_pair
from synapse_acme.status import MAX_STATUS_FILE, CertificateStatus, parse_status_file
from synapse_acme.synapse import glue

if TYPE_CHECKING:  # imported when needed at run time: parse_config must stay light
    from synapse.module_api import ModuleApi

    from synapse_acme.export import FileExporter
    from synapse_acme.runtime import Runtime
    from synapse_acme.tls import HotSwapTLS
    from synapse_acme.watch import FileWatcher

logger = logging.getLogger(__name__)

#: Where the challenge resource is mounted on every Synapse HTTP listener.
CHALLENGE_PATH = "/.well-known/acme-challenge"
#: Keys of the module config that the standalone ``acme:`` block does not have.
_EXPLICIT_LISTENER_KEYS = ("port", "listen")


@attrs.frozen
class ModuleSettings:
    """What :meth:`AcmeModule.parse_config` hands to :meth:`AcmeModule.__init__`."""

    acme: AcmeConfig
    source: str  # "modules" or "acme" (the old top-level block)
    standalone_listener: bool  # the block asked for its own port/listen
    placeholder_written: bool = False


def _split_path(path: str, prefix: str) -> tuple[str, ...]:
    rest = path[len(prefix) :].lstrip(".") if path.startswith(prefix) else path
    return tuple(p for p in rest.split(".") if p)


def _choose_block(
    module_config: Mapping[str, Any], hs: glue.HomeserverSettings | None
) -> tuple[Mapping[str, Any], str, str]:
    """Pick the block to parse: the module's config, or the old top-level ``acme:`` block
    (:func:`synapse_acme.config.choose_block`, the rule the command line follows too).

    Returns ``(block, source, error_prefix)``. Never ignores a top-level block silently.
    """
    legacy = hs.top_level_acme if hs is not None else None
    index = hs.module_index if hs is not None else None
    where = f"modules[{index}].config" if index is not None else "the module's config"
    try:
        chosen = choose_block(module_config, legacy, where)
    except ConfigError as e:
        raise glue.synapse_config_error(e.message, ()) from None
    if chosen.warning is not None:
        logger.warning("synapse-acme: %s", chosen.warning)
    prefix = "config" if chosen.source == "modules" else "acme"
    return chosen.block, chosen.source, prefix


def prepare_tls_files(config: AcmeConfig, clock: IReactorTime) -> bool:
    """Before Synapse reads its TLS files: make them a usable pair. Returns True if a
    placeholder was written.

    With the store's lock free (no other process manages it): finish an interrupted store save,
    then repair the exported pair from the store (missing, mismatched or stale files, loose key
    modes, leftover temporary files). If there is still no certificate, write a labelled
    self-signed placeholder so Synapse can start; it uses the exporter's ownership record, so
    the real certificate replaces it later. Files that are not ours are never touched.
    """
    cert_path, key_path = config.tls_certificate_path, config.tls_private_key_path
    specs = config.certificate_specs()
    if not cert_path or not key_path or not specs:
        return False
    from synapse_acme.export import FileExporter

    names = canonical_names(specs[0].names)
    exporter = FileExporter(
        key=names_key(names), cert_path=cert_path, key_path=key_path, storage=config.storage
    )
    _repair_from_store(config, exporter)
    if os.path.exists(cert_path) and os.path.exists(key_path):
        return False
    written = bool(exporter.write_placeholder_if_missing(names, crypto.now_from_clock(clock)))
    if written:
        logger.warning(
            "synapse-acme: wrote a self-signed PLACEHOLDER certificate for %s to %s (valid %d "
            "days) so Synapse can start; it is replaced as soon as the real one is issued",
            ", ".join(names),
            cert_path,
            crypto.PLACEHOLDER_LIFETIME.days,
        )
    return written


def _repair_from_store(config: AcmeConfig, exporter: FileExporter) -> None:
    """The repair half of :func:`prepare_tls_files`; a busy or unusable store is left alone
    (its manager repairs at its own start) and never stops Synapse."""
    from synapse_acme.interprocess import StoreLock
    from synapse_acme.store import FileStore

    if not os.path.isdir(config.storage) or config.database is not None:
        return  # with a database, build_runtime repairs them from it
    try:
        fsutil.check_owned_by_us(config.storage, "the storage directory")
        lock = StoreLock.acquire(config.storage)
    except StoreError as e:  # StoreBusy included: the manager running now repaired already
        logger.info("synapse-acme: not repairing the TLS files from the store now: %s", e)
        return
    try:
        store = FileStore(config.storage)
        loaded: list[CertificateBundle | Failure | None] = []
        store.load(exporter.key).addCallbacks(loaded.append, loaded.append)
        bundle = loaded[0] if loaded and isinstance(loaded[0], CertificateBundle) else None
        if loaded and not isinstance(loaded[0], CertificateBundle) and loaded[0] is not None:
            logger.error(
                "synapse-acme: the stored certificate is unusable (%s); it is re-issued",
                loaded[0].getErrorMessage(),
            )
        if exporter.repair(bundle):
            logger.warning(
                "synapse-acme: repaired %s / %s from the store before Synapse reads them",
                exporter.cert_path,
                exporter.key_path,
            )
    except Exception:
        logger.exception("synapse-acme: could not repair the TLS files from the store")
    finally:
        lock.release()


def _read_bundle(cert_path: str, key_path: str) -> CertificateBundle | None:
    """The pair on disk as a bundle (re-read until key and chain match), or None if it is
    missing, unreadable or mismatched."""
    try:
        chain, key = read_pair(cert_path, key_path)
    except (OSError, SynapseAcmeError) as e:
        logger.warning("synapse-acme: cannot read the TLS files: %s", e)
        return None
    meta: dict[str, Any] = {}
    if crypto.is_placeholder(crypto.parse_chain(chain)[0]):
        meta["placeholder"] = True
    return CertificateBundle(key_pem=key, chain_pem=chain, metadata=meta)


class _ConfigTimeClock:
    """Twisted's own time source, for the placeholder's validity at config time: importing
    ``twisted.internet.reactor`` there would install a reactor before Synapse picks one."""

    def seconds(self) -> float:
        return runtime.seconds()


@implementer(ICertificateConsumer)
@attrs.define(eq=False)
class _ListenerKeeper:
    """After each new certificate: make sure Synapse's TLS listeners serve it.

    Normally the hot-swap creator is installed once and swaps by itself; this re-installs it if
    it was not installable at startup or Synapse's SIGHUP handler replaced it. Without the
    internals for that, it falls back to Synapse re-reading the files the exporter just wrote.
    """

    module: AcmeModule

    def certificate_changed(self, key: str, bundle: CertificateBundle) -> None:
        if key == self.module.key:
            self.module.reactor.callLater(0, self.module.ensure_serving)


@implementer(ICertificateConsumer)
@attrs.define(eq=False)
class _FollowerConsumer:
    """Processes that do not provision: each new, matching file pair the watcher sees goes to
    the hot-swap creator, which is then (re)installed on Synapse's listeners if needed."""

    module: AcmeModule

    def certificate_changed(self, key: str, bundle: CertificateBundle) -> None:
        if self.module.tls is None:
            return
        self.module.tls.certificate_changed(key, bundle)
        logger.info("synapse-acme: picked up the new certificate files for %s", key)
        self.module.ensure_serving()


class AcmeModule:
    """Synapse module: ``modules: [{module: synapse_acme.synapse.AcmeModule, config: {...}}]``."""

    @staticmethod
    def parse_config(config: Mapping[str, Any] | None) -> ModuleSettings:
        """Validate the config when Synapse loads it; write a placeholder pair if needed.

        Errors become Synapse config errors naming the key. Runs before Synapse checks that
        its TLS files exist, which is why the placeholder is written here.
        """
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise glue.synapse_config_error("expected a mapping of acme settings", ())
        hs = glue.find_homeserver_settings(MODULE_NAME)
        block, source, prefix = _choose_block(config, hs)
        defaults = None
        if hs is not None:
            defaults = {
                "tls_certificate_path": hs.tls_certificate_path,
                "tls_private_key_path": hs.tls_private_key_path,
            }
        try:
            acme = parse_acme_config(
                block,
                server_name=hs.server_name if hs is not None else None,
                base_dir=hs.config_dir if hs is not None else None,
                path=prefix,
                defaults_from=defaults,
            )
        except ConfigError as e:
            raise glue.synapse_config_error(str(e), _split_path(e.path, prefix)) from None
        if source == "modules" and hs is not None and hs.module_index is not None:
            # Runtime messages (a port that cannot be bound...) name the key as it is written.
            acme = attrs.evolve(acme, source_path=f"modules[{hs.module_index}].config")
        if hs is not None and hs.tls_certificate_path and acme.tls_certificate_path:
            if os.path.abspath(acme.tls_certificate_path) != hs.tls_certificate_path:
                logger.warning(
                    "synapse-acme: tls_certificate_path in the module config (%s) is not the "
                    "file Synapse reads (%s); Synapse will not serve what synapse-acme writes "
                    "after a restart",
                    acme.tls_certificate_path,
                    hs.tls_certificate_path,
                )
        written = False
        if acme.enabled and not acme.external_certificates:
            written = prepare_tls_files(acme, _ConfigTimeClock())  # type: ignore[arg-type]
        standalone = any(k in block for k in _EXPLICIT_LISTENER_KEYS)
        return ModuleSettings(
            acme=acme, source=source, standalone_listener=standalone, placeholder_written=written
        )

    def __init__(self, config: ModuleSettings, api: ModuleApi) -> None:
        self.settings = config
        self.api = api
        self.runtime: Runtime | None = None
        self.tls: HotSwapTLS | None = None
        self.glue = glue.SynapseGlue.from_module_api(api)
        if self.glue.hs is not None:
            self.reactor: IReactor = self.glue.reactor()
        else:
            from twisted.internet import reactor

            self.reactor = cast(IReactor, reactor)
        acme = config.acme
        specs = acme.certificate_specs()
        self.key = names_key(canonical_names(specs[0].names)) if specs else ""
        self._renew_watch: RenewRequestWatcher | None = None
        self._watcher: FileWatcher | None = None
        if not acme.enabled or not specs:
            logger.info("synapse-acme: disabled (enabled: false); nothing to do")
            return
        for problem in self.glue.problems:
            logger.error("synapse-acme: Synapse internals check: %s", problem)
        # With external_certificates another tool (certbot) issues: every process only watches.
        # With a database every process provisions: each follows the database (no shared
        # filesystem needed), answers challenges from it, and orders under its issuance lock.
        self.background = self.glue.runs_background_tasks(api)
        self.provisioning = (
            self.background or acme.database is not None
        ) and not acme.external_certificates
        if self.provisioning:
            try:
                self._init_provisioning()
            except StoreBusy as e:
                # Another homeserver process (or `synapse-acme run`) already manages this
                # store: serve and follow its files rather than order beside it.
                logger.error("synapse-acme: not provisioning from this process: %s", e)
                self.provisioning = False
                self._init_follower()
        else:
            self._init_follower()
        self._install_tls()
        self.glue.on_sighup(self._on_sighup)

    # -- setup ---------------------------------------------------------------------------------

    def _init_provisioning(self) -> None:
        from prometheus_client import REGISTRY  # what Synapse's `metrics` listener serves

        from synapse_acme.runtime import build_runtime
        from synapse_acme.threaded import BlockingRunner

        acme = self.settings.acme
        # Store saves, exports and status writes fsync: never on Synapse's reactor thread.
        self._io = BlockingRunner(self.reactor)
        self._io.start()
        self.reactor.addSystemEventTrigger("after", "shutdown", self._io.stop)
        self.runtime = build_runtime(
            acme,
            self.reactor,
            standalone_listener=self.settings.standalone_listener,
            runner=self._io,
            # _install_tls puts runtime.tls on Synapse's TLS listeners, which then also answer
            # tls-alpn-01 (the default challenges include it only then).
            host_serves_tls=self._serves_tls(),
            metrics_registry=REGISTRY,
        )
        self.tls = self.runtime.tls
        self.api.register_web_resource(CHALLENGE_PATH, self.runtime.responder.resource())
        assert self.runtime.acme is not None  # None only with external_certificates
        self.runtime.acme.add_consumer(_ListenerKeeper(self))
        # Only the process that runs background tasks sends alerts (with a database every
        # process provisions; one notice or webhook call per alert is enough).
        if self.runtime.alerter is not None and not self.background:
            self.runtime.alerter.disownServiceParent()  # never started: sends nothing
            self.runtime.alerter = None
        if self.runtime.alerter is not None:
            from synapse_acme.synapse.notices import choose_sinks

            for sink in choose_sinks(acme, self.glue, self.api):
                self.runtime.alerter.add_sink(sink)
        self.reactor.callLater(0, self._start)
        self.reactor.addSystemEventTrigger("before", "shutdown", self._stop)
        logger.info(
            "synapse-acme: provisioning %s from this process (CA %s); challenges answered at %s "
            "on every HTTP listener%s",
            ", ".join(spec.names[0] for spec in acme.certificate_specs()),
            acme.url,
            CHALLENGE_PATH,
            " and on " + ", ".join(acme.http01_endpoints())
            if self.settings.standalone_listener
            else "",
        )

    def _serves_tls(self) -> bool:
        """Whether the hot-swapping creator will serve Synapse's TLS listeners."""
        try:
            return bool(self.glue.can_install_creator and self.glue.has_tls_listener())
        except Exception:  # no homeserver behind the API (tests), or internals moved
            return False

    def _init_follower(self) -> None:
        from synapse_acme.tls import HotSwapTLS

        acme = self.settings.acme
        names = canonical_names(acme.certificate_specs()[0].names)
        self.tls = HotSwapTLS(
            clock=self.reactor, default_key=self.key, required_names={self.key: names}
        )
        logger.info(
            "synapse-acme: this process does not run background tasks, so it does not "
            "provision; it serves the certificate files and reloads them when they change "
            "(route %s to the process that runs background tasks)",
            CHALLENGE_PATH,
        )
        if acme.tls_certificate_path and acme.tls_private_key_path:
            from synapse_acme.watch import FileWatcher

            self._watcher = FileWatcher(
                cert_path=acme.tls_certificate_path,
                key_path=acme.tls_private_key_path,
                key=self.key,
                consumer=_FollowerConsumer(self),
                clock=self.reactor,
                interval=acme.watch_interval,
            )
            self.reactor.callLater(0, self._watcher.startService)

    def _install_tls(self) -> None:
        """Seed the hot-swap creator with the files Synapse just loaded, and install it."""
        acme = self.settings.acme
        if not self.glue.has_tls_listener() or self.tls is None:
            return
        cert_path, key_path = self.glue.tls_paths()
        bundle = _read_bundle(cert_path, key_path) if cert_path and key_path else None
        if bundle is not None:
            try:
                self.tls.set_bundle(self.key, bundle)
            except BundleError as e:
                logger.warning(
                    "synapse-acme: the current TLS files are not usable for %s (%s); Synapse "
                    "serves them itself until the first certificate is issued",
                    self.key,
                    e,
                )
        if not self.glue.can_install_creator:
            logger.error(
                "synapse-acme: cannot hot-swap Synapse's TLS listeners on this Synapse (%s); "
                "FALLBACK: after each new certificate the files are rewritten and Synapse is "
                "asked to re-read them (refresh_certificate)",
                "; ".join(self.glue.problems),
            )
            return
        if self.tls.current(self.key) is not None:
            self.glue.install_creator(self.tls)
            logger.info("synapse-acme: Synapse's TLS listeners use the hot-swapping certificate")
        del acme

    # -- running -------------------------------------------------------------------------------

    def _start(self) -> None:
        assert self.runtime is not None and self.runtime.acme is not None  # provisioning
        try:
            self.runtime.service.startService()
        except Exception:
            logger.exception("synapse-acme: could not start provisioning; Synapse keeps running")
            return
        if self.runtime.listeners:
            # The service orders nothing until the HTTP-01 listener is bound (runtime.py);
            # if a listener cannot be, say so once, now, rather than only when a renewal is due.
            self.runtime.when_ready().addErrback(
                lambda f: logger.error(
                    "synapse-acme: %s. No certificate is ordered from this process until it "
                    "can be opened: fix it and restart Synapse (or remove port/listen from the "
                    "module config if Synapse's own listeners receive the CA's requests)",
                    f.getErrorMessage(),
                )
            )
        self._renew_watch = RenewRequestWatcher(
            self.settings.acme.storage, self.runtime.acme, self.reactor
        )
        self._renew_watch.startService()

    def _stop(self) -> Deferred[None] | None:
        if self._renew_watch is not None and self._renew_watch.running:
            self._renew_watch.stopService()
        if self._watcher is not None and self._watcher.running:
            self._watcher.stopService()
        if self.runtime is not None and self.runtime.service.running:
            return self.runtime.service.stopService()
        return None

    def status(self) -> list[CertificateStatus]:
        """Each managed certificate's status (what metrics and health checks read).

        The provisioning process answers from memory; the others read the ``status.json`` it
        last wrote (empty if there is none yet, or it cannot be read).
        """
        if self.runtime is not None:
            return list(self.runtime.status())
        if not self.settings.acme.enabled or not self.key:
            return []
        from synapse_acme.runtime import status_path

        try:
            data = fsutil.read_regular(status_path(self.settings.acme), limit=MAX_STATUS_FILE)
            return parse_status_file(data) if data is not None else []
        except (SynapseAcmeError, ValueError) as e:
            logger.warning("synapse-acme: cannot read the provisioning status: %s", e)
            return []

    def renew_request_path(self) -> str:
        """The file whose appearance forces a renewal (documented in docs/synapse.md)."""
        return renew_request_path(self.settings.acme.storage)

    def ensure_serving(self) -> None:
        """Make Synapse's TLS listeners serve the newest certificate (see _ListenerKeeper)."""
        if not self.glue.has_tls_listener() or self.tls is None:
            return
        if self.glue.can_install_creator:
            if self.tls.current(self.key) is None:
                return
            replaced = self.glue.install_creator(self.tls)
            if replaced:
                logger.info(
                    "synapse-acme: installed the hot-swapping certificate on %d TLS port(s)",
                    replaced,
                )
        elif self.glue.can_refresh:
            try:
                self.glue.refresh_from_files()
                logger.info("synapse-acme: Synapse re-read its certificate files (fallback)")
            except Exception:
                logger.exception("synapse-acme: refresh_certificate failed")

    def _on_sighup(self, *args: object) -> None:
        """After Synapse's own SIGHUP reload (which puts its file-based factory back)."""
        acme = self.settings.acme
        if self.tls is not None and acme.tls_certificate_path and acme.tls_private_key_path:
            bundle = _read_bundle(acme.tls_certificate_path, acme.tls_private_key_path)
            if bundle is not None:
                try:
                    self.tls.set_bundle(self.key, bundle)
                except BundleError as e:
                    logger.warning("synapse-acme: SIGHUP: files not usable (%s)", e)
        self.ensure_serving()
