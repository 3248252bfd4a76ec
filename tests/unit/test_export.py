"""FileExporter: writes the homeserver's TLS files atomically, never someone else's files."""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from zope.interface.verify import verifyObject

from synapse_acme import crypto
from synapse_acme.export import FileExporter
from synapse_acme.interfaces import ICertificateConsumer
from synapse_acme.model import CertificateBundle

NOW = datetime.datetime(2026, 3, 1, tzinfo=datetime.timezone.utc)
KEY = "matrix.example.org"
NAMES = ["matrix.example.org"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def bundle(n: int) -> CertificateBundle:
    return CertificateBundle(
        key_pem=f"-----BEGIN PRIVATE KEY-----\nkey{n}\n-----END PRIVATE KEY-----\n".encode(),
        chain_pem=f"-----BEGIN CERTIFICATE-----\ncert{n}\n-----END CERTIFICATE-----\n".encode(),
        metadata={"names": NAMES},
    )


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    return {
        "cert": tmp_path / "conf" / "tls.crt",
        "key": tmp_path / "conf" / "tls.key",
        "storage": tmp_path / "storage",
    }


def exporter(paths: dict[str, Path], **kw: Any) -> FileExporter:
    return FileExporter(
        key=KEY,
        cert_path=str(paths["cert"]),
        key_path=str(paths["key"]),
        storage=str(paths["storage"]),
        **kw,
    )


def record(paths: dict[str, Path]) -> dict[str, str]:
    return json.loads((paths["storage"] / "exports.json").read_text())["files"]


def test_provides_interface(paths: dict[str, Path]) -> None:
    assert verifyObject(ICertificateConsumer, exporter(paths))


def test_writes_files_with_modes_and_records_them(paths: dict[str, Path]) -> None:
    old_umask = os.umask(0o022)
    try:
        exporter(paths).certificate_changed(KEY, bundle(1))
    finally:
        os.umask(old_umask)
    assert paths["cert"].read_bytes() == bundle(1).chain_pem
    assert paths["key"].read_bytes() == bundle(1).key_pem
    assert _mode(paths["key"]) == 0o600
    assert _mode(paths["cert"]) == 0o644
    assert _mode(paths["storage"] / "exports.json") == 0o600
    assert set(record(paths)) == {str(paths["cert"]), str(paths["key"])}
    assert sorted(os.listdir(paths["cert"].parent)) == ["tls.crt", "tls.key"]  # no temp files


def test_replaces_its_own_files(paths: dict[str, Path]) -> None:
    calls: list[tuple[str, CertificateBundle]] = []
    e = exporter(paths, on_export=lambda k, b: calls.append((k, b)))
    e.certificate_changed(KEY, bundle(1))
    e.certificate_changed(KEY, bundle(2))
    assert paths["cert"].read_bytes() == bundle(2).chain_pem
    assert paths["key"].read_bytes() == bundle(2).key_pem
    assert [b for _, b in calls] == [bundle(1), bundle(2)]
    # a fresh exporter (after a restart) still recognises the files as ours
    exporter(paths).certificate_changed(KEY, bundle(3))
    assert paths["key"].read_bytes() == bundle(3).key_pem


def test_same_bundle_again_writes_nothing(paths: dict[str, Path]) -> None:
    e = exporter(paths)
    assert e.export(bundle(1)) is True
    before = os.stat(paths["cert"]).st_ino
    assert e.export(bundle(1)) is False
    assert os.stat(paths["cert"]).st_ino == before


def test_ignores_other_keys(paths: dict[str, Path]) -> None:
    exporter(paths).certificate_changed("other.example", bundle(1))
    assert not paths["cert"].exists() and not paths["key"].exists()


def test_never_overwrites_foreign_files_and_warns_once(
    paths: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    paths["cert"].parent.mkdir(parents=True)
    paths["cert"].write_bytes(b"certbot's certificate")
    paths["key"].write_bytes(b"certbot's key")
    e = exporter(paths)
    with caplog.at_level(logging.WARNING, logger="synapse_acme.export"):
        e.certificate_changed(KEY, bundle(1))
        e.certificate_changed(KEY, bundle(2))
    assert paths["cert"].read_bytes() == b"certbot's certificate"
    assert paths["key"].read_bytes() == b"certbot's key"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # once per path, not once per change
    assert any(
        m.startswith(f"not overwriting {paths['cert']}: it was not written by synapse-acme")
        and "tls_certificate_path" in m
        for m in warnings
    )
    assert any(str(paths["key"]) in m and "tls_private_key_path" in m for m in warnings)


def test_one_foreign_file_blocks_both(paths: dict[str, Path]) -> None:
    """Writing only one of the pair would leave a key that does not match its certificate."""
    paths["key"].parent.mkdir(parents=True)
    paths["key"].write_bytes(b"someone else's key")
    exporter(paths).certificate_changed(KEY, bundle(1))
    assert not paths["cert"].exists()
    assert paths["key"].read_bytes() == b"someone else's key"


def test_file_changed_by_operator_is_no_longer_ours(paths: dict[str, Path]) -> None:
    e = exporter(paths)
    e.certificate_changed(KEY, bundle(1))
    paths["cert"].write_bytes(b"operator's own certificate")
    e.certificate_changed(KEY, bundle(2))
    assert paths["cert"].read_bytes() == b"operator's own certificate"
    assert paths["key"].read_bytes() == bundle(1).key_pem
    # once the operator deletes it, we manage it again
    paths["cert"].unlink()
    e.certificate_changed(KEY, bundle(3))
    assert paths["cert"].read_bytes() == bundle(3).chain_pem


def test_symlinked_target_is_not_ours(paths: dict[str, Path], tmp_path: Path) -> None:
    live = tmp_path / "live.pem"
    live.write_bytes(b"managed elsewhere")
    paths["cert"].parent.mkdir(parents=True)
    os.symlink(live, paths["cert"])
    exporter(paths).certificate_changed(KEY, bundle(1))
    assert os.path.islink(paths["cert"]) and live.read_bytes() == b"managed elsewhere"


def test_crash_before_recording_does_not_lock_us_out(paths: dict[str, Path]) -> None:
    """Files written, record not: files identical to what we would write are ours."""
    paths["cert"].parent.mkdir(parents=True)
    paths["cert"].write_bytes(bundle(1).chain_pem)
    paths["key"].write_bytes(bundle(1).key_pem)
    e = exporter(paths)
    assert e.export(bundle(1)) is False  # nothing to write, but now recorded
    assert set(record(paths)) == {str(paths["cert"]), str(paths["key"])}
    e.certificate_changed(KEY, bundle(2))
    assert paths["key"].read_bytes() == bundle(2).key_pem


def test_corrupt_record_means_not_ours(
    paths: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    e = exporter(paths)
    e.certificate_changed(KEY, bundle(1))
    (paths["storage"] / "exports.json").write_text("{oops")
    with caplog.at_level(logging.WARNING):
        e.certificate_changed(KEY, bundle(2))
    assert paths["key"].read_bytes() == bundle(1).key_pem
    assert "ignoring corrupt export record" in caplog.text


def test_combined_file_when_paths_are_equal(paths: dict[str, Path]) -> None:
    e = FileExporter(
        key=KEY,
        cert_path=str(paths["cert"]),
        key_path=str(paths["cert"]),
        storage=str(paths["storage"]),
    )
    e.certificate_changed(KEY, bundle(1))
    assert paths["cert"].read_bytes() == bundle(1).key_pem + bundle(1).chain_pem
    assert _mode(paths["cert"]) == 0o600


def test_write_failure_is_logged_not_raised_and_old_files_kept(
    paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    e = exporter(paths)
    e.certificate_changed(KEY, bundle(1))

    def no_space(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", no_space)
    with caplog.at_level(logging.ERROR):
        e.certificate_changed(KEY, bundle(2))  # must not raise
    monkeypatch.undo()
    assert "ENOSPC" in caplog.text
    assert b"key" not in caplog.text.encode().replace(b"tls.key", b"")
    assert paths["cert"].read_bytes() == bundle(1).chain_pem
    assert paths["key"].read_bytes() == bundle(1).key_pem
    assert sorted(os.listdir(paths["cert"].parent)) == ["tls.crt", "tls.key"]
    # and it still works afterwards
    e.certificate_changed(KEY, bundle(2))
    assert paths["key"].read_bytes() == bundle(2).key_pem


def test_on_export_failure_is_contained(
    paths: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    def boom(key: str, b: CertificateBundle) -> None:
        raise RuntimeError("refresh failed")

    with caplog.at_level(logging.ERROR):
        exporter(paths, on_export=boom).certificate_changed(KEY, bundle(1))
    assert "refresh failed" in caplog.text
    assert paths["key"].read_bytes() == bundle(1).key_pem


def test_placeholder_written_when_missing_then_replaced(paths: dict[str, Path]) -> None:
    e = exporter(paths)
    assert e.write_placeholder_if_missing(NAMES, NOW) is True
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    assert crypto.is_placeholder(cert)
    assert crypto.certificate_names(cert) == NAMES
    assert crypto.load_private_key(paths["key"].read_bytes()) is not None
    assert _mode(paths["key"]) == 0o600
    # both exist now: nothing to do
    assert e.write_placeholder_if_missing(NAMES, NOW) is False
    # the placeholder counts as ours: a real certificate replaces it (a new exporter: restart)
    exporter(paths).certificate_changed(KEY, bundle(1))
    assert paths["cert"].read_bytes() == bundle(1).chain_pem


def test_placeholder_lifetime(paths: dict[str, Path]) -> None:
    exporter(paths).write_placeholder_if_missing(NAMES, NOW, datetime.timedelta(days=2))
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    assert crypto.not_after(cert) == NOW + datetime.timedelta(days=2)


def test_placeholder_never_replaces_foreign_files(paths: dict[str, Path]) -> None:
    paths["cert"].parent.mkdir(parents=True)
    paths["cert"].write_bytes(b"foreign cert")  # key missing
    assert exporter(paths).write_placeholder_if_missing(NAMES, NOW) is False
    assert paths["cert"].read_bytes() == b"foreign cert"
    assert not paths["key"].exists()


def test_placeholder_fills_in_our_missing_half(paths: dict[str, Path]) -> None:
    e = exporter(paths)
    e.certificate_changed(KEY, bundle(1))
    paths["key"].unlink()
    assert e.write_placeholder_if_missing(NAMES, NOW) is True
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    assert crypto.is_placeholder(cert)
