"""DNS-01: the TXT value, the RFC 2136 update on the wire, the responder's propagation check and
cleanup (a fake DNS backend on a Clock), and the ``dns01:`` config block. The real BIND9 run is
tests/integration/test_dns01_bind.py."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.tsig
import dns.update
import josepy
import pytest
from acme import challenges
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from synapse_acme.config import parse_acme_config
from synapse_acme.dns01 import (
    TSIG_ALGORITHMS,
    DNS01Responder,
    Dns01Settings,
    Server,
    record_name,
    txt_value,
)
from synapse_acme.errors import ConfigError, Dns01Error
from synapse_acme.interfaces import IResponder
from synapse_acme.rfc2136 import TSIG_ALGORITHM_NAMES, build_update
from tests.deferreds import failure_of, result_of

SECRET = b"0123456789abcdef0123456789abcdef"
SECRET_B64 = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
KEY_CLAUSE = f'key "acme-key" {{\n\talgorithm hmac-sha512;\n\tsecret "{SECRET_B64}";\n}};\n'
PRIMARY: Server = ("192.0.2.53", 5353)
SECONDARY: Server = ("192.0.2.54", 53)
SETTINGS = Dns01Settings(
    server=PRIMARY,
    zone="example.test",
    tsig_key_name="acme-key",
    tsig_algorithm="hmac-sha256",
    tsig_secret=SECRET,
)


# -- what goes into the zone ------------------------------------------------------------------


def test_the_txt_value_is_what_the_acme_library_computes_for_dns01() -> None:
    key = josepy.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    chall = challenges.DNS01(token=b"x" * 32)
    assert txt_value(chall.key_authorization(key)) == chall.validation(key)


@pytest.mark.parametrize(
    ("identifier", "name"),
    [
        ("example.test", "_acme-challenge.example.test"),
        ("*.example.test", "_acme-challenge.example.test"),
        ("A.Example.Test.", "_acme-challenge.a.example.test"),
    ],
)
def test_the_record_name_drops_a_wildcard(identifier: str, name: str) -> None:
    assert record_name(identifier) == name


def _parsed(message: dns.message.Message) -> dns.update.UpdateMessage:
    keyring = {dns.name.from_text("acme-key."): dns.tsig.Key("acme-key.", SECRET, "hmac-sha256")}
    parsed = dns.message.from_wire(message.to_wire(), keyring=keyring)  # checks the TSIG
    assert isinstance(parsed, dns.update.UpdateMessage)
    return parsed


def test_every_configurable_tsig_algorithm_has_a_dnspython_name() -> None:
    # The configuration checks names without dnspython; the backend maps each one.
    assert set(TSIG_ALGORITHM_NAMES) == set(TSIG_ALGORITHMS)
    assert TSIG_ALGORITHM_NAMES["hmac-sha512"] == dns.tsig.HMAC_SHA512


def test_an_add_is_one_signed_txt_value_in_the_zone() -> None:
    parsed = _parsed(build_update(SETTINGS, "add", "_acme-challenge.example.test", "v1"))
    assert parsed.had_tsig
    assert parsed.keyname == dns.name.from_text("acme-key.")
    assert [str(r.name) for r in parsed.zone] == ["example.test."]
    [rrset] = parsed.update
    assert str(rrset.name) == "_acme-challenge.example.test."
    assert (rrset.rdclass, rrset.rdtype, rrset.ttl) == (
        dns.rdataclass.IN,
        dns.rdatatype.TXT,
        60,
    )
    assert [b"".join(r.strings) for r in rrset] == [b"v1"]


def test_a_delete_removes_only_that_value_never_the_rrset() -> None:
    parsed = _parsed(build_update(SETTINGS, "delete", "_acme-challenge.example.test", "v1"))
    [rrset] = parsed.update
    # RFC 2136 section 2.5.4: class NONE deletes one RR; class ANY would delete them all
    # (dnspython keeps the zone's class and says NONE in ``deleting``).
    assert (rrset.rdclass, rrset.deleting) == (dns.rdataclass.IN, dns.rdataclass.NONE)
    assert [b"".join(r.strings) for r in rrset] == [b"v1"]


def test_a_wrong_secret_does_not_verify() -> None:
    other = attrs.evolve(SETTINGS, tsig_secret=b"x" * 32)
    with pytest.raises(dns.tsig.BadSignature):
        _parsed(build_update(other, "add", "_acme-challenge.example.test", "v1"))


def test_the_secret_is_not_in_the_repr() -> None:
    assert SECRET.decode() not in repr(SETTINGS) and "tsig_secret=" not in repr(SETTINGS)


# -- the responder ----------------------------------------------------------------------------


@attrs.define
class FakeDns:
    """A primary and its secondaries: a value reaches each server ``delay`` queries after it was
    added there (per server); ``down`` servers never answer."""

    servers: list[Server] = attrs.field(factory=lambda: [PRIMARY, SECONDARY])
    delay: int = 0
    down: set[Server] = attrs.field(factory=set)
    fail_add: bool = False
    fail_delete: bool = False
    zone: dict[str, list[str]] = attrs.field(factory=dict)
    seen: dict[tuple[Server, str], int] = attrs.field(factory=dict)
    log: list[tuple[str, str, str]] = attrs.field(factory=list)

    def add(self, name: str, value: str) -> None:
        self.log.append(("add", name, value))
        if self.fail_add:
            raise Dns01Error("REFUSED")
        self.zone.setdefault(name, []).append(value)

    def delete(self, name: str, value: str) -> None:
        self.log.append(("delete", name, value))
        if self.fail_delete:
            raise Dns01Error("no answer from the primary")
        values = self.zone.get(name, [])
        if value in values:
            values.remove(value)

    def authoritative_servers(self) -> list[Server]:
        return list(self.servers)

    def txt_values(self, server: Server, name: str) -> set[str]:
        if server in self.down:
            raise Dns01Error("timed out")
        found = set()
        for value in self.zone.get(name, []):
            count = self.seen.get((server, value), 0)
            self.seen[(server, value)] = count + 1
            if count >= self.delay:
                found.add(value)
        return found


def sync_run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return defer.maybeDeferred(f, *args)


def responder(fake: FakeDns, clock: Clock, **kwargs: Any) -> DNS01Responder:
    return DNS01Responder(
        backend=fake,
        clock=clock,
        run=kwargs.pop("run", sync_run),
        propagation_timeout=kwargs.pop("propagation_timeout", 10.0),
        poll_interval=1.0,
        zone_check=SETTINGS.covers,
        **kwargs,
    )


def test_it_provides_the_responder_contract() -> None:
    assert verifyObject(IResponder, responder(FakeDns(), Clock()))
    assert DNS01Responder.challenge_type == "dns-01"


def test_it_fires_once_every_authoritative_server_has_the_value() -> None:
    fake, clock = FakeDns(delay=2), Clock()
    r = responder(fake, clock)
    d = r.start_responding("example.test", "tok", "tok.thumb")
    assert not d.called
    clock.advance(1)
    assert not d.called
    clock.advance(1)
    assert result_of(d) is None
    assert fake.zone["_acme-challenge.example.test"] == [txt_value("tok.thumb")]
    result_of(r.stop_responding("example.test", "tok"))
    assert fake.zone["_acme-challenge.example.test"] == []
    assert r.pending() == []


def test_a_wildcard_and_its_base_name_hold_two_values_and_remove_only_their_own() -> None:
    fake, clock = FakeDns(), Clock()
    r = responder(fake, clock)
    result_of(r.start_responding("example.test", "t1", "t1.k"))
    result_of(r.start_responding("*.example.test", "t2", "t2.k"))
    name = "_acme-challenge.example.test"
    assert sorted(fake.zone[name]) == sorted([txt_value("t1.k"), txt_value("t2.k")])
    result_of(r.stop_responding("example.test", "t1"))
    assert fake.zone[name] == [txt_value("t2.k")]
    result_of(r.stop_responding("*.example.test", "t2"))
    assert fake.zone[name] == []


def test_a_record_that_never_propagates_fails_naming_the_server_and_is_removed() -> None:
    fake, clock = FakeDns(down={SECONDARY}), Clock()
    r = responder(fake, clock, propagation_timeout=5.0)
    d = r.start_responding("example.test", "tok", "tok.k")
    clock.pump([1.0] * 6)
    err = failure_of(d, Dns01Error)
    assert "192.0.2.54:53: timed out" in str(err)
    assert "within 5 s" in str(err)
    assert fake.zone["_acme-challenge.example.test"] == []
    assert r.pending() == []


def test_cancelling_while_waiting_removes_the_record() -> None:
    fake, clock = FakeDns(delay=100), Clock()
    r = responder(fake, clock)
    d = r.start_responding("example.test", "tok", "tok.k")
    clock.advance(1)
    d.cancel()
    failure_of(d, CancelledError)
    assert fake.zone["_acme-challenge.example.test"] == []
    assert clock.getDelayedCalls() == []


def test_cancelling_while_the_add_is_in_flight_deletes_after_it_lands() -> None:
    fake, clock = FakeDns(), Clock()
    adds: list[Deferred[Any]] = []

    def run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if f == fake.add:  # the "thread" doing the add has not finished yet
            d: Deferred[Any] = Deferred()
            adds.append(d)
            d.addCallback(lambda _: f(*args))
            return d
        return sync_run(f, *args)

    r = responder(fake, clock, run=run)
    d = r.start_responding("example.test", "tok", "tok.k")
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    d.cancel()
    assert outcome == []  # the delete waits for the add
    assert [op for op, _, _ in fake.log] == []
    adds[0].callback(None)
    assert outcome[0].check(CancelledError)
    assert [op for op, _, _ in fake.log] == ["add", "delete"]
    assert fake.zone["_acme-challenge.example.test"] == []


def test_a_refused_add_fails_the_challenge() -> None:
    fake = FakeDns(fail_add=True)
    r = responder(fake, Clock())
    err = failure_of(r.start_responding("example.test", "tok", "tok.k"), Dns01Error)
    assert "REFUSED" in str(err)
    assert r.pending() == []


def test_a_failed_delete_is_logged_naming_the_record_and_never_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeDns()
    r = responder(fake, Clock())
    result_of(r.start_responding("example.test", "tok", "tok.k"))
    fake.fail_delete = True
    with caplog.at_level(logging.ERROR, logger="synapse_acme.dns01"):
        assert result_of(r.stop_responding("example.test", "tok")) is None
    assert "_acme-challenge.example.test" in caplog.text
    assert txt_value("tok.k") in caplog.text and "remove it by hand" in caplog.text


def test_stopping_an_unknown_token_is_not_an_error() -> None:
    assert result_of(responder(FakeDns(), Clock()).stop_responding("example.test", "x")) is None


def test_a_name_outside_the_zone_is_refused_before_any_update() -> None:
    fake = FakeDns()
    err = failure_of(
        responder(fake, Clock()).start_responding("other.test", "t", "t.k"), Dns01Error
    )
    assert "outside" in str(err)
    assert fake.log == []


# -- the dns01: block -------------------------------------------------------------------------


def _config(tmp_path: Path, key_text: str = KEY_CLAUSE, **dns01: Any) -> Any:
    key_file = tmp_path / "tsig.key"
    key_file.write_text(key_text)
    block = {"server": "192.0.2.53:5353", "zone": "example.test", "tsig_secret_file": "tsig.key"}
    block.update(dns01)
    return parse_acme_config(
        {"domain": "example.test", "domains": ["*.example.test"], "dns01": block},
        base_dir=str(tmp_path),
    )


def test_tsig_keygen_output_names_the_key_and_algorithm(tmp_path: Path) -> None:
    settings = _config(tmp_path).dns01
    assert settings.tsig_key_name == "acme-key"
    assert settings.tsig_algorithm == "hmac-sha512"
    assert settings.tsig_secret == SECRET
    assert settings.server == PRIMARY
    assert settings.propagation_servers is None
    assert settings.config_path == "acme.dns01"


def test_a_bare_secret_needs_the_key_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        _config(tmp_path, SECRET_B64 + "\n")
    assert e.value.path == "acme.dns01.tsig_key_name"
    settings = _config(tmp_path, SECRET_B64 + "\n", tsig_key_name="k1", ttl=30).dns01
    assert (settings.tsig_key_name, settings.tsig_algorithm, settings.ttl) == (
        "k1",
        "hmac-sha256",
        30,
    )


@pytest.mark.parametrize(
    ("secret", "extra", "path"),
    [
        (KEY_CLAUSE, {"tsig_key_name": "other"}, "acme.dns01.tsig_key_name"),
        (KEY_CLAUSE, {"tsig_algorithm": "hmac-sha256"}, "acme.dns01.tsig_algorithm"),
        ("not base64 at all!", {"tsig_key_name": "k"}, "acme.dns01.tsig_secret_file"),
        (
            SECRET_B64,
            {"tsig_key_name": "k", "tsig_algorithm": "rot13"},
            "acme.dns01.tsig_algorithm",
        ),
        (SECRET_B64, {"tsig_key_name": "k", "zone": "other.test"}, "acme.dns01.zone"),
        (SECRET_B64, {"tsig_key_name": "k", "server": "ns.example.test"}, "acme.dns01.server"),
        (
            SECRET_B64,
            {"tsig_key_name": "k", "propagation_servers": ["x"]},
            "acme.dns01.propagation_servers[0]",
        ),
        (SECRET_B64, {"tsig_key_name": "k", "secret": SECRET_B64}, "acme.dns01.secret"),
    ],
)
def test_errors_name_the_key_and_never_show_the_secret(
    tmp_path: Path, secret: str, extra: dict[str, Any], path: str
) -> None:
    with pytest.raises(ConfigError) as e:
        _config(tmp_path, secret, **extra)
    assert e.value.path == path
    assert SECRET_B64 not in str(e.value)


def test_a_missing_secret_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        parse_acme_config(
            {
                "domain": "example.test",
                "dns01": {
                    "server": "192.0.2.53",
                    "zone": "example.test",
                    "tsig_secret_file": str(tmp_path / "none.key"),
                },
            }
        )
    assert e.value.path == "acme.dns01.tsig_secret_file"


def test_propagation_servers_and_timeout(tmp_path: Path) -> None:
    settings = _config(
        tmp_path, propagation_servers=["192.0.2.54", "[2001:db8::1]:5353"], propagation_timeout="3m"
    ).dns01
    assert settings.propagation_servers == (("192.0.2.54", 53), ("2001:db8::1", 5353))
    assert settings.propagation_timeout == 180.0
    assert _config(tmp_path, propagation_servers="auto").dns01.propagation_servers is None
