"""Fault matrix against the real Pebble CA, through the real CLI in subprocesses.

Rows 1 (badNonce storm), 4 (kill -9 at 20 points), 7 (flood while validating) and 8 (secrets in
logs, file modes) of docs/RELIABILITY.md. Missing binaries (pebble, wrk) make these tests FAIL.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import josepy as jose

from synapse_acme import crypto
from synapse_acme.account import parse_account_key
from synapse_acme.names import names_key
from synapse_acme.store import FileStore
from synapse_acme.testing.pebble import PebbleCA
from tests.faults.cli_harness import (
    CLI,
    CRASH_RUN,
    ROOT,
    check_valid,
    load_bundle,
    read_trace,
    run,
    save_figures,
)

FIGURES: dict[str, Any] = {}


# -- 1. badNonce on half of all requests ---


def test_nonce_reject_50_percent_twenty_issuances(
    pebble_factory: Callable[..., PebbleCA], tmp_path: Path
) -> None:
    ca = pebble_factory(env={"PEBBLE_WFE_NONCEREJECT": "50"})
    names = [[f"n{i}.nonce.example.test"] for i in range(20)]
    cfg = ca.write_acme_config(tmp_path, names[0], certificates=[{"domains": n} for n in names[1:]])
    started = time.monotonic()
    r = run([*CLI, "-v", "issue", "-c", str(cfg)], timeout=170)
    elapsed = time.monotonic() - started
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("OK      ") == 20, r.stdout
    for n in names:
        check_valid(ca, tmp_path / "store", n)
    retries = r.stderr.count("badNonce from")
    posts = len(re.findall(r"order https|certificate issued", r.stderr))
    assert retries >= 20, "Pebble rejected no nonces: the fault was not injected"
    FIGURES["nonce_reject_50"] = {
        "issuances_ok": 20,
        "badNonce_retries": retries,
        "seconds": round(elapsed, 1),
        "log_markers": posts,
    }


# -- 4. kill -9 at 20 points of an issuance ---


# Where to die, by what the process is about to do (regex on "kind detail", n-th match): the
# commit points of every write (key file link, the two directory renames, status rename), the
# writes and fsyncs in between, and each step of the protocol.
ISSUE_POINTS = [
    (r"^fs write \S*acct\S*\.tmp ", 1),  # the account key's bytes, into its temp file
    (r"^fs link .*acct\.key", 1),  # the account key appears under its name
    (r"^http GET", 1),  # the directory
    (r"^http POST chal", 1),  # telling Pebble to validate
    (r"^http POST finalize", 1),  # the CSR
    (r"^fs write privkey\.pem ", 1),  # privkey.pem into the staging directory
    (r"^fs rename .*~new-", 1),  # the new directory takes the certificate's name
]
RENEW_POINTS = [
    (r"^log synapse_acme\.service", 1),  # start-up, store loaded
    (r"^http POST \S+$", 2),  # newOrder
    (r"^http POST chal", 1),
    (r"^http POST finalize", 1),
    (r"^http POST cert", 1),  # downloading the chain
    (r"^fs mkdir .*~new-", 1),
    (r"^fs write privkey\.pem ", 1),
    (r"^fs write fullchain\.pem ", 1),
    (r"^fs fsync metadata\.json", 1),
    (r"^fs rename ", 1),  # old directory moved aside: no <key> until the next rename
    (r"^fs rename .*~new-", 1),  # between the two renames
    (r"^fs unlink ", 1),  # removing the old directory
    (r"^fs rename \.status", 1),  # the status file
]


def pick_points(events: list[tuple[int, str, str]], wanted: list[tuple[str, int]]) -> list[int]:
    """Event numbers matching each ``(regex, n-th)`` of ``wanted`` (all must be found)."""
    points = []
    for pattern, nth in wanted:
        hits = [n for n, kind, detail in events if re.search(pattern, f"{kind} {detail}")]
        assert len(hits) >= nth, (pattern, nth, events)
        points.append(hits[nth - 1])
    assert len(set(points)) == len(points), points
    return points


def integrity_check(store: Path, account_key: Path, names: Sequence[str], expect_cert: bool) -> str:
    """What a reader of the store sees right after the crash, then after start-up recovery."""
    if account_key.exists():
        parse_account_key(account_key.read_bytes(), str(account_key))  # whole, or not at all
        assert stat.S_IMODE(account_key.stat().st_mode) == 0o600
    final = store / "certificates" / names_key(names)
    now = datetime.datetime.now(datetime.timezone.utc)
    if final.exists():  # a directory under its real name is always complete and consistent
        crypto.validate_bundle(load_bundle(store, names), names, now)
    actions = FileStore(str(store)).recover() if store.exists() else []
    if expect_cert:
        assert final.exists(), f"the certificate vanished; recovery did {actions}"
    if final.exists():
        crypto.validate_bundle(load_bundle(store, names), names, now)
        leftovers = [p.name for p in final.parent.iterdir() if "~" in p.name]
        assert not leftovers, leftovers
        assert stat.S_IMODE((final / "privkey.pem").stat().st_mode) == 0o600
    return "; ".join(actions) or "nothing to recover"


def test_kill_9_at_20_points(pebble_factory: Callable[..., PebbleCA], tmp_path: Path) -> None:
    # No authorization reuse: every run then walks the same protocol steps (challenge included).
    pebble = pebble_factory(env={"PEBBLE_AUTHZREUSE": "0"})
    names = ["crash.example.test", "www.crash.example.test"]
    template = tmp_path / "template"
    template.mkdir()
    cfg_t = pebble.write_acme_config(
        template, names, account_key_file=str(template / "store/acct.key")
    )
    assert run([*CLI, "issue", "-c", str(cfg_t)]).returncode == 0
    scenarios: dict[str, list[str]] = {"issue": ["issue"], "renew": ["renew", "--force"]}
    traces = {}
    for scenario, cmd in scenarios.items():
        work = tmp_path / f"calibrate-{scenario}"
        work.mkdir()
        if scenario == "renew":
            shutil.copytree(template / "store", work / "store")
        cfg = pebble.write_acme_config(work, names, account_key_file=str(work / "store/acct.key"))
        trace = work / "trace"
        r = run([sys.executable, CRASH_RUN, "--trace", str(trace), "--", *cmd, "-c", str(cfg)])
        assert r.returncode == 0, r.stderr[-2000:]
        traces[scenario] = read_trace(trace)
    pick_points(traces["issue"], ISSUE_POINTS)  # every point exists in a real run
    pick_points(traces["renew"], RENEW_POINTS)
    points = [("issue", p) for p in ISSUE_POINTS] + [("renew", p) for p in RENEW_POINTS]
    assert len(points) == 20, points
    report = []
    for i, (scenario, (pattern, nth)) in enumerate(points):
        work = tmp_path / f"kill-{i}"
        work.mkdir()
        old_serial = None
        if scenario == "renew":
            shutil.copytree(template / "store", work / "store")
            old_serial = crypto.parse_chain(load_bundle(work / "store", names).chain_pem)[0]
        cfg = pebble.write_acme_config(work, names, account_key_file=str(work / "store/acct.key"))
        cmd = scenarios[scenario]
        trace = work / "trace"
        r = run([sys.executable, CRASH_RUN, "--trace", str(trace), "--kill-match", pattern,
                 "--kill-nth", str(nth), "--", *cmd, "-c", str(cfg)])  # fmt: skip
        assert r.returncode == -9, (pattern, r.returncode, r.stderr[-1000:])
        assert trace.read_text().endswith("\tKILL\n")
        last = read_trace(trace)[-1]
        n = last[0]
        what = integrity_check(
            work / "store", work / "store/acct.key", names, expect_cert=scenario == "renew"
        )
        again = run([*CLI, *cmd, "-c", str(cfg)])
        assert again.returncode == 0, (pattern, again.stderr[-2000:])
        bundle = check_valid(pebble, work / "store", names)
        if old_serial is not None:
            assert crypto.parse_chain(bundle.chain_pem)[0].serial_number != old_serial.serial_number
        status = run([*CLI, "status", "-c", str(cfg), "--json"])
        assert status.returncode == 0 and json.loads(status.stdout)[0]["state"] == "valid"
        report.append({"scenario": scenario, "killed_before": f"#{n} {last[1]} {last[2]}",
                       "recovery": what})  # fmt: skip
    FIGURES["kill_9"] = {
        "points": len(report),
        "events_issue": len(traces["issue"]),
        "events_renew": len(traces["renew"]),
        "detail": report,
    }


# -- 7. flood the responder while Pebble validates through it ---

_JUNK = [
    b"GET /.well-known/acme-challenge/" + b"A" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),  # a TLS hello
    b"POST /.well-known/acme-challenge/x HTTP/1.1\r\nContent-Length: 100000\r\n\r\nabc",
    b"GET / HTTP/1.1\r\n" + b"X-Junk: " + b"z" * 20000 + b"\r\n\r\n",
    b"BREW /pot HTCPCP/1.0\r\n\r\n",
    b"GET /.well-known/acme-challenge/%00%ff HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n",  # slowloris: never finishes its headers
]


async def _junk_client(port: int, stop: threading.Event, stats: dict[str, int]) -> None:
    rng = random.Random(7)

    async def one() -> None:
        while not stop.is_set() and stats["conns"] < 20000:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), 1.0
                )
            except (OSError, asyncio.TimeoutError):
                stats["refused"] += 1
                await asyncio.sleep(0.01)
                continue
            stats["conns"] += 1
            try:
                writer.write(rng.choice(_JUNK) if rng.random() < 0.7 else rng.randbytes(512))
                await asyncio.wait_for(writer.drain(), 1.0)
                await asyncio.wait_for(reader.read(1024), 0.2)
            except (OSError, asyncio.TimeoutError):
                pass
            finally:
                writer.close()

    await asyncio.gather(*(one() for _ in range(32)))


def _serial(store: Path, names: Sequence[str]) -> int | None:
    try:
        return crypto.parse_chain(load_bundle(store, names).chain_pem)[0].serial_number
    except (OSError, ValueError):
        return None


def test_flood_during_validation(pebble_factory: Callable[..., PebbleCA], tmp_path: Path) -> None:
    """`synapse-acme run` gets a 20 s certificate at start, then renews it ~10 s later by
    itself; wrk and the junk client flood the responder's port from before the renewal until
    after it, so Pebble's real validation of the renewal goes through the flood."""
    wrk = shutil.which("wrk")
    assert wrk, "wrk is missing: apt-get install -y wrk (scripts/install-deps.sh)"
    ca = pebble_factory(validity=20)
    names = ["flood.example.test"]
    store = tmp_path / "store"
    cfg = ca.write_acme_config(tmp_path, names, check_interval=0.5)
    url = f"http://127.0.0.1:{ca.http_port}/.well-known/acme-challenge/junk-token"
    stop = threading.Event()
    stats = {"conns": 0, "refused": 0}
    junk = threading.Thread(
        target=lambda: asyncio.run(_junk_client(ca.http_port, stop, stats)), daemon=True
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [*CLI, "run", "-c", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    wrk_proc = None
    try:
        deadline = time.monotonic() + 20
        first = None
        while first is None and time.monotonic() < deadline and proc.poll() is None:
            first = _serial(store, names)
            time.sleep(0.05)
        assert first is not None, "no first certificate"
        # The listener is up: flood it for 15 s, longer than the wait for the renewal.
        wrk_proc = subprocess.Popen(
            [wrk, "-t1", "-c64", "-d15s", "--timeout", "2s", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        junk.start()
        flood_started = time.monotonic()
        renewed = None
        while time.monotonic() - flood_started < 14 and proc.poll() is None:
            serial = _serial(store, names)
            if serial not in (None, first):
                renewed = time.monotonic() - flood_started
                break
            time.sleep(0.05)
        wrk_running = wrk_proc.poll() is None
        conns_during = stats["conns"]
    finally:
        stop.set()
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
        out = wrk_proc.communicate(timeout=30)[0] if wrk_proc is not None else ""
        if junk.is_alive():
            junk.join(15)
    assert renewed is not None, f"no renewal under flood; log:\n{log[-3000:]}"
    assert wrk_running, "wrk ended before the renewal: the flood did not cover validation"
    check_valid(ca, store, names)
    m = re.search(r"(\d+) requests in", out)
    assert m, out
    assert int(m.group(1)) > 0
    assert conns_during > 0, "the junk client never reached the responder"
    FIGURES["flood"] = {
        "renewed_after_flood_start_seconds": round(renewed, 2),
        "wrk": " ".join(out.split()),
        "junk_connections": stats["conns"],
    }


# -- 8. secrets: no key material in any log line; modes ---


def _secret_fragments(pem: bytes) -> list[str]:
    lines = [ln for ln in pem.decode().splitlines() if ln and not ln.startswith("-----")]
    return [ln[:24] for ln in lines if len(ln) >= 24]


def test_no_key_material_in_logs_and_private_modes(
    pebble_factory: Callable[..., PebbleCA], tmp_path: Path
) -> None:
    hmac_key = jose.b64encode(os.urandom(32)).decode()
    ca = pebble_factory(eab={"kid-secret": hmac_key})
    names = ["secret.example.test"]
    store = tmp_path / "store"
    export = tmp_path / "export"
    export.mkdir()
    cfg = ca.write_acme_config(
        tmp_path,
        names,
        eab={"kid": "kid-secret", "hmac_key": hmac_key},
        tls_certificate_path=str(export / "cert.pem"),
        tls_private_key_path=str(export / "key.pem"),
    )
    # umask 000: every mode below comes from the code, not from a kind environment.
    r = run([*CLI, "-vv", "issue", "-c", str(cfg)], preexec_fn=lambda: os.umask(0))
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "DEBUG" in log and len(log.splitlines()) > 20  # a real debug-level log
    bundle = check_valid(ca, store, names)
    account_pem = (store / "account.key").read_bytes() if (store / "account.key").exists() else b""
    acct_files = [p for p in store.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
    secrets = _secret_fragments(bundle.key_pem)
    for p in acct_files:
        secrets += _secret_fragments(p.read_bytes())
    jwk = parse_account_key(account_pem, "acct") if account_pem else None
    if jwk is not None:
        secrets.append(jwk.to_json()["d"])
    raw = jose.b64decode(hmac_key)
    secrets += [hmac_key, raw.hex(), __import__("base64").b64encode(raw).decode()]
    assert len(secrets) >= 6
    leaks = [s for s in secrets if s in log]
    assert not leaks, leaks
    assert "PRIVATE KEY" not in log
    for meta in [store / "status.json", *store.rglob("metadata.json")]:
        text = meta.read_text()
        assert not [s for s in secrets if s in text], meta
    # Modes, created under umask 000.
    modes = {}
    for p in [store, *store.rglob("*"), export / "key.pem"]:
        modes[str(p.relative_to(tmp_path))] = oct(stat.S_IMODE(p.stat().st_mode))
        m = stat.S_IMODE(p.stat().st_mode)
        if p.is_dir():
            assert m == 0o700, (p, oct(m))
        elif p.name in ("privkey.pem", "key.pem", "status.json") or p in acct_files:
            assert m == 0o600, (p, oct(m))
        else:
            assert m & 0o022 == 0, (p, oct(m))  # never writable by others
    FIGURES["secrets"] = {
        "log_lines": len(log.splitlines()),
        "fragments_checked": len(secrets),
        "leaks": 0,
        "modes": modes,
    }


# -- 9. a damaged store and a lost account key, through the real CLI ---


def _status(cfg: Path) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    text = run([*CLI, "status", "-c", str(cfg)])
    as_json = run([*CLI, "status", "-c", str(cfg), "--json"])
    for r in (text, as_json):
        assert "Traceback" not in r.stdout + r.stderr, r.stderr
    return text, as_json


def test_truncated_chain_in_the_store_is_reissued_and_never_exported(
    pebble: PebbleCA, tmp_path: Path
) -> None:
    names = ["damaged.example.test"]
    store = tmp_path / "store"
    export = tmp_path / "export"
    export.mkdir()
    cfg = pebble.write_acme_config(
        tmp_path,
        names,
        tls_certificate_path=str(export / "cert.pem"),
        tls_private_key_path=str(export / "key.pem"),
    )
    first = run([*CLI, "issue", "-c", str(cfg)])
    assert first.returncode == 0, first.stderr[-2000:]
    good = check_valid(pebble, store, names)
    assert (export / "cert.pem").read_bytes() == good.chain_pem
    chain_file = store / "certificates" / names_key(names) / "fullchain.pem"
    truncated = good.chain_pem[:-200]  # a cut inside the intermediate
    chain_file.write_bytes(truncated)

    text, as_json = _status(cfg)
    assert text.returncode == 1 and as_json.returncode == 1
    assert "state:        unreadable" in text.stdout
    assert f"error:        {chain_file} is damaged: certificate 2 of the chain is incomplete" in (
        text.stdout
    )
    [entry] = json.loads(as_json.stdout)
    assert entry["state"] == "unreadable" and entry["names"] == names
    assert entry["error"].startswith(f"{chain_file} is damaged: certificate 2 of the chain")

    again = run([*CLI, "issue", "-c", str(cfg)])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Nothing to do" not in again.stdout and "OK      damaged.example.test" in again.stdout
    assert f"Cannot read the stored certificate for damaged.example.test: {chain_file}" in (
        again.stderr
    )
    renewed = check_valid(pebble, store, names)
    old_leaf = crypto.parse_chain(good.chain_pem)[0]
    assert crypto.parse_chain(renewed.chain_pem)[0].serial_number != old_leaf.serial_number
    # The export went from the good old chain straight to the new one.
    assert (export / "cert.pem").read_bytes() == renewed.chain_pem != truncated
    assert (export / "key.pem").read_bytes() == renewed.key_pem
    text, as_json = _status(cfg)
    assert as_json.returncode == 0 and json.loads(as_json.stdout)[0]["state"] == "valid"


def test_damaged_key_in_the_store_is_unreadable_in_status(pebble: PebbleCA, tmp_path: Path) -> None:
    names = ["damagedkey.example.test"]
    cfg = pebble.write_acme_config(tmp_path, names)
    assert run([*CLI, "issue", "-c", str(cfg)]).returncode == 0
    key_file = tmp_path / "store" / "certificates" / names_key(names) / "privkey.pem"
    original = key_file.read_bytes()
    for damage, expected in [
        (crypto.generate_private_key_pem(), f"{key_file} does not belong to"),
        (original[:90], f"{key_file} is damaged: private key does not parse"),
    ]:
        key_file.write_bytes(damage)
        text, as_json = _status(cfg)
        assert text.returncode == 1 and as_json.returncode == 1
        assert "state:        unreadable" in text.stdout and expected in text.stdout
        [entry] = json.loads(as_json.stdout)
        assert entry["state"] == "unreadable" and entry["error"].startswith(expected)
        assert b"".join(original.splitlines()[1:-1])[:24].decode() not in text.stdout


def test_lost_account_key_is_not_replaced_until_new_account(
    pebble: PebbleCA, tmp_path: Path
) -> None:
    names = ["lostkey.example.test"]
    store = tmp_path / "store"
    key_file = store / "account.key"
    cfg = pebble.write_acme_config(tmp_path, names)
    assert run([*CLI, "issue", "-c", str(cfg)]).returncode == 0
    record = json.loads((store / "account.json").read_text())
    first_key = parse_account_key(key_file.read_bytes(), "first")
    assert record["directory"] == pebble.directory_url
    assert record["url"].startswith("https://")
    assert record["thumbprint"] == jose.b64encode(first_key.thumbprint()).decode()

    key_file.unlink()
    for cmd in (["issue"], ["renew", "--force"]):
        r = run([*CLI, *cmd, "-c", str(cfg)])
        assert r.returncode == 1, (cmd, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        assert f"error: the ACME account key {key_file} is missing, but " in r.stderr
        assert f"{store / 'account.json'} records the account {record['url']}" in r.stderr
        assert "`synapse-acme new-account -c <config file>`" in r.stderr
        assert not key_file.exists()
    assert not [p.name for p in store.iterdir() if p.name.startswith(("account.key", ".acc"))]

    made = run([*CLI, "new-account", "-c", str(cfg)])
    assert made.returncode == 0, made.stderr
    assert f"NEW ACCOUNT  created a new ACME account key at {key_file}" in made.stdout
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    renewed = run([*CLI, "renew", "--force", "-c", str(cfg)])
    assert renewed.returncode == 0, renewed.stderr[-2000:]
    check_valid(pebble, store, names)
    new_record = json.loads((store / "account.json").read_text())
    new_key = parse_account_key(key_file.read_bytes(), "new")
    assert new_record["thumbprint"] == jose.b64encode(new_key.thumbprint()).decode()
    assert new_record["url"] != record["url"]
    # A foreign key in its place is refused as well.
    key_file.write_bytes(crypto.generate_private_key_pem())
    r = run([*CLI, "renew", "--force", "-c", str(cfg)])
    assert r.returncode == 1 and "is not the key of the account recorded in" in r.stderr


def teardown_module() -> None:
    save_figures("test_pebble_faults", FIGURES)
