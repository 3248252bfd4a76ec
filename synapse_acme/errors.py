"""Every exception the library raises on purpose, in one place.

Callers catch these by class; each carries what an operator needs to act on it
(the config key path, the ACME problem type, the URL) and never key material.
"""

from __future__ import annotations

from typing import Any


class SynapseAcmeError(Exception):
    """Base class of every error raised on purpose by synapse_acme."""


#: How much of a bad value's repr a ConfigError shows.
MAX_VALUE_CHARS = 160


class ConfigError(SynapseAcmeError):
    """A configuration value is invalid.

    ``str(err)`` reads like ``acme.port: expected an integer 1-65535, got 'eighty'``. A long
    value is cut to :data:`MAX_VALUE_CHARS` characters of its repr (a pasted certificate or a
    whole YAML document must not drown the message).
    """

    def __init__(self, path: str, message: str, value: Any = None, *, has_value: bool = True):
        self.path = path
        self.message = message
        self.value = value
        text = f"{path}: {message}"
        if has_value:
            shown = repr(value)
            if len(shown) > MAX_VALUE_CHARS:
                shown = f"{shown[: MAX_VALUE_CHARS - 3]}... ({len(shown)} characters)"
            text += f", got {shown}"
        super().__init__(text)


class AcmeError(SynapseAcmeError):
    """The CA answered with an RFC 8555/7807 problem document.

    ``type`` is the full URN (``urn:ietf:params:acme:error:rateLimited``), ``code`` its last
    part (``rateLimited``). ``retry_after`` is seconds from the response's Retry-After header,
    if any. ``subproblems`` keeps per-identifier problems.
    """

    def __init__(
        self,
        type: str,
        detail: str = "",
        status: int | None = None,
        url: str | None = None,
        retry_after: float | None = None,
        subproblems: tuple[dict[str, Any], ...] = (),
    ):
        self.type = type
        self.detail = detail
        self.status = status
        self.url = url
        self.retry_after = retry_after
        self.subproblems = subproblems
        code = type.rsplit(":", 1)[-1] if type else "unknown"
        self.code = code
        where = f" from {url}" if url else ""
        http = f" (HTTP {status})" if status is not None else ""
        super().__init__(f"ACME error {code}{http}{where}: {detail}")


class AccountRefused(ConfigError):
    """The CA refused to create the account because of a setting (External Account Binding:
    a wrong kid or HMAC key, or none where the CA requires one). ``path`` names the setting
    (``acme.eab``); ``problem`` is the CA's :class:`AcmeError`, whose ``code`` says why."""

    def __init__(self, path: str, message: str, problem: AcmeError) -> None:
        self.problem = problem
        super().__init__(path, message, has_value=False)


class AcmeProtocolError(SynapseAcmeError):
    """The CA's answer is not what RFC 8555 promises (bad JSON, wrong content type, bad URL,
    an order in an unexpected state, a certificate chain that does not parse or does not match).
    """

    def __init__(self, message: str, url: str | None = None, status: int | None = None):
        self.url = url
        self.status = status
        where = f" ({url})" if url else ""
        super().__init__(f"{message}{where}")


class AcmeTransportError(SynapseAcmeError):
    """The CA could not be reached (DNS, connection refused, TLS failure, timeout)."""

    def __init__(self, message: str, url: str | None = None):
        self.url = url
        super().__init__(f"cannot reach the ACME server at {url}: {message}" if url else message)


class ChallengeFailed(SynapseAcmeError):
    """An authorization became invalid; ``error`` is the CA's problem for the challenge."""

    def __init__(self, identifier: str, error: AcmeError | None):
        self.identifier = identifier
        self.error = error
        why = str(error) if error is not None else "no problem document given"
        super().__init__(f"challenge for {identifier} failed: {why}")


class BundleError(SynapseAcmeError):
    """A certificate bundle is unusable (key mismatch, chain out of order, names not covered,
    not yet valid, expired). The previous bundle keeps serving."""


class StoreError(SynapseAcmeError):
    """The store could not read or write (permissions, disk full, corrupt entry)."""


class StoreBusy(StoreError):
    """Another process manages this store (holds its lock); ``pid`` if it recorded one."""

    def __init__(self, storage: str, pid: int | None) -> None:
        self.storage = storage
        self.pid = pid
        who = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(
            f"{storage} is managed by another synapse-acme process ({who}: `synapse-acme run` "
            "or a homeserver with the module); only one process may order and save "
            "certificates for a store. That process issues and renews on its own; "
            "`synapse-acme renew --force` asks it to renew now, `synapse-acme status` shows "
            "its progress"
        )


class ListenError(SynapseAcmeError):
    """None of a listener's endpoints could be bound (each endpoint and its error are named)."""


class Dns01Error(SynapseAcmeError):
    """A DNS-01 step failed: the dynamic update was refused or got no answer, or the TXT record
    did not become visible at the zone's authoritative servers in time. The message names the
    server, the record and the ``dns01`` key to check; never the TSIG secret."""


class PreflightFailed(SynapseAcmeError):
    """The preflight found that the CA's HTTP-01 request for some names would not reach this
    synapse-acme, so nothing was ordered (a failed validation counts against the CA's limits).
    ``failures`` lists ``(name, kind, message)`` per failed name; ``kind`` is one of the verdict
    kinds of :mod:`synapse_acme.preflight` (``dns``, ``unreachable``, ``not-forwarded``,
    ``redirected``, ``other-answer``)."""

    def __init__(self, failures: list[tuple[str, str, str]]) -> None:
        self.failures = failures
        detail = "; ".join(f"{name}: [{kind}] {message}" for name, kind, message in failures)
        super().__init__(
            f"preflight failed, so nothing was ordered from the CA: {detail}. "
            "`synapse-acme check` repeats this check on demand; "
            "preflight: {enabled: false} turns it off"
        )


class DryRunFailed(SynapseAcmeError):
    """A dry run (a full issuance against a staging CA into a scratch store) failed, so the
    real order was not placed; ``cause`` is the dry run's own error."""

    def __init__(self, url: str, cause: BaseException) -> None:
        self.url = url
        self.cause = cause
        why = (
            str(cause)
            if isinstance(cause, SynapseAcmeError)
            else f"{type(cause).__name__}: {cause}"
        )
        super().__init__(
            f"the dry run against {url} failed, so the real order was not placed: {why}"
        )
