"""Smoke run of the benchmark harness (bench/run.py) with tiny sizes: it must work end to end.

No timing assertions: the figures of a loaded CI machine mean nothing. The peers (certbot,
lego, nginx) are installed only by scripts/bench.sh, so this runs synapse-acme's own paths
(CLI, in-process service, floor client against a real Pebble; the responder under real wrk;
the TLS and renewal-check benchmarks; a real Synapse with and without the module; a real
PostgreSQL store beside the file store) and checks the report is written with every section.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--profile",
            "smoke",
            "--peers",
            "none",
            "--out-dir",
            str(tmp_path),
            "--json",
            str(tmp_path / "results.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=480,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())

    assert [sc["key"] for sc in res["issuance"]] == ["one-1", "one-n", "seq-2", "conc-2"]
    for sc in res["issuance"]:
        assert sc["errors"] == {}, sc["errors"]
        for client, cell in sc["results"].items():
            assert cell["n"] == 1 and cell["median"] > 0, (sc["key"], client, cell)
    assert set(res["issuance"][0]["results"]) == {
        "synapse-acme CLI, one process per cert",
        "synapse-acme service (in-process)",
        "floor (minimal client)",
        "floor, whole process",
    }

    for server in ("synapse-acme", "synapse-acme resource in a twisted.web Site"):
        ours = res["responder"]["results"][server]
        for conns in ("1", "4"):
            assert ours[conns]["rps"]["median"] > 0
            assert ours[conns]["errors"] == 0 and ours[conns]["socket_errors"] == 0

    assert [row["certs"] for row in res["tls"]["rows"]] == [1, 10]
    assert res["tls"]["swap"]["failures"] == 0 and res["tls"]["swap"]["swaps"] > 0
    sizes = [(r["store"], r["size"]) for r in res["renewal"]["rows"]]
    assert sizes == [("memory", 10), ("memory", 50), ("file", 10), ("file", 50)]
    assert all(r["renewal_info_calls"] == r["size"] for r in res["renewal"]["rows"])

    # The same Synapse with and without the module: both started, answered, were measured, and
    # completed full handshakes (never resumed) on the certificate Pebble issued to the module.
    syn = res["synapse"]
    assert syn["warm_up"]["certificate"]["curve"] == "secp256r1"
    assert "Pebble" in syn["warm_up"]["certificate"]["issuer"]
    for case in ("without", "with"):
        (run,) = syn["runs"][case]
        assert 0 < run["listening_s"] <= run["start_s"] and run["start_cpu_s"] > 0, run
        assert run["rss_mib"] > 20 and run["idle_cpu_s"] >= 0, run
        for groups in ("p256", "default"):
            hs = run["handshakes"][groups]
            assert hs["handshakes"] > 0 and hs["failed"] == 0 and hs["resumed"] == 0, hs
            assert hs["server_cpu_s"] > 0, hs
    assert syn["ratios"]["hs_p256_per_cpu_s_ratio"] > 0
    assert syn["inprocess"]["with_us"] > 0 and syn["inprocess"]["without_us"] > 0
    assert any("TLS handshakes" in g["goal"] and g["value"] for g in res["goals"])

    # The PostgreSQL store beside the file store: every run served every certificate.
    pg = res["pgstore"]
    assert set(pg["stores"]) == {"postgresql", "postgresql-per-key", "file", "file-threaded"}
    for store, cells in pg["stores"].items():
        assert cells["served"] == [pg["size"]] * pg["runs"], store
        assert cells["load_seconds"]["n"] == pg["runs"] and cells["load_seconds"]["median"] > 0
        assert cells["load_cpu_seconds"]["median"] > 0 and cells["reread_seconds"]["median"] > 0
    assert pg["ratios"]["postgresql/file"]["load_seconds"]["median"] > 0

    report = (tmp_path / "docs" / "BENCHMARKS.md").read_text()
    for heading in (
        "## Machine and versions",
        "## Goals",
        "## 1. Issuance against Pebble",
        "## 2. HTTP-01 challenge responder under load",
        "## 3. TLS: HotSwapTLS with many certificates",
        "## 4. Renewal check cost",
        "## 5. The module's cost to Synapse",
        f"## 6. PostgreSQL store: {pg['size']} certificates",
    ):
        assert heading in report
    assert f"{res['machine']['cores']} cores" in report
