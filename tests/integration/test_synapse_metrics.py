"""The module's metrics on a real Synapse's own ``metrics`` listener (prometheus_client's global
registry), scraped by a real Prometheus: the values read back through Prometheus's HTTP API are
those of the certificate files Synapse reads and of the certificate its TLS listener serves."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from synapse_acme import crypto
from synapse_acme.testing.pebble import PebbleCA
from tests.integration.prometheus import Prometheus, promtool, scrape
from tests.integration.test_synapse import (
    ISSUE_TIMEOUT,
    SERVER_NAME,
    Synapse,
    disk_leaf,
    fetch_chain,
    module_config,
    pebble_ca,  # noqa: F401 (a fixture)
    verified_leaf,
)


@pytest.fixture
def synapse_with_metrics(tmp_path: pathlib.Path, pebble_ca: PebbleCA) -> Iterator[Synapse]:  # noqa: F811
    hs = Synapse(tmp_path / "hs", pebble_ca, module_config(pebble_ca), metrics=True)
    try:
        yield hs
    finally:
        hs.stop()


def test_prometheus_reads_the_module_metrics_from_synapses_metrics_listener(
    synapse_with_metrics: Synapse,
    pebble_ca: PebbleCA,  # noqa: F811
    tmp_path: pathlib.Path,
) -> None:
    hs = synapse_with_metrics
    hs.start()
    target = f"127.0.0.1:{hs.metrics_port}"
    with Prometheus(tmp_path / "prometheus", {"synapse": [target]}) as prom:
        name = f'{{name="{SERVER_NAME}"}}'
        # The placeholder Synapse started with is exported as such, then replaced.
        prom.wait_for(
            f"synapse_acme_certificate_placeholder{name}",
            lambda v: v.get((("name", SERVER_NAME),)) == 0,
            ISSUE_TIMEOUT,
            "the issued certificate",
            hs.log,
        )
        leaf = disk_leaf(hs)
        served = verified_leaf(pebble_ca, fetch_chain(hs.tls_port))
        assert served.serial_number == leaf.serial_number
        not_after = crypto.not_after(leaf).timestamp()
        stored = prom.wait_for(
            f"synapse_acme_certificate_not_after_seconds{name}",
            lambda v: v.get((("name", SERVER_NAME),)) == not_after,
            10,
            "the stored certificate's expiry",
            hs.log,
        )
        assert stored
        prom.wait_for(
            f"synapse_acme_served_not_after_seconds{name}",
            lambda v: v.get((("name", SERVER_NAME),)) == crypto.not_after(served).timestamp(),
            10,
            "the served certificate's expiry",
            hs.log,
        )
        renewal = prom.query(f"synapse_acme_next_renewal_seconds{name}")
        assert crypto.not_before(leaf).timestamp() < renewal[(("name", SERVER_NAME),)] < not_after
        issued = prom.query("synapse_acme_issuance_total")
        assert issued[(("result", "success"),)] == 1
        assert issued[(("result", "failure"),)] == 0
        # Pebble validated through Synapse's own plain listener: counted as hits.
        hits = prom.query('synapse_acme_challenge_requests_total{result="hit"}')
        assert hits[(("result", "hit"),)] >= 1
        # Seeded with the placeholder, then the issued certificate: two swaps.
        assert prom.query("synapse_acme_tls_swaps_total")[()] >= 2
        new_order = prom.query('synapse_acme_ca_requests_total{endpoint="newOrder"}')
        assert new_order[(("endpoint", "newOrder"), ("status", "201"))] == 1
        # The same listener carries Synapse's own metrics: this is Synapse's registry.
        assert prom.query('up{job="synapse"}') == {(): 1.0}
        assert prom.query("process_start_time_seconds")

    # Our families in Synapse's exposition pass promtool's checks.
    _, body = scrape(hs.metrics_port)
    ours = b"\n".join(
        line
        for line in body.splitlines()
        if line.startswith((b"synapse_acme_", b"# HELP synapse_acme_", b"# TYPE synapse_acme_"))
    )
    assert b"synapse_acme_certificate_not_after_seconds{" in ours
    checked = promtool("check", "metrics", stdin=ours + b"\n")
    assert checked.returncode == 0, checked.stdout + checked.stderr
