"""The command line as a process: what a one-shot ``synapse-acme issue`` loads (only what it
runs), and how the process ends (at once, its output complete, with the command's exit code).

Importing, and the interpreter's teardown of what was imported, are most of a short command's
time (bench/run.py measures it: the CLI against a minimal process doing the same protocol
requests). The modules below serve other setups or other commands and are imported where used;
a new eager import of one of them fails here instead of slowing every `issue` unnoticed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

#: Never loaded by an HTTP-01 `issue`: the metrics exposition, DNS-01's dnspython, Synapse and
#: the glue to it, and the parts of other setups (alerts, export, file watching, TLS-ALPN-01,
#: the threaded store of an embedded runtime, the dry run).
NOT_FOR_A_ONE_SHOT_ISSUE = (
    "prometheus_client",
    "dns",
    "synapse",
    "synapse_acme.synapse",
    "synapse_acme.rfc2136",
    "synapse_acme.alerter",
    "synapse_acme.webhook",
    "synapse_acme.export",
    "synapse_acme.watch",
    "synapse_acme.tlsalpn01",
    "synapse_acme.threaded",
    "synapse_acme.dryrun",
)

_PROGRAM = """
import json, sys
from twisted.internet import reactor
import synapse_acme.cli
from synapse_acme.config import parse_acme_config
from synapse_acme.runtime import build_runtime

config = parse_acme_config({
    "enabled": True,
    "url": "https://127.0.0.1:1/dir",
    "domain": "a.example.test",
    "storage": sys.argv[1],
    "terms_of_service_agreed": True,
    "port": 0,
    "bind_addresses": ["127.0.0.1"],
})
runtime = build_runtime(config, reactor, standalone_listener=True, one_shot=True)
assert runtime.acme is not None
print(json.dumps(sorted(sys.modules)))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _modules_of_a_one_shot(tmp_path: Path) -> set[str]:
    env = _env()
    out = subprocess.run(
        [sys.executable, "-c", _PROGRAM, str(tmp_path / "store")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_a_one_shot_issue_loads_only_what_it_runs(tmp_path: Path) -> None:
    loaded = _modules_of_a_one_shot(tmp_path)
    # The check sees what was really imported: the runtime and the ACME layer are there.
    assert {"synapse_acme.runtime", "synapse_acme.acme.issuer", "treq", "yaml"} <= loaded
    wrong = sorted(
        m for m in loaded for top in NOT_FOR_A_ONE_SHOT_ISSUE if m == top or m.startswith(top + ".")
    )
    assert not wrong, wrong


def test_the_process_ends_with_its_output_complete_and_the_commands_exit_code(
    tmp_path: Path,
) -> None:
    # `python -m synapse_acme` skips the interpreter's teardown (cli.entry): what was printed
    # and logged must still all arrive, into a pipe, and the exit code must be the command's.
    cli = [sys.executable, "-m", "synapse_acme"]
    full = subprocess.run(
        [*cli, "generate-config"], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert full.returncode == 0, full.stderr
    assert full.stdout.startswith("# synapse-acme") and full.stdout.endswith("\n")
    # byte for byte what the function behind the command writes
    sample = (Path(__file__).resolve().parents[2] / "synapse_acme" / "sample_acme.yaml").read_text()
    assert full.stdout.strip() == sample.strip()
    missing = subprocess.run(
        [*cli, "status", "-c", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert missing.returncode == 2
    assert missing.stderr.startswith("configuration error: ") and "nope.yaml" in missing.stderr
