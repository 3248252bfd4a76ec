"""The benchmark's run counts (bench/issuance.py, Issuance.measure): the rows compared with the
floor get more runs where they are cheap, peers keep the profile's count, and run i of every
client still comes from the same round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.issuance import Client, Issuance, Scenario


class _CA:
    def stop(self) -> None:
        pass

    def start(self) -> None:
        pass

    def dump_goroutines(self, path: str) -> bool:
        return False


def _issuance(tmp_path: Path, clients: list[tuple[str, str, float]], rounds: list[Any]) -> Issuance:
    iss = object.__new__(Issuance)
    iss.workdir = str(tmp_path)
    iss.ca = _CA()
    iss._nginx = None

    def runner(name: str, seconds: float) -> Any:
        def run(groups: list[list[str]], work: str) -> float:
            rounds.append((name, groups[0][0].split(".")[2]))  # the round is in the name
            return seconds

        return run

    iss.clients = {n: Client(n, kind, False, runner(n, s), n) for n, kind, s in clients}
    return iss


def test_cheap_floor_rows_get_floor_runs_and_the_rest_keep_runs(tmp_path: Path) -> None:
    rounds: list[Any] = []
    clients = [
        ("cli", "project", 1.0),  # 5 runs cost 5 s <= 6 s: goes on to 5
        ("floor", "floor", 0.5),  # 2.5 s: goes on to 5
        ("slow-cli", "project", 10.0),  # 50 s > 6 s: stays at 2
        ("certbot", "certbot", 0.1),  # a peer: stays at 2 however cheap
    ]
    iss = _issuance(tmp_path, clients, rounds)
    scenario = Scenario("one", "one", 1, 1, [c[0] for c in clients])
    res = iss.measure(scenario, 2, 1000.0, lambda _: None, floor_runs=5, floor_budget=6.0)
    n = {name: len(r["by_run"]) for name, r in res["results"].items()}
    assert n == {"cli": 5, "floor": 5, "slow-cli": 2, "certbot": 2}
    # run i of the CLI and run i of the floor were measured in the same round
    by_client: dict[str, list[str]] = {}
    for name, tag in rounds:
        by_client.setdefault(name, []).append(tag)
    assert by_client["cli"] == by_client["floor"] == [f"r{i}" for i in range(5)]


def test_without_floor_runs_every_client_gets_runs(tmp_path: Path) -> None:
    rounds: list[Any] = []
    iss = _issuance(tmp_path, [("cli", "project", 1.0), ("floor", "floor", 0.5)], rounds)
    scenario = Scenario("one", "one", 1, 1, ["cli", "floor"])
    res = iss.measure(scenario, 3, 1000.0, lambda _: None)
    assert {name: len(r["by_run"]) for name, r in res["results"].items()} == {"cli": 3, "floor": 3}
