"""dry_run_on_change: what counts as a change of names or CA (synapse_acme.dryrun.changes)."""

from __future__ import annotations

from synapse_acme.dryrun import changes
from synapse_acme.model import CertificateBundle, CertificateSpec

CA = "https://ca.example.test/dir"


def issued(names: list[str], url: str = CA, **extra: object) -> CertificateBundle:
    return CertificateBundle(
        key_pem=b"", chain_pem=b"", metadata={"names": names, "issuer_directory": url, **extra}
    )


def test_changes_of_names_or_ca_and_nothing_else() -> None:
    spec = CertificateSpec(names=("a.example.test", "b.example.test"))
    assert changes(spec, None, CA) == []  # first issuance: nothing to compare
    assert changes(spec, issued(["b.example.test", "a.example.test"]), CA) == []  # order
    assert changes(spec, issued(["a.example.test"]), CA) == [
        "names a.example.test -> a.example.test, b.example.test"
    ]
    assert changes(spec, issued(list(spec.names), "https://old.example.test/dir"), CA) == [
        "CA https://old.example.test/dir -> https://ca.example.test/dir"
    ]
    assert changes(spec, issued(["x.example.test"], placeholder=True), CA) == []
