"""HotSwapTLS: load time, in-memory handshakes/s and memory with 1, 1,000 and 10,000 certificates.

    python bench/tls_bench.py [--sizes 1 1000 10000] [--handshakes 300]

Handshakes are full TLS 1.3 handshakes over memory BIOs (no sockets), ECDSA P-256 certificates,
each with a distinct SNI name, so the numbers isolate lookup + crypto. Load time covers
validation and context building (``set_bundles``, one swap) plus one single-certificate swap
with the map full. Minting the certificates is not timed.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.task import Clock

from bench.common import rss_mib
from synapse_acme.tls import HotSwapTLS
from tests.certs import TestCA, client_context, handshake_with


def run(size: int, handshakes: int, ca: TestCA) -> None:

    clock = Clock()
    clock.advance(ca.now.timestamp())
    bundles = {f"k{i}": ca.issue([f"n{i}.example.test"]) for i in range(size)}
    rss0 = rss_mib()
    tls = HotSwapTLS(clock=clock, default_key="k0")
    t0 = time.perf_counter()
    refused = tls.set_bundles(bundles)
    load = time.perf_counter() - t0
    assert not refused
    t0 = time.perf_counter()
    tls.set_bundle("k0", ca.issue(["n0.example.test"]))
    one_swap = time.perf_counter() - t0
    rss1 = rss_mib()

    client_ctx = client_context(ca)
    names = [f"n{random.randrange(size)}.example.test".encode() for _ in range(handshakes)]
    t0 = time.perf_counter()
    for name in names:
        handshake_with(tls, client_ctx, name)
    elapsed = time.perf_counter() - t0
    print(
        f"{size:>6} certs: load {load:7.2f} s ({load / size * 1000:6.2f} ms/cert), "
        f"one swap {one_swap * 1000:7.1f} ms, {handshakes / elapsed:6.0f} handshakes/s "
        f"(client+server in one process), RSS +{rss1 - rss0:6.1f} MiB "
        f"({(rss1 - rss0) * 1024 / size:5.1f} KiB/cert)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 1000, 10000])
    parser.add_argument("--handshakes", type=int, default=300)
    args = parser.parse_args()
    ca = TestCA()
    for size in args.sizes:
        run(size, args.handshakes, ca)


if __name__ == "__main__":
    main()
