"""Fault matrix row 6: property-based fuzzing at volume (10,000 examples each), through the
fast real code paths: whole config *documents* (YAML text, mutated), raw HTTP bytes into the
real standalone challenge listener's protocol, and ACME answers into the real transport + client;
and 2,500 documents through the command line's commands themselves.

Each test asserts that only the documented outcomes happen: a value or ConfigError; a 200
only for a live token, every answer well framed (otherwise 4xx or 505, never 500, never an
exception); a parsed object or one
of AcmeError / AcmeProtocolError / AcmeTransportError; exit code 0, 1 or 2 with no traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import signal
import socket
import string
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import attrs
import josepy as jose
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from synapse_acme.acme.client import AcmeClient
from synapse_acme.acme.transport import JWSTransport
from synapse_acme.config import KNOWN_KEYS, AcmeConfig, read_config_file
from synapse_acme.errors import AcmeError, AcmeProtocolError, AcmeTransportError, ConfigError
from synapse_acme.http01 import HTTP01Responder
from synapse_acme.http01_server import make_factory
from tests.http_raw import connect, parse_all
from tests.unit.test_config import _GOOD

EXAMPLES = 10_000
FAST = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
COUNTS: dict[str, int] = {}
# Hypothesis draws a seed and a seeded PRNG builds the input: drawing every choice through
# hypothesis (st.randoms / composite strategies) costs 3-5 ms an example, too slow for 10,000
# in the time budget. A failure still reports its seed, so it replays exactly.
SEEDS = st.integers(0, 2**63)


# -- config documents ---------------------------------------------------------------------------


_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
# Values that are wrong for most keys (types, ranges, encodings, sizes), next to the plausible
# per-key values of the unit fuzzer (_GOOD), so documents mix good and bad keys.
_JUNK: list[Any] = [
    None, True, False, 0, -1, 1.5, -0.0, float("inf"), float("nan"), 2**64, -(2**63), "", " ",
    "x", "eighty", "80", "-5m", "10q", "1e309", "::", "tcp:", "tcp:99999", "systemd:", "unix:",
    "/", "../../etc/passwd", "a" * 300, "ünïcödé.example", "\x00", "mailto:", "https://",
    "http://[::1", "ftp://ca.example/dir", "*.*.example", "-a.example", "a..example", [], [None],
    [1, "a"], [[]], {}, {"a": 1}, {"domains": None}, {"domains": [1]}, {"kid": 1},
    {"kid": "k", "hmac_key": "not base64!"}, [{"domains": []}], "rsa-1024", "ec521",
]  # fmt: skip
_EDITS = ["", ":", "\t", "- ", "{", "'", "\n  x: [", "&a", "*a", "!!python/object:os.system"]


def _document(rng: random.Random) -> str:
    """One homeserver.yaml-like document, built from ``rng`` (drawn by hypothesis) because
    building it from composite strategies costs ~5 ms an example, too slow for 10,000."""
    kind = rng.randrange(10)
    if kind == 0:
        return "".join(
            rng.choice(string.printable + "üß{}[]:-'\"") for _ in range(rng.randrange(60))
        )
    block: Any = {}
    for key in rng.sample(KNOWN_KEYS, rng.randrange(min(9, len(KNOWN_KEYS)))):
        pool = _GOOD.get(key, _JUNK) if rng.random() < 0.75 else _JUNK
        block[key] = rng.choice(pool)
    if rng.random() < 0.1:
        block[rng.choice(["acme", "bogus", "Port", 7, ""])] = rng.choice(_JUNK)
    if rng.random() < 0.05:
        block = rng.choice(_JUNK)
    doc: dict[Any, Any] = {}
    if rng.random() < 0.5:
        doc["server_name"] = rng.choice(["example.org:8448", "matrix.example.org", *_JUNK[:12]])
    if kind <= 2:
        module = {"module": "synapse_acme.synapse.AcmeModule", "config": block}
        doc["modules"] = rng.choice([[module], [module], module, [{"module": 1}], None])
    else:
        doc["acme"] = block
    for key in ("tls_certificate_path", "tls_private_key_path"):
        if rng.random() < 0.2:
            doc[key] = rng.choice(["/etc/cert.pem", *_JUNK[:12]])
    text = yaml.dump(doc, Dumper=_Dumper, allow_unicode=True)
    if kind == 9:  # a hand edit gone wrong: cut, duplicate or insert at a random spot
        at = rng.randrange(len(text) + 1)
        text = text[:at] + rng.choice(_EDITS) + text[at + rng.randrange(6) :]
    return text


def test_fuzz_config_documents(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="synapse_acme")
    path = tmp_path / "homeserver.yaml"
    seen = {"ok": 0, "error": 0}

    @FAST
    @given(seed=SEEDS)
    def check(seed: int) -> None:
        rng = random.Random(seed)
        text = _document(rng)
        path.write_text(text, encoding="utf-8")
        try:
            config = read_config_file(str(path))
        except ConfigError as e:
            assert str(e) and e.path  # names the key (or the file)
            seen["error"] += 1
        else:
            assert isinstance(config, AcmeConfig)
            config.certificate_specs()
            config.http01_endpoints()
            seen["ok"] += 1

    check()
    assert seen["ok"] + seen["error"] >= EXAMPLES
    assert seen["ok"] > 100 and seen["error"] > 100  # both paths were really walked
    COUNTS["config"] = seen["ok"] + seen["error"]


# -- raw HTTP into the challenge listener--------------------------------------------------------

_TOKEN = string.ascii_letters + string.digits + "_-"
LIVE = "LiveToken_-123"
_byte_text = st.binary(max_size=24)
_segment = st.one_of(
    st.sampled_from(
        [b".well-known", b"acme-challenge", b"", b"..", b".", b"%2e%2e", LIVE.encode()]
    ),
    st.text(_TOKEN, min_size=1, max_size=12).map(str.encode),
    _byte_text,
)


_METHODS = [b"GET", b"GET", b"HEAD", b"POST", b"PUT", b"OPTIONS", b"TRACE", b"CONNECT", b"DELETE"]
_SEGMENTS = [b".well-known", b"acme-challenge", b"", b"..", b".", b"%2e%2e", b"%00", b"%ff",
             LIVE.encode(), LIVE.encode() + b"x", b"a" * 300, b"\xff\xfe", b"?q=1", b"#f",
             b";p"]  # fmt: skip
_HEADER_NAMES = [b"Host", b"Content-Length", b"Transfer-Encoding", b"X-Forwarded-For",
                 b"Connection", b"Expect", b"", b" Host", b"H\x00st", b"X" * 300]  # fmt: skip
_HEADER_VALUES = [b"0", b"5", b"-1", b"chunked", b"close", b"100-continue", b"999999999999",
                  b"h.example", b"\xff", b"a\rb", b"x" * 1000]  # fmt: skip


def _rand_bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(rng.randrange(n)))


def _raw_request(rng: random.Random) -> tuple[bytes, bytes, bytes]:
    """One request as raw bytes from ``rng``: 60% well-formed HTTP/1.x with a fuzzed path and
    method, the rest with junk methods, versions and headers."""
    plausible = rng.random() < 0.6
    if rng.random() < 0.3:
        path = b"/.well-known/acme-challenge/" + LIVE.encode() + rng.choice([b"", b"/"])
    else:
        parts = [
            rng.choice(_SEGMENTS) if rng.random() < 0.7 else _rand_bytes(rng, 12)
            for _ in range(rng.randrange(6))
        ]
        path = b"/" + b"/".join(parts)
    if plausible:
        method = rng.choice(_METHODS[:5])
        version = rng.choice([b"HTTP/1.1", b"HTTP/1.0"])
        headers = [(b"Host", b"h.example"), (b"X-Forwarded-For", b"1.2.3.4")][: rng.randrange(3)]
        path = path.replace(b" ", b"%20").replace(b"\r", b"").replace(b"\n", b"")
    else:
        method = rng.choice(_METHODS) if rng.random() < 0.7 else _rand_bytes(rng, 8)
        version = rng.choice([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"", b"HTTP/x", b"ICY"])
        headers = [
            (rng.choice(_HEADER_NAMES), rng.choice(_HEADER_VALUES)) for _ in range(rng.randrange(5))
        ]
    head = method + b" " + path + b" " + version + b"\r\n"
    head += b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n"
    return head, _rand_bytes(rng, 16), path


def test_fuzz_raw_http_against_challenge_listener(caplog: pytest.LogCaptureFixture) -> None:
    responder = HTTP01Responder()
    responder.start_responding("a.example.test", LIVE, LIVE + ".thumbprint")
    clock = Clock()
    factory = make_factory(responder, clock)
    statuses: dict[int, int] = {}
    caplog.set_level(logging.ERROR)

    @FAST
    @given(seed=SEEDS)
    def check(seed: int) -> None:
        rng = random.Random(seed)
        head, body, path = _raw_request(rng)
        split = rng.choice([1 << 20, 1 << 20, 1 << 20, 64, 7, 1])
        proto, transport = connect(factory)
        data = head + body
        for i in range(0, len(data), split):  # also in odd-sized pieces
            if transport.disconnecting:
                break  # a real TCP transport stops reading after loseConnection()
            proto.dataReceived(data[i : i + split])
        proto.connectionLost(Failure(ResponseDone()))
        out = transport.value()
        # Every byte written is whole, well-framed answers (read by http.client), at most
        # one per request; the random bytes after the head may form a second request.
        method = head.split(b" ", 1)[0].decode("latin-1")
        responses = parse_all(out, method)
        assert responses, data[:200]  # every head ends in a blank line: something answers
        code = responses[0][0]
        statuses[code] = statuses.get(code, 0) + 1
        assert code in (200, 400, 404, 405, 431, 505), out[:300]  # never a server error
        if code == 200:
            assert method in ("GET", "HEAD")
            assert path.rstrip(b"/").endswith(b"/acme-challenge/" + LIVE.encode())
            expected = b"" if method == "HEAD" else (LIVE + ".thumbprint").encode()
            assert responses[0][2] == expected

    check()  # (the connections' idle timeouts stay unfired on the private Clock)
    assert sum(statuses.values()) >= EXAMPLES  # every example was answered
    assert all(statuses.get(code, 0) > 100 for code in (200, 400, 404)), statuses
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[0].getMessage()
    COUNTS["http"] = sum(statuses.values())


# -- ACME answers into the transport and client -------------------------------------------------

BASE = "https://ca.test"
DIRECTORY = {
    "newNonce": f"{BASE}/nonce",
    "newAccount": f"{BASE}/acct",
    "newOrder": f"{BASE}/order",
    "renewalInfo": f"{BASE}/ari",
}
_KEY = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
_NONCE = jose.encode_b64jose(b"n" * 16)


class _Response:
    def __init__(self, code: int, headers: dict[str, list[str]], body: bytes) -> None:
        self.code = code
        self.headers = Headers({k: v for k, v in headers.items()})
        self.length = UNKNOWN_LENGTH
        self._body = body

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(StringTransport())
        for i in range(0, len(self._body), 4096):
            protocol.dataReceived(self._body[i : i + 4096])
        protocol.connectionLost(Failure(ResponseDone()))


class _FakeHTTP:
    """Directory and nonces are well-formed; the answer under test is the fuzzed one."""

    def __init__(self, answer: tuple[int, dict[str, list[str]], bytes], target: str) -> None:
        self.answer = answer
        self.target = target
        self.calls = 0

    def request(self, method: str, url: str, **kw: Any) -> defer.Deferred[_Response]:
        self.calls += 1
        if method == "HEAD":
            return defer.succeed(_Response(200, {"Replay-Nonce": [_NONCE]}, b""))
        if url == f"{BASE}/dir" and self.target != "directory":
            hdrs = {"Content-Type": ["application/json"], "Replay-Nonce": [_NONCE]}
            return defer.succeed(_Response(200, hdrs, json.dumps(DIRECTORY).encode()))
        code, headers, body = self.answer
        return defer.succeed(_Response(code, headers, body))


_URLS = [f"{BASE}/x/1", "http://ca.test/y", "file:///etc/passwd", "javascript:1", "https://",
         "//ca.test/z", "https://ca.test:99999/", "", "https://ca.test/a b", 7, None, [],
         {}]  # fmt: skip
_LEAVES = [None, True, False, 0, -1, 2**70, 1.5, float("inf"), "", "x", "valid", "\u2603", "9" * 40]
_STATUS = ["pending", "ready", "processing", "valid", "invalid", "bogus", 1, None]
_PROBLEM_TYPES = ["urn:ietf:params:acme:error:badNonce", "urn:ietf:params:acme:error:rateLimited",
                  "urn:ietf:params:acme:error:malformed", "about:blank", "", 5, None]  # fmt: skip
_CTYPES = ["application/json", "application/problem+json", "application/pem-certificate-chain",
           "text/html", "", "application/json; charset=utf-8", "APPLICATION/JSON"]  # fmt: skip
_RETRY = ["120", "-1", "Wed, 21 Oct 2015 07:28:00 GMT", "99999999999999999999", "soon", ""]
_CODES = [200, 200, 200, 201, 204, 301, 400, 404, 429, 500, 503]
_ops = ["directory", "register", "new_order", "get_order", "get_authorization",
        "answer_challenge", "download_chain", "renewal_info"]  # fmt: skip
DOCUMENTED = (AcmeError, AcmeProtocolError, AcmeTransportError, ConfigError)


def _json_value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth > 2 or r < 0.5:
        return rng.choice(_LEAVES + _URLS)
    if r < 0.75:
        return [_json_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["a", "status", "type", "url", ""]): _json_value(rng, depth + 1)
            for _ in range(rng.randrange(4))}  # fmt: skip


def _maybe(rng: random.Random, good: Any) -> Any:
    return good if rng.random() < 0.8 else _json_value(rng)


def _problem(rng: random.Random) -> dict[str, Any]:
    doc = {"type": _maybe(rng, rng.choice(_PROBLEM_TYPES)), "detail": _maybe(rng, "why")}
    if rng.random() < 0.2:
        doc["subproblems"] = _json_value(rng)
    return doc


def _shaped(rng: random.Random) -> dict[str, Any]:
    """An order/authorization/directory/renewalInfo-like object with some fields broken."""
    ident = {"type": rng.choice(["dns", "ip", "x"]), "value": rng.choice(["a.example.test", ""])}
    chall = {"type": rng.choice(["http-01", "dns-01", "x"]), "url": rng.choice(_URLS),
             "token": rng.choice(["tok", "", "a b"]), "status": rng.choice(_STATUS)}  # fmt: skip
    fields = {
        "status": rng.choice(_STATUS),
        "identifiers": [ident],
        "identifier": ident,
        "authorizations": [rng.choice(_URLS) for _ in range(rng.randrange(3))],
        "finalize": rng.choice(_URLS),
        "certificate": rng.choice(_URLS),
        "expires": rng.choice(["2030-01-01T00:00:00Z", "yesterday", 5]),
        "challenges": [chall for _ in range(rng.randrange(3))],
        "error": _problem(rng),
        "suggestedWindow": {"start": rng.choice(["2030-01-01T00:00:00Z", "x", 1]),
                            "end": rng.choice(["2029-01-01T00:00:00Z", "2031-01-01T00:00:00Z"])},
        "newNonce": rng.choice(_URLS), "newAccount": rng.choice(_URLS),
        "newOrder": rng.choice(_URLS), "meta": _json_value(rng),
    }  # fmt: skip
    return {k: _maybe(rng, v) for k, v in fields.items() if rng.random() < 0.6}


def _answer(rng: random.Random) -> tuple[int, dict[str, list[str]], bytes]:
    kind = rng.randrange(10)
    if kind < 5:
        body = json.dumps(_shaped(rng)).encode()
    elif kind < 7:
        body = json.dumps(_problem(rng)).encode()
    elif kind < 8:
        body = json.dumps(_json_value(rng)).encode()
    elif kind < 9:
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    else:
        body = rng.choice([b"", b"{", b"-----BEGIN CERTIFICATE-----\nMIIB\n", b"<html>502</html>"])
    headers: dict[str, list[str]] = {}
    if rng.random() < 0.9:
        headers["Content-Type"] = [rng.choice(_CTYPES) for _ in range(rng.choice([1, 1, 2]))]
    if rng.random() < 0.7:
        headers["Replay-Nonce"] = [rng.choice([_NONCE, _NONCE, "not base64!", ""])]
    if rng.random() < 0.5:
        headers["Location"] = [str(rng.choice(_URLS))]
    if rng.random() < 0.3:
        headers["Retry-After"] = [rng.choice(_RETRY)]
    if rng.random() < 0.2:
        headers["Link"] = [rng.choice([f'<{BASE}/alt>;rel="alternate"', '<file:///x>;rel="alternate"',
                                       "<<>>;;rel", ""])]  # fmt: skip
    code = rng.choice(_CODES) if rng.random() < 0.9 else rng.randrange(100, 600)
    return code, headers, body


def _call(client: AcmeClient, op: str) -> defer.Deferred[Any]:
    if op == "directory":
        return client.directory()
    if op == "register":
        return client.register(["mailto:a@example.test"], True)
    client.account_url = f"{BASE}/acct/1"
    if op == "new_order":
        return client.new_order(["a.example.test"])
    if op == "get_order":
        return client.get_order(f"{BASE}/order/1")
    if op == "get_authorization":
        return client.get_authorization(f"{BASE}/authz/1")
    if op == "answer_challenge":
        return client.answer_challenge(f"{BASE}/chall/1")
    if op == "download_chain":
        return client.download_chain(f"{BASE}/cert/1")
    return client.renewal_info("aaaa.bbbb")


def test_fuzz_acme_answers_through_transport_and_client(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="synapse_acme")  # 10,000 warnings cost seconds
    outcomes: dict[str, int] = {}

    @FAST
    @given(seed=SEEDS)
    def check(seed: int) -> None:
        rng = random.Random(seed)
        op = rng.choice(_ops)
        http = _FakeHTTP(_answer(rng), op)
        transport = JWSTransport(http, Clock(), _KEY, f"{BASE}/dir")  # type: ignore[arg-type]
        out: list[Any] = []
        _call(AcmeClient(transport), op).addBoth(out.append)
        assert out, "the Deferred did not fire"
        assert http.calls <= 2 + 3 * 22  # bounded: no loop, whatever the answer
        result = out[0]
        if isinstance(result, Failure):
            assert isinstance(result.value, DOCUMENTED), result.getTraceback()
            name = type(result.value).__name__
        else:
            name = "ok"
        outcomes[name] = outcomes.get(name, 0) + 1

    check()
    assert sum(outcomes.values()) >= EXAMPLES
    assert outcomes.get("ok", 0) > 50 and outcomes.get("AcmeProtocolError", 0) > 100
    COUNTS["acme"] = sum(outcomes.values())


# -- config documents through the CLI's commands ------------------------------------------------

CLI_EXAMPLES = 2_500
_CLI_COMMANDS: list[list[str]] = [
    ["status"], ["status", "--json"], ["issue"], ["issue", "--no-listener"],
    ["issue", "--name", "a.example.com"], ["renew"], ["renew", "--force"], ["run"],
    ["run", "--no-listener"], ["new-account"], ["new-account", "--force"], ["generate-config"],
    ["generate-config", "-o", "{case}/out.yaml"],
    ["generate-config", "-o", "{case}/out.yaml", "--force"],
]  # fmt: skip
# Commands that reach the reactor with a usable config: run in a forked child (a reactor runs
# once per process), against a loopback "CA" that closes every connection at once.
_REACTOR_COMMANDS = ("issue", "renew", "run")
_PATH_KEYS = ("storage", "account_key_file", "tls_certificate_path", "tls_private_key_path")


class _ClosingCA:
    """A loopback listener (port 0) that accepts and closes each connection: every request to
    "the CA" fails at once, so no forked command waits for a timeout or reaches a network."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/dir"
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            conn.close()

    def close(self) -> None:
        self.stopping = True
        self.thread.join()
        self.sock.close()


def _contain(doc: Any, rng: random.Random, ca_url: str) -> Any:
    """The document with everything that reaches out of the test made local: the CA is the
    closing listener, listeners bind port 0 on loopback, files land in the case directory,
    keys are quick to make and the request cap cannot stall. Applied only to documents that
    parse, before a command that writes or listens runs on them (the rest stay as fuzzed)."""
    if not isinstance(doc, dict):
        return doc
    for key, new in (
        ("tls_certificate_path", "tls/hs.crt"),
        ("tls_private_key_path", "tls/hs.key"),
    ):
        if key in doc:
            doc[key] = new
    blocks = [doc.get("acme")]
    if isinstance(doc.get("modules"), list):
        blocks += [m.get("config") for m in doc["modules"] if isinstance(m, dict)]
    for block in blocks:
        if not isinstance(block, dict):
            continue
        for key in (
            "staging",
            "port",
            "bind_addresses",
            "ca_bundle",
            "issuer_roots",
            "max_requests_per_minute",
        ):
            block.pop(key, None)
        block["url"] = ca_url
        block["testing_allow_http"] = True  # the closing "CA" speaks plain http on loopback
        block["listen"] = ["tcp:0:interface=127.0.0.1"] if rng.random() < 0.7 else []
        if block.get("tls_listen"):
            block["tls_listen"] = ["tcp:0:interface=127.0.0.1"]
        block["storage"] = "state"
        if "account_key_file" in block:  # inside the store, or a missing directory outside it
            block["account_key_file"] = rng.choice(["state/a.key", "state/k/a.key", "out/a.key"])
        for key, new in (
            ("tls_certificate_path", "tls/c.pem"),
            ("tls_private_key_path", "tls/k.pem"),
        ):
            if key in block:
                block[key] = new
        if "key_type" in block:
            block["key_type"] = "ecdsa-p256"
        for item in block.get("certificates") or []:
            if isinstance(item, dict):
                item.pop("key_type", None)
        block["request_timeout"] = 2
    return doc


def _usable_document(rng: random.Random) -> str:
    """A document that mostly parses and is enabled: the fuzzed documents above rarely are,
    and the commands' paths past the parser (the reactor, the store, the exports) need them."""
    block: dict[str, Any] = {"enabled": rng.random() < 0.9, "domain": "a.example.com"}
    for key in rng.sample(KNOWN_KEYS, rng.randrange(6)):
        if key not in ("enabled", "domain"):
            block[key] = rng.choice(_GOOD[key]) if rng.random() < 0.9 else rng.choice(_JUNK)
    doc: dict[str, Any] = {"server_name": "example.org"}
    if rng.random() < 0.3:
        doc["modules"] = [{"module": "synapse_acme.synapse.AcmeModule", "config": block}]
        if rng.random() < 0.2:
            doc["acme"] = rng.choice([{"enabled": False}, {"enabled": True, "port": 8009}])
    else:
        doc["acme"] = block
    return yaml.dump(doc, Dumper=_Dumper, allow_unicode=True)


@attrs.define
class _Child:
    """A forked ``cli.main`` run (see :func:`_fork_cli`)."""

    pid: int
    out: Path
    what: str  # the case, for the failure message
    started: float = attrs.field(factory=time.monotonic)


def _fresh_reactor() -> Any:
    """In a forked child: a reactor of its own. One the parent created (an earlier test
    imported it) shares its epoll descriptor and waker pipe with the parent and every other
    child, so two children would see each other's events."""
    import twisted.internet
    from twisted.internet import default

    sys.modules.pop("twisted.internet.reactor", None)
    if hasattr(twisted.internet, "reactor"):
        delattr(twisted.internet, "reactor")
    default.install()
    from twisted.internet import reactor

    return reactor


def _fork_cli(args: list[str], cwd: Path, seconds: float, what: str) -> _Child:
    """``cli.main(args)`` in a forked child (a reactor runs once per process), stopped after
    ``seconds`` as SIGTERM would stop `run`. Exit code 99: an exception escaped cli.main."""
    out = cwd / "child.out"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            f = open(out, "w", buffering=1)  # the child ends with os._exit: no close needed
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            sys.stdout = sys.stderr = f
            logging.root.handlers.clear()  # so the CLI's logging goes to f, as in a terminal
            os.chdir(cwd)
            reactor = _fresh_reactor()
            reactor.callWhenRunning(lambda: reactor.callLater(seconds, reactor.stop))
            from synapse_acme import cli

            code = cli.main(args)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)
    return _Child(pid, out, what)


def _reap(child: _Child) -> tuple[int, str]:
    """Wait for ``child`` (killed after 60 s: a command that does not end is a failure)."""
    while True:
        done, status = os.waitpid(child.pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), child.out.read_text()
        if time.monotonic() - child.started > 60:
            os.kill(child.pid, signal.SIGKILL)
            os.waitpid(child.pid, 0)
            raise AssertionError(f"did not end within 60 s: {child.what}\n{child.out.read_text()}")
        time.sleep(0.002)


def _check_outcome(code: int, output: str, what: str) -> None:
    """The documented outcome of every command: 0, 1 or 2, one message, never a traceback."""
    assert code in (0, 1, 2), f"exit {code}: {what}\n{output}"
    assert "Traceback" not in output and "error: unexpected" not in output, f"{what}\n{output}"
    if code == 2:
        assert "error" in output or "usage:" in output, f"{what}\n{output}"


#: Forked runs (valid, enabled documents into issue/renew/run): each costs a process and up to
#: a few tenths of a second, so they are capped; two run at a time while the rest go on.
FORK_BUDGET = 160
PARALLEL_FORKS = 2


def test_fuzz_config_documents_through_every_command(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fuzzed homeserver.yaml/acme.yaml documents through the CLI's commands (not only the
    parser): every case ends in 0, 1 or 2, with one message and no traceback, and nothing
    escapes the case directory."""
    from synapse_acme import cli

    caplog.set_level(logging.WARNING)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # `~/acme` stays in the test's tree
    base = tmp_path / "r" / "s" / "t" / "u"  # `../../x` from a case directory stays in here
    ca = _ClosingCA()
    seen: dict[str, int] = {}
    running: list[tuple[_Child, str]] = []
    counter = iter(range(10**9))

    def reap_one() -> None:
        child, kind = running.pop(0)
        code, output = _reap(child)
        _check_outcome(code, output, child.what)
        seen[f"{kind}:{code}"] = seen.get(f"{kind}:{code}", 0) + 1

    @settings(max_examples=CLI_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(seed=SEEDS)
    def check(seed: int) -> None:
        rng = random.Random(seed)
        case = base / str(next(counter))
        case.mkdir(parents=True)
        if rng.random() < 0.5:
            (case / "tls").mkdir()
        text = _usable_document(rng) if rng.random() < 0.35 else _document(rng)
        command = [a.replace("{case}", str(case)) for a in rng.choice(_CLI_COMMANDS)]
        path = case / "homeserver.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            parsed: AcmeConfig | None = read_config_file(str(path))
        except ConfigError:
            parsed = None
        forked = command[0] in _REACTOR_COMMANDS and parsed is not None and parsed.enabled
        if (
            forked
            and sum(n for k, n in seen.items() if "/forked" in k) + len(running) >= FORK_BUDGET
        ):
            command, forked = ["status"], False  # over budget: the read-only command instead
        if parsed is not None and command[0] not in ("status", "generate-config"):
            path.write_text(yaml.safe_dump(_contain(yaml.safe_load(text), rng, ca.url)))
            try:
                parsed = read_config_file(str(path))
            except ConfigError:
                parsed = None
            forked = forked and parsed is not None and parsed.enabled
        flags = rng.choice([[], ["-q"], ["-v"]])
        args = [command[0], *(["-c", str(path)] if command[0] != "generate-config" else [])]
        args = (
            [*flags, *args, *command[1:]] if rng.random() < 0.5 else [*args, *command[1:], *flags]
        )
        what = f"seed {seed}: synapse-acme {' '.join(args)}\n{path.read_text()}"
        if forked:
            seconds = 0.15 if command[0] == "run" else 15
            running.append((_fork_cli(args, case, seconds, what), f"{command[0]}/forked"))
            while len(running) >= PARALLEL_FORKS:
                reap_one()
            return
        caplog.clear()
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(args)
        _check_outcome(code, out.getvalue() + err.getvalue() + caplog.text, what)
        assert not [r for r in caplog.records if r.exc_info], f"{what}\n{caplog.text}"
        seen[f"{command[0]}:{code}"] = seen.get(f"{command[0]}:{code}", 0) + 1

    try:
        check()
        while running:
            reap_one()
    finally:
        for child, _ in running:
            os.kill(child.pid, signal.SIGKILL)
            os.waitpid(child.pid, 0)
        ca.close()
    total = sum(seen.values())
    forked = sum(n for k, n in seen.items() if "/forked" in k)
    print(f"CLI fuzz: {total} cases, {forked} forked: {dict(sorted(seen.items()))}")
    assert total >= 2_000, seen
    assert forked >= 100, seen  # valid documents really ran through the reactor
    assert {k.rsplit(":", 1)[1] for k in seen} == {"0", "1", "2"}, seen
    COUNTS["cli"] = total
