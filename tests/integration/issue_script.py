"""Issue certificates from a real ACME server with the real reactor; print one JSON line each.

Run by tests/integration/test_issuer_pebble.py in a subprocess (the test process never runs a
reactor). Serves HTTP-01 with the real :class:`synapse_acme.http01.HTTP01Responder` resource on
``--http-port``. ``--names a,b`` may repeat: each group is one issuance, all run concurrently.
Exit status 0 whatever the outcomes; each line says ``ok`` or the error's class/code.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

import josepy as jose
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from synapse_acme import crypto
from synapse_acme.acme.client import AcmeClient
from synapse_acme.acme.issuer import AcmeIssuer
from synapse_acme.acme.transport import JWSTransport, make_http_client
from synapse_acme.acme.trust import load_issuer_trust
from synapse_acme.http01 import HTTP01Responder


class _BadNonceCounter(logging.Handler):
    """Counts the transport's badNonce retries, so a test can see the storm was real."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "badNonce" in record.getMessage():
            self.count += 1


def _outcome(names: list[str], result: Any, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"names": names, "seconds": round(seconds, 3)}
    if isinstance(result, Failure):
        err = result.value
        out.update(
            ok=False,
            error=type(err).__name__,
            code=getattr(err, "code", None),
            message=str(err),
        )
    else:
        out.update(
            ok=True,
            chain_pem=result.chain_pem.decode(),
            key_pem=result.key_pem.decode(),
            metadata=dict(result.metadata),
        )
    return out


async def main(reactor: Any, args: argparse.Namespace) -> None:
    responder = HTTP01Responder()
    root = Resource()
    well_known = Resource()
    root.putChild(b".well-known", well_known)
    well_known.putChild(b"acme-challenge", responder.resource())
    port = reactor.listenTCP(args.http_port, Site(root), interface="127.0.0.1")

    key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    transport = JWSTransport(
        make_http_client(reactor, args.ca_bundle), reactor, key, args.directory
    )
    eab = (args.eab_kid, args.eab_hmac) if args.eab_kid else None
    issuer = AcmeIssuer(
        client=AcmeClient(transport),
        responders=[responder],
        clock=reactor,
        account_key=key,
        trust=load_issuer_trust([("--issuer-roots", args.issuer_roots)], use_system=False),
        contact=("mailto:admin@example.test",),
        tos_agreed=True,
        eab=eab,
        poll_interval=0.05,
        poll_timeout=60.0,
    )

    async def one(names: list[str]) -> dict[str, Any]:
        start = time.monotonic()
        result: Any
        try:
            result = await issuer.issue(names, crypto.generate_private_key_pem())
        except Exception:
            result = Failure()
        return _outcome(names, result, time.monotonic() - start)

    counter = _BadNonceCounter()
    transport_log = logging.getLogger("synapse_acme.acme.transport")
    transport_log.setLevel(logging.DEBUG)
    transport_log.addHandler(counter)

    groups = [g.split(",") for g in args.names]
    outcomes = await defer.gatherResults([defer.Deferred.fromCoroutine(one(g)) for g in groups])
    for outcome in outcomes:
        outcome["bad_nonce_retries"] = counter.count  # for the whole run
        print(json.dumps(outcome), flush=True)
    await port.stopListening()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--directory", required=True)
    parser.add_argument("--ca-bundle", required=True)
    parser.add_argument("--issuer-roots", required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--names", action="append", required=True)
    parser.add_argument("--eab-kid")
    parser.add_argument("--eab-hmac")
    parsed = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, parsed)))
    sys.exit(0)
