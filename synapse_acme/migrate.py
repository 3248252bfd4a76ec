"""Copy a whole store into another backend: ``synapse-acme migrate-store``.

Only the storage contract is used (:class:`~synapse_acme.interfaces.IStorageBackend`, listing
through :class:`~synapse_acme.interfaces.IStoreAdmin`), so any backend goes either way: the
file store into PostgreSQL and back. What is copied: every certificate bundle (key, chain and
metadata, ARI state included), the account key and the account record. What is not: challenge
answers and leases (short-lived), and the status and alert files (each process writes its own).

The rules, per certificate: a bundle already identical in the target is left alone (so running
it again copies nothing twice); a target holding another bundle as new as the source's or newer
(its leaf's notBefore) is kept unless ``force``; anything written is loaded back and compared
before it counts as copied. The account key is never replaced: a target with another account
key is a failure (a new key is a new account at the CA). Every outcome is one line; a key's
content never is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import attrs

from synapse_acme import crypto
from synapse_acme.account import key_thumbprint, parse_account_key
from synapse_acme.errors import SynapseAcmeError
from synapse_acme.interfaces import IStorageBackend
from synapse_acme.model import CertificateBundle
from synapse_acme.status import format_time

COPIED, REPLACED, UNCHANGED, KEPT, FAILED = "COPIED", "REPLACED", "UNCHANGED", "KEPT", "FAILED"
NONE = "NONE"  # nothing of the kind in the source
#: Outcomes that make the command exit non-zero.
BAD = (KEPT, FAILED)


@attrs.frozen
class Line:
    """One outcome: ``word`` (COPIED, ...), what (a certificate key, ``account key``, ...),
    and why."""

    word: str
    what: str
    detail: str

    def __str__(self) -> str:
        return f"{self.word:<10} {self.what}: {self.detail}"


@attrs.define
class Summary:
    """Every line of a migration, in order."""

    lines: list[Line] = attrs.field(factory=list)

    @property
    def ok(self) -> bool:
        return not self.empty and not any(line.word in BAD for line in self.lines)

    @property
    def empty(self) -> bool:
        """The source held nothing at all: most likely the wrong store (a typo in the
        database name, another storage directory), so not a success."""
        return all(line.word == NONE for line in self.lines)

    def count(self, word: str, certificates: bool = True) -> int:
        return sum(
            1
            for ln in self.lines
            if ln.word == word and ln.what.startswith("account ") != certificates
        )

    def __str__(self) -> str:
        certs = ", ".join(
            f"{self.count(w)} {w.lower()}" for w in (COPIED, REPLACED, UNCHANGED, KEPT, FAILED)
        )
        account = "; ".join(
            f"{ln.what} {ln.word.lower()}" for ln in self.lines if ln.what.startswith("account ")
        )
        if self.empty:
            return "the source holds no certificate and no account: is it the right store?"
        return f"certificates: {certs}" + (f"; {account}" if account else "")


async def migrate(
    source: IStorageBackend,
    target: IStorageBackend,
    *,
    force: bool = False,
    report: Callable[[Line], object] = lambda line: None,
) -> Summary:
    """Copy everything from ``source`` into ``target`` (see the module docstring), calling
    ``report`` with each line as it is decided; the summary of them all."""
    summary = Summary()

    def add(word: str, what: str, detail: str) -> None:
        line = Line(word, what, detail)
        summary.lines.append(line)
        report(line)

    for key in await source.keys():
        try:
            word, detail = await _copy_certificate(source, target, key, force)
        except SynapseAcmeError as e:
            word, detail = FAILED, str(e)
        add(word, key, detail)
    try:
        word, detail = await _copy_account_key(source, target)
    except SynapseAcmeError as e:
        word, detail = FAILED, str(e)
    add(word, "account key", detail)
    if word in BAD:
        add(FAILED, "account record", "not copied, since the account key was not")
        return summary
    try:
        word, detail = await _copy_account_record(source, target)
    except SynapseAcmeError as e:
        word, detail = FAILED, str(e)
    add(word, "account record", detail)
    return summary


def _describe(bundle: CertificateBundle) -> str:
    leaf = crypto.parse_chain(bundle.chain_pem)[0]
    return f"serial {leaf.serial_number:x}, valid until {format_time(crypto.not_after(leaf))}"


def _issued(bundle: CertificateBundle) -> Any:
    return crypto.not_before(crypto.parse_chain(bundle.chain_pem)[0])


async def _copy_certificate(
    source: IStorageBackend, target: IStorageBackend, key: str, force: bool
) -> tuple[str, str]:
    bundle = await source.load(key)
    if bundle is None:
        return FAILED, "gone from the source while copying"
    try:
        existing = await target.load(key)
    except SynapseAcmeError as e:
        if not force:
            return KEPT, f"the target's copy is unreadable ({e}); --force replaces it"
        existing = None
    if existing == bundle:
        return UNCHANGED, f"identical in the target ({_describe(bundle)})"
    if existing is not None and not force and _issued(existing) >= _issued(bundle):
        return KEPT, (
            f"the target holds another certificate issued as late or later "
            f"({_describe(existing)}; the source's: {_describe(bundle)}); --force replaces it"
        )
    await target.save(key, bundle)
    if await target.load(key) != bundle:
        return FAILED, "written, but what the target gives back differs from the source"
    if existing is None:
        return COPIED, _describe(bundle)
    return REPLACED, f"{_describe(bundle)}, was {_describe(existing)}"


def _thumbprint(data: bytes, where: str) -> str:
    return key_thumbprint(parse_account_key(data, where))


async def _copy_account_key(source: IStorageBackend, target: IStorageBackend) -> tuple[str, str]:
    key = await source.load_account_key()
    if key is None:
        return NONE, "none in the source"
    mine = _thumbprint(key, "the source's account key")
    if await target.create_account_key(key):
        back = await target.load_account_key()
        if back is None or _thumbprint(back, "the target's account key") != mine:
            return FAILED, "written, but what the target gives back is another key"
        return COPIED, f"thumbprint {mine}"
    theirs = await target.load_account_key()
    if theirs is not None and _thumbprint(theirs, "the target's account key") == mine:
        return UNCHANGED, f"the target has the same key (thumbprint {mine})"
    return KEPT, (
        f"the target already has another account key, which is never replaced (a new key is "
        f"a new account at the CA); source thumbprint {mine}"
    )


async def _copy_account_record(source: IStorageBackend, target: IStorageBackend) -> tuple[str, str]:
    record = await source.load_account_record()
    if record is None:
        return NONE, "none in the source"
    if await target.load_account_record() == record:
        return UNCHANGED, record.url
    await target.save_account_record(record)
    if await target.load_account_record() != record:
        return FAILED, "written, but what the target gives back differs"
    return COPIED, record.url


# -- connection strings --------------------------------------------------------------------------

_PASSWORD_PAIR = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def is_postgres_dsn(dsn: str) -> bool:
    """A libpq URI (``postgresql://``, ``postgres://``) or key=value connection string."""
    return dsn.startswith(("postgresql://", "postgres://")) or ("=" in dsn and "://" not in dsn)


def redact_dsn(dsn: str) -> str:
    """``dsn`` fit to print: any password replaced by ``***``."""
    if "://" not in dsn:
        return _PASSWORD_PAIR.sub(r"\1***", dsn)
    scheme, _, rest = dsn.partition("://")
    netloc, tail = re.match(r"([^/?#]*)(.*)", rest, re.DOTALL).groups()  # type: ignore[union-attr]
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{hosts}"
    tail = re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", tail)
    return f"{scheme}://{netloc}{tail}"


def password_of(dsn: str) -> str | None:
    """The password written in ``dsn``, if any (to scrub it from error messages)."""
    try:
        import psycopg2.extensions

        value = psycopg2.extensions.parse_dsn(dsn).get("password")
    except Exception:  # not parseable: then libpq will not connect with it either
        return None
    return value or None
