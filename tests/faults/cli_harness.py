"""What the fault tests that drive the real CLI in subprocesses share.

Running ``synapse-acme`` (plain or under ``crash_run.py``) with this checkout on the path,
reading a crash trace, loading and checking a stored bundle, and saving the figures the tests
report (``FAULTS_FIGURES``, see docs/RELIABILITY.md).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from synapse_acme import crypto
from synapse_acme.model import CertificateBundle
from synapse_acme.names import names_key
from synapse_acme.testing.pebble import PebbleCA

CLI = [sys.executable, "-m", "synapse_acme"]
CRASH_RUN = str(Path(__file__).with_name("crash_run.py"))
ROOT = str(Path(__file__).resolve().parents[2])


def run(args: Sequence[str], timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``args`` to completion with this checkout first on ``PYTHONPATH``."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.update(kw.pop("env", {}))
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, check=False, env=env, **kw
    )


def load_bundle(store: Path, names: Sequence[str]) -> CertificateBundle:
    """The bundle stored for ``names`` (read straight from its directory, no recovery)."""
    d = store / "certificates" / names_key(names)
    return CertificateBundle(
        key_pem=(d / "privkey.pem").read_bytes(),
        chain_pem=(d / "fullchain.pem").read_bytes(),
        metadata=json.loads((d / "metadata.json").read_text()),
    )


def check_valid(ca: PebbleCA, store: Path, names: Sequence[str]) -> CertificateBundle:
    """The stored bundle for ``names``; AssertionError unless it chains to ``ca`` and is valid."""
    bundle = load_bundle(store, names)
    ca.verify_chain(bundle.chain_pem, names)
    crypto.validate_bundle(bundle, names, datetime.datetime.now(datetime.timezone.utc))
    return bundle


def read_trace(path: Path) -> list[tuple[int, str, str]]:
    """A ``crash_run.py`` trace as ``(number, kind, detail)``, in order."""
    out = []
    for line in path.read_text().splitlines():
        n, kind, detail = line.split("\t")[:3]
        out.append((int(n), kind, detail))
    return out


def save_figures(module: str, figures: dict[str, Any]) -> None:
    """Append ``{module: figures}`` as one JSON line to ``$FAULTS_FIGURES`` (if set)."""
    if figures and os.environ.get("FAULTS_FIGURES"):
        with open(os.environ["FAULTS_FIGURES"], "a", encoding="utf-8") as f:
            f.write(json.dumps({module: figures}) + "\n")
