"""Dry runs: a full issuance against a staging CA into a scratch store, nothing else touched.

``synapse-acme renew --dry-run`` runs one per certificate; with ``dry_run_on_change`` the
service runs one before a real order whose names or CA differ from the certificate's last
issuance, and places the real order only if it passed (a mistake in a new name then costs the
staging CA's generous limits, not the production CA's).

A dry run uses its own account (a new key in a temporary directory: a staging CA does not
know the production account), answers the challenges with the live responder (the CA's
validator reaches the same listener), and saves the certificate into a scratch store in that
temporary directory, which is removed afterwards. It never writes the live store, the
exported files or the served certificate. The chain is checked for order, key and names, not
for a trusted root: staging roots are trusted nowhere.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred

from synapse_acme import crypto
from synapse_acme.account import load_or_create_account_key
from synapse_acme.acme.client import AcmeClient
from synapse_acme.acme.issuer import AcmeIssuer
from synapse_acme.acme.transport import JWSTransport, make_http_client
from synapse_acme.config import AcmeConfig
from synapse_acme.errors import DryRunFailed
from synapse_acme.http01 import HTTP01Responder
from synapse_acme.model import CertificateBundle, CertificateSpec
from synapse_acme.names import canonical_names, names_key
from synapse_acme.store import FileStore

logger = logging.getLogger(__name__)


class ListableStore(Protocol):
    """What the change check reads: the stored bundles (ICertificateStore) and their keys
    (IStoreAdmin); the file store and its threaded wrapper are both."""

    def load(self, key: str) -> Deferred[CertificateBundle | None]: ...

    def keys(self) -> Deferred[list[str]]: ...


async def dry_run(
    config: AcmeConfig,
    reactor: Any,
    spec: CertificateSpec,
    responder: HTTP01Responder,
    *,
    http_client: Any = None,
) -> CertificateBundle:
    """Issue ``spec`` from ``config.dry_run_url`` into a scratch store. Returns the issued
    bundle (already deleted from disk); raises :class:`DryRunFailed` with the cause."""
    url = config.dry_run_url
    scratch = tempfile.mkdtemp(prefix="synapse-acme-dry-run-")
    try:
        account_key = load_or_create_account_key(
            os.path.join(scratch, "account.key"), storage=scratch
        )
        http = (
            http_client if http_client is not None else make_http_client(reactor, config.ca_bundle)
        )
        transport = JWSTransport(
            http,
            reactor,
            account_key,
            url,
            timeout=config.request_timeout,
            max_requests_per_minute=config.max_requests_per_minute,
        )
        same_ca = url == config.url
        issuer = AcmeIssuer(
            client=AcmeClient(transport),
            responders=[responder],
            clock=reactor,
            account_key=account_key,
            trust=None,
            contact=config.contact,
            tos_agreed=config.terms_of_service_agreed,
            # EAB credentials belong to the production CA's account; a staging CA has none.
            eab=(config.eab.kid, config.eab.hmac_key) if config.eab and same_ca else None,
            profile=config.profile,
            poll_interval=config.poll_interval,
            poll_timeout=config.poll_timeout,
        )
        names = canonical_names(spec.names)
        key_pem = crypto.generate_private_key_pem(spec.key_type)
        bundle = await issuer.issue(names, key_pem)
        crypto.validate_bundle(bundle, names, crypto.now_from_clock(reactor))
        await FileStore(os.path.join(scratch, "store")).save(names_key(names), bundle)
        return bundle
    except Exception as e:
        raise DryRunFailed(url, e) from e
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def changes(spec: CertificateSpec, previous: CertificateBundle | None, url: str) -> list[str]:
    """How ``spec`` (to be ordered from ``url``) differs from ``previous``, the last real
    issuance of its names ([] when nothing differs or nothing was issued before)."""
    if previous is None or previous.metadata.get("placeholder"):
        return []
    out = []
    old_names = previous.metadata.get("names")
    if isinstance(old_names, list) and set(old_names) != set(spec.names):
        out.append(f"names {', '.join(old_names)} -> {', '.join(spec.names)}")
    old_url = previous.metadata.get("issuer_directory")
    if isinstance(old_url, str) and old_url != url:
        out.append(f"CA {old_url} -> {url}")
    return out


@attrs.define
class DryRunOnChange:
    """``dry_run_on_change``: before an order whose names or CA differ from the last real
    issuance, one dry run; the real order only after it passed (once per change).

    The last issuance is the certificate being replaced, or, when the names changed (so the
    store key did too), the newest stored certificate sharing a name with the new ones.
    """

    config: AcmeConfig
    reactor: Any
    responder: HTTP01Responder
    store: ListableStore | None = None
    http_client: Any = None
    _passed: set[tuple[str, str]] = attrs.field(factory=set, init=False)

    async def before_order(self, spec: CertificateSpec, previous: CertificateBundle | None) -> None:
        """Returns once the real order may be placed; raises DryRunFailed otherwise."""
        if previous is None:
            previous = await self._related(spec.names)
        what = changes(spec, previous, self.config.url)
        if not what:
            return
        done = (names_key(spec.names), self.config.url)
        if done in self._passed:
            return
        logger.info(
            "Configuration changed for %s (%s): dry run against %s before the real order",
            ", ".join(spec.names), "; ".join(what), self.config.dry_run_url,
        )  # fmt: skip
        await dry_run(self.config, self.reactor, spec, self.responder, http_client=self.http_client)
        self._passed.add(done)
        logger.info("Dry run for %s passed; placing the real order", ", ".join(spec.names))

    async def _related(self, names: Sequence[str]) -> CertificateBundle | None:
        if self.store is None:
            return None
        newest: CertificateBundle | None = None
        for key in await self.store.keys():
            try:
                bundle = await self.store.load(key)
            except Exception:
                continue  # reported by the service; it cannot say what was issued
            if bundle is None or bundle.metadata.get("placeholder"):
                continue
            if not set(bundle.metadata.get("names") or ()) & set(names):
                continue
            if newest is None or str(bundle.metadata.get("issued_at", "")) > str(
                newest.metadata.get("issued_at", "")
            ):
                newest = bundle
        return newest


def run_dry(
    config: AcmeConfig,
    reactor: Any,
    spec: CertificateSpec,
    responder: HTTP01Responder,
    http_client: Any = None,
) -> Deferred[CertificateBundle]:
    """:func:`dry_run` as a Deferred (firing with the bundle, or failing with DryRunFailed)."""
    return Deferred.fromCoroutine(
        dry_run(config, reactor, spec, responder, http_client=http_client)
    )
