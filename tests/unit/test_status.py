"""The status value and its one JSON form (status.json): round trip, and old files still read."""

from __future__ import annotations

import datetime
import json

import pytest

from synapse_acme.status import (
    CertificateStatus,
    ExportStatus,
    dump_status_file,
    format_time,
    parse_status_file,
    parse_time,
)

UTC = datetime.timezone.utc
T0 = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
HOUR = datetime.timedelta(hours=1)

#: An entry as the versions before CertificateStatus wrote it (keys and formats), with export.
OLD_ENTRY = {
    "key": "a.example.test",
    "names": ["a.example.test", "www.a.example.test"],
    "has_certificate": True,
    "placeholder": False,
    "not_before": "2026-11-01T12:00:00Z",
    "not_after": "2027-01-30T12:00:00Z",
    "renew_at": "2026-12-31T12:00:00Z",
    "ari_window": ["2026-12-30T00:00:00Z", "2027-01-01T00:00:00Z"],
    "failures": 2,
    "next_attempt": "2026-11-01T13:00:00Z",
    "last_error": "urn:ietf:params:acme:error:rateLimited: too many",
    "last_error_type": "rateLimited",
    "last_attempt": "2026-11-01T12:00:00Z",
    "last_success": None,
    "issuing": False,
    "served_serial": "1a2b",
    "export": {
        "state": "failed",
        "serial": None,
        "error": "disk full",
        "failures": 3,
        "cert_path": "/etc/tls.crt",
        "key_path": "/etc/tls.key",
    },
}


def test_format_and_parse_time() -> None:
    assert format_time(T0) == "2026-11-01T12:00:00Z"
    assert format_time(None) is None
    assert parse_time("2026-11-01T12:00:00Z") == T0
    assert parse_time("2026-11-01T12:00:00+00:00") == T0
    assert parse_time(None) is None
    for bad in ("2026-11-01T12:00:00", "yesterday", 5):
        with pytest.raises(ValueError):
            parse_time(bad)


def test_an_old_status_file_reads_and_keeps_every_key_and_value() -> None:
    [status] = parse_status_file(json.dumps([OLD_ENTRY]).encode())
    assert status.names == ("a.example.test", "www.a.example.test")
    assert status.not_after == datetime.datetime(2027, 1, 30, 12, tzinfo=UTC)
    assert status.ari_window is not None and status.ari_window[0].day == 30
    assert status.failures == 2 and status.last_error_type == "rateLimited"
    assert status.next_attempt == T0 + HOUR and status.last_success is None
    assert status.export == ExportStatus(
        state="failed", cert_path="/etc/tls.crt", key_path="/etc/tls.key", error="disk full",
        failures=3,
    )  # fmt: skip
    # Not in old files: the defaults.
    assert status.serial is None and status.last_failure is None and not status.unsaved
    # Written again, the old keys come back as they were (new keys are only added).
    again = status.to_json()
    assert {k: again[k] for k in OLD_ENTRY} == OLD_ENTRY


def test_the_oldest_entries_without_served_or_export_read_with_defaults() -> None:
    entry = {k: v for k, v in OLD_ENTRY.items() if k not in ("served_serial", "export")}
    [status] = parse_status_file(json.dumps([entry]).encode())
    assert status.served_serial is None and status.export is None
    assert "export" not in status.to_json()  # nothing exported: no key, as before


def test_round_trip_with_every_field() -> None:
    status = CertificateStatus(
        key="k",
        names=("k.example.test",),
        has_certificate=True,
        placeholder=False,
        serial="ff",
        issuer="CN=Pebble Intermediate CA",
        ca_url="https://ca.test/dir",
        not_before=T0,
        not_after=T0 + 90 * 24 * HOUR,
        renew_at=T0 + 60 * 24 * HOUR,
        ari_window=(T0 + HOUR, T0 + 2 * HOUR),
        failures=1,
        next_attempt=T0 + HOUR,
        last_error="boom",
        last_error_type="serverInternal",
        last_attempt=T0,
        last_success=T0 - HOUR,
        last_failure=T0,
        issuing=True,
        unsaved=True,
        served_serial="ee",
        served_not_after=T0 + 80 * 24 * HOUR,
        export=ExportStatus(state="ok", cert_path="/c", key_path="/k", serial="ff"),
    )
    assert parse_status_file(dump_status_file([status])) == [status]


@pytest.mark.parametrize(
    "data",
    [
        b"{not json",
        b'{"key": "k"}',
        b'[{"names": []}]',
        b'[{"key": "k", "names": "a.example.test"}]',
        b'[{"key": "k", "not_after": "soon"}]',
        b'[{"key": "k", "failures": "2"}]',
        b'[{"key": "k", "ari_window": ["2026-11-01T12:00:00Z"]}]',
        b'[{"key": "k", "export": ["ok"]}]',
        b"\xff\xfe",
    ],
)
def test_a_malformed_file_is_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_status_file(data)
