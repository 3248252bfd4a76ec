"""DNS-01 end to end: a real BIND9 primary, real RFC 2136 updates signed with a tsig-keygen key,
Pebble validating against that BIND9, and the real ``synapse-acme issue`` command.

Proves: a wildcard certificate (``*.example.test`` plus ``example.test``, whose two TXT values
share one name and live at the same time) is issued with no HTTP listener at all; and no TXT
record is left behind, after success and after each kind of failure (the CA finds no record;
the record never became visible, so the CA was never told). A missing ``named`` fails these
tests (Bind9 raises), it never skips them.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from synapse_acme import crypto
from synapse_acme.names import canonical_names, names_key
from synapse_acme.testing import ports
from synapse_acme.testing.bind import Bind9
from synapse_acme.testing.pebble import PebbleCA

CLI = [sys.executable, "-m", "synapse_acme"]
NAMES = ["example.test", "*.example.test"]


@pytest.fixture(scope="module")
def bind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bind9]:
    with Bind9(str(tmp_path_factory.mktemp("bind"))) as server:
        yield server


def issue(config: Path) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [*CLI, "issue", "-c", str(config)], capture_output=True, text=True, timeout=180
    )
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r


def dns01_config(
    ca: PebbleCA, bind: Bind9, directory: Path, **dns01: Any
) -> tuple[Path, dict[str, Any]]:
    """An acme.yaml for ``ca`` issuing NAMES through dns-01 at ``bind``, with no HTTP listener
    (``port: 0``): dns-01 needs no inbound port."""
    settings: dict[str, Any] = {
        "server": bind.server,
        "zone": "example.test",
        "tsig_secret_file": bind.key_file,  # tsig-keygen's output, as the docs say
        "propagation_servers": [bind.server],
        "propagation_timeout": "20s",
    }
    settings.update(dns01)
    path = ca.write_acme_config(directory, NAMES, listener=False, port=0, dns01=settings)
    return path, yaml.safe_load(path.read_text())["acme"]


def test_a_wildcard_certificate_is_issued_through_bind_and_no_txt_is_left(
    bind: Bind9, pebble_factory: Callable[..., PebbleCA], tmp_path: Path
) -> None:
    ca = pebble_factory(dns_server=bind.server)
    config, block = dns01_config(ca, bind, tmp_path)
    r = issue(config)
    assert r.returncode == 0, r.stdout + r.stderr
    key = names_key(canonical_names(NAMES))
    chain = (Path(block["storage"]) / "certificates" / key / "fullchain.pem").read_bytes()
    ca.verify_chain(chain, NAMES)
    leaf = crypto.parse_chain(chain)[0]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == set(NAMES)
    assert bind.challenge_records() == set()
    assert "TSIG" not in r.stderr
    secret = Path(bind.key_file).read_text().split('secret "')[1].split('"')[0]
    assert secret not in r.stdout + r.stderr


def test_a_validation_the_ca_refuses_leaves_no_txt(
    bind: Bind9, pebble_factory: Callable[..., PebbleCA], tmp_path: Path
) -> None:
    # This Pebble asks its own DNS stub, which never has the TXT records: both authorizations
    # become invalid after the records were added and seen at BIND.
    ca = pebble_factory()
    config, _ = dns01_config(ca, bind, tmp_path)
    r = issue(config)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED" in r.stderr, r.stderr
    assert "_acme-challenge.example.test" in r.stderr or "dns" in r.stderr.lower(), r.stderr
    assert bind.challenge_records() == set()


def test_a_record_that_never_becomes_visible_is_removed_and_the_ca_never_asked(
    bind: Bind9, pebble_factory: Callable[..., PebbleCA], tmp_path: Path
) -> None:
    ca = pebble_factory(dns_server=bind.server)
    # A "secondary" that answers nothing: the propagation check times out after the records
    # were added at the primary.
    with ports.reserve_port(udp=True) as silent:
        config, _ = dns01_config(
            ca,
            bind,
            tmp_path,
            propagation_servers=[bind.server, f"127.0.0.1:{silent.port}"],
            propagation_timeout="2s",
        )
        r = issue(config)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "not visible at every authoritative server" in r.stderr, r.stderr
    assert f"127.0.0.1:{silent.port}" in r.stderr
    assert bind.challenge_records() == set()
