"""The Synapse module and its glue, in memory: config-time discovery through the installed
Synapse's own ``ModulesConfig``, error translation, the legacy block, listener installation and
the renew-request trigger (with a fake runtime and a MemoryReactorClock)."""

from __future__ import annotations

import logging
import os
import pathlib
import types
from typing import Any

import attrs
import prometheus_client
import pytest
from synapse.app import _base
from synapse.config._base import ConfigError as SynapseConfigError
from synapse.config.modules import ModulesConfig
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.resource import Resource

from synapse_acme import crypto, interprocess
from synapse_acme.config import MODULE_NAME
from synapse_acme.model import CertificateBundle
from synapse_acme.runtime import Runtime
from synapse_acme.status import CertificateStatus, dump_status_file
from synapse_acme.synapse import AcmeModule, glue
from synapse_acme.synapse import module as module_mod
from synapse_acme.threaded import BlockingRunner
from synapse_acme.tls import HotSwapTLS

NAME = "hs.example.test"


def read_modules(config: dict[str, Any]) -> ModulesConfig:
    """Run Synapse's own ModulesConfig.read_config, as homeserver start does."""
    section = ModulesConfig(None)
    section.read_config(config, config_dir_path="/etc/matrix", data_dir_path="/var/lib/matrix")
    return section


def hs_config(module_config: Any = None, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"module": MODULE_NAME}
    if module_config is not None:
        entry["config"] = module_config
    return {"server_name": NAME, "modules": [entry], **extra}


# -- glue: config time --------------------------------------------------------------------------


def test_settings_from_dict_resolves_like_synapse(tmp_path: pathlib.Path) -> None:
    s = glue.settings_from_dict(
        {
            "server_name": "example.org:8448",
            "tls_certificate_path": "tls/cert.pem",
            "tls_private_key_path": "/abs/key.pem",
            "listeners": [{"port": 8448, "tls": True}, {"port": 8008}],
            "modules": [{"module": "other.Mod"}, {"module": MODULE_NAME}],
            "acme": {"enabled": True},
        },
        "/etc/matrix",
        MODULE_NAME,
    )
    assert s.server_name == "example.org:8448"
    assert s.tls_certificate_path == os.path.abspath("tls/cert.pem")
    assert s.tls_private_key_path == "/abs/key.pem"
    assert s.module_index == 1 and s.has_tls_listener and s.config_dir == "/etc/matrix"
    assert s.top_level_acme == {"enabled": True}


def test_find_homeserver_settings_outside_synapse_is_none() -> None:
    assert glue.find_homeserver_settings(MODULE_NAME) is None


def test_parse_config_sees_the_homeserver_config_through_synapse() -> None:
    section = read_modules(hs_config({"contact": "a@example.test"}))
    ((cls, settings),) = section.loaded_modules
    assert cls is AcmeModule
    assert settings.acme.domain == NAME  # server_name, which parse_config is never given
    assert settings.acme.enabled is True  # listing the module is the opt-in
    assert settings.acme.storage == "/etc/matrix/acme"  # next to the config file
    assert settings.source == "modules" and settings.standalone_listener is False


def test_explicit_port_asks_for_the_standalone_listener() -> None:
    ((_, settings),) = read_modules(hs_config({"port": 8009})).loaded_modules
    assert settings.standalone_listener is True and settings.acme.port == 8009


def test_module_config_error_names_the_key_as_a_synapse_config_error() -> None:
    with pytest.raises(SynapseConfigError) as info:
        read_modules(hs_config({"port": "eighty"}))
    err = info.value
    assert err.path == ("modules", "<item 0>", "config", "port")
    assert "expected an integer" in str(err.__cause__) and "eighty" in str(err.__cause__)


def test_unknown_key_is_a_config_error() -> None:
    with pytest.raises(SynapseConfigError) as info:
        read_modules(hs_config({"prot": 80}))
    assert "prot" in str(info.value.__cause__)


def test_legacy_top_level_block_is_used_and_explained(caplog: pytest.LogCaptureFixture) -> None:
    config = hs_config(acme={"enabled": True, "port": 8009, "reprovision_threshold": 20})
    ((_, settings),) = read_modules(config).loaded_modules
    assert settings.source == "acme"
    assert settings.acme.enabled and settings.acme.reprovision_threshold == 20
    assert settings.standalone_listener is True
    assert "Move its keys under the module" in caplog.text


def test_legacy_block_disabled_stays_disabled() -> None:
    ((_, settings),) = read_modules(hs_config(acme={"port": 80})).loaded_modules
    assert settings.acme.enabled is False  # the old default


def test_both_blocks_is_an_error() -> None:
    config = hs_config({"contact": "a@example.test"}, acme={"enabled": True})
    with pytest.raises(SynapseConfigError) as info:
        read_modules(config)
    assert "top-level 'acme:' block" in str(info.value.__cause__)


def test_old_enabled_false_block_with_module_config_is_ignored_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = hs_config({"contact": "a@example.test"}, acme={"enabled": False})
    ((_, settings),) = read_modules(config).loaded_modules
    assert settings.acme.enabled and "ignoring the top-level" in caplog.text


def test_legacy_v1_url_is_refused_with_the_key() -> None:
    config = hs_config(
        acme={"enabled": True, "url": "https://acme-v01.api.letsencrypt.org/directory"}
    )
    with pytest.raises(SynapseConfigError) as info:
        read_modules(config)
    assert "acme.url" in str(info.value.__cause__)


# -- glue: run time -----------------------------------------------------------------------------


@attrs.define
class FakePort:
    factory: Any


class FakeHS:
    """The handful of HomeServer attributes the glue reads."""

    def __init__(self, reactor: Any, cert: str, key: str, tls: bool = True, bg: bool = True):
        self._reactor = reactor
        self.tls_server_context_factory: Any = object()
        self._listening_services: list[Any] = []
        self.config = _ns(
            tls=_ns(tls_certificate_file=cert, tls_private_key_file=key),
            server=_ns(has_tls_listener=lambda: tls),
            worker=_ns(run_background_tasks=bg),
        )

    def get_reactor(self) -> Any:
        return self._reactor

    def get_instance_id(self) -> str:
        return f"test-{id(self)}"

    hostname = "hs.example.test"


def _ns(**kw: Any) -> Any:
    return types.SimpleNamespace(**kw)


class FakeApi:
    def __init__(self, hs: FakeHS) -> None:
        self._hs = hs
        self.resources: dict[str, Resource] = {}

    def register_web_resource(self, path: str, resource: Resource) -> None:
        self.resources[path] = resource

    def should_run_background_tasks(self) -> bool:
        return bool(self._hs.config.worker.run_background_tasks)


def test_glue_reports_missing_internals() -> None:
    g = glue.SynapseGlue.from_module_api(object())
    assert not g.can_install_creator and "ModuleApi._hs is missing" in g.problems


def test_install_creator_rewraps_tls_ports_once(tmp_path: pathlib.Path) -> None:
    reactor = MemoryReactorClock()
    hs = FakeHS(reactor, "c", "k")
    wrapped = object()
    old_creator = HotSwapTLS(clock=reactor)
    tls_port = FakePort(TLSMemoryBIOFactory(old_creator, False, wrapped))  # type: ignore[arg-type]
    plain_port = FakePort(object())
    hs._listening_services = [tls_port, plain_port]
    g = glue.SynapseGlue.from_module_api(FakeApi(hs))
    assert g.can_install_creator
    creator = HotSwapTLS(clock=reactor)
    assert not g.is_installed(creator)
    assert g.install_creator(creator) == 1
    assert g.is_installed(creator) and hs.tls_server_context_factory is creator
    assert isinstance(tls_port.factory, TLSMemoryBIOFactory)
    assert tls_port.factory.wrappedFactory is wrapped
    assert plain_port.factory is not None and not isinstance(
        plain_port.factory, TLSMemoryBIOFactory
    )
    assert g.install_creator(creator) == 0  # idempotent
    with pytest.raises(TypeError):
        hs.tls_server_context_factory = None
        g.install_creator(object())


def test_version_range() -> None:
    assert glue.version_supported("1.163.2") and glue.version_supported("1.120.0")
    assert not glue.version_supported("1.119.0") and not glue.version_supported("garbage")


# -- the module ---------------------------------------------------------------------------------


@attrs.define
class FakeAcme:
    consumers: list[Any] = attrs.Factory(list)
    renewals: list[tuple[Any, bool]] = attrs.Factory(list)
    keys: list[str] = attrs.Factory(list)

    def add_consumer(self, c: Any) -> None:
        self.consumers.append(c)

    def renew(
        self, key: Any = None, force: bool = False, requested_at: float | None = None
    ) -> defer.Deferred[Any]:
        self.renewals.append((key, force))
        return defer.succeed([])


@attrs.define
class FakeResponder:
    res: Resource = attrs.Factory(Resource)

    def resource(self) -> Resource:
        return self.res


@attrs.define
class FakeService:
    running: bool = False

    def startService(self) -> None:
        self.running = True

    def stopService(self) -> defer.Deferred[None]:
        self.running = False
        return defer.succeed(None)


@attrs.define
class FakeRuntime:
    tls: HotSwapTLS
    acme: FakeAcme = attrs.Factory(FakeAcme)
    responder: FakeResponder = attrs.Factory(FakeResponder)
    service: FakeService = attrs.Factory(FakeService)
    http01_listener: Any = None
    listeners: list[Any] = attrs.Factory(list)
    alerter: Any = None  # alerts off in these tests (the real Synapse test covers them)

    def when_ready(self) -> defer.Deferred[None]:
        # The real Runtime.when_ready, run on this runtime's listeners.
        return Runtime.when_ready(self)  # type: ignore[arg-type]

    statuses: list[CertificateStatus] = attrs.Factory(list)

    def status(self) -> list[CertificateStatus]:
        return self.statuses


def make_module(
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    bg: bool = True,
    files: bool = True,
    external: bool = False,
) -> tuple[AcmeModule, FakeApi, MemoryReactorClock, list[Any]]:
    reactor = MemoryReactorClock()
    reactor.advance(crypto.now_from_clock(_Wall()).timestamp())
    cert, key = str(tmp_path / "fullchain.pem"), str(tmp_path / "privkey.pem")
    if files:
        bundle = crypto.make_placeholder_bundle([NAME], crypto.now_from_clock(reactor))
        pathlib.Path(cert).write_bytes(bundle.chain_pem)
        pathlib.Path(key).write_bytes(bundle.key_pem)
    from synapse_acme.config import parse_acme_config

    acme = parse_acme_config(
        {"enabled": True, "storage": str(tmp_path / "acme"), "external_certificates": external},
        server_name=NAME,
        defaults_from={"tls_certificate_path": cert, "tls_private_key_path": key},
    )
    built: list[Any] = []

    def fake_build(config: Any, r: Any, **kw: Any) -> FakeRuntime:
        rt = FakeRuntime(tls=HotSwapTLS(clock=r))
        built.append((rt, kw))
        return rt

    monkeypatch.setattr("synapse_acme.runtime.build_runtime", fake_build)
    hs = FakeHS(reactor, cert, key, bg=bg)
    hooks: list[Any] = []
    monkeypatch.setattr(_base, "register_sighup", lambda hs, func, *a, **k: hooks.append(func))
    hs.sighup_hooks = hooks  # type: ignore[attr-defined]
    api = FakeApi(hs)
    settings = module_mod.ModuleSettings(acme=acme, source="modules", standalone_listener=False)
    return AcmeModule(settings, api), api, reactor, built


class _Wall:
    def seconds(self) -> float:
        import time

        return time.time()  # test-only: a real "now" so the placeholder is currently valid


def test_module_wires_challenge_tls_and_start(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod, api, reactor, built = make_module(tmp_path, monkeypatch)
    ((rt, kw),) = built
    runner = kw.pop("runner")
    # The metrics go where Synapse's `metrics` listener reads: prometheus_client's REGISTRY.
    assert kw.pop("metrics_registry") is prometheus_client.REGISTRY
    assert kw == {"standalone_listener": False, "host_serves_tls": True}
    # Store saves, exports and status writes run in the runner's one thread, not on the reactor.
    assert isinstance(runner, BlockingRunner)
    assert ("after", "shutdown", runner.stop) in [
        (phase, event, t[0]) for phase, events in reactor.triggers.items()
        for event, ts in events.items() for t in ts
    ]  # fmt: skip
    assert api.resources == {"/.well-known/acme-challenge": rt.responder.res}
    # The creator holds the placeholder from disk and is what listenSSL will get.
    assert api._hs.tls_server_context_factory is rt.tls
    current = rt.tls.current(mod.key)
    assert isinstance(current, CertificateBundle) and current.metadata.get("placeholder")
    assert any(isinstance(c, module_mod._ListenerKeeper) for c in rt.acme.consumers)
    assert not rt.service.running  # never started inside Synapse's start()
    reactor.advance(0)
    assert rt.service.running
    # Shutdown stops the service.
    ((_, _, trigger),) = reactor.triggers["before"]["shutdown"]
    assert trigger is not None


@attrs.define
class FailedListener:
    """An HTTP-01 listener whose port could not be bound (the runtime's ListenError)."""

    def when_listening(self) -> defer.Deferred[Any]:
        from synapse_acme.errors import ListenError

        return defer.fail(
            ListenError("could not open any HTTP-01 challenge listener: port 8009 on :: (...)")
        )


def test_a_listener_that_cannot_bind_is_reported_once_at_start(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, reactor, built = make_module(tmp_path, monkeypatch)
    ((rt, _),) = built
    rt.http01_listener = FailedListener()
    rt.listeners = [rt.http01_listener]
    reactor.advance(0)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "port 8009 on ::" in errors[0]
    assert "No certificate is ordered from this process until it can be opened" in errors[0]
    # (The service itself waits for the listener before any order: runtime.build_runtime
    # passes when_listening as its readiness gate; tests/unit/test_service.py shows the gate.)


def test_renew_request_file_forces_renewal(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod, _, reactor, built = make_module(tmp_path, monkeypatch)
    ((rt, _),) = built
    reactor.advance(0)
    assert rt.acme.renewals == []
    os.makedirs(tmp_path / "acme", exist_ok=True)
    request = pathlib.Path(mod.renew_request_path())
    request.write_text("")
    reactor.advance(interprocess.RENEW_REQUEST_POLL)
    assert rt.acme.renewals == [(None, True)] and not request.exists()
    reactor.advance(interprocess.RENEW_REQUEST_POLL)
    assert rt.acme.renewals == [(None, True)]  # once per request


def test_unusable_files_keep_synapse_factory_until_first_certificate(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod, api, reactor, built = make_module(tmp_path, monkeypatch, files=False)
    ((rt, _),) = built
    before = api._hs.tls_server_context_factory
    assert before is not rt.tls  # nothing to serve yet: Synapse's own factory stays
    bundle = crypto.make_placeholder_bundle([NAME], crypto.now_from_clock(reactor))
    rt.tls.set_bundle(mod.key, bundle)
    keeper = next(c for c in rt.acme.consumers if isinstance(c, module_mod._ListenerKeeper))
    keeper.certificate_changed(mod.key, bundle)
    reactor.advance(0)
    assert api._hs.tls_server_context_factory is rt.tls


def test_sighup_puts_the_creator_back(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _mod, api, _reactor, built = make_module(tmp_path, monkeypatch)
    ((rt, _),) = built
    api._hs.tls_server_context_factory = object()  # what Synapse's refresh_certificate does
    (callback,) = api._hs.sighup_hooks
    callback()  # as Synapse's SIGHUP handler would, after its own refresh_certificate
    assert api._hs.tls_server_context_factory is rt.tls


def test_status_comes_from_the_runtime_in_the_provisioning_process(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod, _, _, built = make_module(tmp_path, monkeypatch)
    ((rt, _),) = built
    rt.statuses = [CertificateStatus(key=mod.key, names=(NAME,), failures=3)]
    assert mod.status() == rt.statuses


def test_status_in_other_processes_is_the_status_file_of_the_provisioning_one(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    mod, _, _, _ = make_module(tmp_path, monkeypatch, bg=False)
    assert mod.status() == []  # nothing written yet
    written = [CertificateStatus(key=mod.key, names=(NAME,), has_certificate=True)]
    storage = pathlib.Path(mod.settings.acme.storage)
    storage.mkdir()
    (storage / "status.json").write_bytes(dump_status_file(written))
    assert mod.status() == written
    (storage / "status.json").write_text("{half a file")
    assert mod.status() == []
    assert "cannot read the provisioning status" in caplog.text


def test_follower_process_reloads_changed_files(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod, api, reactor, built = make_module(tmp_path, monkeypatch, bg=False)
    assert built == [] and api.resources == {}  # no provisioning here
    first = mod.tls.current(mod.key)
    assert first is not None and api._hs.tls_server_context_factory is mod.tls
    new = crypto.make_placeholder_bundle([NAME], crypto.now_from_clock(reactor))
    reactor.advance(0)  # the watcher starts after Synapse's start
    interval = mod.settings.acme.watch_interval
    pathlib.Path(tmp_path / "privkey.pem").write_bytes(new.key_pem)
    reactor.advance(interval)  # half-replaced: key only
    assert mod.tls.current(mod.key).chain_pem == first.chain_pem
    pathlib.Path(tmp_path / "fullchain.pem").write_bytes(new.chain_pem)
    reactor.advance(interval)
    assert mod.tls.current(mod.key).chain_pem == new.chain_pem


def test_external_certificates_only_watch_even_on_the_background_process(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """certbot keeps the files: no ACME, no challenge resource; a renewal by certbot (a plain
    rewrite of both files) is served without a restart or SIGHUP."""
    mod, api, reactor, built = make_module(tmp_path, monkeypatch, bg=True, external=True)
    assert built == [] and api.resources == {}
    assert api._hs.tls_server_context_factory is mod.tls
    reactor.advance(0)
    new = crypto.make_placeholder_bundle([NAME], crypto.now_from_clock(reactor))
    pathlib.Path(tmp_path / "fullchain.pem").write_bytes(new.chain_pem)
    pathlib.Path(tmp_path / "privkey.pem").write_bytes(new.key_pem)
    reactor.advance(mod.settings.acme.watch_interval)
    assert mod.tls.current(mod.key).chain_pem == new.chain_pem


def test_disabled_module_does_nothing(tmp_path: pathlib.Path) -> None:
    from synapse_acme.config import parse_acme_config

    reactor = MemoryReactorClock()
    hs = FakeHS(reactor, "c", "k")
    api = FakeApi(hs)
    settings = module_mod.ModuleSettings(
        acme=parse_acme_config({"enabled": False}, server_name=NAME),
        source="modules",
        standalone_listener=False,
    )
    AcmeModule(settings, api)
    assert api.resources == {} and reactor.getDelayedCalls() == []


def test_sighup_hook_with_the_older_register_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    hooks: list[Any] = []

    def old_register(func: Any, *args: Any, **kwargs: Any) -> None:  # Synapse < 1.14x
        hooks.append(func)

    monkeypatch.setattr(_base, "register_sighup", old_register)
    g = glue.SynapseGlue.from_module_api(FakeApi(FakeHS(MemoryReactorClock(), "c", "k")))
    assert g.on_sighup(print) and hooks == [print]


def test_parse_config_writes_a_placeholder_once(tmp_path: pathlib.Path) -> None:
    cert, key = tmp_path / "tls" / "fullchain.pem", tmp_path / "tls" / "privkey.pem"
    config = hs_config(
        {"storage": str(tmp_path / "acme")},
        tls_certificate_path=str(cert),
        tls_private_key_path=str(key),
        listeners=[{"port": 8448, "tls": True, "type": "http"}],
    )
    ((_, settings),) = read_modules(config).loaded_modules
    assert settings.placeholder_written
    leaf = crypto.parse_chain(cert.read_bytes())[0]
    assert crypto.is_placeholder(leaf) and crypto.certificate_names(leaf) == [NAME]
    assert key.stat().st_mode & 0o777 == 0o600
    crypto.validate_bundle(
        CertificateBundle(key_pem=key.read_bytes(), chain_pem=cert.read_bytes()),
        [NAME],
        crypto.not_before(leaf),
    )
    before = cert.read_bytes()
    ((_, again),) = read_modules(config).loaded_modules
    assert not again.placeholder_written and cert.read_bytes() == before
