"""The ``synapse-acme`` command line: generate-config, run, issue, renew, check, status,
new-account, migrate-store.

Exit codes: 0 success; 1 an issuance or renewal failed (or anything else failed at run time:
the CA, the store, a listener that cannot be opened); 2 bad configuration or usage, including
``issue``/``renew``/``run`` on a block that says ``enabled: false`` (the operator asked for
what the configuration switches off, and nothing was requested or written).

Every failure is one line on stderr (``configuration error: ...`` or ``error: ...``), never a
traceback (``-v`` logs one for an unexpected error). Output to a reader that went away
(``status | head -1``) ends quietly; the exit code is still the command's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

from twisted.internet import defer, task
from twisted.python.failure import Failure

from synapse_acme import __version__, crypto, fsutil, policy
from synapse_acme.config import AcmeConfig, generate_config, read_config_file
from synapse_acme.errors import (
    BundleError,
    ConfigError,
    ListenError,
    StoreBusy,
    StoreError,
    SynapseAcmeError,
)
from synapse_acme.model import CertificateBundle
from synapse_acme.names import names_key
from synapse_acme.pairs import PairMismatch, read_pair
from synapse_acme.status import (
    MAX_STATUS_FILE,
    CertificateStatus,
    format_time,
    parse_status_file,
)

logger = logging.getLogger("synapse_acme.cli")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def _setup_logging(verbosity: int) -> None:
    level = logging.INFO if verbosity == 0 else logging.DEBUG if verbosity > 0 else logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _write(stream: TextIO, text: str) -> None:
    """Write and flush ``text``; a reader that went away (``| head -1``) silences the stream
    instead of raising, so the command still finishes its work and exits with its own code."""
    try:
        stream.write(text)
        stream.flush()
    except BrokenPipeError:
        _silence(stream)


def _silence(stream: TextIO) -> None:
    """Point ``stream``'s descriptor at /dev/null: what is still buffered, and the
    interpreter's final flush, then go nowhere instead of failing again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # not a real file (captured in tests): nothing is flushed at exit either


def _out(text: str = "") -> None:
    _write(sys.stdout, text + "\n")


def _err(text: str) -> None:
    _write(sys.stderr, text + "\n")


def _load(path: str) -> AcmeConfig:
    return read_config_file(path)


def _load_enabled(args: argparse.Namespace) -> AcmeConfig:
    """The config for a command that requests certificates; refused with ``enabled: false``
    before anything is written (no storage directory, no account key, no order)."""
    config = _load(args.config)
    if not config.enabled:
        where = f" in {config.source_file}" if config.source_file else ""
        if config.source_path.startswith("modules"):
            fix = "remove `enabled: false` there (listed as a module, it defaults to true)"
        else:
            fix = "set `enabled: true` in that block"
        if not config.certificate_specs():
            fix += f" and set {config.key('domain')} (there is no server_name to default to)"
        raise ConfigError(
            config.key("enabled"),
            f"false{where}: certificate management is off there, so `synapse-acme "
            f"{args.command}` requested nothing and wrote nothing (no account key, no order, "
            f"no files). To manage certificates, {fix}",
            has_value=False,
        )
    return config


def cmd_generate_config(args: argparse.Namespace) -> int:
    text = generate_config()
    if not args.output:
        _write(sys.stdout, text)
        return EXIT_OK
    try:
        with open(args.output, "w" if args.force else "x", encoding="utf-8") as f:
            f.write(text)
    except FileExistsError:
        _err(
            f"error: {args.output} already exists and was left as it is: give another path "
            "with -o, remove the file first, or add --force to replace it"
        )
        return EXIT_CONFIG
    except OSError as e:
        _err(f"error: cannot write {args.output}: {fsutil.describe_os_error(e)}")
        return EXIT_CONFIG
    _err(f"wrote {args.output}: edit it (enabled, domain, contact, terms_of_service_agreed)")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from synapse_acme import privileges
    from synapse_acme.runtime import check_startable

    config = _load_enabled(args)
    check_startable(config)  # before --user prepares the storage directory
    run_as = None
    if args.user is not None:
        run_as = privileges.resolve(args.user, args.group)
        if privileges.needs_switch(run_as):
            privileges.check_installation(run_as)
            privileges.prepare_storage(config.storage, run_as)
        else:
            run_as = None
    elif args.group is not None:
        raise ConfigError("--group", "only valid with --user", args.group)

    async def main(reactor: Any) -> None:
        from synapse_acme.runtime import build_runtime
        from synapse_acme.threaded import BlockingRunner

        # Store saves, exports and status writes fsync in their own thread, as inside a
        # homeserver: with many certificates at once, a save waiting on the disk would
        # otherwise hold up every other issuance's requests (and the challenge listener).
        io = BlockingRunner(reactor)
        io.start()
        reactor.addSystemEventTrigger("after", "shutdown", io.stop)
        listener = not args.no_listener
        if run_as is None:
            runtime = build_runtime(config, reactor, standalone_listener=listener, runner=io)
        else:
            # Build as the user (its files), bind as root, then drop root for good.
            runtime = privileges.as_user(
                run_as, build_runtime, config, reactor, standalone_listener=listener, runner=io
            )
        # Nothing starts ordering before the challenge listener is bound: a CA validating
        # against a port nobody answers counts failed validations against its limits.
        await _open_listeners(runtime)
        if run_as is not None:
            privileges.drop(run_as)
        if runtime.acme is not None:
            from synapse_acme.interprocess import RenewRequestWatcher

            RenewRequestWatcher(config.storage, runtime.acme, reactor).setServiceParent(
                runtime.service
            )
        runtime.service.startService()
        reactor.addSystemEventTrigger("before", "shutdown", runtime.service.stopService)
        if runtime.acme is not None:
            acme = runtime.acme
            what = "; ".join(", ".join(s.names) for s in acme.status())
            logger.info("synapse-acme %s running for %s", __version__, what)
        if runtime.watcher is not None:
            from synapse_acme.watch import install_sighup

            watcher = runtime.watcher
            install_sighup(reactor, lambda: watcher.check(force=True))
            logger.info(
                "synapse-acme %s watching %s and %s (external_certificates); SIGHUP reloads now",
                __version__,
                config.tls_certificate_path,
                config.tls_private_key_path,
            )
        await defer.Deferred()  # until SIGINT/SIGTERM stops the reactor

    return _react(main)


async def _open_listeners(runtime: Any) -> None:
    """Bind every listener of ``runtime`` (privileged start) and wait until all are bound
    (:meth:`Runtime.when_ready`); if one fails, stop what was started and raise its
    ListenError (nothing was ordered)."""
    try:
        runtime.service.privilegedStartService()
        await runtime.when_ready()
    except BaseException:
        await runtime.service.stopService()
        raise


def _one_shot(args: argparse.Namespace, force: bool) -> int:
    from synapse_acme.runtime import check_startable

    config = _load_enabled(args)
    if config.external_certificates:
        raise ConfigError(
            config.key("external_certificates"),
            "is true: another tool issues these certificates, so there is nothing to "
            f"{args.command} here (use `synapse-acme run` to serve and hot-swap them)",
            True,
        )
    check_startable(config)  # before anything is written
    outcome: dict[str, int] = {"code": EXIT_OK}

    async def main(reactor: Any) -> None:
        from synapse_acme.runtime import build_runtime

        try:
            # One-shot: the service does only what is asked here, schedules nothing, and leaves
            # reporting a failure to the FAILED line below (one report per failure).
            runtime = build_runtime(
                config, reactor, standalone_listener=not args.no_listener, one_shot=True
            )
        except StoreBusy as e:
            if not force:
                raise
            # A running manager (`run`, or Synapse with the module) owns the store: hand the
            # forced renewal to it instead of ordering beside it.
            from synapse_acme.interprocess import RENEW_REQUEST_POLL, request_renewal

            path = request_renewal(config.storage)
            who = f"pid {e.pid}" if e.pid is not None else "another process"
            _out(
                f"HANDED OVER  {config.storage} is managed by {who}; created {path}, so it "
                f"renews every certificate within {RENEW_REQUEST_POLL:g} s. Follow with "
                "`synapse-acme status` (or its log)."
            )
            return
        acme = runtime.acme
        assert acme is not None  # not external_certificates, checked above
        await _open_listeners(runtime)
        runtime.service.startService()
        try:
            await acme.when_loaded()
            key = names_key(args.name) if args.name else None
            if key is not None and key not in acme.keys:
                raise ConfigError(
                    "--name", "no configured certificate has exactly these names", args.name
                )
            results = await acme.renew(key, force=force)
            if not results:
                _out("Nothing to do: every certificate is valid and not yet due for renewal.")
            again = f"synapse-acme {args.command}" + (" --force" if force else "")
            for k, result in results:
                status = acme.status_of(k)
                names = ", ".join(status.names)
                if isinstance(result, Failure):
                    outcome["code"] = EXIT_FAILED
                    what = acme.failure_summary(k) or result.getErrorMessage()
                    if not result.check(SynapseAcmeError):
                        what += " (-v logs the traceback)"
                    _err(
                        f"FAILED  {names}: {what}; nothing will retry it: run `{again}` again, "
                        "or let `synapse-acme run` / the homeserver module retry"
                    )
                else:
                    where = os.path.join(config.storage, "certificates", k)
                    if config.database is not None:  # every process on it serves it now
                        where = f"the PostgreSQL store {config.database.where}"
                    _out(
                        f"OK      {names}: certificate in {where}, valid until "
                        f"{format_time(status.not_after)}; due for renewal at "
                        f"{format_time(status.renew_at)} (then run "
                        "`synapse-acme renew`, or let `synapse-acme run` / the homeserver "
                        "module renew it)"
                    )
            exporter = runtime.exporter
            if exporter is not None and exporter.state.failed:
                # The certificate may be fine in the store, but the homeserver reads these files.
                outcome["code"] = EXIT_FAILED
                _err(
                    f"FAILED  export to {exporter.cert_path} / {exporter.key_path}: "
                    f"{exporter.state.error}; the homeserver's files keep the certificate they "
                    f"had; nothing will retry it: fix that and run `{again}` again (it re-exports "
                    "the stored certificate), or let `synapse-acme run` / the homeserver module "
                    "retry"
                )
        finally:
            await runtime.service.stopService()

    code = _react(main)
    return code if code != EXIT_OK else outcome["code"]


def cmd_issue(args: argparse.Namespace) -> int:
    return _one_shot(args, force=False)


def cmd_renew(args: argparse.Namespace) -> int:
    if args.dry_run:
        return _dry_run(args)
    return _one_shot(args, force=args.force)


def _chosen_specs(config: AcmeConfig, args: argparse.Namespace) -> list[Any]:
    """The configured certificates, or only the one ``--name`` picks (ConfigError if none)."""
    specs = config.certificate_specs()
    if getattr(args, "name", None):
        key = names_key(args.name)
        specs = [s for s in specs if names_key(s.names) == key]
        if not specs:
            raise ConfigError(
                "--name", "no configured certificate has exactly these names", args.name
            )
    return specs


def _dry_run(args: argparse.Namespace) -> int:
    """``renew --dry-run``: each certificate issued by ``dry_run_url`` into a scratch store;
    the live store, the exported files and what is served stay as they are."""
    from synapse_acme.dryrun import dry_run
    from synapse_acme.errors import DryRunFailed
    from synapse_acme.http01 import HTTP01Responder
    from synapse_acme.runtime import http01_listener_for, make_preflight

    config = _load_enabled(args)
    if config.external_certificates:
        raise ConfigError(
            config.key("external_certificates"),
            "is true: another tool issues these certificates, so there is nothing to dry-run",
            True,
        )
    specs = _chosen_specs(config, args)
    if not specs:
        raise ConfigError(config.key("domain"), "not set: no certificate to dry-run", None)
    if not config.http01_endpoints():
        raise ConfigError(
            config.key("port"),
            "0 (no standalone HTTP-01 listener): a dry run's challenges are known only to this "
            "command, so it needs its own listener (port or listen)",
            config.port,
        )
    outcome = {"code": EXIT_OK}

    async def main(reactor: Any) -> None:
        responder = HTTP01Responder()
        listener = http01_listener_for(config, reactor, responder)
        assert listener is not None  # http01_endpoints() checked above
        listener.privilegedStartService()
        listener.startService()
        try:
            await listener.when_listening()
            preflight = make_preflight(config, reactor, responder)
            for spec in specs:
                names = ", ".join(spec.names)
                try:
                    if config.preflight.enabled:
                        await preflight.require(spec.names)
                    bundle = await dry_run(config, reactor, spec, responder)
                except (DryRunFailed, SynapseAcmeError) as e:
                    outcome["code"] = EXIT_FAILED
                    _err(f"DRY RUN FAILED  {names}: {e}")
                    continue
                leaf = crypto.parse_chain(bundle.chain_pem)[0]
                _out(
                    f"DRY RUN OK  {names}: {config.dry_run_url} issued a certificate (valid "
                    f"until {format_time(crypto.not_after(leaf))}) to a scratch account; it was "
                    "discarded: nothing was saved, exported or served"
                )
        finally:
            await listener.stopService()

    code = _react(main)
    return code if code != EXIT_OK else outcome["code"]


def _store_manager(storage: str) -> tuple[bool, int | None]:
    """Whether a running process manages ``storage`` (holds its lock), and its pid if it
    recorded one; read-only (a shared lock is tried and dropped at once, nothing is written)."""
    import errno
    import fcntl

    from synapse_acme.interprocess import LOCK_FILE

    try:
        fd = fsutil.open_regular(os.path.join(storage, LOCK_FILE), os.O_RDONLY)
    except (OSError, StoreError):
        return False, None  # no lock file: nothing has managed this store yet
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False, None
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return True, int(text) if text.isdigit() else None
        return False, None
    finally:
        os.close(fd)  # drops the shared lock, if taken


def cmd_check(args: argparse.Namespace) -> int:
    """The preflight on demand: one verdict line per name; 0 when every name passes."""
    from synapse_acme.account import parse_account_key
    from synapse_acme.http01 import HTTP01Responder
    from synapse_acme.preflight import probe_secret_for
    from synapse_acme.runtime import http01_listener_for, make_preflight

    config = _load(args.config)
    if config.external_certificates:
        raise ConfigError(
            config.key("external_certificates"),
            "is true: another tool answers the CA's challenges, so there is nothing to check",
            True,
        )
    names = list(dict.fromkeys(n for spec in config.certificate_specs() for n in spec.names))
    if not names:
        raise ConfigError(config.key("domain"), "not set: no name to check", None)
    managed, pid = _store_manager(config.storage)
    secret = None
    if managed:
        data = fsutil.read_regular(config.account_key_file, follow=True, limit=1 << 20)
        if data is not None:
            secret = probe_secret_for(parse_account_key(data, config.account_key_file))
    outcome = {"code": EXIT_OK}

    async def main(reactor: Any) -> None:
        listener = None
        if secret is not None:
            who = f"pid {pid}" if pid is not None else "another process"
            _err(
                f"note: {config.storage} is managed by {who}; the probes are answered by it "
                "(no listener opened here)"
            )
            preflight = make_preflight(config, reactor, None, probe_secret=secret)
        else:
            responder = HTTP01Responder()
            if not args.no_listener:
                listener = http01_listener_for(config, reactor, responder)
            if listener is None:
                _err(
                    "note: no synapse-acme process serves challenges for this store and this "
                    "command opens no listener (port 0 or --no-listener): a FAIL below may "
                    "only mean that; start `synapse-acme run` or the homeserver and check again"
                )
            else:
                listener.privilegedStartService()
                listener.startService()
            preflight = make_preflight(config, reactor, responder)
        try:
            if listener is not None:
                await listener.when_listening()
            verdicts = await preflight.check(names)
        finally:
            if listener is not None:
                await listener.stopService()
        for v in verdicts:
            if not v.ok:
                outcome["code"] = EXIT_FAILED
            word = "PASS" if v.ok else "FAIL"
            _out(f"{word}  {v.name}: [{v.kind}] {v.message}")
        if not config.preflight.enabled:
            _err(
                f"note: {config.key('preflight')}.enabled is false: orders are placed without "
                "this check"
            )

    code = _react(main)
    return code if code != EXIT_OK else outcome["code"]


def _react(main: Any) -> int:
    result = {"code": EXIT_OK}

    async def wrapped(reactor: Any) -> None:
        try:
            await main(reactor)
        except Exception as e:
            result["code"] = _report(e)

    try:
        task.react(lambda reactor: defer.ensureDeferred(wrapped(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else EXIT_FAILED
    return result["code"]


def _report(e: Exception) -> int:
    """Print the one line for a failed command and return its exit code."""
    if isinstance(e, ConfigError):
        _err(f"configuration error: {e}")
        return EXIT_CONFIG
    if isinstance(e, ListenError):
        _err(f"error: {e}. Nothing was ordered from the CA")
        return EXIT_FAILED
    if isinstance(e, SynapseAcmeError):
        _err(f"error: {e}")
        return EXIT_FAILED
    logger.debug("Unexpected error", exc_info=e)
    _err(f"error: unexpected {type(e).__name__}: {e} (-v logs the traceback)")
    return EXIT_FAILED


def status_report(config: AcmeConfig, now: datetime.datetime) -> list[dict[str, Any]]:
    """Per certificate, from the store and the last run's status file; needs no network.

    Never fails as a whole: a certificate whose files are damaged or unreadable is reported
    with state ``unreadable`` and the ``error`` saying which file and why, and the others are
    reported as usual.
    """
    from synapse_acme.runtime import status_path
    from synapse_acme.store import FileStore

    # Read-only: the service may be saving right now, so no crash recovery from here.
    store = FileStore(config.storage, auto_recover=False)
    last: dict[str, CertificateStatus] = {}
    try:
        data = fsutil.read_regular(status_path(config), limit=MAX_STATUS_FILE)
        if data is not None:
            last = {status.key: status for status in parse_status_file(data)}
    except (SynapseAcmeError, ValueError) as e:
        logger.warning("Ignoring the status file of the last run: %s", e)
    threshold = datetime.timedelta(days=config.reprovision_threshold)
    out = []
    for index, spec in enumerate(config.certificate_specs()):
        key = names_key(spec.names)
        entry: dict[str, Any] = {"key": key, "names": list(spec.names), "state": "missing"}
        try:
            bundle = _stored_bundle(config, store, key)
            if bundle is not None:
                entry.update(_describe(config, key, bundle, now, threshold))
        except Exception as e:  # one bad certificate must not hide the others
            entry["state"] = "unreadable"
            entry["error"] = str(e) if isinstance(e, SynapseAcmeError) else repr(e)
        prev = last.get(key)
        if prev is not None:
            entry.update(_last_run(prev))
        if index == 0 and not config.external_certificates:
            entry.update(_export_report(config, entry, prev))
        out.append(entry)
    return out


def _last_run(prev: CertificateStatus) -> dict[str, Any]:
    """What the last run's status adds to the report: its attempts, failures and plans."""
    window = prev.ari_window
    carried: dict[str, Any] = {
        "last_error": prev.last_error,
        "last_error_type": prev.last_error_type,
        "last_attempt": format_time(prev.last_attempt),
        "last_success": format_time(prev.last_success),
        "next_attempt": format_time(prev.next_attempt),
        "failures": prev.failures,
        "last_run_renew_at": format_time(prev.renew_at),
        "ari_window": [format_time(t) for t in window] if window is not None else None,
    }
    return {k: v for k, v in carried.items() if v is not None}


def _export_report(
    config: AcmeConfig, entry: dict[str, Any], prev: CertificateStatus | None
) -> dict[str, Any]:
    """What the homeserver's TLS files hold (the first certificate is exported there) and what
    the running process serves, beside the stored ``serial``: three serials to compare."""
    out: dict[str, Any] = {}
    if prev is not None and prev.served_serial is not None:
        out["served_serial"] = prev.served_serial
    cert_path, key_path = config.tls_certificate_path, config.tls_private_key_path
    if not cert_path or not key_path:
        return out
    export: dict[str, Any] = {"cert_path": cert_path, "key_path": key_path}
    last = prev.export if prev is not None else None
    if last is not None:
        export.update(state=last.state, failures=last.failures)
        if last.error is not None:
            export["error"] = last.error
    try:
        chain, _ = read_pair(cert_path, key_path)
        out["exported_serial"] = f"{crypto.parse_chain(chain)[0].serial_number:x}"
    except FileNotFoundError:
        export.setdefault("state", "missing")
        export.setdefault("error", "the TLS files do not exist yet")
    except (OSError, SynapseAcmeError) as e:
        export.update(state="unreadable", error=str(e))
    stored = entry.get("serial")
    if export.get("state") in (None, "ok") and out.get("exported_serial") != stored and stored:
        # Nothing reported a failure, yet the files hold another certificate than the store:
        # the next start of `run`/`issue`/the homeserver module repairs that.
        export.update(state="stale", error="the TLS files hold another certificate than the store")
    export.setdefault("state", "ok" if stored else "none")
    out["export"] = export
    return out


#: Export states that mean the homeserver would not get the stored certificate on its next start.
_BAD_EXPORT_STATES = ("failed", "foreign", "unreadable", "stale")


def _stored_bundle(config: AcmeConfig, store: Any, key: str) -> CertificateBundle | None:
    """The bundle status reports on; raises what makes it unreadable."""
    if config.external_certificates:
        return _read_external(config)
    loaded: list[Any] = []
    failure: list[Failure] = []
    store.load(key).addCallbacks(loaded.append, failure.append)
    if failure:
        failure[0].raiseException()
    return loaded[0] if loaded else None


def _describe(
    config: AcmeConfig,
    key: str,
    bundle: CertificateBundle,
    now: datetime.datetime,
    threshold: datetime.timedelta,
) -> dict[str, Any]:
    chain = crypto.parse_chain(bundle.chain_pem)
    nb, na = crypto.not_before(chain[0]), crypto.not_after(chain[0])
    placeholder = bool(bundle.metadata.get("placeholder"))
    renew_at = policy.renewal_time(nb, na, threshold=threshold, ari_window=None, rand=0.5)
    entry: dict[str, Any] = {
        "state": "placeholder" if placeholder else "expired" if na <= now else "valid",
        "serial": f"{chain[0].serial_number:x}",
        "issuer": chain[0].issuer.rfc4514_string(),
        "not_before": format_time(nb),
        "not_after": format_time(na),
        "renew_at": format_time(renew_at) if not placeholder else "now",
        "path": os.path.join(config.storage, "certificates", key),
    }
    # Which CA issued it, and how many of acme.issuers failed before that one did.
    ca_url = bundle.metadata.get("issuer_directory")
    if isinstance(ca_url, str) and not placeholder:
        entry["ca"] = ca_url
        fallbacks = bundle.metadata.get("issuer_fallbacks")
        entry["fallbacks"] = fallbacks if isinstance(fallbacks, int) and fallbacks > 0 else 0
    if config.external_certificates:
        entry.update(renew_at="by another tool", path=config.tls_certificate_path)
    return entry


def _read_external(config: AcmeConfig) -> CertificateBundle | None:
    """The externally managed pair, or None if a file is missing. Read as the watcher reads it
    (:func:`~synapse_acme.pairs.read_pair`: through symlinks, as certbot's live/ files are
    links, a FIFO refused unread, re-read if it straddled a renewal); another tool may add
    text around the PEM blocks, so no strict parse, but the key must be the leaf's and the
    chain in order, or they cannot be served."""
    cert_path, key_path = config.tls_certificate_path, config.tls_private_key_path
    assert cert_path and key_path
    try:
        chain_pem, key_pem = read_pair(cert_path, key_path)
        crypto.check_chain_order(crypto.parse_chain(chain_pem))
    except FileNotFoundError:
        return None
    except PairMismatch:
        raise BundleError(
            f"{cert_path} / {key_path}: private key does not match the certificate"
        ) from None
    except BundleError as e:
        raise BundleError(f"{cert_path} / {key_path}: {e}") from None
    return CertificateBundle(key_pem=key_pem, chain_pem=chain_pem)


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if not config.enabled:
        where = f" in {config.source_file}" if config.source_file else ""
        _err(
            f"note: {config.key('enabled')} is false{where}: nothing is issued or renewed for "
            "this configuration (issue, renew and run refuse); this shows what the store holds"
        )
    if not config.certificate_specs():
        _err(f"note: no certificate is configured ({config.key('domain')} is not set)")
    now = datetime.datetime.now(datetime.timezone.utc)  # the CLI's edge: the only wall-clock read
    report = status_report(config, now)
    if args.json:
        _out(json.dumps(report, indent=2))
    else:
        for e in report:
            _out(", ".join(e["names"]))
            _out(f"  state:        {e['state']}")
            for label, field in (
                ("error", "error"),
                ("not after", "not_after"),
                ("renew at", "renew_at"),
                ("serial", "serial"),
                ("issuer", "issuer"),
                ("issued by CA", "ca"),
                ("fallbacks", "fallbacks"),
                ("stored in", "path"),
                ("exported", "exported_serial"),
                ("served", "served_serial"),
                ("last success", "last_success"),
                ("last attempt", "last_attempt"),
                ("last error", "last_error"),
                ("next attempt", "next_attempt"),
            ):
                if e.get(field) is not None:
                    _out(f"  {label + ':':<13} {e[field]}")
            export = e.get("export")
            if export is not None:
                detail = f": {export['error']}" if export.get("error") else ""
                where = f"{export['cert_path']}, {export['key_path']}"
                _out(f"  {'export:':<13} {export['state']} ({where}){detail}")
    bad = any(
        e["state"] in ("missing", "expired", "unreadable")
        or e.get("export", {}).get("state") in _BAD_EXPORT_STATES
        for e in report
    )
    return EXIT_FAILED if bad else EXIT_OK


def cmd_new_account(args: argparse.Namespace) -> int:
    """Start a new ACME account on purpose: the one way past a lost or damaged account key."""
    from synapse_acme import account
    from synapse_acme.interprocess import StoreLock
    from synapse_acme.runtime import check_account_key_directory

    config = _load(args.config)
    if config.external_certificates:
        raise ConfigError(
            config.key("external_certificates"),
            "is true: another tool issues these certificates and holds the ACME account",
            True,
        )
    if config.database is not None:
        raise ConfigError(
            config.key("database"),
            "is set: the ACME account key is kept in the database and shared by every process "
            "on it, and new-account replaces only a file store's. To start over there, stop "
            "every process, delete the rows of synapse_acme_account_key and "
            "synapse_acme_account, and start one: it creates a new account",
            has_value=False,  # the URL may hold a password
        )
    check_account_key_directory(config)  # before the storage directory is made
    now = datetime.datetime.now(datetime.timezone.utc)  # the CLI's edge: the only wall-clock read
    fsutil.check_owned_by_us(config.storage, "the storage directory")
    fsutil.ensure_private_dir(config.storage)
    try:
        lock = StoreLock.acquire(config.storage)
    except StoreBusy as e:
        who = f"pid {e.pid}" if e.pid is not None else "another process"
        raise StoreError(  # not StoreBusy's text: renew --force is no way out here
            f"{config.storage} is in use by {who} (`synapse-acme run` or a homeserver with the "
            "module): stop it first, then run new-account again"
        ) from None
    try:
        done = account.start_new_account(
            config.account_key_file,
            config.storage,
            now.strftime("%Y%m%dT%H%M%SZ"),
            force=args.force,
        )
    finally:
        lock.release()
    _out(f"NEW ACCOUNT  created a new ACME account key at {done.key_path}")
    _out(f"  thumbprint:          {done.thumbprint}")
    if done.old_key is not None:
        _out(f"  previous key kept:   {done.old_key}")
    if done.old_record is not None:
        _out(f"  previous record:     {done.old_record}")
    _out(
        "The CA registers the new account on the next `synapse-acme issue`, `renew` or `run`; "
        "the certificates in the store stay in use and are renewed under the new account."
    )
    if not config.enabled:
        _err(
            f"note: {config.key('enabled')} is false, so issue, renew and run refuse until "
            "it is true"
        )
    return EXIT_OK


def cmd_migrate_store(args: argparse.Namespace) -> int:
    """Copy the file store into a PostgreSQL store (``--to``) or back (``--from``); the rules
    are :mod:`synapse_acme.migrate`'s. Exit 0 only if every entry is in the target. Or, with
    ``--reseal``, seal a PostgreSQL store's private keys again with the current key."""
    from synapse_acme import migrate
    from synapse_acme.filebackend import FileBackend
    from synapse_acme.interprocess import StoreLock
    from synapse_acme.pgstore import KeyRing, PostgresBackend, ThreadedDatabase, generate_key_file

    ways = (("--to", args.to), ("--from", args.from_), ("--reseal", args.reseal))
    flag, dsn = next((f, v) for f, v in ways if v is not None)
    shown = migrate.redact_dsn(dsn)
    if not migrate.is_postgres_dsn(dsn):
        raise ConfigError(
            flag,
            "is not a PostgreSQL connection string (postgresql://USER@HOST/DATABASE, or "
            "libpq key=value pairs)",
            shown,
        )
    if args.to is not None and args.to_dir is not None:
        raise ConfigError(
            "--to-dir", "only with --from: with --to, -c names the source", args.to_dir
        )
    if args.reseal is not None and (args.config or args.to_dir):
        raise ConfigError(
            "--reseal", "works on the database alone: give no -c or --to-dir with it", shown
        )
    if args.reseal is None and (args.config is None) == (args.to_dir is None):
        raise ConfigError(
            "-c",
            "give -c CONFIG (its storage is the file store) or, with --from, --to-dir DIR",
            args.config,
        )
    if not args.key_file:
        raise ConfigError(
            "--key-file",
            "required: the file holding the PostgreSQL store's encryption key (--new-key-file "
            "creates it); repeat it to list old keys after the current one",
            None,
        )
    if args.new_key_file and args.from_ is not None:
        raise ConfigError(
            "--new-key-file", "only with --to or --reseal: reading a store needs its key", True
        )
    if args.config is not None:
        config = _load(args.config)
        storage, account_key_file = config.storage, config.account_key_file
    else:
        storage, account_key_file = args.to_dir, None
    secret = migrate.password_of(dsn)

    def scrub(text: str) -> str:
        return text.replace(secret, "***") if secret else text

    if args.new_key_file:
        path = args.key_file[0]
        try:
            key_id = generate_key_file(path)
        except FileExistsError:
            raise ConfigError(
                "--new-key-file", f"{path} already exists: drop --new-key-file to use it", True
            ) from None
        except OSError as e:
            raise StoreError(f"cannot create {path}: {fsutil.describe_os_error(e)}") from None
        _out(f"KEY FILE   created {path} (mode 0600, key id {key_id}): back it up; without it")
        _out("           the private keys in the database cannot be read")
    keyring = KeyRing.from_files(args.key_file)
    if args.reseal is not None:
        return _reseal(dsn, shown, keyring, scrub)
    lock = None
    if args.to is not None:  # the file store is only read: no lock, no crash recovery
        if not os.path.isdir(storage):
            raise StoreError(f"there is no file store at {storage}: nothing to copy")
        source_desc, target_desc = storage, shown
    else:  # written: never under a running manager's feet
        fsutil.check_owned_by_us(storage, "the storage directory")
        fsutil.ensure_private_dir(storage)
        try:
            lock = StoreLock.acquire(storage)
        except StoreBusy as e:
            who = f"pid {e.pid}" if e.pid is not None else "another process"
            raise StoreError(
                f"{storage} is in use by {who} (`synapse-acme run` or a homeserver with the "
                "module): stop it first, then run migrate-store again"
            ) from None
        source_desc, target_desc = shown, storage
    outcome = {"code": EXIT_OK}

    async def main(reactor: Any) -> None:
        pg = PostgresBackend(ThreadedDatabase(dsn, reactor), reactor, keyring)
        files = FileBackend(
            storage, reactor, account_key_file=account_key_file, auto_recover=lock is not None
        )
        source, target = (files, pg) if args.to is not None else (pg, files)
        try:
            await pg.setup()
            _out(f"Copying {source_desc} -> {target_desc} (encryption key {keyring.current_id})")

            def report(line: migrate.Line) -> None:
                (_err if line.word in migrate.BAD else _out)(scrub(str(line)))

            summary = await migrate.migrate(source, target, force=args.force, report=report)
        except SynapseAcmeError as e:
            raise StoreError(scrub(str(e))) from None
        finally:
            await pg.close()
        _out(("Done: " if summary.ok else "NOT DONE: ") + str(summary))
        if not summary.ok:
            outcome["code"] = EXIT_FAILED
        others = os.path.join(storage, "accounts")
        if args.to is not None and os.path.isdir(others):
            _err(
                f"note: the accounts at other CAs of acme.issuers ({others}) are not part of the "
                "store and were not copied"
            )

    try:
        code = _react(main)
    finally:
        if lock is not None:
            lock.release()
    return code if code != EXIT_OK else outcome["code"]


def _reseal(dsn: str, shown: str, keyring: Any, scrub: Callable[[str], str]) -> int:
    """``migrate-store --reseal``: the last step of a key rotation (see
    :meth:`~synapse_acme.pgstore.PostgresBackend.reseal`)."""
    from synapse_acme.pgstore import PostgresBackend, ThreadedDatabase

    async def main(reactor: Any) -> None:
        pg = PostgresBackend(ThreadedDatabase(dsn, reactor), reactor, keyring)
        try:
            await pg.setup()
            _out(f"Resealing {shown} with encryption key {keyring.current_id}")
            done, already = await pg.reseal()
        except SynapseAcmeError as e:
            raise StoreError(scrub(str(e))) from None
        finally:
            await pg.close()
        for what in done:
            _out(f"RESEALED   {what}")
        _out(
            f"Done: {len(done)} private keys resealed, {already} already were; every row now "
            f"opens with key {keyring.current_id} alone, so the key files listed after the "
            "first may go"
        )

    return _react(main)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="synapse-acme",
        description="Automatic TLS certificates (ACME v2) for Matrix homeservers.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    # The same options after the subcommand (`synapse-acme issue -c x -v`), counted apart
    # and added up in main(), so that neither place overrides the other.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="count", default=0, dest="sub_verbose", help="more logging"
    )
    common.add_argument(
        "-q", "--quiet", action="store_true", dest="sub_quiet", help="warnings and errors only"
    )
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    g = add("generate-config", help="print a commented sample acme: block")
    g.add_argument("-o", "--output", help="write to this new file instead of stdout")
    g.add_argument("--force", action="store_true", help="with -o: replace an existing file")
    g.set_defaults(func=cmd_generate_config)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "-c",
            "--config",
            required=True,
            help="homeserver.yaml or a standalone YAML file with an acme: block",
        )

    r = add("run", help="answer challenges and keep certificates renewed (stays up)")
    with_config(r)
    r.add_argument(
        "--no-listener",
        action="store_true",
        help="do not open the HTTP-01 listener (challenges served elsewhere)",
    )
    r.add_argument(
        "--user",
        help="started as root: bind the listeners (port 80), then run as this user",
    )
    r.add_argument("--group", help="with --user: this group instead of the user's own")
    r.set_defaults(func=cmd_run)

    for name, help_text in (
        ("issue", "obtain missing certificates now, then exit"),
        ("renew", "renew certificates that are due (or all with --force)"),
    ):
        sp = add(name, help=help_text)
        with_config(sp)
        sp.add_argument("--name", action="append", help="only the certificate with these names")
        sp.add_argument(
            "--no-listener",
            action="store_true",
            help="do not open the HTTP-01 listener (challenges served elsewhere)",
        )
        if name == "renew":
            sp.add_argument(
                "--dry-run",
                action="store_true",
                help="issue against dry_run_url (staging) into a scratch store: nothing is "
                "saved, exported or served",
            )
            sp.add_argument(
                "--force",
                action="store_true",
                help="renew even if not due; if a running synapse-acme manages the store, ask "
                "it to renew every certificate now",
            )
        sp.set_defaults(func=cmd_issue if name == "issue" else cmd_renew)

    c = add(
        "check",
        help="preflight: probe each name as the CA would; one verdict per name (0: all pass)",
    )
    with_config(c)
    c.add_argument(
        "--no-listener",
        action="store_true",
        help="do not open the HTTP-01 listener (challenges served elsewhere)",
    )
    c.set_defaults(func=cmd_check)

    s = add("status", help="show each certificate's state (reads the store only)")
    with_config(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)

    n = add(
        "new-account",
        help="replace a lost or damaged ACME account key with a new one (a new account)",
    )
    with_config(n)
    n.add_argument(
        "--force",
        action="store_true",
        help="even if the current key is fine: leave that account (its key file is kept)",
    )
    n.set_defaults(func=cmd_new_account)

    m = add(
        "migrate-store",
        help="copy the certificates and the ACME account from the file store to PostgreSQL "
        "(--to) or back (--from)",
    )
    m.add_argument("-c", "--config", help="its storage (and account_key_file) is the file store")
    way = m.add_mutually_exclusive_group(required=True)
    way.add_argument(
        "--to", metavar="DSN", help="copy into this PostgreSQL store (postgresql://...)"
    )
    way.add_argument("--from", dest="from_", metavar="DSN", help="copy from this PostgreSQL store")
    way.add_argument(
        "--reseal",
        metavar="DSN",
        help="seal every private key in this PostgreSQL store again with the first --key-file "
        "(the last step of a key rotation)",
    )
    m.add_argument(
        "--to-dir", metavar="DIR", help="with --from: write this file store instead of -c's"
    )
    m.add_argument(
        "--key-file",
        action="append",
        metavar="PATH",
        help="the PostgreSQL store's encryption key (base64, 32 bytes); repeat for old keys "
        "after the current one",
    )
    m.add_argument(
        "--new-key-file",
        action="store_true",
        help="with --to or --reseal: create the first --key-file (0600; it must not exist)",
    )
    m.add_argument(
        "--force",
        action="store_true",
        help="replace a certificate in the target even if it is as new or newer",
    )
    m.set_defaults(func=cmd_migrate_store)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except BrokenPipeError:  # --help into `| head -1`, or a usage error into a closed stderr
        _silence(sys.stdout)
        _silence(sys.stderr)
        words = sys.argv[1:] if argv is None else list(argv)
        asked = any(w in ("-h", "--help", "--version") for w in words)
        return EXIT_OK if asked else EXIT_CONFIG
    quiet = args.quiet or args.sub_quiet
    _setup_logging(-1 if quiet else args.verbose + args.sub_verbose)
    try:
        return int(args.func(args))
    except Exception as e:
        return _report(e)


def entry() -> NoReturn:
    """The process entry point (``synapse-acme`` and ``python -m synapse_acme``): :func:`main`,
    then out without the interpreter's teardown.

    When :func:`main` returns, every file is written, fsynced and closed, the store lock is
    released and the reactor has stopped (with its thread pools). What the interpreter would
    still do is free the objects of ~700 modules one by one: ~10% of a one-shot ``issue``'s
    CPU time, for nothing. So the log handlers and the output are flushed here, and the process
    ends with :func:`main`'s exit code.
    """
    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away, or a closed stream
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
