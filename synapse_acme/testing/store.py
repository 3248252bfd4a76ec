"""An in-memory :class:`~synapse_acme.interfaces.ICertificateStore` for tests.

It follows the same contract as :class:`synapse_acme.store.FileStore` (checked by the same
contract tests): same key validation, the same refusal of a bundle that is not intact
(:func:`synapse_acme.store.check_intact`), metadata round-tripped through JSON (so a caller cannot
mutate what is stored, and non-JSON metadata fails here as it would on disk), and a way to
make the next save fail for fault-injection tests.
"""

from __future__ import annotations

import attrs
from twisted.internet import defer
from zope.interface import implementer

from synapse_acme.errors import StoreError
from synapse_acme.interfaces import ICertificateStore
from synapse_acme.model import CertificateBundle
from synapse_acme.store import (
    check_bundle,
    check_intact,
    check_key,
    decode_metadata,
    encode_metadata,
)


@implementer(ICertificateStore)
@attrs.define
class MemoryStore:
    """Bundles in a dict, stored as bytes so every load returns a fresh copy."""

    _entries: dict[str, tuple[bytes, bytes, bytes]] = attrs.field(factory=dict, init=False)
    _fail_next: list[Exception] = attrs.field(factory=list, init=False)
    saves: int = attrs.field(default=0, init=False)  # successful saves, for assertions

    def fail_next_save(self, exc: Exception | None = None) -> None:
        """Make the next :meth:`save` fail with ``exc`` (default: a StoreError like ENOSPC)
        and leave the stored bundle untouched. Calls queue up."""
        self._fail_next.append(
            exc if exc is not None else StoreError("simulated: No space left on device (ENOSPC)")
        )

    def load(self, key: str) -> defer.Deferred[CertificateBundle | None]:
        """Deferred firing with a copy of the bundle under ``key``, or ``None``."""
        try:
            check_key(key)
        except StoreError:
            return defer.fail()
        entry = self._entries.get(key)
        if entry is None:
            return defer.succeed(None)
        key_pem, chain_pem, metadata = entry
        return defer.succeed(
            CertificateBundle(
                key_pem=key_pem,
                chain_pem=chain_pem,
                metadata=decode_metadata(metadata, f"memory:{key}"),
            )
        )

    def save(self, key: str, bundle: CertificateBundle) -> defer.Deferred[None]:
        """Deferred firing with ``None`` once stored; StoreError for a bad key/bundle or an
        injected failure (the old bundle survives)."""
        try:
            check_key(key)
            check_bundle(bundle)
            check_intact(bundle, f"memory:{key}")
            metadata = encode_metadata(bundle.metadata)
            if self._fail_next:
                raise self._fail_next.pop(0)
        except Exception:
            return defer.fail()
        self._entries[key] = (bundle.key_pem, bundle.chain_pem, metadata)
        self.saves += 1
        return defer.succeed(None)

    def keys(self) -> defer.Deferred[list[str]]:
        """Deferred firing with the sorted stored keys."""
        return defer.succeed(sorted(self._entries))

    def delete(self, key: str) -> defer.Deferred[None]:
        """Deferred firing with ``None`` once ``key`` is gone (absent is fine)."""
        try:
            check_key(key)
        except StoreError:
            return defer.fail()
        self._entries.pop(key, None)
        return defer.succeed(None)
