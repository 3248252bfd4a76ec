"""Nothing lost on disk: kill -9 at every directory-entry change, and a reader that never stops.

Rows 4b and 4c of docs/RELIABILITY.md, against the real Pebble, through the real CLI.

4b. ``issue`` (first issuance, fresh store) and ``renew --force`` (over an existing certificate)
export to ``tls_certificate_path``/``tls_private_key_path`` in a directory of their own. One
calibration run under ``crash_run.py`` (itself under ``strace``, which proves the trace missed no
directory-entry syscall) lists every rename/replace/link/symlink/unlink/rmdir the command makes.
For each one the command is run again and SIGKILLed just before it, and again just after it.
Right after each kill: the exported pair is whole or (first issuance only) not there yet, every
certificate directory of the store under its real name is complete, the account key is
untouched. Then the same command, run again without a kill, must finish the work: exported pair
= the store's current bundle, chaining to Pebble's root, and ``status`` says valid.

4c. A long-running ``synapse-acme run`` exports; a reader process reads the two paths without
pause (as Synapse does: following links) across 100 forced renewals handed over with
``renew --force``, and counts the moments at which the pair on disk did not match.

The checks read the exported paths the way Synapse does (following symbolic links) and know
nothing of how the export is laid out, so they hold for any correct implementation.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from synapse_acme.account import parse_account_key
from synapse_acme.errors import StoreError
from synapse_acme.names import is_safe_key, names_key
from synapse_acme.testing.pebble import PebbleCA
from tests.faults.cli_harness import CLI, CRASH_RUN, ROOT, read_trace, run, save_figures

NAMES = ["crash.example.test", "www.crash.example.test"]
COMMANDS = {"issue": ["issue"], "renew": ["renew", "--force"]}
#: The trace's names of the calls that change a directory entry and are killed at.
KILL_CALLS = ("rename", "replace", "link", "symlink", "unlink", "remove", "rmdir")
#: The same changes (and mkdir) as syscalls, for strace (a regex: the *at variants included).
STRACE_CALLS = r"/^(rename|link|symlink|unlink|rmdir|mkdir)(at|at2)?$"
FIGURES: dict[str, Any] = {}


# -- where a command runs ---


@attrs.define
class Site:
    """The config and the live tree (store + export directory) of one command under test.

    Every run uses the same absolute paths, and the tree is restored by copying a snapshot back
    (links copied as links): whatever an implementation records about the paths it exports to
    (an ownership record, absolute symbolic links) stays true in the restored copy.
    """

    root: Path
    pebble: PebbleCA

    @property
    def live(self) -> Path:
        return self.root / "live"

    @property
    def store(self) -> Path:
        return self.live / "store"

    @property
    def account_key(self) -> Path:
        return self.store / "acct.key"

    @property
    def cert_path(self) -> Path:
        return self.live / "export" / "cert.pem"

    @property
    def key_path(self) -> Path:
        return self.live / "export" / "key.pem"

    @property
    def config(self) -> Path:
        return self.root / "acme.yaml"

    def write_config(self, **extra: Any) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.pebble.write_acme_config(
            self.root,
            NAMES,
            storage=str(self.store),
            account_key_file=str(self.account_key),
            tls_certificate_path=str(self.cert_path),
            tls_private_key_path=str(self.key_path),
            **extra,
        )

    def reset(self, snapshot: Path | None) -> None:
        """A fresh tree (empty export directory, no store), or a copy of ``snapshot``."""
        if self.live.exists():
            shutil.rmtree(self.live)
        if snapshot is None:
            (self.live / "export").mkdir(parents=True)
        else:
            shutil.copytree(snapshot, self.live, symlinks=True)

    def keep(self, dest: Path) -> None:
        shutil.copytree(self.live, dest, symlinks=True)


# -- what is checked ---


def read_following(path: Path) -> bytes | None:
    """The bytes a reader gets at ``path`` (links followed), None if there is nothing there."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _spki(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def pair_mismatch(chain_pem: bytes, key_pem: bytes) -> str | None:
    """None if ``key_pem`` is the private key of the leaf of ``chain_pem``, else why not."""
    try:
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    except ValueError as e:
        return f"the certificate file does not parse ({e})"
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        return f"the key file does not parse ({e})"
    if _spki(leaf.public_key()) != _spki(key.public_key()):
        return f"the key does not match the certificate (serial {leaf.serial_number:x})"
    return None


def exported_pair_problems(site: Site, pair_existed: bool) -> list[str]:
    """Right after a kill: the exported pair matches, or no pair existed before this run and
    at most one of the two files has appeared."""
    try:
        chain, key = read_following(site.cert_path), read_following(site.key_path)
    except OSError as e:
        return [f"export unreadable: {e}"]
    if chain is None or key is None:
        if not pair_existed:
            return []  # first issuance: "no pair yet", whatever half of it is there
        gone = [p.name for p, data in ((site.cert_path, chain), (site.key_path, key)) if not data]
        return [f"exported pair lost: {' and '.join(gone)} missing"]
    why = pair_mismatch(chain, key)
    return [f"exported pair mismatched: {why}"] if why else []


def store_problems(store: Path) -> list[str]:
    """Every ``certificates/<key>/`` under its real name holds a verifying chain, its key and
    parseable metadata (staging and temporary names are the store's own business)."""
    certificates = store / "certificates"
    if not certificates.is_dir():
        return []
    problems = []
    for entry in sorted(certificates.iterdir()):
        if not is_safe_key(entry.name):
            continue
        where = f"store {entry.name}"
        if entry.is_symlink() or not entry.is_dir():
            problems.append(f"{where}: not a directory")
            continue
        try:
            chain_pem = (entry / "fullchain.pem").read_bytes()
            key_pem = (entry / "privkey.pem").read_bytes()
            metadata = json.loads((entry / "metadata.json").read_bytes())
        except (OSError, ValueError) as e:
            problems.append(f"{where}: {e}")
            continue
        if not isinstance(metadata, dict):
            problems.append(f"{where}: metadata.json is not an object")
        try:
            chain = x509.load_pem_x509_certificates(chain_pem)
        except ValueError as e:
            problems.append(f"{where}: fullchain.pem does not parse ({e})")
            continue
        if len(chain) < 2:
            problems.append(f"{where}: fullchain.pem holds no intermediate")
            continue
        try:
            chain[0].verify_directly_issued_by(chain[1])
        except (ValueError, TypeError, InvalidSignature) as e:
            problems.append(f"{where}: leaf not signed by the intermediate ({e!r})")
        why = pair_mismatch(chain_pem, key_pem)
        if why:
            problems.append(f"{where}: privkey.pem vs fullchain.pem: {why}")
    return problems


def account_key_problems(site: Site, before: bytes | None) -> list[str]:
    """The account key is the one from before the run; with none before, absent or whole."""
    path = site.account_key
    if not path.exists():
        return [] if before is None else ["account key lost"]
    data = path.read_bytes()
    if before is not None:
        return [] if data == before else ["account key changed"]
    problems = []
    try:
        parse_account_key(data, str(path))
    except StoreError as e:
        problems.append(f"account key incomplete: {e}")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode != 0o600:
        problems.append(f"account key mode {mode:04o}")
    return problems


def finished_problems(site: Site, account: bytes | None, old_serial: int | None) -> list[str]:
    """After the restart: the exported pair is the store's current bundle and chains to Pebble,
    the account key is still the one the killed run left, ``status`` says valid."""
    problems = store_problems(site.store)
    chain, key = read_following(site.cert_path), read_following(site.key_path)
    if chain is None or key is None:
        return [*problems, "no exported pair after the restart"]
    why = pair_mismatch(chain, key)
    if why:
        problems.append(f"exported pair mismatched after the restart: {why}")
    current = site.store / "certificates" / names_key(NAMES)
    try:
        stored_chain = (current / "fullchain.pem").read_bytes()
        stored_key = (current / "privkey.pem").read_bytes()
    except OSError as e:
        return [*problems, f"no current bundle in the store after the restart: {e}"]
    differ = [n for n, same in (("chain", chain == stored_chain), ("key", key == stored_key))
              if not same]  # fmt: skip
    if differ:
        problems.append(f"exported {' and '.join(differ)} differ from the store's current bundle")
    try:
        site.pebble.verify_chain(chain, NAMES)
    except AssertionError as e:
        problems.append(f"exported chain: {e}")
    if old_serial is not None and x509.load_pem_x509_certificate(chain).serial_number == old_serial:
        problems.append("the restart did not renew")
    problems += account_key_problems(site, account)
    if account is None and not site.account_key.exists():
        problems.append("no account key after the restart")
    status = run([*CLI, "status", "-c", str(site.config), "--json"])
    states = [e.get("state") for e in json.loads(status.stdout or "[]")]
    if status.returncode != 0 or states != ["valid"]:
        problems.append(f"status exited {status.returncode} with states {states}")
    return problems


# -- the kill points ---


@attrs.frozen
class KillPoint:
    """Die just before (or just after) the ``nth`` event matching ``pattern``."""

    event: str  # as it appeared in the calibration run
    pattern: str
    nth: int
    after: bool

    @property
    def label(self) -> str:
        """``before 'fs rename .cert.pem.<hex>.tmp cert.pem' (match 1)``."""
        return f"{'after' if self.after else 'before'} {self.event!r} (match {self.nth})"


# Parts of names that differ from run to run (random hex of temporary and staging names,
# counters, times): matched as "some letters or digits", the rest literally.
_VARIABLE = re.compile(r"[0-9A-Fa-f]{6,}|[0-9]+")


def event_pattern(text: str) -> str:
    """A regex for trace event ``text`` ("kind detail") with its variable parts wildcarded.

    A name that differs between runs in another way makes the point unreachable in the kill
    run, which fails the test loudly (``not killed there``) instead of testing less."""
    parts, pos = [], 0
    for m in _VARIABLE.finditer(text):
        parts += [re.escape(text[pos : m.start()]), "[0-9A-Za-z]+"]
        pos = m.end()
    return "^" + "".join([*parts, re.escape(text[pos:])]) + "$"


def kill_points(events: Sequence[tuple[int, str, str]]) -> list[KillPoint]:
    """Before and after every directory-entry change of a calibration trace."""
    texts = [f"{kind} {detail}" for _, kind, detail in events]
    points = []
    for i, (_, kind, detail) in enumerate(events):
        if kind != "fs" or detail.split(" ", 1)[0] not in KILL_CALLS:
            continue
        pattern = event_pattern(texts[i])
        nth = sum(1 for t in texts[: i + 1] if re.search(pattern, t))
        points += [KillPoint(texts[i], pattern, nth, after) for after in (False, True)]
    return points


# -- calibration: one run, traced by the harness and by strace ---

_SYSCALL = re.compile(r"^\d+\s+(\w+)\((.*)$")
_ARG = re.compile(r'AT_FDCWD|\d+<(?P<fd>[^>]*)>|"(?P<s>(?:[^"\\]|\\.)*)"')
_SAME_KIND = {"replace": "rename", "remove": "unlink"}


def strace_changes(path: Path, under: Path) -> collections.Counter[tuple[str, ...]]:
    """``(call, name, ...)`` of every directory-entry syscall on a path under ``under``."""
    found: collections.Counter[tuple[str, ...]] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        m = _SYSCALL.match(line)
        if not m:
            continue  # a "resumed" half, an exit
        call, args = m.groups()
        kind = "rmdir" if call == "unlinkat" and "AT_REMOVEDIR" in args else call
        kind = re.sub(r"at2?$", "", kind)
        names, paths, base = [], [], None
        for a in _ARG.finditer(args):
            if a.group("fd") is not None:
                base = a.group("fd")
                continue
            text = a.group("s")
            if text is not None:
                names.append(os.path.basename(text.rstrip("/")) or text)
                joined = text if base is None else os.path.join(base, text)
                paths.append(os.path.normpath(joined))
            base = None
        if kind == "symlink":
            paths = paths[1:]  # a link's target is only text
        if any(p == str(under) or p.startswith(f"{under}{os.sep}") for p in paths):
            found[(kind, *names)] += 1
    return found


def harness_changes(events: Sequence[tuple[int, str, str]]) -> collections.Counter[tuple[str, ...]]:
    """The same ``(call, name, ...)`` from a crash_run trace."""
    found: collections.Counter[tuple[str, ...]] = collections.Counter()
    for _, kind, detail in events:
        call, *args = detail.split(" ")
        if kind != "fs" or (call not in KILL_CALLS and call != "mkdir"):
            continue
        n = 2 if call in ("rename", "replace", "link", "symlink") else 1
        found[(_SAME_KIND.get(call, call), *args[:n])] += 1
    return found


def calibrate(site: Site, cmd: Sequence[str], work: Path) -> tuple[list[Any], list[str]]:
    """The trace of one whole run of ``cmd``, and what strace saw change that it lacks."""
    strace = shutil.which("strace")
    assert strace, "strace is missing: apt-get install -y strace (scripts/install-deps.sh)"
    work.mkdir(parents=True)
    trace, syscalls = work / "trace", work / "strace"
    r = run([strace, "-f", "-qq", "-e", "signal=none", "-s", "4096", "-y", "-o", str(syscalls),
             "-e", f"trace={STRACE_CALLS}",
             sys.executable, CRASH_RUN, "--trace", str(trace), "--", *cmd,
             "-c", str(site.config)])  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    events = read_trace(trace)
    seen = strace_changes(syscalls, site.live)
    assert seen, "strace saw no directory change: is it tracing the command?"
    missed = seen - harness_changes(events)
    return events, [f"{' '.join(k)} (x{n})" for k, n in sorted(missed.items())]


def kill_and_restart(
    site: Site, snapshot: Path | None, cmd: Sequence[str], point: KillPoint, work: Path
) -> list[str]:
    """Run ``cmd`` killed at ``point``, check the disk, run it again, check the result."""
    site.reset(snapshot)
    work.mkdir(parents=True)
    account = site.account_key.read_bytes() if site.account_key.exists() else None
    pair_existed = site.cert_path.exists() and site.key_path.exists()
    old_serial = (
        x509.load_pem_x509_certificate(site.cert_path.read_bytes()).serial_number
        if pair_existed
        else None
    )
    trace = work / "trace"
    killed = run([sys.executable, CRASH_RUN, "--trace", str(trace), "--kill-match", point.pattern,
                  "--kill-nth", str(point.nth), *(["--kill-after"] if point.after else []),
                  "--", *cmd, "-c", str(site.config)])  # fmt: skip
    (work / "killed.stderr").write_text(killed.stderr)
    if killed.returncode != -signal.SIGKILL:
        return [f"not killed there: exit {killed.returncode}; {killed.stderr[-500:]}"]
    n, kind, detail = read_trace(trace)[-1]
    died_at = detail if kind == "after" else f"{kind} {detail}"
    if (kind == "after") != point.after or not re.search(point.pattern, died_at):
        return [f"killed at the wrong place: #{n} {kind} {detail}"]
    problems = exported_pair_problems(site, pair_existed)
    problems += store_problems(site.store)
    problems += account_key_problems(site, account)
    left = site.account_key.read_bytes() if site.account_key.exists() else None
    again = run([*CLI, *cmd, "-c", str(site.config)])
    (work / "restart.stderr").write_text(again.stderr)
    if again.returncode != 0:
        tail = " | ".join(again.stderr.strip().splitlines()[-3:])
        return [*problems, f"restart exited {again.returncode}: {tail}"]
    return problems + [f"after the restart: {p}" for p in finished_problems(site, left, old_serial)]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_kill_9_before_and_after_every_entry_change(
    pebble: PebbleCA, tmp_path: Path, command: str
) -> None:
    started = time.monotonic()
    cmd = COMMANDS[command]
    site = Site(tmp_path / "site", pebble)
    site.write_config()
    snapshot = None
    if command == "renew":
        site.reset(None)
        first = run([*CLI, "issue", "-c", str(site.config)])
        assert first.returncode == 0, first.stderr[-3000:]
        assert site.cert_path.exists() and site.key_path.exists(), "issue exported nothing"
        snapshot = tmp_path / "baseline"
        site.keep(snapshot)
    site.reset(snapshot)
    events, missed = calibrate(site, cmd, tmp_path / "calibration")
    points = kill_points(events)
    assert points, "no directory-entry change in the trace"
    failures = [f"the trace lacks directory changes strace saw: {missed}"] if missed else []
    failing = []
    for i, point in enumerate(points):
        work = tmp_path / "points" / f"{i:02d}"
        problems = kill_and_restart(site, snapshot, cmd, point, work)
        if problems:
            site.keep(work / "live")  # the evidence, as the restart left it
            failing.append(point.label)
            failures.append(f"{point.label}:\n      " + "\n      ".join(problems))
    FIGURES[command] = {
        "trace_events": len(events),
        "entry_changes": len(points) // 2,
        "kill_points": len(points),
        "failing_points": failing,
        "seconds": round(time.monotonic() - started, 1),
    }
    assert not failures, (
        f"{len(failing)} of {len(points)} kill points of `synapse-acme {' '.join(cmd)}` "
        "lost something:\n  " + "\n  ".join(failures)
    )


def teardown_module() -> None:
    save_figures("test_crash_every_point", FIGURES)


# -- 4c. a reader that never pauses, across 100 forced renewals ---

RENEWALS = 100
READER = str(Path(__file__).with_name("pair_reader.py"))
# `synapse-acme renew --force`, a hundred times: each run is the console script's own
# cli.main() in a process of its own, forked from one that imported synapse_acme once, so
# that a hand-over costs its work (config, lock refused, request file) and not a second of
# imports. Protocol: one line in per run; out come the run's stdout, then "EXIT <code>".
HAND_OVER = """
import os, sys
from synapse_acme import cli, runtime
args = sys.argv[1:]
for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:
        code = cli.main(args)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print("EXIT", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def hand_over(forker: subprocess.Popen[str]) -> tuple[int, str]:
    """One ``renew --force`` through ``forker`` (see HAND_OVER): its exit code and stdout."""
    assert forker.stdin is not None and forker.stdout is not None
    forker.stdin.write("go\n")
    forker.stdin.flush()
    lines: list[str] = []
    for line in forker.stdout:
        if line.startswith("EXIT "):
            return int(line.split()[1]), "".join(lines)
        lines.append(line)
    raise AssertionError(f"the hand-over process ended: {''.join(lines)}")


def wait_for_new_export(
    site: Site, service: subprocess.Popen[bytes], log: Path, previous: int | None
) -> int:
    """The serial of the next matching pair exported after ``previous``."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert service.poll() is None, f"`run` exited: {log.read_text()[-3000:]}"
        chain, key = read_following(site.cert_path), read_following(site.key_path)
        if chain is not None and key is not None and pair_mismatch(chain, key) is None:
            serial = x509.load_pem_x509_certificate(chain).serial_number
            if serial != previous:
                return serial
        time.sleep(0.01)
    raise AssertionError(f"no new certificate exported within 60 s: {log.read_text()[-3000:]}")


class ReaderSerials:
    """The serials ``pair_reader.py`` announces (``serial <hex>`` lines), read in a thread."""

    def __init__(self, reader: subprocess.Popen[str]) -> None:
        self._reader = reader
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.seen: set[int] = set()
        self._last = ""
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self._reader.stdout is not None
        for line in self._reader.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _take(self, timeout: float) -> bool:
        """Take one line; False once the reader's output has ended."""
        line = self._lines.get(timeout=timeout)
        if line is None:
            return False
        if line.startswith("serial "):
            self.seen.add(int(line.split()[1], 16))
        else:
            self._last = line
        return True

    def wait_for(self, serial: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while serial not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"the reader did not read certificate {serial:x} within {timeout} s"
            try:
                assert self._take(left), "the reader ended"
            except queue.Empty:
                continue

    def summary(self) -> dict[str, Any]:
        """The reader's JSON summary (after SIGTERM)."""
        self._reader.wait(timeout=30)
        while self._take(30):
            pass
        return dict(json.loads(self._last))


def test_pair_reader_across_100_forced_renewals(pebble: PebbleCA, tmp_path: Path) -> None:
    site = Site(tmp_path / "site", pebble)
    site.write_config()
    site.reset(None)
    env = dict(os.environ, PYTHONPATH=ROOT)
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        service = subprocess.Popen(
            [*CLI, "run", "-c", str(site.config)], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    reader = forker = None
    try:
        serial = wait_for_new_export(site, service, log, None)  # the first issuance
        reader = subprocess.Popen(
            [sys.executable, READER, str(site.cert_path), str(site.key_path)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        forker = subprocess.Popen(
            [sys.executable, "-c", HAND_OVER, "renew", "--force", "-c", str(site.config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        announced = ReaderSerials(reader)
        announced.wait_for(serial)
        started = time.monotonic()
        for _ in range(RENEWALS):
            code, stdout = hand_over(forker)
            assert code == 0 and "HANDED OVER" in stdout, (code, stdout)
            serial = wait_for_new_export(site, service, log, serial)
            # The reader must have read this certificate before the next renewal replaces it:
            # on a loaded machine a starved reader would otherwise miss one, and the test would
            # not have looked at every change.
            announced.wait_for(serial)
        elapsed = time.monotonic() - started
        assert reader.poll() is None, "the reader died"
        reader.send_signal(signal.SIGTERM)
        seen = announced.summary()
    finally:
        for proc in (forker, reader, service):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
    FIGURES["pair_reader"] = {
        "renewals": RENEWALS,
        "seconds": round(elapsed, 1),
        **seen,
    }
    assert seen["serials"] >= RENEWALS + 1, f"the reader did not see every certificate: {seen}"
    assert seen["reads"] > RENEWALS, seen
    assert seen["mismatches"] == 0 and seen["missing"] == 0, (
        f"the exported pair on disk did not match at {seen['mismatches']} reads "
        f"({seen['mismatched_pairs']} distinct pairs) and was missing at {seen['missing']} "
        f"({seen['reads']} reads, {seen['straddles']} straddled a change, {RENEWALS} "
        f"renewals): {seen['examples']}"
    )
