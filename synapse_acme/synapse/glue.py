"""Every use of Synapse internals, in one place, each checked with a clear error.

Why: Synapse's module API has no hook for TLS certificates, for the homeserver config seen at
module-parse time, or for SIGHUP. We reach into a few private attributes instead; keeping them
here means a new Synapse release breaks one small, tested file, and :meth:`SynapseGlue.check`
reports exactly what is missing at startup (with the fallback in use) instead of failing later.

Internals used (all present in matrix-synapse 1.120 - 1.163):

- ``ModulesConfig.read_config``'s frame (``config`` dict and ``config_dir_path``) while a module's
  ``parse_config`` runs: to learn ``server_name``, the TLS file paths and a top-level ``acme:``
  block, which Synapse does not pass to modules;
- ``ModuleApi._hs``; ``hs.get_reactor()``; ``hs.config.tls.tls_certificate_file`` /
  ``tls_private_key_file``; ``hs.config.server.has_tls_listener()``;
  ``hs.config.worker.run_background_tasks``;
- ``hs.tls_server_context_factory`` (what ``listenSSL`` gets when the listeners start, after
  modules are built) and ``hs._listening_services`` (ports whose ``factory`` is a
  ``TLSMemoryBIOFactory``);
- ``synapse.app._base.refresh_certificate(hs)`` (fallback: re-read the files) and
  ``synapse.app._base.register_sighup``;
- for alerts (:mod:`synapse_acme.synapse.notices`): ``hs.config.servernotices
  .server_notices_mxid``, ``hs.get_server_notices_manager().send_notice(user_id, content)``
  (main process only), and the ``users`` table's ``name``, ``admin`` and ``deactivated``
  columns (read through the public ``ModuleApi.run_db_interaction``) to find the admins.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOFactory

logger = logging.getLogger(__name__)

#: The Synapse releases this glue is written and tested for (inclusive lower bound, and the
#: newest release the integration test ran against). Outside the range we still try, loudly.
MIN_SYNAPSE = (1, 120)
TESTED_MAX_SYNAPSE = (1, 163)


def synapse_version() -> str:
    """The installed matrix-synapse version string, or ``"unknown"``."""
    try:
        from importlib.metadata import version

        return version("matrix-synapse")
    except Exception:
        return "unknown"


def _version_tuple(text: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def version_supported(text: str) -> bool:
    """True if ``text`` (e.g. ``"1.163.2"``) lies inside the declared, tested range."""
    v = _version_tuple(text)
    return len(v) == 2 and MIN_SYNAPSE <= v <= TESTED_MAX_SYNAPSE


# -- config time -----------------------------------------------------------------------------


@attrs.frozen
class HomeserverSettings:
    """What a module needs from the surrounding homeserver.yaml at config time."""

    server_name: str | None
    tls_certificate_path: str | None  # absolute, resolved the way Synapse does (against cwd)
    tls_private_key_path: str | None
    config_dir: str | None
    top_level_acme: Mapping[str, Any] | None  # the old built-in `acme:` block, if present
    module_index: int | None  # position of our module in `modules:` (for error paths)
    has_tls_listener: bool


def _abspath(path: Any) -> str | None:
    # Synapse resolves tls_*_path with os.path.abspath (against the working directory).
    return os.path.abspath(path) if isinstance(path, str) and path else None


def settings_from_dict(
    config: Mapping[str, Any], config_dir: str | None, module_name: str
) -> HomeserverSettings:
    """Pick our settings out of a raw (merged) homeserver config dict."""
    index = None
    modules = config.get("modules") or []
    if isinstance(modules, list):
        for i, entry in enumerate(modules):
            if isinstance(entry, Mapping) and entry.get("module") == module_name:
                index = i
                break
    listeners = config.get("listeners") or []
    has_tls = isinstance(listeners, list) and any(
        isinstance(item, Mapping) and bool(item.get("tls")) for item in listeners
    )
    acme = config.get("acme")
    server_name = config.get("server_name")
    return HomeserverSettings(
        server_name=server_name if isinstance(server_name, str) else None,
        tls_certificate_path=_abspath(config.get("tls_certificate_path")),
        tls_private_key_path=_abspath(config.get("tls_private_key_path")),
        config_dir=config_dir,
        top_level_acme=acme if isinstance(acme, Mapping) else None,
        module_index=index,
        has_tls_listener=has_tls,
    )


def find_homeserver_settings(module_name: str) -> HomeserverSettings | None:
    """The homeserver config being parsed right now, or ``None`` if not called from Synapse.

    Synapse calls ``parse_config(module_config)`` from ``ModulesConfig.read_config(config, ...)``
    and passes nothing else; the whole dict is a local of that frame. We look for it rather than
    re-reading ``-c`` files from ``sys.argv`` (which would miss Synapse's merge rules).
    """
    try:
        from synapse.config.modules import ModulesConfig
    except Exception:  # Synapse not installed: unit tests, the standalone runner
        return None
    frame = inspect.currentframe()
    try:
        while frame is not None:
            local = frame.f_locals
            if (
                frame.f_code.co_name == "read_config"
                and isinstance(local.get("self"), ModulesConfig)
                and isinstance(local.get("config"), Mapping)
            ):
                kwargs = local.get("kwargs") or {}
                config_dir = kwargs.get("config_dir_path") if isinstance(kwargs, dict) else None
                return settings_from_dict(local["config"], config_dir, module_name)
            frame = frame.f_back
    finally:
        del frame
    logger.warning(
        "synapse-acme: could not find the homeserver config while parsing the module config "
        "(Synapse %s); set domain, tls_certificate_path and tls_private_key_path in the "
        "module config explicitly",
        synapse_version(),
    )
    return None


def synapse_config_error(message: str, path: tuple[str, ...]) -> Exception:
    """A ``synapse.config._base.ConfigError`` so Synapse prints it as a config error with the
    key path (``Error in configuration at 'modules.<item 0>.config.port'``)."""
    try:
        from synapse.config._base import ConfigError as SynapseConfigError
    except Exception:
        from synapse_acme.errors import ConfigError

        return ConfigError(".".join(path), message, has_value=False)
    return SynapseConfigError(message, path)


# -- run time --------------------------------------------------------------------------------


@attrs.define(eq=False)
class SynapseGlue:
    """Handle on the running homeserver for the few things the module API does not offer.

    Build with :meth:`from_module_api`; :attr:`problems` lists what this Synapse lacks, and
    the ``can_*`` flags say which hot-swap route is possible.
    """

    hs: Any
    problems: list[str] = attrs.field(factory=list)
    can_install_creator: bool = False
    can_refresh: bool = False
    _refresh: Callable[[Any], None] | None = None
    _register_sighup: Callable[..., None] | None = None

    @classmethod
    def from_module_api(cls, api: Any) -> SynapseGlue:
        """Check the running Synapse for every internal we use; never raises."""
        hs = getattr(api, "_hs", None)
        glue = cls(hs=hs)
        if hs is None:
            glue.problems.append("ModuleApi._hs is missing")
            return glue
        for attr in ("get_reactor", "config"):
            if not hasattr(hs, attr):
                glue.problems.append(f"HomeServer.{attr} is missing")
        if not hasattr(hs, "tls_server_context_factory"):
            glue.problems.append("HomeServer.tls_server_context_factory is missing")
        if not isinstance(getattr(hs, "_listening_services", None), list):
            glue.problems.append("HomeServer._listening_services is missing")
        glue.can_install_creator = not glue.problems
        try:
            from synapse.app import _base

            glue._refresh = _base.refresh_certificate
            glue._register_sighup = getattr(_base, "register_sighup", None)
            glue.can_refresh = hs is not None
        except Exception as e:  # pragma: no cover - depends on the Synapse release
            glue.problems.append(f"synapse.app._base.refresh_certificate is missing ({e})")
        version = synapse_version()
        if not version_supported(version):
            glue.problems.append(
                f"matrix-synapse {version} is outside the tested range "
                f"{'.'.join(map(str, MIN_SYNAPSE))} - {'.'.join(map(str, TESTED_MAX_SYNAPSE))}"
            )
        return glue

    def reactor(self) -> Any:
        """The reactor Synapse runs on."""
        return self.hs.get_reactor()

    def runs_background_tasks(self, api: Any) -> bool:
        """Whether this process is the one that runs background tasks (and so provisions)."""
        check = getattr(api, "should_run_background_tasks", None)
        if check is not None:
            return bool(check())
        return bool(self.hs.config.worker.run_background_tasks)

    def has_tls_listener(self) -> bool:
        """Whether this process has a ``tls: true`` listener."""
        return bool(self.hs.config.server.has_tls_listener())

    def tls_paths(self) -> tuple[str | None, str | None]:
        """The certificate and key paths Synapse reads (absolute)."""
        tls = self.hs.config.tls
        return tls.tls_certificate_file, tls.tls_private_key_file

    def install_creator(self, creator: object) -> int:
        """Make ``creator`` (an ``IOpenSSLServerConnectionCreator``) serve every TLS listener.

        Before the listeners start (module ``__init__``) this just sets what ``listenSSL`` will
        get. Afterwards (first good certificate arrived late, or Synapse's SIGHUP handler put
        its own file-based factory back) it also re-wraps each TLS port's protocol factory, the
        way ``refresh_certificate`` does. Returns how many ports were re-wrapped. Done once per
        install, never per renewal: renewals swap inside ``creator``.
        """
        if not self.can_install_creator:
            raise RuntimeError(
                "cannot install a TLS connection creator: " + "; ".join(self.problems)
            )
        if not IOpenSSLServerConnectionCreator.providedBy(creator):
            raise TypeError(f"{creator!r} does not provide IOpenSSLServerConnectionCreator")
        if self.hs.tls_server_context_factory is creator:
            return 0
        self.hs.tls_server_context_factory = creator
        replaced = 0
        for port in self.tls_ports():
            port.factory = TLSMemoryBIOFactory(creator, False, port.factory.wrappedFactory)
            replaced += 1
        return replaced

    def is_installed(self, creator: object) -> bool:
        """True while ``creator`` is what Synapse's TLS listeners use. Synapse's
        ``refresh_certificate`` (SIGHUP) always sets a new factory first, so this is enough."""
        return getattr(self.hs, "tls_server_context_factory", None) is creator

    def tls_ports(self) -> list[Any]:
        """Listening ports that speak TLS (for tests and status)."""
        return [
            p
            for p in getattr(self.hs, "_listening_services", [])
            if isinstance(getattr(p, "factory", None), TLSMemoryBIOFactory)
        ]

    def refresh_from_files(self) -> None:
        """Fallback: Synapse re-reads its certificate files and re-wraps its TLS ports
        (what SIGHUP does, without reloading logging and caches)."""
        if self._refresh is None:
            raise RuntimeError("synapse.app._base.refresh_certificate is not available")
        self._refresh(self.hs)

    def on_sighup(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` after Synapse's own SIGHUP handlers (registered before modules
        are built, so ours runs after ``refresh_certificate``). False if unsupported."""
        register = self._register_sighup
        if register is None:
            return False
        try:
            params = list(inspect.signature(register).parameters)
            if params and params[0] == "hs":
                register(self.hs, callback)
            else:  # older releases: register_sighup(func, *args)
                register(callback)
        except Exception as e:
            logger.error(
                "synapse-acme: cannot hook SIGHUP (%s); after a SIGHUP, Synapse "
                "serves its files until the next certificate arrives",
                e,
            )
            return False
        return True

    # -- alerts ------------------------------------------------------------------------------

    def server_notices_enabled(self) -> bool:
        """Whether homeserver.yaml configures ``server_notices`` (its system user is set)."""
        try:
            return self.hs.config.servernotices.server_notices_mxid is not None
        except AttributeError as e:
            logger.error(
                "synapse-acme: cannot tell whether server notices are configured on this "
                "Synapse (%s); alerts are not sent as server notices",
                e,
            )
            return False

    def send_server_notice(self, user_id: str, content: Mapping[str, Any]) -> defer.Deferred[None]:
        """Send ``content`` (an ``m.room.message`` content) to ``user_id`` as a server notice:
        Synapse creates the user's server-notices room and invites them if needed. Fails on a
        worker (Synapse sends server notices from the main process only)."""

        async def send() -> None:
            manager = self.hs.get_server_notices_manager()
            await manager.send_notice(user_id, dict(content))

        return defer.ensureDeferred(send())

    def admin_users(self, api: Any) -> defer.Deferred[list[str]]:
        """The user IDs of the homeserver's active admins (the ``users`` table: there is no
        module API for this)."""

        def query(txn: Any) -> list[str]:
            txn.execute("SELECT name FROM users WHERE admin = 1 AND deactivated = 0 ORDER BY name")
            return [str(row[0]) for row in txn.fetchall()]

        result: defer.Deferred[list[str]] = api.run_db_interaction(
            "synapse_acme_admin_users", query
        )
        return result
