"""The status of each managed certificate: one frozen value that everyone reads.

:class:`~synapse_acme.service.AcmeService` produces a :class:`CertificateStatus` per certificate;
the runtime adds what the TLS listeners serve and what the export holds and writes
``status.json`` with :func:`dump_status_file`; ``synapse-acme status`` reads that file back with
:func:`parse_status_file`, the Synapse module hands it out (:meth:`AcmeModule.status`), and
metrics can read the same value. The JSON form is defined here and nowhere else.

The format of ``status.json`` only grows: a key once written keeps its name and meaning, and
:meth:`CertificateStatus.from_json` reads a file written by an older version (a missing key is
its default), so ``status`` after an upgrade still shows the last run of the old version.
Times are aware UTC datetimes here and ISO 8601 with ``Z`` in JSON (:func:`format_time`).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

#: The largest ``status.json`` read (it holds about a kilobyte per certificate).
MAX_STATUS_FILE = 16 * 1024 * 1024


def format_time(value: datetime.datetime | None) -> str | None:
    """``2026-12-31T12:00:00Z``: how status, the CLI and log lines write a time."""
    if value is None:
        return None
    return value.astimezone(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def parse_time(text: object) -> datetime.datetime | None:
    """The inverse of :func:`format_time` (also accepts ``+00:00``); ValueError if malformed."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"expected a time as text, got {text!r}")
    # datetime.fromisoformat reads "Z" only from Python 3.11 on.
    value = datetime.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    if value.tzinfo is None:
        raise ValueError(f"time without a time zone: {text!r}")
    return value.astimezone(datetime.timezone.utc)


def time_from_seconds(seconds: float | None) -> datetime.datetime | None:
    """Clock seconds (``IReactorTime.seconds()``) as an aware UTC datetime."""
    if seconds is None:
        return None
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)


def _text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"expected text, got {value!r}")


def _count(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a count, got {value!r}")
    return value


@attrs.frozen
class ExportStatus:
    """The homeserver's TLS files (the first certificate is exported there).

    ``state``: ``none`` (nothing exported yet), ``ok``, ``foreign`` (a path holds something
    synapse-acme did not write: left alone), ``failed``; ``synapse-acme status`` adds what it
    sees on disk itself: ``missing``, ``unreadable``, ``stale`` (the files hold another
    certificate than the store). ``serial``: the leaf serial (hex) the files hold, if ours.
    ``failures``: failed attempts in a row.
    """

    state: str
    cert_path: str | None = None
    key_path: str | None = None
    serial: str | None = None
    error: str | None = None
    failures: int = 0

    @property
    def ok(self) -> bool:
        return self.state == "ok"

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "serial": self.serial,
            "error": self.error,
            "failures": self.failures,
            "cert_path": self.cert_path,
            "key_path": self.key_path,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExportStatus:
        if not isinstance(data, Mapping):
            raise ValueError(f"expected an export object, got {data!r}")
        return cls(
            state=_text(data.get("state")) or "none",
            cert_path=_text(data.get("cert_path")),
            key_path=_text(data.get("key_path")),
            serial=_text(data.get("serial")),
            error=_text(data.get("error")),
            failures=_count(data.get("failures")),
        )


@attrs.frozen
class CertificateStatus:
    """One managed certificate as the provisioning process sees it.

    The stored certificate: ``has_certificate``, ``placeholder`` (a self-signed stand-in),
    ``serial`` (hex), ``issuer`` (the leaf's issuer name), ``ca_url`` (the directory URL of the
    CA that issued it), ``fallbacks`` (how many CAs of ``acme.issuers`` failed before that one
    issued it: 0 when the first did), ``not_before``/``not_after``. Renewal: ``renew_at`` (the
    planned moment), ``ari_window`` (the CA's suggested window), ``issuing`` (an order is in
    flight), ``unsaved`` (issued but not yet saved: it is saved on the next attempt).
    Failures: ``failures`` (in a row; 0 after a success), ``last_error``/``last_error_type``
    (the current failure; None after a success), ``last_failure`` (when the last attempt that
    failed started, kept after a later success), ``next_attempt`` (the retry in force, None if
    none is scheduled), ``last_attempt``/``last_success``.
    What is in use: ``served_serial``/``served_not_after`` (what the TLS listeners serve, None
    when none serves it) and ``export`` (the homeserver's files; None when not exported).
    """

    key: str
    names: tuple[str, ...]
    has_certificate: bool = False
    placeholder: bool = False
    serial: str | None = None
    issuer: str | None = None
    ca_url: str | None = None
    not_before: datetime.datetime | None = None
    not_after: datetime.datetime | None = None
    renew_at: datetime.datetime | None = None
    ari_window: tuple[datetime.datetime, datetime.datetime] | None = None
    failures: int = 0
    next_attempt: datetime.datetime | None = None
    last_error: str | None = None
    last_error_type: str | None = None
    last_attempt: datetime.datetime | None = None
    last_success: datetime.datetime | None = None
    last_failure: datetime.datetime | None = None
    issuing: bool = False
    unsaved: bool = False
    served_serial: str | None = None
    served_not_after: datetime.datetime | None = None
    export: ExportStatus | None = None
    fallbacks: int = 0

    def to_json(self) -> dict[str, Any]:
        """The ``status.json`` entry. The first keys are those of the first versions, in
        their order; ``export`` is left out when nothing is exported (as it always was)."""
        out: dict[str, Any] = {
            "key": self.key,
            "names": list(self.names),
            "has_certificate": self.has_certificate,
            "placeholder": self.placeholder,
            "not_before": format_time(self.not_before),
            "not_after": format_time(self.not_after),
            "renew_at": format_time(self.renew_at),
            "ari_window": (
                [format_time(self.ari_window[0]), format_time(self.ari_window[1])]
                if self.ari_window is not None
                else None
            ),
            "failures": self.failures,
            "next_attempt": format_time(self.next_attempt),
            "last_error": self.last_error,
            "last_error_type": self.last_error_type,
            "last_attempt": format_time(self.last_attempt),
            "last_success": format_time(self.last_success),
            "issuing": self.issuing,
            "served_serial": self.served_serial,
            "serial": self.serial,
            "issuer": self.issuer,
            "ca_url": self.ca_url,
            "last_failure": format_time(self.last_failure),
            "unsaved": self.unsaved,
            "served_not_after": format_time(self.served_not_after),
            "fallbacks": self.fallbacks,
        }
        if self.export is not None:
            out["export"] = self.export.to_json()
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CertificateStatus:
        """Read an entry written by this or an older version; ValueError if it is malformed."""
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a status object, got {data!r}")
        key = data.get("key")
        if not isinstance(key, str):
            raise ValueError(f"status entry without a key: {data!r}")
        names = data.get("names", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"expected a list of names, got {names!r}")
        window = data.get("ari_window")
        if window is not None:
            if not isinstance(window, list) or len(window) != 2:
                raise ValueError(f"expected [start, end], got {window!r}")
            start, end = parse_time(window[0]), parse_time(window[1])
            window = (start, end) if start is not None and end is not None else None
        export = data.get("export")
        return cls(
            key=key,
            names=tuple(names),
            has_certificate=bool(data.get("has_certificate", False)),
            placeholder=bool(data.get("placeholder", False)),
            serial=_text(data.get("serial")),
            issuer=_text(data.get("issuer")),
            ca_url=_text(data.get("ca_url")),
            not_before=parse_time(data.get("not_before")),
            not_after=parse_time(data.get("not_after")),
            renew_at=parse_time(data.get("renew_at")),
            ari_window=window,
            failures=_count(data.get("failures")),
            next_attempt=parse_time(data.get("next_attempt")),
            last_error=_text(data.get("last_error")),
            last_error_type=_text(data.get("last_error_type")),
            last_attempt=parse_time(data.get("last_attempt")),
            last_success=parse_time(data.get("last_success")),
            last_failure=parse_time(data.get("last_failure")),
            issuing=bool(data.get("issuing", False)),
            unsaved=bool(data.get("unsaved", False)),
            served_serial=_text(data.get("served_serial")),
            served_not_after=parse_time(data.get("served_not_after")),
            export=ExportStatus.from_json(export) if export is not None else None,
            fallbacks=_count(data.get("fallbacks")),
        )


def dump_status_file(statuses: Sequence[CertificateStatus]) -> bytes:
    """The content of ``status.json``: a JSON list, one entry per certificate."""
    return json.dumps([s.to_json() for s in statuses], indent=2).encode("utf-8")


def parse_status_file(data: bytes) -> list[CertificateStatus]:
    """The entries of a ``status.json``; ValueError if it is not one (bad JSON included)."""
    entries = json.loads(data)
    if not isinstance(entries, list):
        raise ValueError(f"expected a JSON list, got {type(entries).__name__}")
    return [CertificateStatus.from_json(entry) for entry in entries]


__all__ = [
    "MAX_STATUS_FILE",
    "CertificateStatus",
    "ExportStatus",
    "dump_status_file",
    "format_time",
    "parse_status_file",
    "parse_time",
    "time_from_seconds",
]
