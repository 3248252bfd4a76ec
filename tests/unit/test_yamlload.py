"""yamlload and the config reader: hostile YAML is a ConfigError, fast and small."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest

from synapse_acme.config import read_config_file
from synapse_acme.errors import ConfigError
from synapse_acme.yamlload import MAX_DEPTH, YamlBoundsError, safe_load_bounded

BOMB = "\n".join(
    ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
)


def _write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "acme.yaml"
    p.write_text(text)
    return str(p)


def test_billion_laughs_is_refused_quickly_in_little_memory(tmp_path: Path) -> None:
    path = _write(tmp_path, BOMB + "\nacme:\n  enabled: true\n  bind_addresses: *a9\n")
    tracemalloc.start()
    started = time.monotonic()
    with pytest.raises(ConfigError) as e:
        read_config_file(path)
    took = time.monotonic() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert "alias bomb" in str(e.value) and "line 3" in str(e.value)
    assert took < 2 and peak < 20 * 1024 * 1024
    assert len(str(e.value)) < 500


def test_deep_nesting_is_a_config_error_not_a_recursion_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "acme: " + "[" * 100_000)
    with pytest.raises(ConfigError, match=f"nested deeper than {MAX_DEPTH} levels"):
        read_config_file(path)


def test_too_many_aliases(tmp_path: Path) -> None:
    text = "x: &x 1\nacme:\n  domains: [" + ", ".join(["*x"] * 1001) + "]\n"
    with pytest.raises(ConfigError, match="more than 1000 aliases"):
        read_config_file(_write(tmp_path, text))


def test_recursive_alias_is_refused() -> None:
    with pytest.raises(YamlBoundsError):
        safe_load_bounded("a: &a [*a]\n")


def test_ordinary_anchors_and_merge_keys_still_work() -> None:
    doc = safe_load_bounded(
        "defaults: &d {port: 8009, enabled: true}\n"
        "acme:\n  <<: *d\n  domain: a.example\n"
        "names: &n [a.example, b.example]\nagain: *n\nthird: *n\n"
    )
    assert doc["acme"] == {"port": 8009, "enabled": True, "domain": "a.example"}
    assert doc["again"] == doc["third"] == ["a.example", "b.example"]
    nested = safe_load_bounded("a: " + "[" * (MAX_DEPTH - 2) + "1" + "]" * (MAX_DEPTH - 2))
    assert nested is not None


def test_huge_file_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "acme:\n  domain: a.example\n# " + "x" * (5 * 1024 * 1024) + "\n")
    with pytest.raises(ConfigError, match="larger than 4 MiB"):
        read_config_file(path)
