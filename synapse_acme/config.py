"""The ``acme:`` configuration block, parsed into one frozen :class:`AcmeConfig`.

Synapse's old ``acme:`` keys keep their meaning, so an old homeserver.yaml block still reads.
Every problem raises :class:`~synapse_acme.errors.ConfigError` naming the full key path and the
bad value (never an EAB HMAC key), because an operator fixes a config file by key, not by traceback.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import importlib.resources
import ipaddress
import logging
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import yaml
from cryptography import x509
from twisted.internet.endpoints import quoteStringArgument

from synapse_acme import fsutil
from synapse_acme.alerts import DEFAULT_EXPIRY_DAYS
from synapse_acme.crypto import KEY_TYPES
from synapse_acme.dns01 import (
    DEFAULT_PROPAGATION_TIMEOUT,
    DEFAULT_TTL,
    TSIG_ALGORITHMS,
    Dns01Settings,
)
from synapse_acme.errors import ConfigError, StoreError
from synapse_acme.limits import ConnectionLimits
from synapse_acme.model import CertificateSpec
from synapse_acme.names import canonical_name
from synapse_acme.policy import DEFAULT_REQUEST_TIMEOUT, MAX_REQUESTS_PER_MINUTE
from synapse_acme.preflight import DEFAULT_TIMEOUT as DEFAULT_PREFLIGHT_TIMEOUT
from synapse_acme.yamlload import MAX_BYTES, YamlBoundsError, safe_load_bounded

logger = logging.getLogger(__name__)

LETSENCRYPT_URL = "https://acme-v02.api.letsencrypt.org/directory"
LETSENCRYPT_STAGING_URL = "https://acme-staging-v02.api.letsencrypt.org/directory"
# Let's Encrypt switched ACME v1 off in 2021; Synapse's old default pointed there.
_V1_HOSTS = {
    "acme-v01.api.letsencrypt.org": LETSENCRYPT_URL,
    "acme-staging.api.letsencrypt.org": LETSENCRYPT_STAGING_URL,
}

#: The class path of the Synapse module, as written under ``modules:`` in homeserver.yaml.
MODULE_NAME = "synapse_acme.synapse.AcmeModule"

# certmagic checks every 10 minutes; mod_md every 12 hours. Frequent checks cost nothing
# when nothing is due, and catch revocations/ARI changes early.
DEFAULT_CHECK_INTERVAL = 600.0
DEFAULT_CHECK_JITTER = 0.1
# Polling when the CA sends no Retry-After (Pebble never does): short, since it is cheap.
DEFAULT_POLL_INTERVAL = 0.5
# Externally managed files (certbot): one stat per file per check; certbot renews at most daily.
DEFAULT_WATCH_INTERVAL = 5.0
DEFAULT_POLL_TIMEOUT = 300.0
DEFAULT_REPROVISION_THRESHOLD = 30  # days; Synapse's old default, now only an upper bound

# Obvious spellings people bring from certbot/lego; anything else must be a KEY_TYPES name.
_KEY_TYPE_ALIASES = {
    "ec256": "ecdsa-p256",
    "p256": "ecdsa-p256",
    "ecdsa": "ecdsa-p256",
    "ec384": "ecdsa-p384",
    "p384": "ecdsa-p384",
    "rsa": "rsa-2048",
    "rsa2048": "rsa-2048",
    "rsa3072": "rsa-3072",
    "rsa4096": "rsa-4096",
}

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_EMAIL_LOCAL = re.compile(r"^[A-Za-z0-9!#$'*+/=^_`{|}~.-]+$")
_B64URL = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")
_ENDPOINT_TYPE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_HTTP01_ENDPOINT_TYPES = ("tcp", "tcp6", "ssl", "unix", "systemd")
# The runner wraps tls_listen endpoints in TLS itself, so "ssl:" (which needs files) is refused.
_TLS_ENDPOINT_TYPES = ("tcp", "tcp6", "unix", "systemd")
# Prometheus scrapes plain HTTP here (put TLS in front with a proxy if it must cross a network).
_METRICS_ENDPOINT_TYPES = ("tcp", "tcp6", "unix", "systemd")
_CA_BUNDLE_MAX_BYTES = 10 * 1024 * 1024
#: The challenge types ``challenges`` may name (the runtime decides which this setup answers).
CHALLENGE_TYPES = ("dns-01", "http-01", "tls-alpn-01")
# A CA's validator sends its request within milliseconds; minutes only help a slow-loris.
_MAX_LISTENER_TIMEOUT = 300.0


@attrs.frozen
class EabConfig:
    """External Account Binding credentials (RFC 8555 §7.3.4), as the CA hands them out."""

    kid: str
    hmac_key: str = attrs.field(repr=False)  # base64url text; never printed

    def hmac_key_bytes(self) -> bytes:
        """The decoded MAC key (the config parser already checked it decodes)."""
        return _b64url_decode(self.hmac_key)


@attrs.frozen
class IssuerConfig:
    """One CA: an item of ``acme.issuers``, or the one CA of the top-level ``url``,
    ``ca_bundle``, ``issuer_roots``, ``eab`` and ``profile`` when ``issuers`` is absent.
    ``path`` is where its keys are written (``acme`` or ``acme.issuers[1]``), for messages."""

    url: str
    ca_bundle: str | None = None
    issuer_roots: str | None = None
    eab: EabConfig | None = None
    profile: str | None = None
    path: str = attrs.field(default="acme", eq=False)

    def key(self, name: str) -> str:
        """The full key path of this CA's setting ``name`` (``acme.issuers[1].eab``)."""
        return f"{self.path}.{name}"


# ---------------------------------------------------------------------------------------------
# value readers: each takes the value and its full key path, returns the clean value or raises


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, "expected true or false", value)
    return value


def _int(value: Any, path: str, low: int, high: int | None, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(path, f"expected {what}", value)
    if high is not None and value > high:
        raise ConfigError(path, f"expected {what}", value)
    return value


def _duration(value: Any, path: str, *, allow_zero: bool = False) -> float:
    """Seconds as a number, or text like ``'10m'`` (Synapse's duration style)."""
    what = "expected a duration: seconds as a number, or text like '90s', '10m', '1h'"
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(path, what, value)
    if seconds == 0 and not allow_zero:
        raise ConfigError(path, what + " (greater than zero)", value)
    return seconds


def _str(value: Any, path: str, what: str = "a non-empty string") -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, f"expected {what}", value)
    return value.strip()


def _list(value: Any, path: str, what: str, *, allow_single: bool = False) -> list[Any]:
    if allow_single and isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(path, f"expected a list of {what}", value)
    return list(value)


def _name(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, "expected a DNS name", value)
    try:
        return canonical_name(value)
    except ValueError as e:
        raise ConfigError(path, f"expected a DNS name ({e})", value) from None


def _names(value: Any, path: str) -> list[str]:
    """A list of DNS names; one name may be written as a plain string (a one-element list,
    never split into characters), and is then named by ``path`` itself in errors."""
    if isinstance(value, str):
        try:
            return [_name(value, path)]
        except ConfigError as e:
            if not any(c in value.strip() for c in ", ;"):
                raise
            hint = "several names are a YAML list, like [a.example.com, b.example.com]"
            raise ConfigError(path, f"{e.message}; {hint}", value) from None
    return [_name(v, f"{path}[{i}]") for i, v in enumerate(_list(value, path, "DNS names"))]


def _dedupe(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def _key_type(value: Any, path: str) -> str:
    what = "a key type: " + ", ".join(KEY_TYPES)
    if not isinstance(value, str):
        raise ConfigError(path, f"expected {what}", value)
    text = value.strip().lower()
    text = _KEY_TYPE_ALIASES.get(text.replace("-", "").replace("_", ""), text)
    if text not in KEY_TYPES:
        raise ConfigError(path, f"expected {what}", value)
    return text


def _url(value: Any, path: str) -> str:
    text = _str(value, path, "an http(s) URL of an ACME v2 directory")
    try:
        parts = urllib.parse.urlsplit(text)
        host = (parts.hostname or "").lower()
    except ValueError:
        raise ConfigError(path, "expected an http(s) URL of an ACME v2 directory", value) from None
    if host in _V1_HOSTS:
        raise ConfigError(
            path,
            "this is an ACME v1 directory, and Let's Encrypt switched ACME v1 off in 2021; "
            f"use {_V1_HOSTS[host]}",
            value,
        )
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigError(path, "expected an http(s) URL of an ACME v2 directory", value)
    return text


def _address(value: Any, path: str) -> str:
    what = "an IP address to bind to, like '::' or '0.0.0.0'"
    if not isinstance(value, str):
        raise ConfigError(path, f"expected {what}", value)
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ConfigError(path, f"expected {what}", value) from None


def _split_endpoint(text: str) -> list[str]:
    """Split on unescaped colons, as Twisted's endpoint parser does (``\\:`` is a literal colon)."""
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _endpoint(value: Any, path: str, allowed: tuple[str, ...]) -> str:
    """A Twisted server endpoint string; checks the type and, for TCP, the port.

    Not parsed with ``serverFromString`` here: ``systemd:`` endpoints only resolve inside the
    socket-activated process, and parsing needs a reactor.
    """
    what = "a Twisted server endpoint string like 'tcp:8009:interface=127.0.0.1' (types: "
    what += ", ".join(allowed) + ")"
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, f"expected {what}", value)
    text = value.strip()
    parts = _split_endpoint(text)
    kind = parts[0]
    if len(parts) < 2 or not _ENDPOINT_TYPE.match(kind) or kind not in allowed:
        raise ConfigError(path, f"expected {what}", value)
    args = parts[1:]
    if kind in ("tcp", "tcp6", "ssl"):
        keywords = dict(a.split("=", 1) for a in args if "=" in a)
        positional = [a for a in args if "=" not in a]
        port_text = keywords.get("port", positional[0] if positional else None)
        if port_text is None or not port_text.isdigit() or int(port_text) > 65535:
            raise ConfigError(path, f"expected {what}, with a port 0-65535", value)
    elif kind == "unix":
        address = next((a for a in args if "=" not in a), None) or dict(
            a.split("=", 1) for a in args if "=" in a
        ).get("address")
        if not address:
            raise ConfigError(path, f"expected {what}, with a socket path", value)
    elif kind == "systemd":
        keywords = dict(a.split("=", 1) for a in args if "=" in a)
        # Exactly one of index= (position in LISTEN_FDS) or name= (FileDescriptorName=).
        by_index = keywords.get("index", "").isdigit() and "name" not in keywords
        by_name = bool(keywords.get("name")) and "index" not in keywords
        if not (by_index or by_name) or not keywords.get("domain"):
            raise ConfigError(
                path,
                f"expected {what}, like 'systemd:domain=INET:index=0' or "
                "'systemd:domain=INET6:name=synapse-acme-http'",
                value,
            )
    return text


def _endpoints(value: Any, path: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    items = _list(value, path, "Twisted endpoint strings", allow_single=True)
    return tuple(_endpoint(v, f"{path}[{i}]", allowed) for i, v in enumerate(items))


def _contact(value: Any, path: str) -> str:
    what = "an email address or a mailto: URI (one address each)"
    if not isinstance(value, str):
        raise ConfigError(path, f"expected {what}", value)
    text = value.strip()
    if text.lower().startswith("mailto:"):
        text = text[len("mailto:") :]
    local, at, domain = text.rpartition("@")
    if not at or not _EMAIL_LOCAL.match(local) or ".." in local:
        raise ConfigError(path, f"expected {what}", value)
    try:
        domain = canonical_name(domain)
    except ValueError:
        raise ConfigError(path, f"expected {what}", value) from None
    if domain.startswith("*.") or "." not in domain:
        raise ConfigError(path, f"expected {what}", value)
    return f"mailto:{local}@{domain}"


def _file_path(value: Any, path: str, base_dir: str | None) -> str:
    text = _str(value, path, "a file path")
    if "\0" in text:
        raise ConfigError(path, "expected a file path", value)
    text = os.path.expanduser(text)
    if base_dir is not None and not os.path.isabs(text):
        text = os.path.normpath(os.path.join(base_dir, text))
    return text


def _certificates_file(value: Any, path: str, base_dir: str | None) -> str:
    file_path = _file_path(value, path, base_dir)
    what = "expected a PEM file of CA certificates"
    try:
        data = fsutil.read_regular(file_path, follow=True, limit=_CA_BUNDLE_MAX_BYTES)
    except StoreError as e:  # the real reason: EACCES (and where), a directory, a FIFO...
        raise ConfigError(path, f"{what}: {e}{fsutil.access_hint(file_path)}", value) from None
    if data is None:
        raise ConfigError(path, f"{what} that exists", value)
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(
            path, "expected a PEM file with at least one certificate", value
        ) from None
    return file_path


def _connection_limits(value: Any, path: str) -> ConnectionLimits:
    what = "a mapping of max_connections, max_per_address, handshake_timeout, header_timeout"
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected {what}", value)
    fields = ("max_connections", "max_per_address", "handshake_timeout", "header_timeout")
    _check_keys(value, path, fields)
    given = {k: v for k, v in value.items() if v is not None}
    out: dict[str, Any] = {}
    for key in ("max_connections", "max_per_address"):
        if key in given:
            out[key] = _int(given[key], f"{path}.{key}", 1, 1_000_000, "a whole number above 0")
    for key in ("handshake_timeout", "header_timeout"):
        if key in given:
            seconds = _duration(given[key], f"{path}.{key}")
            if seconds > _MAX_LISTENER_TIMEOUT:
                raise ConfigError(
                    f"{path}.{key}",
                    f"expected at most {_MAX_LISTENER_TIMEOUT:g} s (a slow peer holds a "
                    "connection this long)",
                    given[key],
                )
            out[key] = seconds
    limits = ConnectionLimits(**out)
    if limits.max_per_address > limits.max_connections:
        raise ConfigError(
            f"{path}.max_per_address",
            f"expected at most max_connections ({limits.max_connections})",
            limits.max_per_address,
        )
    return limits


@attrs.frozen
class PreflightConfig:
    """``preflight:``: probe each name as the CA would before every order (see
    :mod:`synapse_acme.preflight`). ``resolver`` None is the system's resolver, else a DNS
    server ``(host, port)`` asked directly."""

    enabled: bool = True
    port: int = 80
    timeout: float = DEFAULT_PREFLIGHT_TIMEOUT
    resolver: tuple[str, int] | None = None


def _dns_server(value: Any, path: str) -> tuple[str, int] | None:
    what = "'system', or a DNS server as an IP address with an optional port ('192.0.2.53:53')"
    text = _str(value, path, what)
    if text == "system":
        return None
    host, port_text = text, "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else port_text
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        raise ConfigError(path, f"expected {what}", value) from None
    if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ConfigError(path, f"expected {what}", value)
    return address, int(port_text)


def _switchable(value: Any, path: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """A sub-block with an ``enabled`` key, which may also be written as just true or false
    (``preflight: false`` reads naturally): its keys that have a value, ``enabled`` read."""
    if isinstance(value, bool):
        return {"enabled": value}
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected a mapping of {', '.join(keys)} (or true/false)", value)
    _check_keys(value, path, keys)
    given = {k: v for k, v in value.items() if v is not None}
    if "enabled" in given:
        given["enabled"] = _bool(given["enabled"], f"{path}.enabled")
    return given


def _preflight(value: Any, path: str) -> PreflightConfig:
    given = _switchable(value, path, ("enabled", "port", "timeout", "resolver"))
    out: dict[str, Any] = {k: given[k] for k in ("enabled",) if k in given}
    if "port" in given:
        out["port"] = _int(given["port"], f"{path}.port", 1, 65535, "an integer 1-65535")
    if "timeout" in given:
        seconds = _duration(given["timeout"], f"{path}.timeout")
        if seconds > _MAX_LISTENER_TIMEOUT:
            raise ConfigError(
                f"{path}.timeout", f"expected at most {_MAX_LISTENER_TIMEOUT:g} s", given["timeout"]
            )
        out["timeout"] = seconds
    if "resolver" in given:
        out["resolver"] = _dns_server(given["resolver"], f"{path}.resolver")
    return PreflightConfig(**out)


@attrs.frozen
class AlertsConfig:
    """``alerts:``: tell the operator when renewal fails (see :mod:`synapse_acme.alerts`)."""

    enabled: bool = True
    expiry_days: int = DEFAULT_EXPIRY_DAYS


def _alerts(value: Any, path: str) -> AlertsConfig:
    given = _switchable(value, path, ("enabled", "expiry_days"))
    out: dict[str, Any] = {k: given[k] for k in ("enabled",) if k in given}
    if "expiry_days" in given:
        out["expiry_days"] = _days(given["expiry_days"], f"{path}.expiry_days")
    return AlertsConfig(**out)


#: Keys of ``database:``.
_DATABASE_KEYS = ("url", "args", "key_files", "connect_timeout", "lease")
#: libpq connection keywords (``args:``): lower-case words, as psycopg2 and Synapse take them.
_DB_KEYWORD = re.compile(r"[a-z][a-z_]{0,63}")
#: ``args`` keys of Synapse's ``database.args`` that are the pool's, not libpq's: ignored.
_POOL_ARGS = ("cp_min", "cp_max", "cp_reconnect", "cp_noisy")
DEFAULT_DB_CONNECT_TIMEOUT = 10.0
DEFAULT_DB_LEASE = 60.0
#: The shortest lease: it is renewed every third, and a renewal is a database round trip.
MIN_DB_LEASE = 6.0


@attrs.frozen
class DatabaseConfig:
    """``database:``: the PostgreSQL store shared by every process (:mod:`synapse_acme.pgstore`).

    ``dsn`` is a libpq connection string or URI and may hold a password: it is never logged or
    shown (``where`` names the database without credentials). ``key_files``: the keys sealing
    private keys at rest, the first sealing, all opening. ``connect_timeout``: the bound of each
    connection attempt (the start-up one included). ``lease``: how long the issuance lock of a
    process that died blocks the others.
    """

    dsn: str = attrs.field(repr=False)
    where: str
    key_files: tuple[str, ...]
    connect_timeout: float = DEFAULT_DB_CONNECT_TIMEOUT
    lease: float = DEFAULT_DB_LEASE


def _database_url(value: Any, path: str) -> tuple[str, str]:
    """``(dsn, where)`` from a ``postgresql://`` URI; a value holding a password is never
    echoed in an error."""
    what = "expected a URI postgresql://USER@HOST[:PORT]/DATABASE"
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, what, value if not isinstance(value, str) else None)
    text = value.strip()
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError:
        parts, port = None, None
    secret = parts is not None and parts.password is not None
    shown: Any = _without_password(text) if secret else text
    if parts is None:
        raise ConfigError(path, what, has_value=False)  # unparsed: it may hold a password
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(path, what, shown)
    if not parts.path.strip("/") or any(c in text for c in "\0\n\r"):
        raise ConfigError(path, what + " (with a database name)", shown)
    where = f"{parts.hostname or 'localhost'}{f':{port}' if port else ''}{parts.path}"
    return text, where


def _without_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rpartition("@")
    userinfo = netloc[0].partition(":")[0] + ":***"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{userinfo}@{netloc[2]}"))


def _database_args(value: Any, path: str) -> tuple[str, str]:
    """``(dsn, where)`` from libpq keywords in the style of Synapse's ``database.args``
    (``user``, ``password``, ``database`` or ``dbname``, ``host``, ``port``, ``sslmode``, ...);
    a password is never echoed."""
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(
            path,
            "expected a mapping of connection keywords (user, password, database, host, ...)",
            has_value=False,
        )
    words: dict[str, str] = {}
    for key, item in value.items():
        where = f"{path}.{key}"
        if not isinstance(key, str) or not _DB_KEYWORD.fullmatch(key):
            raise ConfigError(where, "expected a libpq connection keyword", has_value=False)
        if key in _POOL_ARGS:
            continue
        secret = key in ("password", "passfile")
        if isinstance(item, bool) or not isinstance(item, (str, int)) or str(item) == "":
            raise ConfigError(where, "expected a string or a number", item, has_value=not secret)
        if "\0" in str(item):
            raise ConfigError(where, "expected text without NUL", has_value=False)
        words["dbname" if key == "database" else key] = str(item)
    if "dbname" not in words:
        raise ConfigError(f"{path}.database", "missing: the database to use", has_value=False)
    dsn = " ".join(f"{k}='{_libpq_quote(v)}'" for k, v in words.items())
    host = words.get("host", "localhost")
    port = f":{words['port']}" if "port" in words else ""
    return dsn, f"{host}{port}/{words['dbname']}"


def _libpq_quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _database(value: Any, path: str, ctx: _Context) -> DatabaseConfig:
    what = "a mapping of url (or args), key_files, connect_timeout, lease"
    if not isinstance(value, Mapping):
        # Never echoed: it may be a URL with a password.
        raise ConfigError(path, f"expected {what}, got {_type_name(value)}", has_value=False)
    _check_keys(value, path, _DATABASE_KEYS)
    given = {k: v for k, v in value.items() if v is not None}
    if ("url" in given) == ("args" in given):
        raise ConfigError(
            path, "expected one of url and args (how to reach the database)", has_value=False
        )
    if "url" in given:
        dsn, where = _database_url(given["url"], f"{path}.url")
    else:
        dsn, where = _database_args(given["args"], f"{path}.args")
    if "key_files" not in given:
        raise ConfigError(
            f"{path}.key_files",
            "missing: private keys are stored encrypted with a key from a file; make one with "
            "`head -c 32 /dev/urandom | base64 > FILE` (mode 0600) and list it here",
            has_value=False,
        )
    files = _list(given["key_files"], f"{path}.key_files", "key files", allow_single=True)
    if not files:
        raise ConfigError(f"{path}.key_files", "expected at least one key file", [])
    key_files = tuple(
        _file_path(f, f"{path}.key_files[{i}]", ctx.base_dir) for i, f in enumerate(files)
    )
    out = DatabaseConfig(dsn=dsn, where=where, key_files=key_files)
    if "connect_timeout" in given:
        out = attrs.evolve(
            out, connect_timeout=_duration(given["connect_timeout"], f"{path}.connect_timeout")
        )
    if "lease" in given:
        lease = _duration(given["lease"], f"{path}.lease")
        if lease < MIN_DB_LEASE:
            raise ConfigError(
                f"{path}.lease", f"expected at least {MIN_DB_LEASE:g} s", given["lease"]
            )
        out = attrs.evolve(out, lease=lease)
    return out


def _webhook_url(value: Any, path: str) -> str:
    # Never echoed: a webhook URL often carries its token in the path or the query.
    what = "an http(s) URL (the value is not shown: it may hold a token)"
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, f"expected {what}", has_value=False)
    text = value.strip()
    try:
        parts = urllib.parse.urlsplit(text)
        host = parts.hostname
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        raise ConfigError(path, f"expected {what}", has_value=False) from None
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigError(path, f"expected {what}", has_value=False)
    return text


def _room_id(value: Any, path: str) -> str:
    what = "a Matrix room ID like '!abcdef:example.org' (not an alias)"
    text = _str(value, path, what)
    if not text.startswith("!") or len(text) < 2 or any(c.isspace() for c in text):
        raise ConfigError(path, f"expected {what}", value)
    return text


def _user_id(value: Any, path: str) -> str:
    what = "a Matrix user ID like '@acme-alerts:example.org'"
    text = _str(value, path, what)
    local, sep, server = text[1:].partition(":")
    if not text.startswith("@") or not sep or not local or not server:
        raise ConfigError(path, f"expected {what}", value)
    if any(c.isspace() for c in text):
        raise ConfigError(path, f"expected {what}", value)
    return text


_DNS01_KEYS = (
    "server",
    "zone",
    "tsig_key_name",
    "tsig_algorithm",
    "tsig_secret_file",
    "ttl",
    "propagation_timeout",
    "propagation_servers",
)
# tsig-keygen's output: key "NAME" { algorithm ALG; secret "BASE64"; };
_TSIG_KEY_CLAUSE = re.compile(r'key\s+"?([^"\s{]+)"?\s*\{(.*?)\}\s*;', re.S)
_TSIG_ALGORITHM = re.compile(r"algorithm\s+\"?([A-Za-z0-9-]+)\"?\s*;")
_TSIG_SECRET = re.compile(r'secret\s+"([^"]+)"\s*;')
_TSIG_FILE_MAX_BYTES = 64 * 1024


def _tsig_secret_file(
    file_path: str, path: str, value: Any
) -> tuple[bytes, str | None, str | None]:
    """``(secret, key name, algorithm)`` from a TSIG secret file: either the base64 secret
    alone, or a BIND ``key`` clause as ``tsig-keygen`` writes it (which also names the key and
    its algorithm). The file's content is never echoed in an error."""
    what = (
        "expected a file holding a TSIG secret (base64) or a BIND key clause as written by "
        "tsig-keygen"
    )
    try:
        data = fsutil.read_regular(file_path, follow=True, limit=_TSIG_FILE_MAX_BYTES)
    except StoreError as e:
        raise ConfigError(path, f"{what}: {e}{fsutil.access_hint(file_path)}", value) from None
    if data is None:
        raise ConfigError(path, f"{what}, that exists", value)
    text = data.decode("utf-8", "replace")
    name = algorithm = None
    clause = _TSIG_KEY_CLAUSE.search(text)
    if clause is not None:
        name = clause.group(1)
        found_algorithm = _TSIG_ALGORITHM.search(clause.group(2))
        found_secret = _TSIG_SECRET.search(clause.group(2))
        if found_secret is None:
            raise ConfigError(path, f"{what} (its key clause has no secret)", value)
        algorithm = found_algorithm.group(1).lower() if found_algorithm else None
        secret_text = found_secret.group(1)
    else:
        secret_text = text.strip()
    try:
        secret = base64.b64decode("".join(secret_text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(path, f"{what} (the secret is not base64)", value) from None
    if not secret:
        raise ConfigError(path, f"{what} (the secret is empty)", value)
    return secret, name, algorithm


def _dns01(value: Any, path: str, ctx: _Context) -> Dns01Settings:
    what = "a mapping of server, zone, tsig_key_name, tsig_algorithm, tsig_secret_file, ..."
    if not isinstance(value, Mapping):
        # Never echoed: a secret pasted in the wrong place must not reach a log.
        raise ConfigError(path, f"expected {what}, got {_type_name(value)}", has_value=False)
    _check_keys(value, path, _DNS01_KEYS)
    given = {k: v for k, v in value.items() if v is not None}
    for required in ("server", "zone", "tsig_secret_file"):
        if required not in given:
            raise ConfigError(f"{path}.{required}", "missing", None, has_value=False)
    server = _dns_server(given["server"], f"{path}.server")
    if server is None:
        raise ConfigError(
            f"{path}.server", "expected the IP address of the zone's primary", "system"
        )
    zone = _name(given["zone"], f"{path}.zone")
    if zone.startswith("*."):
        raise ConfigError(f"{path}.zone", "expected a zone name, not a wildcard", given["zone"])
    secret_file = _file_path(given["tsig_secret_file"], f"{path}.tsig_secret_file", ctx.base_dir)
    secret, file_key_name, file_algorithm = _tsig_secret_file(
        secret_file, f"{path}.tsig_secret_file", given["tsig_secret_file"]
    )
    key_name = file_key_name
    if "tsig_key_name" in given:
        key_name = _name(given["tsig_key_name"], f"{path}.tsig_key_name")
        if file_key_name is not None and canonical_name(file_key_name) != key_name:
            raise ConfigError(
                f"{path}.tsig_key_name",
                f"differs from the key named in tsig_secret_file ({file_key_name})",
                given["tsig_key_name"],
            )
    if key_name is None:
        raise ConfigError(
            f"{path}.tsig_key_name",
            "missing (tsig_secret_file holds a bare secret, so the key's name must be given)",
            None,
            has_value=False,
        )
    algorithm = file_algorithm or "hmac-sha256"
    if "tsig_algorithm" in given:
        algorithm = _str(given["tsig_algorithm"], f"{path}.tsig_algorithm").lower()
        if file_algorithm is not None and file_algorithm != algorithm:
            raise ConfigError(
                f"{path}.tsig_algorithm",
                f"differs from the algorithm in tsig_secret_file ({file_algorithm})",
                given["tsig_algorithm"],
            )
    if algorithm not in TSIG_ALGORITHMS:
        where = "tsig_algorithm" if "tsig_algorithm" in given else "tsig_secret_file"
        raise ConfigError(
            f"{path}.{where}",
            f"expected a TSIG algorithm: {', '.join(TSIG_ALGORITHMS)}",
            algorithm,
        )
    out: dict[str, Any] = {}
    if "ttl" in given:
        out["ttl"] = _int(given["ttl"], f"{path}.ttl", 1, 86400, "seconds, 1-86400")
    if "propagation_timeout" in given:
        out["propagation_timeout"] = _duration(
            given["propagation_timeout"], f"{path}.propagation_timeout"
        )
    if "propagation_servers" in given and given["propagation_servers"] != "auto":
        items = _list(
            given["propagation_servers"],
            f"{path}.propagation_servers",
            "DNS servers as IP[:PORT] (or 'auto')",
            allow_single=True,
        )
        found = []
        for i, item in enumerate(items):
            item_path = f"{path}.propagation_servers[{i}]"
            address = _dns_server(item, item_path)
            if address is None:
                raise ConfigError(item_path, "expected IP[:PORT], not 'system'", item)
            found.append(address)
        if not found:
            raise ConfigError(f"{path}.propagation_servers", "expected at least one", [])
        out["propagation_servers"] = tuple(found)
    return Dns01Settings(
        server=server,
        zone=zone,
        tsig_key_name=key_name,
        tsig_algorithm=algorithm,
        tsig_secret=secret,
        tsig_secret_file=secret_file,
        config_path=path,
        **out,
    )


def _b64url_decode(text: str) -> bytes:
    stripped = text.rstrip("=")
    return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))


def _eab(value: Any, path: str) -> EabConfig:
    # Never echo anything under eab: a misplaced HMAC key must not reach a log.
    if not isinstance(value, Mapping):
        raise ConfigError(
            path,
            f"expected a mapping with kid and hmac_key, got {_type_name(value)}",
            has_value=False,
        )
    _check_keys(value, path, ("kid", "hmac_key"))
    for required in ("kid", "hmac_key"):
        if required not in value:
            raise ConfigError(
                f"{path}.{required}",
                "missing (the CA gives kid and hmac_key)",
                None,
                has_value=False,
            )
    kid = _str(value["kid"], f"{path}.kid", "the key identifier text the CA gave")
    raw = value["hmac_key"]
    bad = "expected base64url text (RFC 4648 §5) as the CA gave it"
    if not isinstance(raw, str) or not _B64URL.match(raw.strip()):
        raise ConfigError(f"{path}.hmac_key", bad, has_value=False)
    try:
        decoded = _b64url_decode(raw.strip())
    except (binascii.Error, ValueError):
        raise ConfigError(f"{path}.hmac_key", bad, has_value=False) from None
    if not decoded:
        raise ConfigError(f"{path}.hmac_key", bad + " (it decodes to nothing)", has_value=False)
    return EabConfig(kid=kid, hmac_key=raw.strip())


def _optional(
    item: Mapping[Any, Any], at: str, key: str, read: Callable[..., Any], *args: Any
) -> Any:
    """``read(item[key], '<at>.<key>', *args)``, or None when the key is absent or null."""
    return read(item[key], f"{at}.{key}", *args) if item.get(key) is not None else None


_ISSUER_KEYS = ("url", "ca_bundle", "issuer_roots", "eab", "profile", "testing_allow_http")
#: The top-level keys that describe the one CA; ``issuers`` replaces them.
_ONE_CA_KEYS = ("url", "staging", "ca_bundle", "issuer_roots", "eab", "profile")


def _issuers(
    value: Any, path: str, base_dir: str | None, allow_http: bool
) -> tuple[IssuerConfig, ...]:
    items = _list(value, path, "a list of mappings, each with the url of a CA")
    if not items:
        raise ConfigError(path, "expected at least one CA (each a mapping with url)", value)
    out: list[IssuerConfig] = []
    for i, item in enumerate(items):
        at = f"{path}[{i}]"
        if not isinstance(item, Mapping):
            # Not echoed: it may hold an eab block.
            raise ConfigError(
                at,
                f"expected a mapping with url (and ca_bundle, eab, ...), got {_type_name(item)}",
                has_value=False,
            )
        _check_keys(item, at, _ISSUER_KEYS)
        if item.get("url") is None:
            raise ConfigError(f"{at}.url", "missing: the CA's ACME directory URL", None)
        url = _url(item["url"], f"{at}.url")
        http_ok = allow_http or (
            item.get("testing_allow_http") is not None
            and _bool(item["testing_allow_http"], f"{at}.testing_allow_http")
        )
        if url.lower().startswith("http:") and not http_ok:
            raise ConfigError(
                f"{at}.url",
                "expected an https:// URL: over plain http anyone on the path could answer in "
                "the CA's name (a local test CA may be allowed with testing_allow_http: true)",
                item["url"],
            )
        if any(known.url == url for known in out):
            raise ConfigError(f"{at}.url", "the same CA as an earlier item; list each CA once", url)

        out.append(
            IssuerConfig(
                url=url,
                ca_bundle=_optional(item, at, "ca_bundle", _certificates_file, base_dir),
                issuer_roots=_optional(item, at, "issuer_roots", _certificates_file, base_dir),
                eab=_optional(item, at, "eab", _eab),
                profile=_optional(item, at, "profile", _profile),
                path=at,
            )
        )
    return tuple(out)


def _certificates(value: Any, path: str, key_type: str) -> tuple[CertificateSpec, ...]:
    specs = []
    for i, item in enumerate(_list(value, path, "mappings with domains (and key_type)")):
        item_path = f"{path}[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(item_path, "expected a mapping with domains (and key_type)", item)
        _check_keys(item, item_path, ("domains", "key_type", "challenges"))
        if "domains" not in item:
            raise ConfigError(
                f"{item_path}.domains", "missing: list the names of this certificate", None
            )
        names = _names(item["domains"], f"{item_path}.domains")
        if not names:
            raise ConfigError(
                f"{item_path}.domains", "expected at least one DNS name", item["domains"]
            )
        item_key_type = key_type
        if item.get("key_type") is not None:
            item_key_type = _key_type(item["key_type"], f"{item_path}.key_type")
        item_challenges = None
        if item.get("challenges") is not None:
            item_challenges = _challenges(item["challenges"], f"{item_path}.challenges")
        specs.append(
            CertificateSpec(
                names=_dedupe(names), key_type=item_key_type, challenges=item_challenges
            )
        )
    return tuple(specs)


def _challenges(value: Any, path: str) -> tuple[str, ...]:
    """A preference list of challenge types: known ones, each once, at least one."""
    what = f"challenge types, preferred first: {', '.join(CHALLENGE_TYPES)}"
    items = _list(value, path, what, allow_single=True)
    if not items:
        raise ConfigError(path, f"expected at least one of the {what}", value)
    types = []
    for i, item in enumerate(items):
        if not isinstance(item, str) or item.strip().lower() not in CHALLENGE_TYPES:
            close = difflib.get_close_matches(str(item).lower(), CHALLENGE_TYPES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}[{i}]", f"unknown challenge type{hint}; {what}", item)
        types.append(item.strip().lower())
    return _dedupe(types)


def _check_keys(block: Mapping[Any, Any], path: str, known: Iterable[str]) -> None:
    """Refuse unknown keys (typo protection), suggesting the closest known one."""
    known = sorted(known)
    for key in block:
        if isinstance(key, str) and key in known:
            continue
        hint = ""
        if isinstance(key, str):
            close = difflib.get_close_matches(key, known, n=1)
            if close:
                hint = f" (did you mean {close[0]!r}?)"
        # The value is never echoed: a misplaced secret must not reach a log.
        raise ConfigError(
            f"{path}.{key}",
            f"unknown key{hint}; known keys: {', '.join(known)}",
            has_value=False,
        )


def _pair_from(
    source: Mapping[Any, Any], prefix: str, base_dir: str | None
) -> tuple[str | None, str | None]:
    """Read tls_certificate_path / tls_private_key_path from one mapping: both or neither."""
    cert_key, key_key = "tls_certificate_path", "tls_private_key_path"
    cert = source.get(cert_key)
    key = source.get(key_key)
    cert_path = _file_path(cert, prefix + cert_key, base_dir) if cert is not None else None
    key_path = _file_path(key, prefix + key_key, base_dir) if key is not None else None
    if (cert_path is None) != (key_path is None):
        missing = key_key if key_path is None else cert_key
        raise ConfigError(
            prefix + missing,
            f"missing: set both {cert_key} and {key_key}, or neither",
            None,
            has_value=False,
        )
    return cert_path, key_path


# ---------------------------------------------------------------------------------------------


def _fraction(value: Any, path: str) -> float:
    what = "a fraction from 0 up to (not including) 1, like 0.1"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(path, f"expected {what}", value)
    if not (math.isfinite(value) and 0 <= value < 1):
        raise ConfigError(path, f"expected {what}", value)
    return float(value)


def _port(value: Any, path: str) -> int:
    return _int(value, path, 0, 65535, "an integer 1-65535 (or 0 for no listener)")


def _days(value: Any, path: str) -> int:
    return _int(value, path, 1, None, "a whole number of days above 0")


def _requests_per_minute(value: Any, path: str) -> int:
    return _int(value, path, 1, None, "a whole number of requests per minute above 0")


def _profile(value: Any, path: str) -> str:
    return _str(value, path, "a profile name the CA offers, like 'tlsserver'")


def _addresses(value: Any, path: str) -> tuple[str, ...]:
    addresses = _list(value, path, "IP addresses", allow_single=True)
    return _dedupe(_address(v, f"{path}[{i}]") for i, v in enumerate(addresses))


def _http01_endpoints(value: Any, path: str) -> tuple[str, ...]:
    return _endpoints(value, path, _HTTP01_ENDPOINT_TYPES)


def _tls_endpoints(value: Any, path: str) -> tuple[str, ...]:
    return _endpoints(value, path, _TLS_ENDPOINT_TYPES)


def _metrics_endpoints(value: Any, path: str) -> tuple[str, ...]:
    return _endpoints(value, path, _METRICS_ENDPOINT_TYPES)


def _contacts(value: Any, path: str) -> tuple[str, ...]:
    contacts = _list(value, path, "email addresses", allow_single=True)
    return _dedupe(_contact(v, f"{path}[{i}]") for i, v in enumerate(contacts))


# ---------------------------------------------------------------------------------------------
# the settings: each key once, with its reader and its line in docs/configuration.md


@attrs.frozen
class _Context:
    """What a reader may need besides its value: where relative paths start, and the block
    (``certificates`` items default to the block's ``key_type``)."""

    base_dir: str | None
    block: Mapping[Any, Any]


def _path_in(value: Any, path: str, ctx: _Context) -> str:
    return _file_path(value, path, ctx.base_dir)


def _certificates_file_in(value: Any, path: str, ctx: _Context) -> str:
    return _certificates_file(value, path, ctx.base_dir)


def _certificates_in(value: Any, path: str, ctx: _Context) -> tuple[CertificateSpec, ...]:
    key_type = "ecdsa-p256"
    if ctx.block.get("key_type") is not None:
        key_type = _key_type(ctx.block["key_type"], path.rsplit(".", 1)[0] + ".key_type")
    return _certificates(value, path, key_type)


def _issuers_in(value: Any, path: str, ctx: _Context) -> tuple[IssuerConfig, ...]:
    allow = ctx.block.get("testing_allow_http")
    top = (
        _bool(allow, path.rsplit(".", 1)[0] + ".testing_allow_http") if allow is not None else False
    )
    return _issuers(value, path, ctx.base_dir, top)


def _setting(
    default: Any = attrs.NOTHING,
    *,
    read: Callable[..., Any],
    shown_default: str,
    doc: str,
    uses_context: bool = False,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """One ``acme:`` key: its default, the reader that turns a YAML value into it (called as
    ``read(value, key_path)``, plus a :class:`_Context` with ``uses_context``), and its row in
    the table of docs/configuration.md (:func:`settings_table`)."""
    metadata = {"read": read, "context": uses_context, "shown_default": shown_default, "doc": doc}
    if factory is not None:
        return attrs.field(factory=factory, metadata=metadata)
    return attrs.field(default=default, metadata=metadata)


@attrs.frozen
class AcmeConfig:
    """Everything the ``acme:`` block can say, validated, with defaults filled in.

    Each setting is declared once, here: its default, its reader and its documentation line.
    Rules across keys (``staging`` and ``url``, ``listen`` and ``port``, the defaults taken
    from ``server_name`` and the homeserver's TLS paths) are in :func:`parse_acme_config`.
    Paths are absolute when the config came from a file (resolved against its directory).
    ``source_path`` and ``source_file`` say where the block was read (for messages, through
    :meth:`key`); they are not settings.
    """

    enabled: bool = _setting(
        False,
        read=_bool,
        shown_default="`false` (`true` in the module's `config:`)",
        doc=(
            "Manage certificates at all. Nothing is requested from a CA while false: `issue`, "
            "`renew` and `run` refuse with exit code 2 and write nothing (see *`enabled: false`* "
            "above)."
        ),
    )
    url: str = _setting(
        LETSENCRYPT_URL,
        read=_url,
        shown_default="`https://acme-v02.api.letsencrypt.org/directory`",
        doc=(
            "The CA's ACME v2 directory URL (`https://`; `http://` only with "
            "`testing_allow_http`). ACME v1 URLs (`acme-v01.api.letsencrypt.org`, "
            "`acme-staging.api.letsencrypt.org`, Synapse's old default) are refused: Let's Encrypt"
            " switched v1 off in 2021; the error gives the v2 URL."
        ),
    )
    testing_allow_http: bool = _setting(
        False,
        read=_bool,
        shown_default="`false`",
        doc=(
            "Testing only: accept an `http://` `url` (a CA on this machine). Otherwise `http://` "
            "is refused, because over plain http anyone on the path could answer in the CA's name."
        ),
    )
    staging: bool = _setting(
        False,
        read=_bool,
        shown_default="`false`",
        doc=(
            "Shortcut: `true` means `url: https://acme-staging-v02.api.letsencrypt.org/directory`."
            " Setting both `staging: true` and a different `url` is an error."
        ),
    )
    port: int = _setting(
        80,
        read=_port,
        shown_default="`80`",
        doc="Port of the standalone HTTP-01 challenge listener; `0` means none.",
    )
    bind_addresses: tuple[str, ...] = _setting(
        ("::", "0.0.0.0"),
        read=_addresses,
        shown_default="`['::', '0.0.0.0']`",
        doc="IP addresses that listener binds (one address may be given as a plain string).",
    )
    listen: tuple[str, ...] | None = _setting(
        None,
        read=_http01_endpoints,
        shown_default="none",
        doc=(
            "List of Twisted server endpoint strings replacing `port` and `bind_addresses` (set "
            "one or the other): `tcp:8009:interface=127.0.0.1`, `tcp6:port=80:interface=\\:\\:`, "
            "`unix:/run/acme.sock`, `systemd:domain=INET:index=0`, "
            "`systemd:domain=INET6:name=synapse-acme-http` (socket activation: the name is the "
            "socket unit's `FileDescriptorName`; see "
            "[deploy-systemd-socket.md](deploy-systemd-socket.md)). `[]` means none."
        ),
    )
    reprovision_threshold: int = _setting(
        DEFAULT_REPROVISION_THRESHOLD,
        read=_days,
        shown_default="`30`",
        doc=(
            "Days before expiry by which a certificate is renewed at the latest. An upper bound "
            "only; see *When certificates are renewed*."
        ),
    )
    domain: str | None = _setting(
        None,
        read=_name,
        shown_default="the homeserver's `server_name`, without a `:port`",
        doc="First name on the certificate. Required when `enabled` and there is no `server_name`.",
    )
    domains: tuple[str, ...] = _setting(
        (),
        read=_names,
        shown_default="`[]`",
        doc=(
            "More names (SANs) for the same certificate. Duplicates of `domain` are dropped. One "
            "name may be a plain string (`domains: www.example.com`); several need a list."
        ),
    )
    certificates: tuple[CertificateSpec, ...] = _setting(
        (),
        read=_certificates_in,
        uses_context=True,
        shown_default="`[]`",
        doc=(
            "More certificates (standalone runner): a list of `{domains: [...], key_type: ..., "
            "challenges: [...]}`; `key_type` and `challenges` default to the top-level ones."
        ),
    )
    contact: tuple[str, ...] = _setting(
        (),
        read=_contacts,
        shown_default="`[]`",
        doc=(
            "Email address(es) for the CA account, plain (`ops@example.com`) or as `mailto:` URIs;"
            " stored as `mailto:` URIs."
        ),
    )
    terms_of_service_agreed: bool = _setting(
        False,
        read=_bool,
        shown_default="`false`",
        doc="Agree to the CA's terms of service; CAs refuse new accounts without it.",
    )
    key_type: str = _setting(
        "ecdsa-p256",
        read=_key_type,
        shown_default="`ecdsa-p256`",
        doc=(
            "Certificate key: `ecdsa-p256`, `ecdsa-p384`, `rsa-2048`, `rsa-3072`, `rsa-4096`. Also"
            " accepted: `ec256`, `p256`, `ecdsa`, `ec384`, `p384`, `rsa` (= `rsa-2048`), "
            "`rsa2048`, `rsa3072`, `rsa4096`."
        ),
    )
    storage: str = _setting(
        "./acme",
        read=_path_in,
        uses_context=True,
        shown_default="`acme` next to the config file (`./acme` without one)",
        doc=(
            "Directory for certificates, keys and state (0700; keys 0600). Must belong to the user"
            " synapse-acme runs as (a directory of another user, or a symlink to one, is refused "
            "before anything in it is changed; with `run --user` it must belong to that user)."
        ),
    )
    account_key_file: str = _setting(
        "./acme/account.key",
        read=_path_in,
        uses_context=True,
        shown_default="`<storage>/account.key`",
        doc=(
            "The ACME account key. Created on the first run only: once the store shows an account "
            "existed (`<storage>/account.json`, or any issued certificate), a missing or "
            "unreadable key is an error, never silently a new account; see *The ACME account* "
            "below. May be a symbolic link (e.g. into a secrets directory); the file it leads to "
            "must be a regular file owned by the user synapse-acme runs as. Its directory must "
            "exist unless it is inside `storage`: synapse-acme creates directories only there, so "
            "a path copied from an example (`/path/to/acme_account.key`) is an error naming this "
            "key (exit code 2, nothing written), never a new `/path/to`."
        ),
    )
    ca_bundle: str | None = _setting(
        None,
        read=_certificates_file_in,
        uses_context=True,
        shown_default="none (system trust)",
        doc=(
            "PEM file of CA certificate(s) to trust for the ACME server's HTTPS (private CAs, "
            "Pebble). Must be a readable regular file with at least one certificate; the error "
            "gives the real reason, e.g. `Permission denied (EACCES); the directory /srv/ca is not"
            " searchable by synapse-acme (uid 998)`. When the CA's HTTPS certificate does not "
            "verify, the failure names this key and `url`."
        ),
    )
    issuer_roots: str | None = _setting(
        None,
        read=_certificates_file_in,
        uses_context=True,
        shown_default="none (system trust and `ca_bundle`)",
        doc=(
            "PEM file of the root certificate(s) a private CA issues from (step-ca; Pebble's "
            "`/roots/0`). Every issued chain is checked before it is stored or served: the leaf is"
            " `CA:FALSE` with serverAuth, each certificate is signed by the next, and the chain "
            "reaches a root in the system trust store, in `ca_bundle` or in this file. A leaf "
            "without its intermediate, or one from an unknown root, is refused with an error "
            "naming this key, and the last good certificate keeps serving. Read at start."
        ),
    )
    eab: EabConfig | None = _setting(  # noqa: RUF009 (an attrs.field)
        None,
        read=_eab,
        shown_default="none",
        doc=(
            "External Account Binding: `{kid: ..., hmac_key: ...}` as given by the CA (ZeroSSL, "
            "Google, ...). `hmac_key` is base64url text."
        ),
    )
    profile: str | None = _setting(
        None,
        read=_profile,
        shown_default="none",
        doc=(
            "ACME profile to request, if the CA offers profiles (Let's Encrypt: `classic`, "
            "`tlsserver`, `shortlived`)."
        ),
    )
    issuers: tuple[IssuerConfig, ...] | None = _setting(
        None,
        read=_issuers_in,
        uses_context=True,
        shown_default="none (the one CA of `url`)",
        doc=(
            "Several CAs, tried in order: a list of `{url, ca_bundle, issuer_roots, eab, profile,"
            " testing_allow_http}` (only `url` required), replacing the top-level `url`, "
            "`staging`, `ca_bundle`, `issuer_roots`, `eab` and `profile` (setting both is an "
            "error). When a CA refuses a certificate for good (e.g. `rejectedIdentifier`, `caa`, "
            "a refused EAB, an unusable chain) the next is asked at once; when it fails in a way "
            "that may pass (unreachable, `rateLimited`, a server error, a failed validation) it "
            "is asked again on the next attempts, and the next CA only after 3 such failures in "
            "a row for that certificate (at once in the one-shot `issue`/`renew`, which do not "
            "retry). Each CA has its own account: the first keeps `account_key_file` and "
            "`<storage>/account.json`, the others use `<storage>/accounts/<CA>/`. The "
            "certificate records the CA that issued it (`synapse-acme status`), and every "
            "renewal starts again at the first. See docs/cas.md."
        ),
    )
    tls_certificate_path: str | None = _setting(
        None,
        read=_path_in,
        uses_context=True,
        shown_default="the homeserver's `tls_certificate_path`",
        doc=(
            "Where the issued certificate chain is written for the homeserver. Set both paths or "
            "neither."
        ),
    )
    tls_private_key_path: str | None = _setting(
        None,
        read=_path_in,
        uses_context=True,
        shown_default="the homeserver's `tls_private_key_path`",
        doc="Where the certificate's private key is written.",
    )
    check_interval: float = _setting(
        DEFAULT_CHECK_INTERVAL,
        read=_duration,
        shown_default="`600` (10 minutes)",
        doc=(
            "How often to check whether renewal is due. Seconds, or text like `90s`, `10m`, `1h`, "
            "`1d`, `500ms`."
        ),
    )
    check_jitter: float = _setting(
        DEFAULT_CHECK_JITTER,
        read=_fraction,
        shown_default="`0.1`",
        doc=(
            "Random extra wait per check, as a fraction of `check_interval` (0 up to, not "
            "including, 1)."
        ),
    )
    poll_interval: float = _setting(
        DEFAULT_POLL_INTERVAL,
        read=_duration,
        shown_default="`0.5`",
        doc=(
            "Seconds between polls of an order or authorization when the CA sends no `Retry-After`."
        ),
    )
    poll_timeout: float = _setting(
        DEFAULT_POLL_TIMEOUT,
        read=_duration,
        shown_default="`300`",
        doc="Give up on one issuance's polling after this long (at least `poll_interval`).",
    )
    request_timeout: float = _setting(
        DEFAULT_REQUEST_TIMEOUT,
        read=_duration,
        shown_default="`45`",
        doc=(
            "Give up on one request to the CA (connect to the last byte of the answer) after this "
            "long; the attempt fails with `no answer within N s`. Seconds, or text like `90s`, "
            "`1m`. Lower it only for a CA on a fast local network (tests)."
        ),
    )
    connection_limits: ConnectionLimits = _setting(  # noqa: RUF009 (an attrs.field)
        factory=ConnectionLimits,
        read=_connection_limits,
        shown_default="see right",
        doc=(
            "Caps on each standalone listener (HTTP-01 and every `tls_listen` endpoint): "
            "`max_connections` (`256` open connections), `max_per_address` (`128` from one peer "
            "address, at most `max_connections`), `handshake_timeout` (`10s` for a TLS handshake),"
            " `header_timeout` (`10s` for an HTTP-01 request head, and idling between requests; at"
            " most 300 s each). At a cap, the connection idle longest is dropped, so a fresh one "
            "(a CA's validator) always gets in. The caps shrink to fit the open-files limit, which"
            " is raised to its hard limit at start (logged). Synapse's own listeners are Synapse's"
            " to limit."
        ),
    )
    tls_listen: tuple[str, ...] = _setting(
        (),
        read=_tls_endpoints,
        shown_default="`[]`",
        doc=(
            "Standalone runner: Twisted endpoint strings (`tcp`, `tcp6`, `unix`, `systemd`; not "
            "`ssl`) on which to serve TLS with the managed certificates, e.g. `tcp:8448`."
        ),
    )
    metrics_listen: tuple[str, ...] = _setting(
        (),
        read=_metrics_endpoints,
        shown_default="`[]`",
        doc=(
            "Twisted endpoint strings (`tcp`, `tcp6`, `unix`, `systemd`) on which `synapse-acme "
            "run` serves Prometheus metrics at `/metrics`, e.g. `tcp:9109:interface=127.0.0.1`; "
            "`[]` means none. Inside Synapse the metrics are on Synapse's own `metrics` listener "
            "(this key is not needed there). See [monitoring.md](monitoring.md)."
        ),
    )
    challenges: tuple[str, ...] | None = _setting(
        None,
        read=_challenges,
        shown_default=(
            "what this setup can answer: `dns-01` if `dns01` is set, `http-01` if the HTTP-01 "
            "listener or Synapse's listeners serve it, then `tls-alpn-01` if synapse-acme serves "
            "TLS"
        ),
        doc=(
            "Challenge types to use, preferred first: `dns-01` (needs `dns01`; "
            "docs/challenge-dns-01.md), `http-01` (port 80), `tls-alpn-01` (port "
            "443, answered by the TLS listeners synapse-acme serves: `tls_listen`, or Synapse's "
            "`tls: true` listeners; docs/challenge-tls-alpn-01.md). A type this setup cannot "
            "answer is an error at start."
        ),
    )
    external_certificates: bool = _setting(
        False,
        read=_bool,
        shown_default="`false`",
        doc=(
            "Certificates are kept up to date by another tool (certbot, an operator): synapse-acme"
            " issues nothing and only watches `tls_certificate_path`/`tls_private_key_path`, "
            "hot-swapping them into the TLS listeners when both files changed and match (a "
            "half-replaced pair is waited out). Needs both paths."
        ),
    )
    watch_interval: float = _setting(
        DEFAULT_WATCH_INTERVAL,
        read=_duration,
        shown_default="`5s`",
        doc=(
            "With `external_certificates` (and in Synapse worker processes): how often the two "
            "files are looked at (one `stat` each; read and hashed only when that changes)."
        ),
    )
    max_requests_per_minute: int = _setting(
        MAX_REQUESTS_PER_MINUTE,
        read=_requests_per_minute,
        shown_default="`1200`",
        doc=(
            "A cap on requests to the CA in any 60 s (queued in order, never dropped). 1200 is "
            "Let's Encrypt's 20 requests/s averaged over a minute; 100 certificates issued at once"
            " make about 1,000-2,000 requests. Raise it only for a private CA without rate limits."
        ),
    )
    preflight: PreflightConfig = _setting(  # noqa: RUF009 (an attrs.field)
        factory=PreflightConfig,
        read=_preflight,
        shown_default="see right",
        doc=(
            "Before every order, fetch `http://NAME/.well-known/acme-challenge/<probe>` for each "
            "name as the CA would, and order only when this synapse-acme answered (a failed "
            "validation counts against the CA's limits; this costs nothing). `enabled` (`true`; "
            "`preflight: false` also works) turns it off for hosts that cannot reach their own "
            "public name; `port` (`80`) is the port probed; `timeout` (`10s`) bounds each name; "
            "`resolver` (`system`: this host's resolver, `/etc/hosts` included) or a DNS server "
            "`IP[:PORT]` asked directly, as the CA's resolver would be. `synapse-acme check` runs "
            "it on demand; see [troubleshooting](troubleshooting.md#preflight-verdicts)."
        ),
    )
    dns01: Dns01Settings | None = _setting(  # noqa: RUF009 (an attrs.field)
        None,
        read=_dns01,
        uses_context=True,
        shown_default="none",
        doc=(
            "Answer `dns-01` challenges by RFC 2136 dynamic updates (wildcard names; no inbound "
            "port needed); when set, dns-01 is used for every name. `server` (the zone's primary,"
            " `IP[:PORT]`), `zone`, `tsig_secret_file` (tsig-keygen's key clause, or the base64 "
            "secret alone with `tsig_key_name`), `tsig_algorithm` (`hmac-sha256`), `ttl` (`"
            f"{DEFAULT_TTL}`), `propagation_timeout` (`{DEFAULT_PROPAGATION_TIMEOUT:g}s`: how "
            "long the record may take to be visible at every authoritative server), "
            "`propagation_servers` (`auto`: the zone's NS servers and `server`; or a list of "
            "`IP[:PORT]`). See [challenge-dns-01.md](challenge-dns-01.md)."
        ),
    )
    dry_run_url: str = _setting(
        LETSENCRYPT_STAGING_URL,
        read=_url,
        shown_default="`https://acme-staging-v02.api.letsencrypt.org/directory`",
        doc=(
            "The ACME directory of `synapse-acme renew --dry-run` and `dry_run_on_change`: a full "
            "issuance against this (staging) CA into a scratch store, with a scratch account; "
            "nothing is saved, exported or served. `http://` only with `testing_allow_http`."
        ),
    )
    dry_run_on_change: bool = _setting(
        False,
        read=_bool,
        shown_default="`false`",
        doc=(
            "When the names of a certificate or the CA (`url`) differ from those of its last "
            "issuance, do one dry run against `dry_run_url` before the real order; if it fails, "
            "the real order is not placed (the attempt fails, saying why, and is retried later)."
        ),
    )
    alerts: AlertsConfig = _setting(  # noqa: RUF009 (an attrs.field)
        factory=AlertsConfig,
        read=_alerts,
        shown_default="see right",
        doc=(
            "Tell the operator when renewal fails (Let's Encrypt sends no expiry emails): "
            "`failing` on the first failure after a success, `expiring` daily while a "
            "certificate within `expiry_days` (`14`) of expiry cannot be renewed, `recovered` "
            "after a reported failure; at most one per certificate and kind per 24 h, also "
            "across restarts (`<storage>/alerts.json`). Each goes to the log, to "
            "`alert_webhook`, and inside Synapse to the admins' server notices or `alert_room`"
            " (see [synapse.md](synapse.md#alerts-to-the-admins)). `enabled` (`true`; "
            "`alerts: false` also works) turns them all off."
        ),
    )
    alert_webhook: str | None = _setting(
        None,
        read=_webhook_url,
        shown_default="none",
        doc=(
            "An http(s) URL to which each alert is POSTed as JSON (`event`, `name`, `names`, "
            "`error`, `error_type`, `not_after`, `at`, `host`, `failures`, `next_attempt`): "
            "10 s timeout, three attempts; a failure is logged and never stops renewals. Only "
            "its scheme and host are ever logged (the path may hold a token)."
        ),
    )
    alert_room: str | None = _setting(
        None,
        read=_room_id,
        shown_default="none (server notices when Synapse has `server_notices`)",
        doc=(
            "Synapse module: a room ID (`!...`) that receives the alerts as `m.notice` messages "
            "from `alert_sender`, instead of server notices to every admin. Needs "
            "`alert_sender`."
        ),
    )
    alert_sender: str | None = _setting(
        None,
        read=_user_id,
        shown_default="none",
        doc=(
            "Synapse module, with `alert_room`: the local user (`@acme-alerts:example.org`) "
            "who posts the alerts; it must have joined the room and be allowed to post there."
        ),
    )
    database: DatabaseConfig | None = _setting(  # noqa: RUF009 (an attrs.field)
        None,
        read=_database,
        uses_context=True,
        shown_default="none (the file store in `storage`)",
        doc=(
            "Keep certificates, the ACME account, challenge answers and the issuance lock in "
            "PostgreSQL, shared by every process on any host (Synapse workers, several `run` "
            "processes): one order per renewal, any process answers the CA, each serves a new "
            "certificate within 2 s. `url` (`postgresql://USER[:PASSWORD]@HOST[:PORT]/DB`) or "
            "`args` (libpq keywords as in Synapse's `database.args`: `user`, `password`, "
            "`database`, `host`, `port`, ...); `key_files` (required): files with a 32-byte "
            "base64 key (`head -c 32 /dev/urandom | base64`, mode 0600) encrypting private keys "
            "at rest, the first encrypts, all decrypt (rotation); `connect_timeout` "
            f"(`{DEFAULT_DB_CONNECT_TIMEOUT:g}s`, also the longest a start waits for the "
            f"database); `lease` (`{DEFAULT_DB_LEASE:g}s`): how long a process that died while "
            "ordering blocks the others. `storage` then keeps only this process's own state "
            "(status, alerts). See [how-it-works.md](how-it-works.md#one-store-for-many-processes)."
        ),
    )
    source_path: str = attrs.field(default="acme", eq=False)
    source_file: str | None = attrs.field(default=None, eq=False)

    def key(self, name: str) -> str:
        """The full key path of setting ``name`` where this block was read, for messages:
        ``acme.port``, or ``modules[0].config.port`` for the Synapse module's config."""
        return f"{self.source_path}.{name}"

    def http01_endpoints(self) -> list[str]:
        """Twisted server endpoint strings for the standalone HTTP-01 listener ([] for none)."""
        if self.listen is not None:
            return list(self.listen)
        if self.port == 0:
            return []
        endpoints = []
        for address in self.bind_addresses:
            kind = "tcp6" if ipaddress.ip_address(address).version == 6 else "tcp"
            endpoints.append(f"{kind}:port={self.port}:interface={quoteStringArgument(address)}")
        return endpoints

    def issuer_list(self) -> tuple[IssuerConfig, ...]:
        """The CAs to ask, in order: ``issuers``, or the one CA of the top-level keys."""
        if self.issuers is not None:
            return self.issuers
        return (
            IssuerConfig(
                url=self.url,
                ca_bundle=self.ca_bundle,
                issuer_roots=self.issuer_roots,
                eab=self.eab,
                profile=self.profile,
                path=self.source_path,
            ),
        )

    def certificate_specs(self) -> list[CertificateSpec]:
        """The certificates to manage: ``(domain, *domains)`` first, then ``certificates``."""
        specs = []
        if self.domain is not None:
            specs.append(
                CertificateSpec(names=(self.domain, *self.domains), key_type=self.key_type)
            )
        specs.extend(self.certificates)
        return specs


def _settings() -> list[attrs.Attribute[Any]]:
    return [f for f in attrs.fields(AcmeConfig) if "read" in f.metadata]


KNOWN_KEYS: tuple[str, ...] = tuple(sorted(f.name for f in _settings()))


def settings_table() -> str:
    """The table of keys in docs/configuration.md, made from the declarations above (a unit
    test keeps the document equal to it)."""
    rows = ["| Key | Default | Meaning |", "| --- | --- | --- |"]
    for f in _settings():
        rows.append(f"| `{f.name}` | {f.metadata['shown_default']} | {f.metadata['doc']} |")
    return "\n".join(rows) + "\n"


def parse_acme_config(
    block: Mapping[Any, Any] | None,
    *,
    server_name: str | None = None,
    base_dir: str | None = None,
    path: str = "acme",
    defaults_from: Mapping[Any, Any] | None = None,
    source_file: str | None = None,
) -> AcmeConfig:
    """Validate an ``acme:`` block (as loaded from YAML) into an :class:`AcmeConfig`.

    ``server_name`` is the homeserver's (the default ``domain``; a ``:port`` suffix is dropped);
    ``base_dir`` is the config file's directory (relative paths resolve against it);
    ``path`` prefixes key paths in errors; ``defaults_from`` is the surrounding homeserver
    config, whose ``tls_certificate_path``/``tls_private_key_path`` are the defaults here;
    ``source_file`` is the file the block was read from (named in messages).
    """
    if block is None:
        block = {}
    if not isinstance(block, Mapping):
        raise ConfigError(
            path, f"expected a mapping of acme settings, got {_type_name(block)}", has_value=False
        )
    _check_keys(block, path, KNOWN_KEYS)
    present = {k: v for k, v in block.items() if v is not None}

    def at(key: str) -> str:
        return f"{path}.{key}"

    ctx = _Context(base_dir, present)
    values: dict[str, Any] = {}
    for field in _settings():
        if field.name in present:
            read = field.metadata["read"]
            args = (ctx,) if field.metadata["context"] else ()
            values[field.name] = read(present[field.name], at(field.name), *args)

    # issuers replace the one CA; the top-level keys then mirror the first (what a dry run,
    # the account record and status call "the CA")
    if "issuers" in values:
        for key in _ONE_CA_KEYS:
            if key in present:
                raise ConfigError(
                    at("issuers"),
                    f"issuers replaces the top-level {', '.join(_ONE_CA_KEYS)}; {key} is set "
                    f"too: move it into an item of issuers, or remove issuers",
                    has_value=False,
                )
        first = values["issuers"][0]
        values.update(
            url=first.url,
            ca_bundle=first.ca_bundle,
            issuer_roots=first.issuer_roots,
            eab=first.eab,
            profile=first.profile,
        )

    # url / staging (each item of issuers was checked by its reader)
    url = values.get("url") if "issuers" not in values else None
    if url is not None:
        if url.lower().startswith("http:") and not values.get("testing_allow_http"):
            raise ConfigError(
                at("url"),
                "expected an https:// URL: over plain http anyone on the path could answer in "
                "the CA's name (a local test CA may be allowed with testing_allow_http: true)",
                present["url"],
            )
        if values.get("staging") and url != LETSENCRYPT_STAGING_URL:
            raise ConfigError(
                at("staging"),
                f"staging: true selects {LETSENCRYPT_STAGING_URL}, but url is also set; "
                "remove one of them",
                True,
            )
    elif values.get("staging"):
        values["url"] = LETSENCRYPT_STAGING_URL

    dry_url = values.get("dry_run_url")
    if dry_url is not None and dry_url.lower().startswith("http:"):
        if not values.get("testing_allow_http"):
            raise ConfigError(
                at("dry_run_url"),
                "expected an https:// URL (a local test CA may be allowed with "
                "testing_allow_http: true)",
                present["dry_run_url"],
            )

    # listeners
    if "listen" in values:
        for other in ("port", "bind_addresses"):
            if other in present:
                raise ConfigError(
                    at("listen"),
                    f"listen replaces port and bind_addresses; remove {other} or listen",
                    present["listen"],
                )

    # names
    domain: str | None = values.get("domain")
    if domain is None and server_name is not None:
        host = _server_name_host(server_name)
        try:
            domain = canonical_name(host)
        except ValueError as e:
            raise ConfigError(
                at("domain"),
                f"not set, and server_name cannot be used as a certificate name ({e}); set domain",
                server_name,
            ) from None
    extra: list[str] = values.get("domains", [])
    if domain is None and (values.get("enabled") or extra):
        raise ConfigError(
            at("domain"), "not set and there is no server_name to default to; set domain", None
        )
    values["domain"] = domain
    values["domains"] = tuple(n for n in _dedupe(extra) if n != domain)
    if "certificates" in values:
        seen = {frozenset((domain, *values["domains"]))} if domain is not None else set()
        for i, spec in enumerate(values["certificates"]):
            if frozenset(spec.names) in seen:
                raise ConfigError(
                    f"{at('certificates')}[{i}].domains",
                    "the same names as another certificate here; list each set once",
                    list(spec.names),
                )
            seen.add(frozenset(spec.names))

    dns01: Dns01Settings | None = values.get("dns01")
    if dns01 is not None:
        names = [domain, *values["domains"]] if domain is not None else []
        names += [n for spec in values.get("certificates", ()) for n in spec.names]
        outside = [n for n in dict.fromkeys(names) if not dns01.covers(n)]
        if outside:
            raise ConfigError(
                at("dns01.zone"),
                f"does not contain {', '.join(outside)}: dns-01 answers every name by updating "
                "this zone (a name in another zone needs its own certificate setup)",
                dns01.zone,
            )

    # files
    if "storage" not in values:
        values["storage"] = (
            os.path.normpath(base_dir + "/acme") if base_dir is not None else "./acme"
        )
    values.setdefault("account_key_file", os.path.join(values["storage"], "account.key"))
    cert_key, key_key = "tls_certificate_path", "tls_private_key_path"
    if (cert_key in values) != (key_key in values):
        missing = key_key if key_key not in values else cert_key
        raise ConfigError(
            at(missing),
            f"missing: set both {cert_key} and {key_key}, or neither",
            None,
            has_value=False,
        )
    if cert_key not in values and defaults_from is not None:
        values[cert_key], values[key_key] = _pair_from(defaults_from, "", base_dir)
    cert_path, key_path = values.get(cert_key), values.get(key_key)

    if values.get("external_certificates") and not (cert_path and key_path):
        raise ConfigError(
            at("external_certificates"),
            "true needs tls_certificate_path and tls_private_key_path (the files another tool "
            "such as certbot keeps up to date)",
            True,
        )

    if ("alert_room" in values) != ("alert_sender" in values):
        given, needed = (
            ("alert_room", "alert_sender")
            if "alert_room" in values
            else ("alert_sender", "alert_room")
        )
        raise ConfigError(
            at(given),
            f"needs {needed} too: alert_room is the room, alert_sender the local user who posts"
            " there",
            present[given],
        )

    if "database" in values:
        _check_database(values, present, at)

    interval = values.get("poll_interval", DEFAULT_POLL_INTERVAL)
    if values.get("poll_timeout", DEFAULT_POLL_TIMEOUT) < interval:
        raise ConfigError(
            at("poll_timeout"),
            f"expected at least poll_interval ({interval} s)",
            present.get("poll_timeout"),
        )

    values["source_path"] = path
    values["source_file"] = source_file
    return AcmeConfig(**values)


def _check_database(
    values: Mapping[str, Any], present: Mapping[Any, Any], at: Callable[[str], str]
) -> None:
    """``database`` against the keys it cannot go with."""
    if values.get("external_certificates"):
        raise ConfigError(
            at("database"),
            "cannot be used with external_certificates: true (another tool issues, so there is "
            "nothing to share); remove one of them",
            has_value=False,
        )
    if "account_key_file" in present:
        raise ConfigError(
            at("account_key_file"),
            "with database the ACME account key is kept (encrypted) in the database, shared by "
            "every process; remove account_key_file",
            present["account_key_file"],
        )
    if len(values.get("issuers") or ()) > 1:
        raise ConfigError(
            at("issuers"),
            "with database only one CA is supported (the database holds one ACME account); "
            "list one item, or use the file store",
            has_value=False,
        )


def _server_name_host(server_name: str) -> str:
    """The host part of a Matrix server name (``example.org:8448`` -> ``example.org``)."""
    text = str(server_name).strip()
    if text.startswith("["):  # IPv6 literal, possibly with a port
        return text[: text.find("]") + 1] if "]" in text else text
    host, sep, port = text.rpartition(":")
    return host if sep and port.isdigit() else text


@attrs.frozen
class ChosenBlock:
    """The block that configures synapse-acme, as :func:`choose_block` picked it."""

    block: Any  # as loaded from YAML; parse_acme_config checks it
    path: str  # the key path prefix its errors are named with
    source: str  # "modules" (the module's config) or "acme" (the top-level block)
    warning: str | None = None  # to log: the operator should change the file


def _legacy_advice(module_path: str) -> str:
    return (
        "the top-level 'acme:' block is the old built-in Synapse setting; Synapse itself ignores "
        "it since 1.30. Move its keys under the module, then delete the top-level block:\n"
        "    modules:\n"
        f"      - module: {MODULE_NAME}\n"
        "        config:\n"
        "          <the keys of your acme: block, e.g. contact, terms_of_service_agreed, port>\n"
        f"(this config was read from the top-level block because {module_path} is empty)"
    )


def choose_block(module_config: Any, top_level: Any, module_path: str) -> ChosenBlock:
    """Which block configures synapse-acme when the module is listed under ``modules:``.

    One rule for the homeserver module and the command line, so both read the same settings
    from one homeserver.yaml: the module's ``config`` (listing the module is the opt-in, so
    ``enabled`` defaults to true there); with no module config, the old top-level ``acme:``
    block (``top_level``, honouring its ``enabled``, default false), with a warning; both set
    is a ConfigError, except an old ``acme: {enabled: false}`` alone, which is ignored with a
    warning. ``module_path`` names the module's config in messages.
    """
    if module_config is not None and not isinstance(module_config, Mapping):
        raise ConfigError(
            module_path,
            f"expected a mapping of acme settings, got {_type_name(module_config)}",
            has_value=False,
        )
    legacy = top_level if isinstance(top_level, Mapping) else None
    if legacy is not None and not module_config:
        return ChosenBlock(legacy, "acme", "acme", _legacy_advice(module_path))
    block = dict(module_config or {})
    if block.get("enabled") is None:  # written with no value: the module's default
        block["enabled"] = True
    if legacy is None:
        return ChosenBlock(block, module_path, "modules")
    if legacy.get("enabled") is False and set(legacy) <= {"enabled"}:
        return ChosenBlock(
            block,
            module_path,
            "modules",
            "ignoring the top-level 'acme: {enabled: false}' block (an old Synapse default); "
            f"{module_path} is used. Delete the top-level block.",
        )
    raise ConfigError(
        "acme",
        f"both this top-level 'acme:' block and {module_path} (the synapse-acme module's "
        "config) are set, and neither the homeserver module nor the command line guesses "
        "which one counts: move every key of the top-level 'acme:' block into the module "
        "config and delete the top-level block",
        has_value=False,
    )


def read_config_file(path: str) -> AcmeConfig:
    """Read ``acme:`` settings from a YAML file: a homeserver.yaml (top-level ``acme:`` block or
    the module under ``modules:``, chosen as the homeserver module does, see
    :func:`choose_block`) or a standalone file with just ``acme:`` (+ ``server_name``).
    """
    try:
        with open(path, encoding="utf-8") as f:
            doc = safe_load_bounded(f.read(MAX_BYTES + 1))
    except FileNotFoundError:
        raise ConfigError(path, "config file not found", has_value=False) from None
    except IsADirectoryError:
        raise ConfigError(
            path, "is a directory; give the YAML file (-c FILE)", has_value=False
        ) from None
    except OSError as e:
        raise ConfigError(
            path, f"cannot read config file ({e.strerror})", has_value=False
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(path, "config file is not UTF-8 text", has_value=False) from None
    except yaml.YAMLError as e:
        raise ConfigError(path, f"not valid YAML: {e}", has_value=False) from None
    except YamlBoundsError as e:
        raise ConfigError(path, f"refusing this YAML: {e}", has_value=False) from None
    except RecursionError:
        raise ConfigError(path, "not valid YAML: nested too deeply", has_value=False) from None
    if not isinstance(doc, Mapping):
        raise ConfigError(
            path, f"expected a YAML mapping at the top, got {_type_name(doc)}", has_value=False
        )
    base_dir = os.path.dirname(os.path.abspath(path))
    server_name = doc.get("server_name")
    if server_name is not None and not isinstance(server_name, str):
        raise ConfigError("server_name", "expected a server name string", server_name)

    def parse(chosen: ChosenBlock) -> AcmeConfig:
        return parse_acme_config(
            chosen.block,
            server_name=server_name,
            base_dir=base_dir,
            path=chosen.path,
            defaults_from=doc,
            source_file=os.path.abspath(path),
        )

    modules = doc.get("modules")
    if modules is not None:
        if not isinstance(modules, list):
            raise ConfigError(
                "modules", f"expected a list, got {_type_name(modules)}", has_value=False
            )
        for i, entry in enumerate(modules):
            if isinstance(entry, Mapping) and entry.get("module") == MODULE_NAME:
                chosen = choose_block(entry.get("config"), doc.get("acme"), f"modules[{i}].config")
                if chosen.warning is not None:
                    logger.warning("%s: %s", path, chosen.warning)
                return parse(chosen)
    if "acme" in doc:
        return parse(ChosenBlock(doc["acme"], "acme", "acme"))
    raise ConfigError(
        path,
        f"found neither an acme: block nor {MODULE_NAME} under modules:",
        has_value=False,
    )


def generate_config() -> str:
    """The commented sample ``acme:`` block shipped with the package."""
    return (
        importlib.resources.files("synapse_acme")
        .joinpath("sample_acme.yaml")
        .read_text(encoding="utf-8")
    )
