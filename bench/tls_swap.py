"""HotSwapTLS handshake latency, quiet vs during a swap storm; prints one JSON line.

    python bench/tls_swap.py [--certs 1000] [--handshakes 300]

Same in-memory TLS 1.3 handshakes as bench/tls_bench.py (client and server in one process,
memory BIOs). The storm: a second thread replaces the certificate of the name being handshaken
(and others) back to back with ``set_bundle`` (pre-minted bundles, validation + context build
per swap) for the whole measurement. Every handshake must succeed and see a certificate for its
name; the figures are per-handshake latency p50/p99 and the swap rate achieved.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.task import Clock

from synapse_acme.tls import HotSwapTLS
from tests.certs import TestCA, client_context, handshake_with


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(certs: int, handshakes: int) -> dict[str, Any]:
    ca = TestCA()
    clock = Clock()
    clock.advance(ca.now.timestamp())
    tls = HotSwapTLS(clock=clock, default_key="k0")
    tls.set_bundles({f"k{i}": ca.issue([f"n{i}.example.test"]) for i in range(certs)})
    hot = min(certs, 8)
    spare = [(f"k{i % hot}", ca.issue([f"n{i % hot}.example.test"])) for i in range(64)]
    client_ctx = client_context(ca)

    def handshake_ms(i: int) -> float:
        name = f"n{i % hot}.example.test".encode()
        t0 = time.perf_counter()
        client = handshake_with(tls, client_ctx, name)
        elapsed = (time.perf_counter() - t0) * 1000
        cert = client.get_peer_certificate()
        assert cert is not None and name.decode() in str(cert.to_cryptography().extensions)
        return elapsed

    for i in range(20):  # warm-up
        handshake_ms(i)
    quiet = [handshake_ms(i) for i in range(handshakes)]

    stop = threading.Event()
    swaps = [0]

    def storm() -> None:
        while not stop.is_set():
            key, bundle = spare[swaps[0] % len(spare)]
            tls.set_bundle(key, bundle)
            swaps[0] += 1

    thread = threading.Thread(target=storm, daemon=True)
    t0 = time.perf_counter()
    thread.start()
    stormy = [handshake_ms(i) for i in range(handshakes)]
    stop.set()
    thread.join()
    storm_seconds = time.perf_counter() - t0
    return {
        "certs": certs,
        "handshakes": handshakes,
        "quiet_p50_ms": _pct(quiet, 0.5),
        "quiet_p99_ms": _pct(quiet, 0.99),
        "storm_p50_ms": _pct(stormy, 0.5),
        "storm_p99_ms": _pct(stormy, 0.99),
        "swaps": swaps[0],
        "swaps_per_s": swaps[0] / storm_seconds,
        "failures": 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--certs", type=int, default=1000)
    parser.add_argument("--handshakes", type=int, default=300)
    args = parser.parse_args()
    print(json.dumps(run(args.certs, args.handshakes)))


if __name__ == "__main__":
    main()
