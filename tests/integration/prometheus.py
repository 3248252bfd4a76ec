"""A real Prometheus (Debian's ``prometheus``) for the metrics tests, and ``promtool``.

Prometheus must be told its port up front and cannot take a socket, so its web port is
reserved (:func:`synapse_acme.testing.ports.reserve_port`) and a start that fails with
EADDRINUSE is retried on another. It scrapes every second and keeps its data in the test's
temporary directory; the package's systemd service plays no part. A missing binary fails the
test (never a skip).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from synapse_acme.testing import ports

START_ATTEMPTS = 3
START_TIMEOUT = 30.0


def binary(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, (
        f"{name} is not installed: `apt-get install prometheus` (scripts/install-deps.sh does)"
    )
    return path


class Prometheus:
    """One Prometheus scraping ``targets`` (``job -> ["host:port", ...]``) every second."""

    def __init__(self, workdir: Path, targets: dict[str, Sequence[str]]) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "prometheus.yml"
        jobs = [
            {"job_name": job, "static_configs": [{"targets": list(hosts)}]}
            for job, hosts in targets.items()
        ]
        conf = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}}
        conf["scrape_configs"] = jobs  # type: ignore[assignment]
        self.config.write_text(json.dumps(conf))  # JSON is YAML
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "prometheus.log"

    def start(self) -> Prometheus:
        for attempt in range(1, START_ATTEMPTS + 1):
            with ports.reserve_port() as reserved:
                self.port = reserved.port
            mark = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                self._start_once()
                return self
            except AssertionError:
                self.stop()
                text = self.log_path.read_bytes()[mark:].decode(errors="replace")
                if attempt == START_ATTEMPTS or not ports.port_in_use(text):
                    raise
        raise AssertionError("not reached")

    def _start_once(self) -> None:
        storage = self.dir / "data"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    binary("prometheus"),
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={storage}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"prometheus exited with {self.proc.returncode}:\n{self.log()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"prometheus not ready within {START_TIMEOUT} s:\n{self.log()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def query(self, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
        """An instant query through the HTTP API: labels (without ``__name__``, ``job``,
        ``instance``) -> value."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as r:
            answer = json.load(r)
        assert answer["status"] == "success", answer
        out = {}
        for item in answer["data"]["result"]:
            labels = {
                k: v for k, v in item["metric"].items() if k not in ("__name__", "job", "instance")
            }
            out[tuple(sorted(labels.items()))] = float(item["value"][1])
        return out

    def targets_up(self) -> dict[str, bool]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=5) as r:
            answer = json.load(r)
        return {t["scrapeUrl"]: t["health"] == "up" for t in answer["data"]["activeTargets"]}

    def wait_for(
        self,
        expr: str,
        check: Callable[[dict[tuple[tuple[str, str], ...], float]], bool],
        timeout: float,
        what: str,
        extra_log: Callable[[], str] = lambda: "",
    ) -> dict[tuple[tuple[str, str], ...], float]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = self.query(expr)
            if check(last):
                return last
            time.sleep(0.25)
        raise AssertionError(
            f"timed out waiting for {what}: {expr} = {last}\n{self.log()}\n{extra_log()[-4000:]}"
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary("promtool"), *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=60,
    )


def scrape(port: int, path: str = "/metrics") -> tuple[str, bytes]:
    """``(content type, body)`` of a direct GET of the exposition."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.headers.get("content-type", ""), r.read()


__all__ = ["Prometheus", "binary", "promtool", "scrape"]
