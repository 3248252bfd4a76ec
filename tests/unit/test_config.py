"""The acme: block parser: defaults, every key's errors, file forms, the sample and its docs."""

from __future__ import annotations

import datetime
import os
import pathlib
import re
from typing import Any

import attrs
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synapse_acme.config import (
    KNOWN_KEYS,
    LETSENCRYPT_STAGING_URL,
    LETSENCRYPT_URL,
    AcmeConfig,
    EabConfig,
    generate_config,
    parse_acme_config,
    read_config_file,
    settings_table,
)
from synapse_acme.errors import ConfigError
from synapse_acme.limits import ConnectionLimits
from synapse_acme.model import CertificateSpec

ROOT = pathlib.Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "sample_config" / "acme.yaml"
HMAC = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"


def _ca_pem() -> str:
    """A throwaway self-signed CA certificate, as a CA bundle would hold."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")])
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _error(block: Any, **kwargs: Any) -> str:
    kwargs.setdefault("server_name", "example.org")
    with pytest.raises(ConfigError) as info:
        parse_acme_config(block, **kwargs)
    return str(info.value)


# -- defaults --------------------------------------------------------------------------------


def test_defaults_for_an_empty_block() -> None:
    config = parse_acme_config({}, server_name="Example.ORG:8448")
    assert config == AcmeConfig(domain="example.org")
    assert config.enabled is False
    assert config.url == LETSENCRYPT_URL
    assert config.port == 80
    assert config.bind_addresses == ("::", "0.0.0.0")
    assert config.reprovision_threshold == 30
    assert config.storage == "./acme"
    assert config.account_key_file == os.path.join("./acme", "account.key")
    assert config.check_interval == 600 and config.check_jitter == 0.1
    assert config.poll_interval == 0.5 and config.poll_timeout == 300
    assert config.request_timeout == 45
    assert config.http01_endpoints() == [
        r"tcp6:port=80:interface=\:\:",
        "tcp:port=80:interface=0.0.0.0",
    ]


def test_none_block_is_disabled_and_needs_no_domain() -> None:
    config = parse_acme_config(None)
    assert config.enabled is False and config.domain is None
    assert config.certificate_specs() == []


def test_old_synapse_block_still_reads(tmp_path: pathlib.Path) -> None:
    old = {
        "enabled": True,
        "url": LETSENCRYPT_URL,
        "port": 8009,
        "bind_addresses": ["127.0.0.1"],
        "reprovision_threshold": 30,
        "domain": "matrix.example.com",
        "account_key_file": "/data/acme_account.key",
    }
    config = parse_acme_config(old, server_name="example.com", base_dir=str(tmp_path))
    assert config.http01_endpoints() == ["tcp:port=8009:interface=127.0.0.1"]
    assert config.domain == "matrix.example.com"
    assert config.account_key_file == "/data/acme_account.key"
    assert config.storage == str(tmp_path / "acme")


def test_full_block(tmp_path: pathlib.Path) -> None:
    (tmp_path / "ca.pem").write_text(_ca_pem())
    block = {
        "enabled": True,
        "staging": True,
        "domain": "Example.com.",
        "domains": ["matrix.example.com", "EXAMPLE.com", "bücher.example"],
        "certificates": [{"domains": ["a.example.com"], "key_type": "rsa"}, {"domains": "b.x.y"}],
        "contact": ["ops@example.com", "mailto:Admin@EXAMPLE.com"],
        "terms_of_service_agreed": True,
        "key_type": "EC384",
        "storage": "state",
        "account_key_file": "~/acct.key",
        "ca_bundle": "ca.pem",
        "eab": {"kid": "kid-1", "hmac_key": HMAC},
        "profile": "shortlived",
        "tls_certificate_path": "tls/cert.pem",
        "tls_private_key_path": "/abs/key.pem",
        "check_interval": "1h",
        "check_jitter": 0,
        "poll_interval": "250ms",
        "poll_timeout": 60,
        "request_timeout": "2s",
        "listen": ["tcp:8009:interface=127.0.0.1", "systemd:domain=INET:index=0"],
        "tls_listen": "tcp:8448",
    }
    config = parse_acme_config(block, base_dir=str(tmp_path))
    assert config.url == LETSENCRYPT_STAGING_URL
    assert config.domain == "example.com"
    assert config.domains == ("matrix.example.com", "xn--bcher-kva.example")
    assert config.contact == ("mailto:ops@example.com", "mailto:Admin@example.com")
    assert config.key_type == "ecdsa-p384"
    assert config.storage == str(tmp_path / "state")
    assert config.account_key_file == os.path.expanduser("~/acct.key")
    assert config.ca_bundle == str(tmp_path / "ca.pem")
    assert config.eab == EabConfig(kid="kid-1", hmac_key=HMAC)
    assert HMAC not in repr(config)
    assert config.eab is not None and len(config.eab.hmac_key_bytes()) == 48
    assert config.tls_certificate_path == str(tmp_path / "tls" / "cert.pem")
    assert config.tls_private_key_path == "/abs/key.pem"
    assert (config.check_interval, config.check_jitter) == (3600, 0)
    assert (config.poll_interval, config.poll_timeout) == (0.25, 60)
    assert config.request_timeout == 2
    assert config.http01_endpoints() == list(block["listen"])
    assert config.tls_listen == ("tcp:8448",)
    assert config.certificate_specs() == [
        CertificateSpec(
            ("example.com", "matrix.example.com", "xn--bcher-kva.example"), "ecdsa-p384"
        ),
        CertificateSpec(("a.example.com",), "rsa-2048"),
        CertificateSpec(("b.x.y",), "ecdsa-p384"),
    ]


def test_port_zero_and_empty_listen_mean_no_listener() -> None:
    assert parse_acme_config({"port": 0}, server_name="a.b").http01_endpoints() == []
    assert parse_acme_config({"listen": []}, server_name="a.b").http01_endpoints() == []
    assert parse_acme_config({"bind_addresses": []}, server_name="a.b").http01_endpoints() == []


def test_ipv6_bind_address_is_escaped_for_twisted() -> None:
    config = parse_acme_config({"bind_addresses": "::1", "port": 8009}, server_name="a.b")
    assert config.http01_endpoints() == [r"tcp6:port=8009:interface=\:\:1"]


def test_null_values_mean_default() -> None:
    assert parse_acme_config({"port": None, "url": None}, server_name="a.b").port == 80


def test_tls_paths_default_from_homeserver(tmp_path: pathlib.Path) -> None:
    hs = {"tls_certificate_path": "/etc/hs/cert.pem", "tls_private_key_path": "key.pem"}
    config = parse_acme_config({}, server_name="a.b", base_dir=str(tmp_path), defaults_from=hs)
    assert config.tls_certificate_path == "/etc/hs/cert.pem"
    assert config.tls_private_key_path == str(tmp_path / "key.pem")
    own = {"tls_certificate_path": "c", "tls_private_key_path": "k"}
    config = parse_acme_config(own, server_name="a.b", base_dir="/x", defaults_from=hs)
    assert (config.tls_certificate_path, config.tls_private_key_path) == ("/x/c", "/x/k")


# -- every key's bad values ------------------------------------------------------------------

KNOWN = ", ".join(KNOWN_KEYS)
ENDPOINT = (
    "expected a Twisted server endpoint string like 'tcp:8009:interface=127.0.0.1' "
    "(types: tcp, tcp6, ssl, unix, systemd)"
)
TLS_ENDPOINT = ENDPOINT.replace("tcp6, ssl, unix", "tcp6, unix")
DURATION = "expected a duration: seconds as a number, or text like '90s', '10m', '1h'"
KEY_TYPE = "expected a key type: ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072, rsa-4096"
EMAIL = "expected an email address or a mailto: URI (one address each)"
V1 = "this is an ACME v1 directory, and Let's Encrypt switched ACME v1 off in 2021; use "

BAD = [
    ({"enabled": "yes"}, "acme.enabled: expected true or false, got 'yes'"),
    ({"enabled": 1}, "acme.enabled: expected true or false, got 1"),
    ({"staging": "true"}, "acme.staging: expected true or false, got 'true'"),
    ({"terms_of_service_agreed": 0}, "acme.terms_of_service_agreed: expected true or false, got 0"),
    ({"url": 5}, "acme.url: expected an http(s) URL of an ACME v2 directory, got 5"),
    (
        {"url": "ftp://ca.example/dir"},
        "acme.url: expected an http(s) URL of an ACME v2 directory, got 'ftp://ca.example/dir'",
    ),
    (
        {"url": "not a url"},
        "acme.url: expected an http(s) URL of an ACME v2 directory, got 'not a url'",
    ),
    (
        {"url": "https://[::1/dir"},
        "acme.url: expected an http(s) URL of an ACME v2 directory, got 'https://[::1/dir'",
    ),
    (
        {"url": "https://acme-v01.api.letsencrypt.org/directory"},
        f"acme.url: {V1}{LETSENCRYPT_URL}, got 'https://acme-v01.api.letsencrypt.org/directory'",
    ),
    (
        {"url": "https://acme-staging.api.letsencrypt.org/directory"},
        f"acme.url: {V1}{LETSENCRYPT_STAGING_URL}, got 'https://acme-staging.api.letsencrypt.org/directory'",
    ),
    (
        {"staging": True, "url": LETSENCRYPT_URL},
        f"acme.staging: staging: true selects {LETSENCRYPT_STAGING_URL}, but "
        "url is also set; remove one of them, got True",
    ),
    (
        {"port": "eighty"},
        "acme.port: expected an integer 1-65535 (or 0 for no listener), got 'eighty'",
    ),
    ({"port": 65536}, "acme.port: expected an integer 1-65535 (or 0 for no listener), got 65536"),
    ({"port": -1}, "acme.port: expected an integer 1-65535 (or 0 for no listener), got -1"),
    ({"port": True}, "acme.port: expected an integer 1-65535 (or 0 for no listener), got True"),
    ({"port": 80.0}, "acme.port: expected an integer 1-65535 (or 0 for no listener), got 80.0"),
    ({"bind_addresses": 5}, "acme.bind_addresses: expected a list of IP addresses, got 5"),
    (
        {"bind_addresses": ["::", "localhost"]},
        "acme.bind_addresses[1]: expected an IP address to bind to, like '::' "
        "or '0.0.0.0', got 'localhost'",
    ),
    (
        {"listen": {"a": 1}},
        "acme.listen: expected a list of Twisted endpoint strings, got {'a': 1}",
    ),
    ({"listen": ["tcp:8009", 8009]}, f"acme.listen[1]: {ENDPOINT}, got 8009"),
    ({"listen": ["8009"]}, f"acme.listen[0]: {ENDPOINT}, got '8009'"),
    ({"listen": ["le:/srv:tcp:443"]}, f"acme.listen[0]: {ENDPOINT}, got 'le:/srv:tcp:443'"),
    (
        {"listen": ["tcp:eighty"]},
        f"acme.listen[0]: {ENDPOINT}, with a port 0-65535, got 'tcp:eighty'",
    ),
    (
        {"listen": ["tcp6:port=70000"]},
        f"acme.listen[0]: {ENDPOINT}, with a port 0-65535, got 'tcp6:port=70000'",
    ),
    ({"listen": ["unix:"]}, f"acme.listen[0]: {ENDPOINT}, with a socket path, got 'unix:'"),
    (
        {"listen": ["systemd:index=0"]},
        f"acme.listen[0]: {ENDPOINT}, like 'systemd:domain=INET:index=0' or "
        "'systemd:domain=INET6:name=synapse-acme-http', got 'systemd:index=0'",
    ),
    (
        {"listen": ["systemd:domain=INET:index=0:name=x"]},
        f"acme.listen[0]: {ENDPOINT}, like 'systemd:domain=INET:index=0' or "
        "'systemd:domain=INET6:name=synapse-acme-http', got 'systemd:domain=INET:index=0:name=x'",
    ),
    (
        {"listen": ["tcp:8009"], "port": 8009},
        "acme.listen: listen replaces port and bind_addresses; remove port or "
        "listen, got ['tcp:8009']",
    ),
    (
        {"listen": ["tcp:8009"], "bind_addresses": ["::"]},
        "acme.listen: listen replaces port and bind_addresses; remove "
        "bind_addresses or listen, got ['tcp:8009']",
    ),
    ({"tls_listen": ["ssl:8448"]}, f"acme.tls_listen[0]: {TLS_ENDPOINT}, got 'ssl:8448'"),
    (
        {"reprovision_threshold": 0},
        "acme.reprovision_threshold: expected a whole number of days above 0, got 0",
    ),
    (
        {"reprovision_threshold": "30d"},
        "acme.reprovision_threshold: expected a whole number of days above 0, got '30d'",
    ),
    (
        {"domain": "exa mple.com"},
        "acme.domain: expected a DNS name (not a valid DNS name: 'exa "
        "mple.com' (bad label 'exa mple')), got 'exa mple.com'",
    ),
    (
        {"domain": "192.0.2.1"},
        "acme.domain: expected a DNS name (IP addresses are not supported, "
        "only DNS names: '192.0.2.1'), got '192.0.2.1'",
    ),
    ({"domain": ["a.b"]}, "acme.domain: expected a DNS name, got ['a.b']"),
    ({"domains": ["a.example", "b..example", "c.example"]}, "acme.domains[1]: expected a DNS name"),
    ({"domains": {"a": "b"}}, "acme.domains: expected a list of DNS names, got {'a': 'b'}"),
    (
        {"certificates": {"domains": ["a.b"]}},
        "acme.certificates: expected a list of mappings with domains (and "
        "key_type), got {'domains': ['a.b']}",
    ),
    (
        {"certificates": ["a.b"]},
        "acme.certificates[0]: expected a mapping with domains (and key_type), got 'a.b'",
    ),
    (
        {"certificates": [{"key_type": "rsa"}]},
        "acme.certificates[0].domains: missing: list the names of this certificate, got None",
    ),
    (
        {"certificates": [{"domains": []}]},
        "acme.certificates[0].domains: expected at least one DNS name, got []",
    ),
    (
        {"certificates": [{"domains": ["a.b", "-x.b"]}]},
        "acme.certificates[0].domains[1]: expected a DNS name",
    ),
    (
        {"certificates": [{"domains": ["a.b"], "key_type": "dsa"}]},
        f"acme.certificates[0].key_type: {KEY_TYPE}, got 'dsa'",
    ),
    (
        {"certificates": [{"domains": ["a.b"], "keytype": "rsa"}]},
        "acme.certificates[0].keytype: unknown key (did you mean 'key_type'?); "
        "known keys: challenges, domains, key_type",
    ),
    (
        {"certificates": [{"domains": ["example.org"]}]},
        "acme.certificates[0].domains: the same names as another certificate "
        "here; list each set once, got ['example.org']",
    ),
    ({"contact": 5}, "acme.contact: expected a list of email addresses, got 5"),
    ({"contact": ["ops@example.com", "nobody"]}, f"acme.contact[1]: {EMAIL}, got 'nobody'"),
    ({"contact": ["a@b@c.example"]}, f"acme.contact[0]: {EMAIL}, got 'a@b@c.example'"),
    ({"contact": ["a,b@c.example"]}, f"acme.contact[0]: {EMAIL}, got 'a,b@c.example'"),
    (
        {"contact": ["mailto:ops@localhost"]},
        f"acme.contact[0]: {EMAIL}, got 'mailto:ops@localhost'",
    ),
    (
        {"contact": ["ops@example.com?subject=x"]},
        f"acme.contact[0]: {EMAIL}, got 'ops@example.com?subject=x'",
    ),
    ({"key_type": "rsa-1024"}, f"acme.key_type: {KEY_TYPE}, got 'rsa-1024'"),
    ({"key_type": 256}, f"acme.key_type: {KEY_TYPE}, got 256"),
    ({"storage": ""}, "acme.storage: expected a file path, got ''"),
    ({"storage": 7}, "acme.storage: expected a file path, got 7"),
    ({"account_key_file": ["a"]}, "acme.account_key_file: expected a file path, got ['a']"),
    (
        {"ca_bundle": "/nonexistent/ca.pem"},
        "acme.ca_bundle: expected a PEM file of CA certificates that exists, "
        "got '/nonexistent/ca.pem'",
    ),
    ({"eab": "kid:secret"}, "acme.eab: expected a mapping with kid and hmac_key, got str"),
    ({"eab": {"kid": "k"}}, "acme.eab.hmac_key: missing (the CA gives kid and hmac_key)"),
    ({"eab": {"hmac_key": HMAC}}, "acme.eab.kid: missing (the CA gives kid and hmac_key)"),
    (
        {"eab": {"kid": "", "hmac_key": HMAC}},
        "acme.eab.kid: expected the key identifier text the CA gave, got ''",
    ),
    (
        {"eab": {"kid": "k", "hmac_key": "not base64url!"}},
        "acme.eab.hmac_key: expected base64url text (RFC 4648 §5) as the CA gave it",
    ),
    (
        {"eab": {"kid": "k", "hmac_key": "a+b/c="}},
        "acme.eab.hmac_key: expected base64url text (RFC 4648 §5) as the CA gave it",
    ),
    (
        {"eab": {"kid": "k", "hmac_key": "A"}},
        "acme.eab.hmac_key: expected base64url text (RFC 4648 §5) as the CA gave it",
    ),
    (
        {"eab": {"kid": "k", "hmac_key": 12345}},
        "acme.eab.hmac_key: expected base64url text (RFC 4648 §5) as the CA gave it",
    ),
    (
        {"eab": {"kid": "k", "hmac_key": HMAC, "hmac": HMAC}},
        "acme.eab.hmac: unknown key (did you mean 'hmac_key'?); known keys: hmac_key, kid",
    ),
    (
        {"profile": ""},
        "acme.profile: expected a profile name the CA offers, like 'tlsserver', got ''",
    ),
    (
        {"profile": ["a"]},
        "acme.profile: expected a profile name the CA offers, like 'tlsserver', got ['a']",
    ),
    (
        {"tls_certificate_path": "c.pem"},
        "acme.tls_private_key_path: missing: set both tls_certificate_path and "
        "tls_private_key_path, or neither",
    ),
    (
        {"tls_private_key_path": "k.pem"},
        "acme.tls_certificate_path: missing: set both tls_certificate_path and "
        "tls_private_key_path, or neither",
    ),
    ({"check_interval": "soon"}, f"acme.check_interval: {DURATION}, got 'soon'"),
    ({"check_interval": 0}, f"acme.check_interval: {DURATION} (greater than zero), got 0"),
    ({"check_interval": float("inf")}, f"acme.check_interval: {DURATION}, got inf"),
    ({"poll_interval": -1}, f"acme.poll_interval: {DURATION}, got -1"),
    ({"poll_timeout": True}, f"acme.poll_timeout: {DURATION}, got True"),
    ({"request_timeout": 0}, f"acme.request_timeout: {DURATION} (greater than zero), got 0"),
    ({"request_timeout": "never"}, f"acme.request_timeout: {DURATION}, got 'never'"),
    (
        {"poll_timeout": 1, "poll_interval": 2},
        "acme.poll_timeout: expected at least poll_interval (2.0 s), got 1",
    ),
    (
        {"check_jitter": 1},
        "acme.check_jitter: expected a fraction from 0 up to (not including) 1, like 0.1, got 1",
    ),
    (
        {"check_jitter": "10%"},
        "acme.check_jitter: expected a fraction from 0 up to (not including) "
        "1, like 0.1, got '10%'",
    ),
    (
        {"check_jitter": float("nan")},
        "acme.check_jitter: expected a fraction from 0 up to (not including) 1, like 0.1, got nan",
    ),
    ({"prot": 80}, f"acme.prot: unknown key (did you mean 'port'?); known keys: {KNOWN}"),
    ({"zzz": "secret"}, f"acme.zzz: unknown key; known keys: {KNOWN}"),
    ({1: 2}, f"acme.1: unknown key; known keys: {KNOWN}"),
    (["enabled"], "acme: expected a mapping of acme settings, got a list"),
]


@pytest.mark.parametrize(
    ("block", "message"), BAD, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(BAD)]
)
def test_bad_values_name_key_and_value(block: Any, message: str) -> None:
    text = _error(block)
    assert text == message or (text.startswith(message) and message.endswith("DNS name"))


def test_errors_use_the_given_path_prefix() -> None:
    text = _error({"port": "x"}, path="modules[0].config")
    assert text.startswith("modules[0].config.port: expected an integer")


def test_hmac_key_never_appears_in_errors() -> None:
    secret = "c2VjcmV0LXNlY3JldC1zZWNyZXQ!"
    for block in (
        {"eab": {"kid": "k", "hmac_key": secret}},
        {"eab": secret},
        {"eab": [secret]},
        {"hmac_key": secret},
        {"eab": {"kid": "k", "hmac_key": HMAC, "other": secret}},
    ):
        with pytest.raises(ConfigError) as info:
            parse_acme_config(block, server_name="a.b")
        assert secret not in str(info.value)
        assert secret not in repr(info.value.value)


def test_domain_required_when_enabled_without_server_name() -> None:
    assert _error({"enabled": True}, server_name=None) == (
        "acme.domain: not set and there is no server_name to default to; set domain, got None"
    )
    assert _error({"domains": ["a.b"]}, server_name=None).startswith("acme.domain: not set")


def test_unusable_server_name_is_reported_on_domain() -> None:
    text = _error({"enabled": True}, server_name="[::1]:8448")
    assert text.startswith("acme.domain: not set, and server_name cannot be used")
    assert text.endswith("got '[::1]:8448'")


def test_ca_bundle_must_hold_a_certificate(tmp_path: pathlib.Path) -> None:
    (tmp_path / "empty.pem").write_text("no certificate here\n")
    text = _error({"ca_bundle": "empty.pem"}, base_dir=str(tmp_path))
    assert text == (
        "acme.ca_bundle: expected a PEM file with at least one certificate, got 'empty.pem'"
    )
    (tmp_path / "dir.pem").mkdir()
    assert "it is a directory, not a regular file" in _error(
        {"ca_bundle": "dir.pem"}, base_dir=str(tmp_path)
    )


def test_issuer_roots_is_a_file_of_certificates_resolved_like_ca_bundle(
    tmp_path: pathlib.Path,
) -> None:
    (tmp_path / "empty.pem").write_text("no certificate here\n")
    assert _error({"issuer_roots": "empty.pem"}, base_dir=str(tmp_path)) == (
        "acme.issuer_roots: expected a PEM file with at least one certificate, got 'empty.pem'"
    )
    assert "that exists" in _error({"issuer_roots": "missing.pem"}, base_dir=str(tmp_path))


def test_plain_http_ca_url_is_refused_unless_testing_allows_it() -> None:
    text = _error({"url": "http://ca.example/dir"})
    assert text.startswith("acme.url: expected an https:// URL")
    assert "testing_allow_http: true" in text and text.endswith("got 'http://ca.example/dir'")
    config = parse_acme_config({"url": "http://127.0.0.1:14000/dir", "testing_allow_http": True})
    assert config.url == "http://127.0.0.1:14000/dir" and config.testing_allow_http
    assert _error({"testing_allow_http": "yes"}).startswith(
        "acme.testing_allow_http: expected true or false"
    )


def test_connection_limits_defaults_and_each_key() -> None:
    assert parse_acme_config({}).connection_limits == ConnectionLimits()
    limits = parse_acme_config(
        {
            "connection_limits": {
                "max_connections": 50,
                "max_per_address": 5,
                "handshake_timeout": "3s",
                "header_timeout": 2,
            }
        }
    ).connection_limits
    assert limits == ConnectionLimits(50, 5, 3.0, 2.0)
    # Unset keys keep their defaults.
    assert parse_acme_config(
        {"connection_limits": {"max_connections": 1000}}
    ).connection_limits == ConnectionLimits(max_connections=1000)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([1], "acme.connection_limits: expected a mapping of max_connections"),
        ({"max_conns": 5}, "acme.connection_limits.max_conns: unknown key (did you mean"),
        ({"max_connections": 0}, "acme.connection_limits.max_connections: expected a whole"),
        ({"max_per_address": -1}, "acme.connection_limits.max_per_address: expected a whole"),
        (
            {"max_connections": 10, "max_per_address": 20},
            "acme.connection_limits.max_per_address: expected at most max_connections (10)",
        ),
        ({"handshake_timeout": 0}, "acme.connection_limits.handshake_timeout: expected a dur"),
        ({"header_timeout": "1h"}, "acme.connection_limits.header_timeout: expected at most 300"),
    ],
)
def test_connection_limits_errors_name_the_key(value: Any, expected: str) -> None:
    assert _error({"connection_limits": value}).startswith(expected)


def test_partial_homeserver_tls_paths_named_at_top_level() -> None:
    text = _error({}, defaults_from={"tls_certificate_path": "/c.pem"})
    assert text.startswith("tls_private_key_path: missing: set both")


# -- files -----------------------------------------------------------------------------------


def _write(tmp_path: pathlib.Path, text: str, name: str = "homeserver.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_read_homeserver_with_top_level_block(tmp_path: pathlib.Path) -> None:
    path = _write(
        tmp_path,
        "server_name: hs.example.com\n"
        "tls_certificate_path: hs.tls.crt\n"
        "tls_private_key_path: hs.tls.key\n"
        "acme:\n  enabled: true\n  port: 8009\n",
    )
    config = read_config_file(path)
    assert config.enabled and config.port == 8009 and config.domain == "hs.example.com"
    assert config.tls_certificate_path == str(tmp_path / "hs.tls.crt")
    assert config.storage == str(tmp_path / "acme")


def test_read_homeserver_with_module(tmp_path: pathlib.Path) -> None:
    text = (
        "server_name: hs.example.com\n"
        "modules:\n"
        "  - module: other.Module\n    config: {}\n"
        "  - module: synapse_acme.synapse.AcmeModule\n"
        "    config:\n      enabled: true\n      port: eighty\n"
    )
    with pytest.raises(ConfigError) as info:
        read_config_file(_write(tmp_path, text))
    assert str(info.value).startswith("modules[1].config.port: expected an integer 1-65535")
    config = read_config_file(_write(tmp_path, text.replace("eighty", "0")))
    assert config.enabled and config.http01_endpoints() == [] and config.domain == "hs.example.com"


_MODULE = "modules:\n  - module: synapse_acme.synapse.AcmeModule\n"


def test_read_module_config_defaults_enabled_to_true_as_the_module_does(
    tmp_path: pathlib.Path,
) -> None:
    base = "server_name: hs.example.com\n" + _MODULE
    for config_text in ("    config: {port: 0}\n", "    config:\n      enabled:\n", ""):
        config = read_config_file(_write(tmp_path, base + config_text))
        assert config.enabled, config_text
        assert config.source_path == "modules[0].config"
        assert config.key("enabled") == "modules[0].config.enabled"
    off = read_config_file(_write(tmp_path, base + "    config: {enabled: false}\n"))
    assert off.enabled is False and off.source_file == str(tmp_path / "homeserver.yaml")


def test_read_both_blocks_is_refused_as_the_module_refuses(tmp_path: pathlib.Path) -> None:
    text = "server_name: hs.example.com\nacme:\n  enabled: true\n  port: 8009\n" + _MODULE
    with pytest.raises(ConfigError) as info:
        read_config_file(_write(tmp_path, text + "    config: {contact: a@example.com}\n"))
    message = str(info.value)
    assert message.startswith("acme: both this top-level 'acme:' block and modules[0].config")
    assert "delete the top-level block" in message
    # Without a module config, the top-level block is read (its enabled, default false).
    legacy = read_config_file(_write(tmp_path, text))
    assert legacy.enabled and legacy.port == 8009 and legacy.source_path == "acme"


def test_read_old_disabled_block_beside_the_module_is_ignored_loudly(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = "server_name: hs.example.com\nacme:\n  enabled: false\n" + _MODULE
    config = read_config_file(_write(tmp_path, text + "    config: {port: 0}\n"))
    assert config.enabled and config.source_path == "modules[0].config"
    assert "ignoring the top-level 'acme: {enabled: false}' block" in caplog.text


def test_one_name_as_a_string_is_a_one_element_list() -> None:
    config = parse_acme_config({"domain": "a.example.com", "domains": "other.example.com"})
    assert config.domains == ("other.example.com",)  # never split into characters
    text = _error({"domains": "b.example.com, c.example.com"})
    assert text.startswith("acme.domains: expected a DNS name")
    assert "several names are a YAML list, like [a.example.com, b.example.com]" in text


def test_read_standalone_file(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, "acme:\n  enabled: true\n  domain: a.example.test\n", "acme.yaml")
    assert read_config_file(path).domain == "a.example.test"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("acme: [unclosed\n", "not valid YAML"),
        ("- a\n- b\n", "expected a YAML mapping at the top, got a list"),
        ("", "expected a YAML mapping at the top, got nothing (null)"),
        ("server_name: a.b\n", "found neither an acme: block nor synapse_acme.synapse.AcmeModule"),
        ("modules: {a: b}\n", "expected a list, got a mapping"),
        ("server_name: [a]\nacme: {}\n", "expected a server name string"),
    ],
)
def test_bad_files(tmp_path: pathlib.Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        read_config_file(path)
    assert message in str(info.value)


def test_missing_and_binary_files_are_named(tmp_path: pathlib.Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=re.escape(f"{missing}: config file not found")):
        read_config_file(missing)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=re.escape(str(binary))):
        read_config_file(str(binary))


# -- the sample and the docs -----------------------------------------------------------------


def test_packaged_sample_equals_sample_file() -> None:
    packaged = ROOT / "synapse_acme" / "sample_acme.yaml"
    assert packaged.read_text() == SAMPLE.read_text()
    assert generate_config() == SAMPLE.read_text()


def test_sample_parses_as_file_and_block() -> None:
    block = yaml.safe_load(generate_config())["acme"]
    assert parse_acme_config(block, server_name="example.com").domain == "example.com"
    assert read_config_file(str(SAMPLE)).enabled is False


def _uncommented_sample_keys() -> dict[str, Any]:
    """Each `#key: value` line of the sample at block level, parsed as YAML."""
    values: dict[str, Any] = {}
    for line in SAMPLE.read_text().splitlines():
        match = re.match(r"^  #([a-z_]+): (.*)$", line)
        if match:
            values[match.group(1)] = yaml.safe_load(match.group(2) or "null")
    return values


def test_sample_defaults_are_the_real_defaults() -> None:
    shown = _uncommented_sample_keys()
    defaults = parse_acme_config({}, server_name="example.com")
    for key, value in shown.items():
        if key in ("domain", "storage", "account_key_file"):
            continue  # examples / relative to the file
        assert parse_acme_config({key: value}, server_name="example.com") == defaults, key


def test_every_field_is_in_the_sample_and_documented() -> None:
    sample = SAMPLE.read_text()
    docs = (ROOT / "docs" / "configuration.md").read_text()
    for key in KNOWN_KEYS:
        assert re.search(rf"^  #?{key}:", sample, re.M), f"{key} not in sample"
    # The table of keys is the one the declarations make, word for word (regenerate it with
    # the command in the comment above it when a key changes).
    assert settings_table() in docs
    assert set(KNOWN_KEYS) == {
        f.name for f in attrs.fields(AcmeConfig) if f.name not in ("source_path", "source_file")
    }


def test_module_snippet_parses(tmp_path: pathlib.Path) -> None:
    snippet = (ROOT / "sample_config" / "homeserver-module.yaml").read_text()
    path = _write(tmp_path, "server_name: example.com\n" + snippet)
    config = read_config_file(path)
    assert config.enabled and config.url == LETSENCRYPT_STAGING_URL and config.port == 0


# -- fuzz ------------------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "::",
            "0.0.0.0",
            "tcp:8009",
            "a.example.com",
            "*.example.com",
            "ops@a.example",
            "10m",
            "rsa",
            "https://ca.example/dir",
            LETSENCRYPT_URL,
            HMAC,
            "~",
            ".",
            "/",
        ]
    ),
)
# Flat on purpose: nested recursive strategies made generation (not parsing) take 15 s.
_inner_keys = st.sampled_from(["domains", "key_type", "kid", "hmac_key", "x"])
_values = st.one_of(
    _scalars,
    st.lists(_scalars, max_size=3),
    st.dictionaries(_inner_keys, st.one_of(_scalars, st.lists(_scalars, max_size=2)), max_size=3),
    st.lists(
        st.dictionaries(
            _inner_keys, st.one_of(_scalars, st.lists(_scalars, max_size=2)), max_size=2
        ),
        max_size=2,
    ),
)
_keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=10), st.integers())
# Plausible values per key, so that the fuzzer also walks the success paths and mixes
# of good and bad keys, not only "unknown key".
_GOOD: dict[str, list[Any]] = {
    "enabled": [True, False],
    "url": [LETSENCRYPT_URL, "https://ca.example/dir", "http://127.0.0.1:14000/dir"],
    "staging": [True, False],
    "port": [0, 80, 8009, 65535],
    "bind_addresses": [["::"], "0.0.0.0", [], ["::1", "127.0.0.1"]],
    "listen": [
        [],
        ["tcp:8009"],
        ["systemd:domain=INET:index=0"],
        ["systemd:domain=INET6:name=synapse-acme-http"],
        "unix:/run/a.sock",
    ],
    "reprovision_threshold": [1, 30],
    "domain": ["a.example.com", "xn--bcher-kva.example", "Bücher.example."],
    "domains": [[], ["b.example.com"], "*.example.com", ["a.example.com", "a.example.com"]],
    "certificates": [
        [],
        [{"domains": ["c.example"]}],
        [{"domains": "d.example", "key_type": "rsa"}],
        [{"domains": ["e.example"], "challenges": ["tls-alpn-01"]}],
    ],
    "contact": ["ops@example.com", [], ["mailto:a@b.example"]],
    "terms_of_service_agreed": [True],
    "key_type": ["ec256", "rsa-4096", "ECDSA-P384"],
    "storage": ["state", "/var/lib/acme", "~/acme"],
    "account_key_file": ["acct.key"],
    "ca_bundle": ["/nonexistent.pem"],
    "eab": [{"kid": "k", "hmac_key": HMAC}],
    "profile": ["shortlived"],
    "tls_certificate_path": ["c.pem"],
    "tls_private_key_path": ["k.pem"],
    "check_interval": [1, "10m", 0.5],
    "check_jitter": [0, 0.5],
    "poll_interval": [0.1, "1s"],
    "poll_timeout": [10, "5m"],
    "request_timeout": [2, "45s"],
    "tls_listen": [[], ["tcp:8448"], "tcp6:8448"],
    "metrics_listen": [[], ["tcp:9109:interface=127.0.0.1"], "unix:/run/acme-metrics.sock"],
    "challenges": [["tls-alpn-01"], "http-01", ["http-01", "tls-alpn-01"]],
    "external_certificates": [True, False],
    "watch_interval": [5, "1m"],
    "max_requests_per_minute": [1, 1200, 100000],
    "testing_allow_http": [True, False],
    "issuer_roots": [None],
    "connection_limits": [
        {},
        {"max_connections": 10, "max_per_address": 10},
        {"handshake_timeout": "5s", "header_timeout": 2},
        {"max_per_address": 64},
    ],
    "preflight": [
        False,
        {"enabled": False},
        {"port": 5002, "timeout": "2s", "resolver": "127.0.0.1:8053"},
        {"resolver": "system"},
    ],
    "dry_run_url": ["https://acme-staging-v02.api.letsencrypt.org/directory"],
    "dry_run_on_change": [True, False],
    "alerts": [True, False, {"enabled": True, "expiry_days": 7}, {"expiry_days": 0}],
    "alert_webhook": ["https://hooks.example/t/abc", "http://127.0.0.1:9/x", "ftp://x"],
    "alert_room": ["!abc:example.org", "#alias:example.org"],
    "alert_sender": ["@acme:example.org", "acme"],
    "dns01": [{"server": "127.0.0.1:5353", "zone": "example.com", "tsig_secret_file": "/none.key"}],
    "database": [
        {"url": "postgresql://u:pw@db.example/synapse", "key_files": ["s.key"]},
        {"args": {"user": "u", "database": "d", "port": 5433}, "key_files": "s.key"},
        {"url": "postgresql://db.example/d", "key_files": "k", "lease": "1s"},
    ],
    "issuers": [
        [{"url": "https://ca.example/dir"}],
        [{"url": "https://a.example/dir", "profile": "x"}, {"url": "https://b.example/dir"}],
        [{"url": "https://ca.example/dir", "eab": {"kid": "k", "hmac_key": HMAC}}],
        [],
    ],
}


@st.composite
def _blocks(draw: Any) -> Any:
    block: dict[Any, Any] = {}
    for key in draw(st.lists(st.sampled_from(KNOWN_KEYS), max_size=8, unique=True)):
        good = st.sampled_from(_GOOD[key])
        block[key] = draw(st.one_of(good, good, good, _values))
    if draw(st.integers(0, 9)) == 0:
        block[draw(_keys)] = draw(_values)
    return block


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    block=st.one_of(
        _blocks(), _blocks(), _blocks(), st.dictionaries(_keys, _values, max_size=4), _scalars
    ),
    server_name=st.one_of(st.none(), st.text(max_size=20), st.just("example.org:8448")),
    defaults_from=st.one_of(
        st.none(),
        st.dictionaries(
            st.sampled_from(["tls_certificate_path", "tls_private_key_path"]), _scalars
        ),
    ),
)
def test_fuzz_only_config_or_config_error(block: Any, server_name: Any, defaults_from: Any) -> None:
    try:
        config = parse_acme_config(
            block,
            server_name=server_name,
            base_dir="/nonexistent-base",
            defaults_from=defaults_from,
        )
    except ConfigError as e:
        assert str(e).startswith(("acme", "tls_"))
    else:
        assert isinstance(config, AcmeConfig)
        config.http01_endpoints()
        config.certificate_specs()


def test_external_certificates_needs_both_paths() -> None:
    with pytest.raises(ConfigError) as e:
        parse_acme_config({"domain": "a.example.com", "external_certificates": True})
    assert str(e.value).startswith("acme.external_certificates: true needs tls_certificate_path")
    config = parse_acme_config(
        {
            "domain": "a.example.com",
            "external_certificates": True,
            "tls_certificate_path": "/etc/letsencrypt/live/a/fullchain.pem",
            "tls_private_key_path": "/etc/letsencrypt/live/a/privkey.pem",
            "watch_interval": "2s",
        }
    )
    assert config.external_certificates and config.watch_interval == 2.0


def test_max_requests_per_minute_must_be_positive() -> None:
    with pytest.raises(ConfigError) as e:
        parse_acme_config({"domain": "a.example.com", "max_requests_per_minute": 0})
    assert str(e.value) == (
        "acme.max_requests_per_minute: expected a whole number of requests per minute above 0"
        ", got 0"
    )


def test_challenges_top_level_and_per_certificate() -> None:
    config = parse_acme_config(
        {
            "domain": "example.org",
            "challenges": ["TLS-ALPN-01", "http-01", "tls-alpn-01"],
            "certificates": [
                {"domains": ["a.example.org"], "challenges": "http-01"},
                {"domains": ["b.example.org"]},
            ],
        }
    )
    assert config.challenges == ("tls-alpn-01", "http-01")
    assert [s.challenges for s in config.certificate_specs()] == [None, ("http-01",), None]
    assert parse_acme_config({"domain": "example.org"}).challenges is None


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            {"challenges": ["http01"]},
            "acme.challenges[0]: unknown challenge type (did you mean 'http-01'?); challenge "
            "types, preferred first: dns-01, http-01, tls-alpn-01, got 'http01'",
        ),
        ({"challenges": []}, "acme.challenges: expected at least one of the challenge types"),
        (
            {"certificates": [{"domains": ["a.b"], "challenges": ["tls-sni-01"]}]},
            "acme.certificates[0].challenges[0]: unknown challenge type",
        ),
    ],
)
def test_bad_challenges_name_the_key(block: Any, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_acme_config({"domain": "example.org", **block})
    assert str(e.value).startswith(message)


# -- several CAs (issuers) -------------------------------------------------------------------


def test_without_issuers_the_one_ca_is_the_top_level_keys(tmp_path: pathlib.Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text(_ca_pem())
    config = parse_acme_config(
        {"url": "https://ca.example/dir", "ca_bundle": str(bundle), "profile": "p"},
        path="modules[0].config",
    )
    [ca] = config.issuer_list()
    assert (ca.url, ca.ca_bundle, ca.profile, ca.eab) == (config.url, str(bundle), "p", None)
    assert ca.key("eab") == "modules[0].config.eab"


def test_issuers_in_order_each_with_its_own_settings(tmp_path: pathlib.Path) -> None:
    (tmp_path / "roots.pem").write_text(_ca_pem())
    config = parse_acme_config(
        {
            "issuers": [
                {"url": "https://a.example/dir", "profile": "tlsserver"},
                {
                    "url": "http://127.0.0.1:14000/dir",
                    "testing_allow_http": True,
                    "ca_bundle": "roots.pem",
                    "issuer_roots": "roots.pem",
                    "eab": {"kid": "k", "hmac_key": HMAC},
                },
            ]
        },
        base_dir=str(tmp_path),
    )
    first, second = config.issuer_list()
    assert (first.url, first.profile, first.eab, first.ca_bundle) == (
        "https://a.example/dir",
        "tlsserver",
        None,
        None,
    )
    assert second.ca_bundle == second.issuer_roots == str(tmp_path / "roots.pem")
    assert second.eab == EabConfig(kid="k", hmac_key=HMAC)
    assert second.key("eab") == "acme.issuers[1].eab"
    # The top-level keys mirror the first CA: what a dry run and the account record call "the CA".
    assert (config.url, config.profile) == ("https://a.example/dir", "tlsserver")


@pytest.mark.parametrize(
    ("issuers", "expected"),
    [
        ([], "acme.issuers: expected at least one CA"),
        ("https://a.example/dir", "acme.issuers: expected a list"),
        ([{"profile": "x"}], "acme.issuers[0].url: missing"),
        ([{"url": "https://a.example/dir"}, {"url": 3}], "acme.issuers[1].url: expected"),
        ([{"url": "https://a.example/dir", "urls": 1}], "acme.issuers[0].urls: unknown key"),
        ([{"url": "http://a.example/dir"}], "acme.issuers[0].url: expected an https:// URL"),
        (
            [{"url": "https://a.example/dir"}, {"url": "https://a.example/dir"}],
            "acme.issuers[1].url: the same CA as an earlier item",
        ),
        (
            [{"url": "https://a.example/dir", "eab": {"kid": "k", "hmac_key": "!!"}}],
            "acme.issuers[0].eab.hmac_key: expected base64url",
        ),
        ([{"url": "https://a.example/dir", "ca_bundle": "/nonexistent.pem"}], "ca_bundle"),
        (["https://a.example/dir"], "acme.issuers[0]: expected a mapping"),
    ],
)
def test_bad_issuers_name_the_item_and_key(issuers: Any, expected: str) -> None:
    text = _error({"issuers": issuers})
    assert text.startswith(expected) or f"acme.issuers[0].{expected}" in text, text
    assert HMAC not in text and "!!" not in text


@pytest.mark.parametrize("key", ["url", "staging", "ca_bundle", "issuer_roots", "eab", "profile"])
def test_issuers_and_a_top_level_ca_key_is_an_error(key: str, tmp_path: pathlib.Path) -> None:
    (tmp_path / "ca.pem").write_text(_ca_pem())
    value = {
        "url": "https://b.example/dir",
        "staging": True,
        "ca_bundle": str(tmp_path / "ca.pem"),
        "issuer_roots": str(tmp_path / "ca.pem"),
        "eab": {"kid": "k", "hmac_key": HMAC},
        "profile": "p",
    }[key]
    text = _error({"issuers": [{"url": "https://a.example/dir"}], key: value})
    assert text.startswith("acme.issuers: issuers replaces the top-level"), text
    assert f"{key} is set too" in text and HMAC not in text


def test_top_level_testing_allow_http_covers_the_issuers() -> None:
    config = parse_acme_config(
        {"testing_allow_http": True, "issuers": [{"url": "http://127.0.0.1:1/dir"}]}
    )
    assert config.issuer_list()[0].url == "http://127.0.0.1:1/dir"
