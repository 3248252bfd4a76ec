"""In-process issuance, timed inside one process with the real reactor; prints one JSON line.

    python bench/inproc.py service --config acme.yaml
    python bench/inproc.py floor --directory URL --ca-bundle PEM --http-port P --names a --names b,c

``service``: the real wiring of ``synapse-acme run`` (build_runtime: FileStore, account key,
AcmeIssuer, HTTP-01 listener, HotSwapTLS, file writes in their own thread) and
``AcmeService.renew()`` for every configured certificate at once.
The clock starts after imports, listener bind and store load: what an already running homeserver
pays when it needs certificates.

``floor``: the least a client can do: one account, then for every certificate (all concurrent)
newOrder -> authorization -> challenge -> poll with *no* delay -> finalize -> poll -> download.
Built from the project's acme/transport.py and acme/client.py (signed requests, nonce reuse) and its
HTTP-01 resource; no store, no validation, no policy. Nothing can be much faster against the
same CA, so it is the yardstick for the 100-certificate goal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import josepy as jose
from acme import challenges, messages
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import defer, task

from synapse_acme import crypto
from synapse_acme.acme.client import AcmeClient
from synapse_acme.acme.csr import make_csr_pem
from synapse_acme.acme.transport import JWSTransport, make_http_client
from synapse_acme.http01 import HTTP01Responder
from synapse_acme.http01_server import make_factory


async def run_service(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    from synapse_acme.config import read_config_file
    from synapse_acme.runtime import build_runtime
    from synapse_acme.threaded import BlockingRunner

    config = read_config_file(args.config)
    io = BlockingRunner(reactor)  # as `synapse-acme run` wires it (cli.cmd_run)
    io.start()
    runtime = build_runtime(config, reactor, runner=io)
    runtime.service.privilegedStartService()
    runtime.service.startService()
    try:
        if runtime.http01_listener is not None:
            await runtime.http01_listener.when_listening()
        await runtime.acme.when_loaded()
        t0, cpu0 = time.perf_counter(), time.process_time()
        results = await runtime.acme.renew(None, force=True)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        await runtime.service.stopService()
        io.stop()
    failed = [k for k, r in results if not hasattr(r, "chain_pem")]
    # cpu_seconds: this process's CPU (every thread) in the same window; on a loaded machine it
    # says more than the wall clock about the work done here.
    return {"seconds": elapsed, "cpu_seconds": cpu, "certificates": len(results), "failed": failed}


async def _zero_poll(fetch: Any, waiting: set[Any]) -> Any:
    polls = 0
    while True:
        item = await fetch()
        if item.body.status not in waiting:
            return item, polls
        polls += 1
        await task.deferLater(reactor_ref[0], 0, lambda: None)


reactor_ref: list[Any] = []


async def _floor_one(
    client: AcmeClient, responder: HTTP01Responder, key: jose.JWK, names: list[str]
) -> int:
    order = await client.new_order(names)
    polls = 0

    async def authorize(url: str) -> int:
        authz = await client.get_authorization(url)
        challb = next(c for c in authz.body.challenges if isinstance(c.chall, challenges.HTTP01))
        token = challb.chall.encode("token")
        _resp, validation = challb.chall.response_and_validation(key)
        ident = str(authz.body.identifier.value)
        responder.start_responding(ident, token, validation)
        await client.answer_challenge(challb.uri)
        done, n = await _zero_poll(lambda: client.get_authorization(url), {messages.STATUS_PENDING})
        responder.stop_responding(ident, token)
        if done.body.status != messages.STATUS_VALID:
            raise RuntimeError(f"authorization for {ident}: {done.body.status}")
        return n

    counts = await defer.gatherResults(
        [defer.Deferred.fromCoroutine(authorize(u)) for u in order.body.authorizations]
    )
    polls += sum(counts)
    key_pem = crypto.generate_private_key_pem()
    csr = x509.load_pem_x509_csr(make_csr_pem(key_pem, names))
    from cryptography.hazmat.primitives import serialization

    order = await client.finalize(order, csr.public_bytes(serialization.Encoding.DER))
    order, n = await _zero_poll(
        lambda: client.get_order(order.url), {messages.STATUS_PENDING, messages.STATUS_PROCESSING}
    )
    polls += n
    if order.body.status != messages.STATUS_VALID:
        raise RuntimeError(f"order {order.url}: {order.body.status}")
    chain, _alternates = await client.download_chain(str(order.body.certificate))
    if b"BEGIN CERTIFICATE" not in chain:
        raise RuntimeError("no certificate")
    return polls


async def run_floor(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    reactor_ref.append(reactor)
    responder = HTTP01Responder()
    port = reactor.listenTCP(
        args.http_port, make_factory(responder, reactor), interface="127.0.0.1"
    )
    try:
        t0, cpu0 = time.perf_counter(), time.process_time()
        key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
        # No client-side request cap (the product's transport queues over 600/min): the floor
        # is what the CA itself allows.
        client = AcmeClient(
            JWSTransport(
                make_http_client(reactor, args.ca_bundle),
                reactor,
                key,
                args.directory,
                max_requests_per_minute=10**9,
            )
        )
        await client.register(("mailto:admin@example.test",), True)
        groups = [g.split(",") for g in args.names]
        polls = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(_floor_one(client, responder, key, g)) for g in groups]
        )
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        await port.stopListening()
    return {
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "certificates": len(groups),
        "polls": sum(polls),
        "failed": [],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("service")
    s.add_argument("--config", required=True)
    f = sub.add_parser("floor")
    f.add_argument("--directory", required=True)
    f.add_argument("--ca-bundle", required=True)
    f.add_argument("--http-port", type=int, required=True)
    f.add_argument("--names", action="append", required=True)
    args = parser.parse_args()

    async def go(reactor: Any) -> None:
        fn = run_service if args.mode == "service" else run_floor
        out = await fn(reactor, args)
        print(json.dumps(out), flush=True)
        if out["failed"]:
            raise SystemExit(1)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(go(reactor)))


if __name__ == "__main__":
    main()
    sys.exit(0)
