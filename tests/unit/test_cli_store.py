"""The command line over a damaged store: `status` reports each certificate on its own and
never crashes; `new-account` is explicit, refuses while a manager holds the store.

The same commands run as real subprocesses against Pebble in tests/faults/test_pebble_faults.py.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
import yaml

from synapse_acme import cli
from synapse_acme.interprocess import StoreLock
from synapse_acme.names import names_key
from synapse_acme.store import FileStore
from tests.certs import TestCA
from tests.deferreds import result_of

NOW = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=datetime.timezone.utc)
GOOD, BAD = ["good.example.test"], ["bad.example.test"]


def _config(tmp_path: Path, **extra: object) -> Path:
    block = {
        "enabled": True,
        "domain": GOOD[0],
        "certificates": [{"domains": BAD}],
        "storage": str(tmp_path / "store"),
        "terms_of_service_agreed": True,
        **extra,
    }
    path = tmp_path / "acme.yaml"
    path.write_text(yaml.safe_dump({"acme": block}))
    return path


def _two_certificates(tmp_path: Path) -> Path:
    ca = TestCA(now=NOW)
    store = FileStore(str(tmp_path / "store"))
    for names in (GOOD, BAD):
        result_of(store.save(names_key(names), ca.issue(names)))
    return tmp_path / "store" / "certificates"


def test_status_reports_a_damaged_chain_beside_a_good_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs = _two_certificates(tmp_path)
    chain = certs / names_key(BAD) / "fullchain.pem"
    chain.write_bytes(chain.read_bytes()[:-100])
    cfg = _config(tmp_path)
    assert cli.main(["status", "-c", str(cfg), "--json"]) == cli.EXIT_FAILED
    good, bad = json.loads(capsys.readouterr().out)
    assert good["state"] in ("valid", "expired") and "error" not in good
    assert bad["state"] == "unreadable" and bad["error"].startswith(f"{chain} is damaged")
    assert cli.main(["status", "-c", str(cfg)]) == cli.EXIT_FAILED
    out = capsys.readouterr().out
    assert f"  error:        {chain} is damaged: certificate 2 of the chain" in out
    assert out.count("state:") == 2


def test_status_survives_a_fifo_status_file_and_a_fifo_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.hang import deadline

    certs = _two_certificates(tmp_path)
    os.mkfifo(tmp_path / "store" / "status.json")
    key = certs / names_key(BAD) / "privkey.pem"
    key.unlink()
    os.mkfifo(key)
    with deadline(10):
        assert cli.main(["status", "-c", str(_config(tmp_path)), "--json"]) == cli.EXIT_FAILED
    _, bad = json.loads(capsys.readouterr().out)
    assert bad == {
        "key": names_key(BAD),
        "names": BAD,
        "state": "unreadable",
        "error": f"refusing to use {key}: it is a FIFO (named pipe), not a regular file",
    }


def test_status_of_damaged_external_files_is_unreadable(tmp_path: Path) -> None:
    ca = TestCA(now=NOW)
    bundle, other = ca.issue(GOOD), ca.issue(GOOD)
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(bundle.chain_pem)
    key_path.write_bytes(other.key_pem)  # not the certificate's key
    cfg = cli.read_config_file(
        str(
            _config(
                tmp_path,
                certificates=[],
                external_certificates=True,
                tls_certificate_path=str(cert_path),
                tls_private_key_path=str(key_path),
            )
        )
    )
    [entry] = cli.status_report(cfg, NOW)
    assert entry["state"] == "unreadable"
    assert entry["error"] == (
        f"{cert_path} / {key_path}: private key does not match the certificate"
    )


def test_new_account_refuses_while_the_store_is_managed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path)
    (tmp_path / "store").mkdir()
    lock = StoreLock.acquire(str(tmp_path / "store"))
    try:
        assert cli.main(["new-account", "-c", str(cfg)]) == cli.EXIT_FAILED
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert f"is in use by pid {os.getpid()}" in err and "stop it first" in err
    assert not (tmp_path / "store" / "account.key").exists()


def test_new_account_makes_a_key_and_is_refused_for_a_healthy_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path)
    assert cli.main(["new-account", "-c", str(cfg)]) == cli.EXIT_OK
    key_file = tmp_path / "store" / "account.key"
    assert f"NEW ACCOUNT  created a new ACME account key at {key_file}" in capsys.readouterr().out
    first = key_file.read_bytes()
    assert cli.main(["new-account", "-c", str(cfg)]) == cli.EXIT_FAILED
    assert "nothing to repair" in capsys.readouterr().err
    assert key_file.read_bytes() == first
    assert cli.main(["new-account", "-c", str(cfg), "--force"]) == cli.EXIT_OK
    assert "previous key kept:" in capsys.readouterr().out
    assert key_file.read_bytes() != first
    [kept] = [p for p in key_file.parent.iterdir() if ".replaced-" in p.name]
    assert kept.read_bytes() == first


def test_new_account_is_a_configuration_error_for_external_certificates(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("")
    cfg = _config(
        tmp_path,
        certificates=[],
        external_certificates=True,
        tls_certificate_path=str(tmp_path / "c.pem"),
        tls_private_key_path=str(tmp_path / "k.pem"),
    )
    assert cli.main(["new-account", "-c", str(cfg)]) == cli.EXIT_CONFIG
    assert not (tmp_path / "store").exists()


def test_new_account_on_a_database_store_says_how_to_start_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "store.key"
    key_file.write_text("A" * 43 + "=\n")
    key_file.chmod(0o600)
    database = {
        "url": "postgresql://acme:s3cret@db.example.test/synapse",
        "key_files": [str(key_file)],
    }
    cfg = _config(tmp_path, database=database)
    assert cli.main(["new-account", "-c", str(cfg)]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "acme.database: is set: the ACME account key is kept in the database" in err
    assert "synapse_acme_account_key" in err and "s3cret" not in err
    assert not (tmp_path / "store").exists()  # nothing was made
