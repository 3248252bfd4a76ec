"""FileExporter: writes the homeserver's TLS files atomically, never someone else's files."""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from synapse_acme import crypto
from synapse_acme.export import ExportOutcome, ExportState, FileExporter
from synapse_acme.interfaces import ICertificateConsumer
from synapse_acme.model import CertificateBundle
from tests.certs import TestCA

NOW = datetime.datetime(2026, 3, 1, tzinfo=datetime.timezone.utc)
KEY = "matrix.example.org"
NAMES = ["matrix.example.org"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


_CA = TestCA(NOW)
_BUNDLES: dict[int, CertificateBundle] = {}


def bundle(n: int) -> CertificateBundle:
    """Real pairs (a key and its chain), one per ``n``: the exporter checks pairs."""
    if n not in _BUNDLES:
        _BUNDLES[n] = _CA.issue(NAMES, serial=1000 + n)
    return _BUNDLES[n]


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
    # the paths are links into one live directory holding one version (no temp files)
    assert sorted(os.listdir(paths["cert"].parent)) == [
        ".synapse-acme-tls.crt",
        "tls.crt",
        "tls.key",
    ]
    assert os.readlink(paths["cert"]) == ".synapse-acme-tls.crt/current/fullchain.pem"
    assert os.readlink(paths["key"]) == ".synapse-acme-tls.crt/current/privkey.pem"
    live = paths["cert"].parent / ".synapse-acme-tls.crt"
    assert sorted(os.listdir(live)) == ["current", "v1"]
    assert _mode(live) == 0o755 and _mode(live / "v1") == 0o755


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
    """A plain file (the combined layout) is ours only through the record."""
    e = FileExporter(
        key=KEY, cert_path=str(paths["cert"]), key_path=str(paths["cert"]),
        storage=str(paths["storage"]),
    )  # fmt: skip
    e.certificate_changed(KEY, bundle(1))
    (paths["storage"] / "exports.json").write_text("{oops")
    with caplog.at_level(logging.WARNING):
        e.certificate_changed(KEY, bundle(2))
    assert paths["cert"].read_bytes().startswith(bundle(1).key_pem)
    assert "ignoring corrupt export record" in caplog.text
    assert e.state.outcome is ExportOutcome.FOREIGN


def test_our_links_stay_ours_without_the_record(paths: dict[str, Path]) -> None:
    """A link pointing exactly into our live directory is ours whatever the record says."""
    e = exporter(paths)
    e.certificate_changed(KEY, bundle(1))
    (paths["storage"] / "exports.json").write_text("{oops")
    e.certificate_changed(KEY, bundle(2))
    assert paths["key"].read_bytes() == bundle(2).key_pem
    assert e.state.outcome is ExportOutcome.OK


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
    live = paths["cert"].parent / ".synapse-acme-tls.crt"
    assert sorted(os.listdir(live)) == ["current", "v1"]  # the staging directory is gone
    assert e.state.outcome is ExportOutcome.FAILED and "ENOSPC" in (e.state.error or "")
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


# -- one pair at every instant ------------------------------------------------------------------


def _pair_ok_or_absent(paths: dict[str, Path]) -> bool:
    """What a reader opening the two paths sees: a matching pair, or not both files."""
    try:
        chain, key = paths["cert"].read_bytes(), paths["key"].read_bytes()
    except FileNotFoundError:
        return True
    return crypto.key_matches_leaf(key, chain)


def _check_after_every_change(
    monkeypatch: pytest.MonkeyPatch, paths: dict[str, Path], seen: list[str]
) -> None:
    """After every call that changes a directory entry, the pair on disk must match."""
    for name in ("rename", "replace", "symlink", "unlink", "mkdir", "rmdir", "link"):
        real = getattr(os, name)

        def wrapped(*args: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
            result = _real(*args, **kw)
            seen.append(f"{_name} {os.path.basename(str(args[-1]))}")
            assert _pair_ok_or_absent(paths), f"pair mismatched after {seen[-1]}: {seen}"
            return result

        monkeypatch.setattr(os, name, wrapped)


def test_renewal_changes_the_pair_in_one_step(
    paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    e = exporter(paths)
    e.export(bundle(1))
    seen: list[str] = []
    _check_after_every_change(monkeypatch, paths, seen)
    e.export(bundle(2))
    e.export(bundle(3))
    monkeypatch.undo()
    assert paths["key"].read_bytes() == bundle(3).key_pem
    assert sum(s.startswith("rename current") for s in seen) == 2  # one flip per renewal
    assert not any(s.endswith(("tls.crt", "tls.key")) for s in seen)  # the paths never change


def test_first_export_never_shows_a_mismatched_pair(
    paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    _check_after_every_change(monkeypatch, paths, seen)
    exporter(paths).export(bundle(1))
    monkeypatch.undo()
    assert paths["cert"].read_bytes() == bundle(1).chain_pem


@pytest.mark.parametrize("missing", [None, "cert", "key"])
def test_old_layout_files_become_links_without_a_mismatch(
    paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch, missing: str | None
) -> None:
    """Files written by an earlier version (plain files + record) migrate without a moment in
    which the two paths hold different pairs."""
    paths["cert"].parent.mkdir(parents=True)
    paths["cert"].write_bytes(bundle(1).chain_pem)
    paths["key"].write_bytes(bundle(1).key_pem)
    exporter(paths)._save_record(
        {str(paths["cert"]): hashlib.sha256(bundle(1).chain_pem).hexdigest(),
         str(paths["key"]): hashlib.sha256(bundle(1).key_pem).hexdigest()}
    )  # fmt: skip
    if missing is not None:
        paths[missing].unlink()
    seen: list[str] = []
    _check_after_every_change(monkeypatch, paths, seen)
    assert exporter(paths).export(bundle(2)) is True
    monkeypatch.undo()
    assert os.path.islink(paths["cert"]) and os.path.islink(paths["key"])
    assert paths["key"].read_bytes() == bundle(2).key_pem
    assert paths["cert"].read_bytes() == bundle(2).chain_pem


def test_old_versions_are_pruned(paths: dict[str, Path]) -> None:
    e = exporter(paths)
    for n in range(1, 6):
        e.export(bundle(n))
    live = paths["cert"].parent / ".synapse-acme-tls.crt"
    assert sorted(os.listdir(live)) == ["current", "v4", "v5"]
    assert os.readlink(live / "current") == "v5"


def test_key_in_another_directory_gets_an_absolute_link(tmp_path: Path) -> None:
    paths = {
        "cert": tmp_path / "certs" / "tls.crt",
        "key": tmp_path / "private" / "tls.key",
        "storage": tmp_path / "storage",
    }
    e = exporter(paths)
    e.export(bundle(1))
    assert os.readlink(paths["key"]) == str(
        tmp_path / "certs" / ".synapse-acme-tls.crt" / "current" / "privkey.pem"
    )
    e.export(bundle(2))
    assert paths["key"].read_bytes() == bundle(2).key_pem
    assert paths["cert"].read_bytes() == bundle(2).chain_pem


# -- repair at start ---------------------------------------------------------------------------


def test_repair_restores_a_deleted_live_directory(paths: dict[str, Path]) -> None:
    e = exporter(paths)
    e.export(bundle(1))
    shutil.rmtree(paths["cert"].parent / ".synapse-acme-tls.crt")
    assert not paths["cert"].exists()  # dangling links
    assert exporter(paths).repair(bundle(1)) is True
    assert paths["key"].read_bytes() == bundle(1).key_pem


def test_repair_brings_a_stale_export_up_to_the_store(paths: dict[str, Path]) -> None:
    """Killed after the store saved a renewal but before the export: the start repairs it."""
    exporter(paths).export(bundle(1))
    assert exporter(paths).repair(bundle(2)) is True
    assert paths["key"].read_bytes() == bundle(2).key_pem
    assert paths["cert"].read_bytes() == bundle(2).chain_pem


def test_content_changed_through_our_link_is_no_longer_ours(paths: dict[str, Path]) -> None:
    """Written through the link (``cp other.pem tls.crt``): the operator's now, as a file."""
    exporter(paths).export(bundle(1))
    paths["cert"].write_bytes(bundle(2).chain_pem)
    paths["key"].write_bytes(bundle(2).key_pem)
    e = exporter(paths)
    assert e.repair(bundle(3)) is False
    assert e.state.outcome is ExportOutcome.FOREIGN
    assert "changed after synapse-acme wrote it" in (e.state.error or "")
    assert paths["key"].read_bytes() == bundle(2).key_pem


def test_repair_tightens_loosened_keys_and_removes_leftovers(
    paths: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    e = exporter(paths)
    e.export(bundle(1))
    e.export(bundle(2))
    live = paths["cert"].parent / ".synapse-acme-tls.crt"
    os.chmod(live / "v2" / "privkey.pem", 0o666)
    os.chmod(live / "v1" / "privkey.pem", 0o644)
    leftovers = [
        paths["cert"].parent / ".tls.crt.0123456789ab.tmp",
        paths["cert"].parent / ".tls.key.0123456789ab.tmp",
        live / ".current.0123456789ab.tmp",
    ]
    for p in leftovers:
        p.write_bytes(b"half")
    (live / ".v3.0123456789ab.tmp").mkdir()
    (live / "v9").mkdir()  # written, never made current (killed before the flip)
    unrelated = paths["cert"].parent / ".other.0123456789ab.tmp"  # not ours: left alone
    unrelated.write_bytes(b"x")
    with caplog.at_level(logging.WARNING):
        assert exporter(paths).repair(bundle(2)) is False  # the pair was right already
    assert _mode(live / "v2" / "privkey.pem") == 0o600
    assert _mode(live / "v1" / "privkey.pem") == 0o600
    assert "had mode 0666; tightened it to 0600" in caplog.text
    assert not any(p.exists() for p in leftovers)
    assert sorted(os.listdir(live)) == ["current", "v1", "v2"]
    assert unrelated.exists()


def test_repair_tightens_an_old_layout_key_file(paths: dict[str, Path]) -> None:
    e = FileExporter(
        key=KEY, cert_path=str(paths["cert"]), key_path=str(paths["cert"]),
        storage=str(paths["storage"]),
    )  # fmt: skip
    e.export(bundle(1))
    os.chmod(paths["cert"], 0o666)
    e.repair(bundle(1))
    assert _mode(paths["cert"]) == 0o600


# -- files as an attacker might leave them -------------------------------------------------------


@pytest.mark.parametrize("what", ["fifo", "dir", "foreign-link"])
def test_odd_file_at_a_path_is_refused_without_blocking(
    paths: dict[str, Path], tmp_path: Path, what: str
) -> None:
    paths["key"].parent.mkdir(parents=True)
    if what == "fifo":
        os.mkfifo(paths["key"])
    elif what == "dir":
        paths["key"].mkdir()
    else:
        (tmp_path / "elsewhere").write_bytes(b"x")
        os.symlink(tmp_path / "elsewhere", paths["key"])
    e = exporter(paths)
    e.certificate_changed(KEY, bundle(1))  # a blocking open() of the FIFO would hang here
    assert e.state.outcome is ExportOutcome.FOREIGN
    assert str(paths["key"]) in (e.state.error or "")
    assert not paths["cert"].exists()
    expected = {"fifo": "FIFO", "dir": "a directory", "foreign-link": "symbolic link"}[what]
    assert expected in (e.state.error or "")


# -- an export failure is a failure, retried with backoff ------------------------------------------


def test_failed_export_is_retried_with_backoff_until_it_works(
    paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    states: list[ExportState] = []
    e = exporter(paths, clock=clock, on_state=states.append)
    e.startService()
    e.certificate_changed(KEY, bundle(1))
    real_write = os.write

    def no_space(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", no_space)
    e.certificate_changed(KEY, bundle(2))
    assert e.state.outcome is ExportOutcome.FAILED and e.state.failures == 1
    assert e.state.next_retry is not None and 9 <= e.state.next_retry <= 11  # seconds first
    clock.advance(e.state.next_retry)  # still full: second failure, longer wait
    assert e.state.failures == 2 and e.state.next_retry > clock.seconds() + 25
    assert paths["key"].read_bytes() == bundle(1).key_pem  # the old pair is kept whole
    monkeypatch.setattr(os, "write", real_write)
    clock.advance(e.state.next_retry - clock.seconds())
    assert e.state.outcome is ExportOutcome.OK and e.state.failures == 0
    assert e.state.serial == f"{1000 + 2:x}"
    assert paths["key"].read_bytes() == bundle(2).key_pem
    assert [s.outcome for s in states] == [ExportOutcome.OK, *[ExportOutcome.FAILED] * 2,
                                           ExportOutcome.OK]  # fmt: skip
    e.stopService()
    assert not clock.getDelayedCalls()


def test_without_a_clock_a_failure_is_not_retried(
    paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_space(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", no_space)
    e = exporter(paths)
    with caplog.at_level(logging.ERROR):
        e.certificate_changed(KEY, bundle(1))
    assert e.state.failed and e.state.next_retry is None
    assert "not retried by this process" in caplog.text
