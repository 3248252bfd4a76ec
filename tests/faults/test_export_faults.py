"""Fault matrix, export side: the homeserver's TLS files on a REAL full tmpfs, and hostile files
at the export paths, under the real CLI and a real Pebble.

An export that fails is a failure: the one-shot command exits non-zero and says so, ``status``
shows the export's state and compares what is stored, exported and served, a running ``run``
retries until the files hold the new certificate, and the homeserver's files keep their old,
matching pair throughout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from synapse_acme import crypto
from synapse_acme.testing.pebble import PebbleCA
from tests.faults.test_disk_faults import fill, tmpfs  # noqa: F401  (fixture)
from tests.integration.test_service_pebble import CLI, cli, stored

NAMES = ["export.example.test"]


def _serial(chain_pem: bytes) -> str:
    return f"{crypto.parse_chain(chain_pem)[0].serial_number:x}"


def _exported(export: Path) -> tuple[bytes, bytes]:
    chain, key = (export / "tls.crt").read_bytes(), (export / "tls.key").read_bytes()
    assert crypto.key_matches_leaf(key, chain)  # always a pair
    return chain, key


def _config(ca: PebbleCA, tmp_path: Path, export: Path, **extra: Any) -> Path:
    return ca.write_acme_config(
        tmp_path,
        NAMES,
        tls_certificate_path=str(export / "tls.crt"),
        tls_private_key_path=str(export / "tls.key"),
        **extra,
    )


def _status(cfg: Path) -> dict[str, Any]:
    r = cli("status", "-c", str(cfg), "--json")
    assert "Traceback" not in r.stdout + r.stderr
    (entry,) = json.loads(r.stdout)
    return dict(entry)


def test_export_disk_full_fails_loudly_and_run_retries_until_written(
    pebble_factory: Callable[..., PebbleCA],
    tmp_path: Path,
    tmpfs: Path,  # noqa: F811
) -> None:
    ca = pebble_factory()
    export = tmpfs / "tls"
    cfg = _config(ca, tmp_path, export)
    r = cli("issue", "-c", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    first_chain, first_key = _exported(export)

    filler = fill(tmpfs, 0)
    r = cli("renew", "-c", str(cfg), "--force")
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "Traceback" not in out
    assert "No space left on device (ENOSPC)" in out and str(export / "tls.crt") in out, out
    # The homeserver's files still hold the old pair, whole.
    assert _exported(export) == (first_chain, first_key)
    _, new = stored(tmp_path, NAMES)
    assert new.chain_pem != first_chain  # the renewal itself was saved in the store
    entry = _status(cfg)
    assert entry["export"]["state"] == "failed", entry
    assert "ENOSPC" in entry["export"]["error"]
    assert entry["serial"] == _serial(new.chain_pem)
    assert entry["exported_serial"] == _serial(first_chain) != entry["serial"]

    # `run` repairs at start; the disk is still full, so it fails and retries (10 s first).
    proc = subprocess.Popen(
        [*CLI, "run", "-c", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _status(cfg).get("export", {}).get("failures", 0) < 1:
            time.sleep(0.2)
        assert _status(cfg)["export"]["state"] == "failed"
        assert _exported(export) == (first_chain, first_key)
        filler.unlink()  # space returns: the next retry writes the stored certificate
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and _exported(export)[0] != new.chain_pem:
            time.sleep(0.1)
        assert _exported(export) == (new.chain_pem, new.key_pem)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _status(cfg)["export"]["state"] != "ok":
            time.sleep(0.1)
        entry = _status(cfg)
        assert entry["export"]["state"] == "ok", entry
        assert entry["serial"] == entry["exported_serial"] == _serial(new.chain_pem)
    finally:
        proc.send_signal(signal.SIGTERM)
        log = proc.communicate(timeout=30)[0]
    assert "retrying in" in log and "Traceback" not in log, log
    ca.verify_chain(new.chain_pem, NAMES)


def test_fifo_at_the_export_key_path_is_refused_not_hung_on(
    pebble_factory: Callable[..., PebbleCA], tmp_path: Path
) -> None:
    ca = pebble_factory()
    export = tmp_path / "tls"
    export.mkdir()
    os.mkfifo(export / "tls.key")
    cfg = _config(ca, tmp_path, export)
    r = cli("issue", "-c", str(cfg), timeout=60)  # a blocking open() would hang forever
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "FIFO" in out and str(export / "tls.key") in out, out
    assert "Traceback" not in out
    assert not (export / "tls.crt").exists()
    assert _status(cfg)["export"]["state"] == "foreign"


def test_loosened_key_and_leftovers_are_fixed_at_start(
    pebble_factory: Callable[..., PebbleCA], tmp_path: Path
) -> None:
    ca = pebble_factory()
    export = tmp_path / "tls"
    cfg = _config(ca, tmp_path, export)
    assert cli("issue", "-c", str(cfg)).returncode == 0
    key_file = export / "tls.key"
    os.chmod(os.path.realpath(key_file), 0o666)
    stale = export / ".tls.key.0123456789ab.tmp"
    stale.write_bytes(b"half a key")
    r = cli("issue", "-c", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert os.stat(key_file).st_mode & 0o777 == 0o600
    assert not stale.exists()
    assert "tightened it to 0600" in r.stderr
    _exported(export)
