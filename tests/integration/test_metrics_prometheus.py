"""The metrics as an operator's Prometheus sees them: a real Prometheus (Debian's) scrapes a real
``synapse-acme run`` that got its certificates from Pebble, and the values read back through
Prometheus's HTTP API are those of the certificate on disk and of the one served; ``promtool``
accepts the exposition. (The Synapse side: test_synapse_metrics.py.)"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from synapse_acme import crypto
from synapse_acme.names import names_key
from synapse_acme.testing.pebble import PebbleCA
from synapse_acme.testing.ports import handover, listening_socket, systemd_endpoint
from tests.integration.prometheus import Prometheus, promtool, scrape
from tests.unit.test_contrib_prometheus import CONTRIB, RULES

CLI = [sys.executable, "-m", "synapse_acme"]
NAME = "prom.example.test"
BLOCKED = "blocked.example.test"  # Pebble refuses it: the failure path, measured


def served_leaf(port: int, name: str = NAME) -> x509.Certificate | None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            with ctx.wrap_socket(sock, server_hostname=name) as tls:
                der = tls.getpeercert(binary_form=True)
    except OSError:
        return None
    return x509.load_der_x509_certificate(der) if der else None


def stored_leaf(store: Path, names: list[str]) -> x509.Certificate:
    chain = (store / "certificates" / names_key(names) / "fullchain.pem").read_bytes()
    return crypto.parse_chain(chain)[0]


def one(values: dict[tuple[tuple[str, str], ...], float], **labels: str) -> float:
    return values[tuple(sorted(labels.items()))]


def test_prometheus_scrapes_the_runner_and_sees_the_stored_and_served_certificate(
    pebble_factory: Callable[..., PebbleCA], tmp_path: Path
) -> None:
    ca = pebble_factory(blocklist=[BLOCKED])
    # Both listeners are bound here and handed over: no port can be taken in between.
    tls_socket, metrics_socket = listening_socket(), listening_socket()
    tls_port, metrics_port = tls_socket.getsockname()[1], metrics_socket.getsockname()[1]
    cfg = ca.write_acme_config(
        tmp_path,
        [NAME],
        certificates=[{"domains": [BLOCKED]}],
        tls_listen=[systemd_endpoint(0)],
        metrics_listen=[systemd_endpoint(1)],
        check_interval=1,
    )
    argv, fds = handover([*CLI, "run", "-c", str(cfg)], [tls_socket, metrics_socket])
    log_path = tmp_path / "run.log"
    with tls_socket, metrics_socket, open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, pass_fds=fds)
    started = time.time()

    def log() -> str:
        return log_path.read_text(errors="replace")

    try:
        with Prometheus(tmp_path / "prometheus", {"acme": [f"127.0.0.1:{metrics_port}"]}) as prom:
            name = f'{{name="{NAME}"}}'
            stored = prom.wait_for(
                f"synapse_acme_certificate_not_after_seconds{name}",
                lambda v: bool(v),
                60,
                "the stored certificate's expiry",
                log,
            )
            leaf = stored_leaf(tmp_path / "store", [NAME])
            ca.verify_chain(
                (
                    tmp_path / "store" / "certificates" / names_key([NAME]) / "fullchain.pem"
                ).read_bytes(),
                [NAME],
            )
            not_after = crypto.not_after(leaf).timestamp()
            assert one(stored, name=NAME) == not_after
            served = served_leaf(tls_port)
            assert served is not None and served.serial_number == leaf.serial_number
            prom.wait_for(
                f"synapse_acme_served_not_after_seconds{name}",
                lambda v: v.get((("name", NAME),)) == crypto.not_after(served).timestamp(),
                10,
                "the served certificate's expiry",
                log,
            )
            renewal = one(prom.query(f"synapse_acme_next_renewal_seconds{name}"), name=NAME)
            assert started < renewal < not_after
            # The refused name: its failures are counted and dated, and it is retried.
            failing = f'{{name="{BLOCKED}"}}'
            prom.wait_for(
                f"synapse_acme_consecutive_failures{failing}",
                lambda v: v.get((("name", BLOCKED),), 0) >= 1,
                30,
                "the refused certificate's failures",
                log,
            )
            last_failure = one(
                prom.query(f"synapse_acme_last_failure_timestamp_seconds{failing}"), name=BLOCKED
            )
            assert started - 1 < last_failure < time.time() + 1
            assert not prom.query(f"synapse_acme_certificate_not_after_seconds{failing}")
            issued = prom.query("synapse_acme_issuance_total")
            assert one(issued, result="success") == 1
            assert one(issued, result="failure") >= 1
            # Counted at the source: Pebble validated our token (3 times), the preflight
            # probed it, and the CA was asked for every kind of resource along the way.
            hits = one(prom.query("synapse_acme_challenge_requests_total"), result="hit")
            assert hits >= 3
            requests = prom.query("synapse_acme_ca_requests_total")
            endpoints = {dict(labels)["endpoint"] for labels in requests}
            assert {"directory", "newAccount", "newOrder", "finalize", "certificate"} <= endpoints
            assert one(requests, endpoint="newOrder", status="201") >= 1
            assert one(requests, endpoint="newOrder", status="400") >= 1  # the refused name
            swaps = one(prom.query("synapse_acme_tls_swaps_total"))
            assert swaps >= 1

            # The exposition itself passes promtool's checks (names, types, units, HELP).
            content_type, body = scrape(metrics_port)
            assert content_type.startswith("text/plain")
            checked = promtool("check", "metrics", stdin=body)
            assert checked.returncode == 0, checked.stdout + checked.stderr
            assert checked.stdout.strip() == "" and checked.stderr.strip() == "", checked
            # Every metric the dashboard and the alert rules use is in the real exposition.
            exported = {
                family.name + ("_total" if family.type == "counter" else "")
                for family in text_string_to_metric_families(body.decode())
            }
            contrib = "".join(
                (CONTRIB / f).read_text() for f in ("grafana-dashboard.json", RULES.name)
            )
            referenced = set(re.findall(r"synapse_acme_[a-z_]+", contrib))
            assert referenced and referenced <= exported, referenced - exported

            # A forced renewal: the new certificate's expiry reaches Prometheus, the swap and
            # the success are counted, and what is served is what is stored.
            renew = subprocess.run(
                [*CLI, "renew", "--force", "-c", str(cfg)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert renew.returncode == 0, renew.stdout + renew.stderr
            prom.wait_for(
                "synapse_acme_issuance_total",
                lambda v: v.get((("result", "success"),)) == 2,
                30,
                "the second issuance",
                log,
            )
            new_leaf = stored_leaf(tmp_path / "store", [NAME])
            assert new_leaf.serial_number != leaf.serial_number
            prom.wait_for(
                f"synapse_acme_certificate_not_after_seconds{name}",
                lambda v: v.get((("name", NAME),)) == crypto.not_after(new_leaf).timestamp(),
                10,
                "the renewed certificate's expiry",
                log,
            )
            prom.wait_for(
                "synapse_acme_tls_swaps_total", lambda v: v.get((), 0) > swaps, 10, "a swap", log
            )
            served = served_leaf(tls_port)
            assert served is not None and served.serial_number == new_leaf.serial_number
            assert (
                one(prom.query(f"synapse_acme_served_not_after_seconds{name}"), name=NAME)
                == crypto.not_after(served).timestamp()
            )
            assert prom.targets_up() == {f"http://127.0.0.1:{metrics_port}/metrics": True}
        assert proc.poll() is None, "synapse-acme run exited"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
