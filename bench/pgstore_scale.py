"""Start-up load, memory and the periodic check of AcmeService over N certificates kept in a
real PostgreSQL store (:mod:`synapse_acme.pgstore`), side by side with the file store.

    python bench/pgstore_scale.py --size 10000 --runs 5 [--ticks 5]

Prints one JSON line. Set-up (not timed): a throw-away PostgreSQL server
(:class:`~synapse_acme.testing.postgres.PostgresServer`), N real 90-day certificates (one
P-256 key each, chain leaf + intermediate) minted once by tests/certs.py's TestCA through
FakeIssuer, and each saved once into both stores through their normal ``save`` (the
PostgreSQL one seals every private key with a key file, as in production).

Each run is a fresh child process per store (``--measure``), the stores alternating (ABBA)
so slow phases of a loaded machine hit both. Each child builds the store as production does:

- ``postgresql``: :class:`~synapse_acme.pgstore.PostgresBackend` on ``ThreadedDatabase``
  (psycopg2 through adbapi's thread pool) on a running reactor;
- ``file``: :class:`~synapse_acme.store.FileStore` answered on the reactor thread (the
  standalone runner);
- ``file-threaded``: the same behind :class:`~synapse_acme.threaded.ThreadedStore` (its one
  I/O thread: how the module runs it inside Synapse).

then times ``startService`` until ``when_loaded`` fires (every bundle read, checked intact
and adopted: the child asserts all N are served), the first check (an ARI fetch from the
issuer per certificate, nothing due) and ``--ticks`` steady checks (nothing due, ARI fresh).
RSS: after the load and first check minus before ``startService`` (store connected).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import attrs
from zope.interface import implementer

from bench.common import rss_mib, summary
from synapse_acme.interfaces import ICertificateStore

STORES = ("postgresql", "postgresql-per-key", "file", "file-threaded")
#: The service's check interval (as in bench/renewal_check.py); the bench advances its clock.
INTERVAL = 600.0
#: What each child reports (seconds; MiB). ``load_cpu_seconds`` is the process's CPU time
#: (every thread) during the load: less moved by other load on the machine than wall time.
FIELDS = (
    "load_seconds",
    "load_cpu_seconds",
    "first_check_seconds",
    "tick_seconds",
    "rss_mib",
    "reread_seconds",
)


def _names(i: int) -> tuple[str, ...]:
    return (f"n{i}.example.test",)


# -- set-up (the parent) ----------------------------------------------------------------------


def fill(size: int, dsn: str, key_file: str, root: str) -> dict[str, Any]:
    """Mint ``size`` certificates and save each into both stores; the anchoring time and the
    seconds each step took."""
    from twisted.internet.task import Clock

    from synapse_acme.crypto import generate_private_key_pem
    from synapse_acme.names import names_key
    from synapse_acme.pgstore import KeyRing, PostgresBackend
    from synapse_acme.store import FileStore
    from synapse_acme.testing.issuer import FakeIssuer
    from synapse_acme.testing.postgres import InlineDatabase
    from tests.certs import TestCA

    ca = TestCA()
    clock = Clock()
    clock.advance(ca.now.timestamp())
    issuer = FakeIssuer(ca=ca, clock=clock)
    t0 = time.perf_counter()
    bundles = []
    for i in range(size):
        issued: list[Any] = []
        issuer.issue(_names(i), generate_private_key_pem()).addCallback(issued.append)
        bundles.append((names_key(_names(i)), issued[0]))
    mint = time.perf_counter() - t0

    backend = PostgresBackend(InlineDatabase(dsn), clock, KeyRing.from_files([key_file]))
    _now(backend.setup())
    t0 = time.perf_counter()
    for key, bundle in bundles:
        _now(backend.save(key, bundle))
    fill_pg = time.perf_counter() - t0
    _now(backend.close())
    files = FileStore(root)
    t0 = time.perf_counter()
    for key, bundle in bundles:
        _now(files.save(key, bundle))
    fill_file = time.perf_counter() - t0
    return {
        "now": ca.now.timestamp(),
        "mint_seconds": mint,
        "fill_postgresql_seconds": fill_pg,
        "fill_file_seconds": fill_file,
    }


def _now(d: Any) -> Any:
    """The result of a Deferred that has already fired (InlineDatabase, FileStore)."""
    out: list[Any] = []
    d.addBoth(out.append)
    if not out:
        raise RuntimeError("a store call did not answer at once")
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def run(size: int, runs: int, ticks: int, stores: tuple[str, ...]) -> dict[str, Any]:
    """Set up both stores once, then ``runs`` interleaved child measurements per store."""
    from synapse_acme.pgstore import generate_key_file
    from synapse_acme.testing.postgres import PostgresServer

    with tempfile.TemporaryDirectory(prefix="bench-pgstore-") as work, PostgresServer() as pg:
        dsn = pg.create_database("bench")
        key_file = os.path.join(work, "store.key")
        generate_key_file(key_file)
        root = os.path.join(work, "files")
        setup = fill(size, dsn, key_file, root)
        child = [sys.executable, os.path.abspath(__file__), "--size", str(size)]
        child += ["--ticks", str(ticks), "--now", repr(setup["now"]), "--dsn", dsn]
        child += ["--key-file", key_file, "--root", root]
        samples: dict[str, list[dict[str, Any]]] = {s: [] for s in stores}
        loads: list[str] = []
        for r in range(runs):
            order = stores if r % 2 == 0 else tuple(reversed(stores))
            for store in order:
                loads.append(_load_average())
                out = subprocess.run(
                    [*child, "--measure", store],
                    capture_output=True,
                    text=True,
                    timeout=1800,
                    check=False,
                )
                if out.returncode != 0:
                    raise RuntimeError(f"--measure {store} exited {out.returncode}: {out.stderr}")
                samples[store].append(json.loads(out.stdout.strip().splitlines()[-1]))
    result: dict[str, Any] = {"size": size, "runs": runs, "ticks": ticks, "setup": setup}
    result["load_average_before_each_run"] = loads
    result["stores"] = {}
    for store, rows in samples.items():
        cells: dict[str, Any] = {field: summary([row[field] for row in rows]) for field in FIELDS}
        cells["served"] = [row["served"] for row in rows]  # every run asserts all of them
        result["stores"][store] = cells
    # Ratios run by run (each pair measured in the same round), then their median.
    pairs = {
        "postgresql/file": ("postgresql", "file"),
        "postgresql/file-threaded": ("postgresql", "file-threaded"),
        "postgresql/postgresql-per-key": ("postgresql", "postgresql-per-key"),
    }
    result["ratios"] = {
        name: {
            field: summary(
                [
                    a[field] / b[field]
                    for a, b in zip(samples[x], samples[y], strict=True)
                    if b[field] > 0
                ]
            )
            for field in ("load_seconds", "load_cpu_seconds", "rss_mib", "reread_seconds")
        }
        for name, (x, y) in pairs.items()
        if x in samples and y in samples
    }
    return result


def _load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- one measurement (a child) ----------------------------------------------------------------


@implementer(ICertificateStore)
@attrs.frozen
class OneByOne:
    """The PostgreSQL store without its batched read (IBatchLoad): the service then reads it
    one round trip per certificate, as it did before the batched read existed."""

    inner: Any

    def load(self, key: str) -> Any:
        return self.inner.load(key)

    def save(self, key: str, bundle: Any) -> Any:
        return self.inner.save(key, bundle)


async def reread(store: Any, keys: list[str]) -> float:
    """Seconds to read every bundle again, as a shared store's safety net would on a check:
    in batches where the store offers them (as the service's start does), else key by key."""
    from synapse_acme.interfaces import IBatchLoad
    from synapse_acme.service import STORE_LOAD_BATCH

    batch = IBatchLoad(store, None)
    t0 = time.perf_counter()
    got = 0
    if batch is not None:
        for i in range(0, len(keys), STORE_LOAD_BATCH):
            found = await batch.load_many(keys[i : i + STORE_LOAD_BATCH])
            got += sum(1 for b in found.values() if b is not None and not isinstance(b, Exception))
    else:
        for key in keys:
            got += (await store.load(key)) is not None
    if got != len(keys):
        raise RuntimeError(f"re-read {got} of {len(keys)}")
    return time.perf_counter() - t0


async def _measure(args: argparse.Namespace, reactor: Any) -> dict[str, Any]:
    from twisted.internet.task import Clock

    from synapse_acme.model import CertificateSpec
    from synapse_acme.pgstore import KeyRing, PostgresBackend, ThreadedDatabase
    from synapse_acme.service import AcmeService
    from synapse_acme.store import FileStore
    from synapse_acme.testing.issuer import FakeIssuer
    from synapse_acme.threaded import BlockingRunner, ThreadedStore

    clock = Clock()  # the service's: its checks run when the bench says
    clock.advance(args.now)
    issuer = FakeIssuer(ca=None, clock=clock)  # answers renewal_info only (no window)
    specs = [CertificateSpec(names=_names(i)) for i in range(args.size)]
    store: Any
    close: Any
    if args.measure.startswith("postgresql"):
        db = ThreadedDatabase(args.dsn, reactor)
        db.start()
        backend = PostgresBackend(db, reactor, KeyRing.from_files([args.key_file]))
        await backend.setup()  # what a process does before its service starts
        store, close = backend, backend.close
        if args.measure == "postgresql-per-key":
            store = OneByOne(backend)
    elif args.measure == "file":
        store, close = FileStore(args.root), None
    else:
        runner = BlockingRunner(reactor)
        runner.start()
        store, close = ThreadedStore(FileStore(args.root), runner), runner.stop
    rss0 = rss_mib()
    service = AcmeService(specs, store, issuer, clock, check_interval=INTERVAL, check_jitter=0.0)
    t0, cpu0 = time.perf_counter(), time.process_time()
    service.startService()
    await service.when_loaded()
    load, load_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    t0 = time.perf_counter()
    clock.advance(0)  # the first check: ARI for every certificate, nothing due
    first = time.perf_counter() - t0
    rss1 = rss_mib()
    served = sum(1 for s in service.status() if s.has_certificate and not s.placeholder)
    if served != args.size or issuer.calls:
        raise RuntimeError(f"{served} of {args.size} served, {len(issuer.calls)} orders")
    steady = []
    for _ in range(args.ticks):
        t0 = time.perf_counter()
        clock.advance(INTERVAL)
        steady.append(time.perf_counter() - t0)
    if issuer.calls or issuer.renewal_info_calls != args.size:
        raise RuntimeError(f"orders {issuer.calls}, ARI calls {issuer.renewal_info_calls}")
    rereads = sorted([await reread(store, service.keys) for _ in range(3)])
    await service.stopService()
    if close is not None:
        await defer_maybe(close)
    steady.sort()
    return {
        "store": args.measure,
        "load_seconds": load,
        "load_cpu_seconds": load_cpu,
        "first_check_seconds": first,
        "tick_seconds": steady[len(steady) // 2],
        "rss_mib": rss1 - rss0,
        "reread_seconds": rereads[1],
        "served": served,
    }


async def defer_maybe(f: Any) -> None:
    from twisted.internet import defer

    await defer.maybeDeferred(f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ticks", type=int, default=5)
    parser.add_argument("--stores", nargs="*", choices=STORES, default=list(STORES))
    parser.add_argument("--measure", choices=STORES, help=argparse.SUPPRESS)
    parser.add_argument("--now", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    parser.add_argument("--key-file", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        from twisted.internet import defer, task

        def go(reactor: Any) -> Any:
            async def inner() -> None:
                print(json.dumps(await _measure(args, reactor)), flush=True)

            return defer.ensureDeferred(inner())

        task.react(go)
    print(json.dumps(run(args.size, args.runs, args.ticks, tuple(args.stores))))


if __name__ == "__main__":
    main()
