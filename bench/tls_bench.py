"""HotSwapTLS: load time, in-memory handshakes/s and memory with 1, 1,000 and 10,000 certificates.

    python bench/tls_bench.py [--sizes 1 1000 10000] [--handshakes 300] [--rounds 5] [--no-warm-up]

Handshakes are full TLS 1.3 handshakes over memory BIOs (no sockets), ECDSA P-256 certificates,
each with a distinct SNI name, so the numbers isolate lookup + crypto. Load time is the
start-up path: the service has validated each bundle as it read it from the store (timed on
its own, "the service's validation"), then hands them over in batches (``set_bundles``, one
swap), which re-checks names and dates and finds the costly checks done (``crypto``'s
verified pairs). "Cold load" is ``set_bundles`` on bundles nothing validated before (an
embedder calling it directly), on a map thrown away after. The background warm-up that then
parses the certificates for OpenSSL (a slice per reactor turn, handshakes are served
meanwhile) is timed on its own, by turning the clock until it is done; "one swap" is the
median of 5 single-certificate swaps of the default certificate with the map full. Minting the
certificates is not timed. ``--no-warm-up``: every certificate waits for its first handshake
to be parsed, which the first-hit blocks below then pay.

Handshakes run in ``--rounds`` rounds of ``--handshakes`` names not used before (the first
handshake for each name; without the warm-up it parses that certificate), then the same names
again, each handshake alternating with one on a creator holding 1 certificate. The headline
handshakes/s is the median wall-clock rate of the first hits; the ratios to 1 certificate are
per CPU-second of the handshaking thread (client and server both), median of the rounds, so
other load on a shared machine moves them much less. RSS is shown after
the load and after every name has had a handshake (the parsed-certificate cache as full as
this size makes it).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from OpenSSL import SSL
from twisted.internet.task import Clock

from bench.common import rss_mib
from synapse_acme import crypto
from synapse_acme.tls import HotSwapTLS
from tests.certs import TestCA, client_context, handshake_with


def _timed(tls: HotSwapTLS, client_ctx: SSL.Context, name: bytes) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this thread) of one handshake."""
    t0, c0 = time.perf_counter(), time.thread_time()
    handshake_with(tls, client_ctx, name)
    return time.perf_counter() - t0, time.thread_time() - c0


def _alternating(
    single: HotSwapTLS, tls: HotSwapTLS, client_ctx: SSL.Context, names: list[bytes]
) -> tuple[float, float]:
    """One handshake on ``single`` (1 certificate), one on ``tls`` for the next name, and so
    on, so both see the same moments of a shared machine. Returns (``tls``'s handshakes per
    wall second, its handshakes per CPU second relative to ``single``'s)."""
    wall = cpu = base = 0.0
    for name in names:
        base += _timed(single, client_ctx, b"n0.example.test")[1]
        w, c = _timed(tls, client_ctx, name)
        wall, cpu = wall + w, cpu + c
    return len(names) / wall, base / max(cpu, 1e-9)


def run(
    size: int, handshakes: int, rounds: int, ca: TestCA, single: HotSwapTLS, warm_up: bool
) -> None:
    clock = Clock()
    clock.advance(ca.now.timestamp())
    bundles = {f"k{i}": ca.issue([f"n{i}.example.test"]) for i in range(size)}
    spares = [ca.issue(["n0.example.test"]) for _ in range(5)]
    # warm_up only when off: this script also measures a HotSwapTLS from before it existed
    off: dict[str, Any] = {} if warm_up else {"warm_up": False}
    # Cold: a HotSwapTLS given bundles nothing has validated in this process (an embedder
    # calling set_bundles itself); then thrown away.
    crypto.forget_verified()
    cold_tls = HotSwapTLS(clock=clock, default_key="k0", warm_up=False)
    t0 = time.perf_counter()
    assert not cold_tls.set_bundles(bundles)
    cold = time.perf_counter() - t0
    del cold_tls
    crypto.forget_verified()
    gc.collect()
    rss0 = rss_mib()
    # The start-up path: the service validates each bundle it reads from the store (its
    # _adopt), then hands them to the map in batches (certificates_loaded -> set_bundles).
    now = crypto.now_from_clock(clock)
    t0 = time.perf_counter()
    for i, bundle in enumerate(bundles.values()):
        crypto.validate_bundle(bundle, [f"n{i}.example.test"], now, allow_expired=True)
    service_validation = time.perf_counter() - t0
    tls = HotSwapTLS(clock=clock, default_key="k0", **off)
    t0 = time.perf_counter()
    refused = tls.set_bundles(bundles)
    load = time.perf_counter() - t0
    assert not refused
    rss_load = rss_mib() - rss0
    t0, c0 = time.perf_counter(), time.process_time()
    while clock.getDelayedCalls():
        clock.advance(0)
    warm_wall, warm_cpu = time.perf_counter() - t0, time.process_time() - c0
    swaps = []
    for bundle in spares:
        t0 = time.perf_counter()
        tls.set_bundle("k0", bundle)
        swaps.append(time.perf_counter() - t0)
    one_swap = statistics.median(swaps)

    client_ctx = client_context(ca)
    order = list(range(size))
    random.shuffle(order)
    first_wall, first_ratio, again_ratio = [], [], []
    for _ in range(rounds):
        # Names not handshaken before while there are some (then random repeats).
        fresh = [order.pop() if order else random.randrange(size) for _ in range(handshakes)]
        names = [f"n{i}.example.test".encode() for i in fresh]
        wall, first = _alternating(single, tls, client_ctx, names)
        _, again = _alternating(single, tls, client_ctx, names)
        first_wall.append(wall)
        first_ratio.append(first)
        again_ratio.append(again)
    for i in order:  # every name once, so the cache holds what this size makes it hold
        handshake_with(tls, client_ctx, f"n{i}.example.test".encode())
    rss1 = rss_mib()
    print(
        f"{size:>6} certs: load {load:7.2f} s ({load / size * 1000:6.3f} ms/cert), "
        f"one swap {one_swap * 1000:7.2f} ms, {statistics.median(first_wall):6.0f} handshakes/s "
        f"(client+server in one process, first hit per name, warm-up "
        f"{'off' if not warm_up else f'{warm_wall:.2f} s ({warm_cpu:.2f} s CPU)'} before; "
        f"per CPU-second vs 1 certificate "
        f"in the same rounds: first hits {statistics.median(first_ratio):.3f}x, again "
        f"{statistics.median(again_ratio):.3f}x), after load +{rss_load:.1f} MiB, "
        f"RSS +{rss1 - rss0:6.1f} MiB ({(rss1 - rss0) * 1024 / size:5.1f} KiB/cert) once every "
        f"name had a handshake; cold load {cold:.2f} s, the service's validation "
        f"{service_validation:.2f} s",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 1000, 10000])
    parser.add_argument("--handshakes", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-warm-up", dest="warm_up", action="store_false")
    args = parser.parse_args()
    ca = TestCA()
    clock = Clock()
    clock.advance(ca.now.timestamp())
    single = HotSwapTLS(clock=clock, default_key="k0")
    single.set_bundle("k0", ca.issue(["n0.example.test"]))
    clock.advance(0)  # what a reactor does next: the default's own context
    for size in args.sizes:
        run(size, args.handshakes, args.rounds, ca, single, args.warm_up)


if __name__ == "__main__":
    main()
