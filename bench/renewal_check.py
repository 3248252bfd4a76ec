"""Cost of AcmeService's periodic renewal check with N managed certificates, nothing due.

    python bench/renewal_check.py --size 1000 --store memory|file [--ticks 9]

Prints one JSON line. Real AcmeService, real MemoryStore/FileStore, FakeIssuer minting real
90-day certificates from tests/certs.py's TestCA (minting and pre-filling the store are not
timed). Timed: ``startService`` + store load (every bundle validated); the first check (which
also fetches the ARI window of every certificate from the issuer); and the steady ticks that
follow (``Clock.advance`` by one check interval: nothing due, ARI fresh). Memory: RSS after
load minus RSS before, and the tracemalloc peak during one steady tick.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tracemalloc
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.task import Clock

from bench.common import rss_mib
from synapse_acme.model import CertificateSpec
from synapse_acme.service import AcmeService
from synapse_acme.store import FileStore
from synapse_acme.testing.issuer import FakeIssuer
from synapse_acme.testing.store import MemoryStore
from tests.certs import TestCA


def run(size: int, store_kind: str, ticks: int) -> dict[str, Any]:
    ca = TestCA()
    clock = Clock()
    clock.advance(ca.now.timestamp())
    issuer = FakeIssuer(ca=ca, clock=clock)
    tmp = tempfile.TemporaryDirectory(prefix="bench-renewal-")
    store: Any = MemoryStore() if store_kind == "memory" else FileStore(tmp.name)
    specs = [CertificateSpec(names=(f"n{i}.example.test",)) for i in range(size)]
    t0 = time.perf_counter()
    for spec in specs:  # pre-fill (not timed): real certificates, one per spec
        from synapse_acme.crypto import generate_private_key_pem
        from synapse_acme.names import names_key

        d = issuer.issue(spec.names, generate_private_key_pem())
        bundle: list[Any] = []
        d.addCallback(bundle.append)
        store.save(names_key(spec.names), bundle[0])
    mint = time.perf_counter() - t0
    issuer.calls.clear()
    interval = 600.0
    rss0 = rss_mib()
    service = AcmeService(specs, store, issuer, clock, check_interval=interval, check_jitter=0.0)
    t0 = time.perf_counter()
    service.startService()  # loads every bundle synchronously (stores answer at once)
    clock.advance(0)  # the first check: ARI for every certificate, nothing due
    first = time.perf_counter() - t0
    rss1 = rss_mib()
    assert issuer.calls == [], "nothing should be due"
    steady = []
    for _ in range(ticks):
        t0 = time.perf_counter()
        clock.advance(interval)
        steady.append(time.perf_counter() - t0)
    # The allocation peak from one more tick, not timed: tracing slows a tick several times.
    tracemalloc.start()
    clock.advance(interval)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert issuer.calls == [], "nothing should be due"
    service.stopService()
    tmp.cleanup()
    steady.sort()
    return {
        "size": size,
        "store": store_kind,
        "mint_seconds": mint,
        "load_and_first_check_seconds": first,
        "tick_seconds_median": steady[len(steady) // 2],
        "tick_seconds_all": steady,
        "rss_mib_after_load": rss1 - rss0,
        "tick_peak_alloc_kib": peak / 1024,
        "renewal_info_calls": issuer.renewal_info_calls,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--store", choices=["memory", "file"], default="memory")
    parser.add_argument("--ticks", type=int, default=9)
    args = parser.parse_args()
    print(json.dumps(run(args.size, args.store, args.ticks)))


if __name__ == "__main__":
    main()
