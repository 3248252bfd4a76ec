"""Every file in sample_config/ is checked by the program that will read it, so none can rot.

nginx -t and apache2 -t read the shipped sites (rendered with test ports and paths);
systemd-analyze verify reads the units (works offline in this container, no PID 1 systemd
needed); the YAML files load through synapse-acme's own config reader; the authbind recipe
passes sh -n (and really runs in test_deploy_port80). A new sample file fails the test until a
check is added for it.
"""

from __future__ import annotations

import datetime
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from synapse_acme import crypto
from synapse_acme.config import read_config_file
from tests.integration.deploy.common import SAMPLES, program, render, world_dir
from tests.integration.deploy.proxies import Apache, Nginx, Ports, apache_site, nginx_site

CHECKED = {
    "acme.yaml",
    "acme-behind-proxy.yaml",
    "acme-port80.yaml",
    "homeserver-module.yaml",
    "nginx-synapse-acme.conf",
    "apache-synapse-acme.conf",
    "synapse-acme.service",
    "synapse-acme.socket",
    "synapse-acme-reload-proxy.path",
    "synapse-acme-reload-proxy.service",
    "authbind-setup.sh",
}


@pytest.fixture
def workdir() -> Iterator[Path]:
    with world_dir("samples") as d:
        yield d


def test_every_sample_is_checked() -> None:
    assert {p.name for p in SAMPLES.iterdir()} == CHECKED


def _tls_files(directory: Path) -> Path:
    tls = directory / "tls"
    tls.mkdir()
    bundle = crypto.make_placeholder_bundle(
        ["matrix.example.test"], datetime.datetime.now(datetime.timezone.utc)
    )
    (tls / "fullchain.pem").write_bytes(bundle.chain_pem)
    (tls / "privkey.pem").write_bytes(bundle.key_pem)
    return tls


PORTS = Ports(http=18080, tls=18443, responder=18009, homeserver=18008)


def test_nginx_accepts_the_sample_site(workdir: Path) -> None:
    nginx = Nginx(workdir, nginx_site(PORTS, "matrix.example.test", _tls_files(workdir)), PORTS)
    r = nginx.check()
    assert r.returncode == 0, r.stderr
    assert "syntax is ok" in r.stderr and "test is successful" in r.stderr


def test_apache_accepts_the_sample_vhost(workdir: Path) -> None:
    site = apache_site(PORTS, "matrix.example.test", _tls_files(workdir))
    apache = Apache(workdir, site, PORTS)
    r = apache.check()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Syntax OK" in r.stdout + r.stderr


def test_apache_modules_the_guide_enables_exist() -> None:
    for module in ("proxy", "proxy_http", "headers", "ssl", "alias"):
        assert (Path("/usr/lib/apache2/modules") / f"mod_{module}.so").exists(), module


def _systemd_verify(directory: Path, units: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [program("systemd-analyze"), "verify", *[str(directory / u) for u in units]],
        capture_output=True,
        text=True,
        check=False,
        cwd=directory,
    )


def test_systemd_accepts_the_units(workdir: Path) -> None:
    """Rendered only where a path must exist here: the synapse-acme program."""
    entry = shutil.which("synapse-acme") or str(Path(sys.executable).with_name("synapse-acme"))
    assert Path(entry).exists(), "the synapse-acme console script is not installed"
    names = [
        "synapse-acme.service",
        "synapse-acme.socket",
        "synapse-acme-reload-proxy.path",
        "synapse-acme-reload-proxy.service",
    ]
    for name in names:
        text = render(name, [])
        if name == "synapse-acme.service":
            text = render(name, [("/usr/local/bin/synapse-acme", entry)])
        (workdir / name).write_text(text)
    r = _systemd_verify(workdir, names)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout + r.stderr == "", r.stdout + r.stderr  # no unknown keys, no warnings


def test_systemd_verify_really_checks(workdir: Path) -> None:
    """The check above is real: a typo in the sample unit is reported."""
    (workdir / "synapse-acme.service").write_text(
        render("synapse-acme.service", [("StateDirectoryMode=", "StateDirectoryMod=")])
    )
    r = _systemd_verify(workdir, ["synapse-acme.service"])
    assert "Unknown key 'StateDirectoryMod'" in r.stderr


def test_yaml_samples_load(workdir: Path) -> None:
    assert read_config_file(str(SAMPLES / "acme.yaml")).enabled is False  # the commented one
    for name in ("acme-behind-proxy.yaml", "acme-port80.yaml"):
        config = read_config_file(str(SAMPLES / name))
        assert config.enabled and config.certificate_specs(), name
    proxy = read_config_file(str(SAMPLES / "acme-behind-proxy.yaml"))
    assert proxy.http01_endpoints() == ["tcp:port=8009:interface=127.0.0.1"]
    assert proxy.tls_certificate_path == "/var/lib/synapse-acme/tls/fullchain.pem"
    port80 = read_config_file(str(SAMPLES / "acme-port80.yaml"))
    assert all("port=80:" in e for e in port80.http01_endpoints())
    # The socket-activation variant the comment describes.
    socket_variant = workdir / "acme-socket.yaml"
    socket_variant.write_text(
        render(
            "acme-port80.yaml",
            [
                ("  port: 80\n", ""),
                ("  bind_addresses: ['::', '0.0.0.0']\n", ""),
                ("#listen:", "listen:"),
            ],
        )
    )
    assert read_config_file(str(socket_variant)).http01_endpoints() == [
        "systemd:domain=INET6:name=synapse-acme-http"
    ]
    # The module snippet goes into a homeserver.yaml, which has a server_name.
    homeserver = workdir / "homeserver.yaml"
    homeserver.write_text(
        "server_name: matrix.example.test\n" + render("homeserver-module.yaml", [])
    )
    module_cfg = read_config_file(str(homeserver))
    assert module_cfg.enabled and module_cfg.http01_endpoints() == []


def test_authbind_recipe_is_valid_shell() -> None:
    r = subprocess.run(["sh", "-n", str(SAMPLES / "authbind-setup.sh")], capture_output=True)
    assert r.returncode == 0, r.stderr
    usage = subprocess.run(["sh", str(SAMPLES / "authbind-setup.sh")], capture_output=True)
    assert usage.returncode != 0 and b"usage" in usage.stderr
