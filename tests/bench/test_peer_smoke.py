"""bench/peer works end to end: both systems set up, measured, checked and torn down (N=10).

Skips without root, OVS or OVN (on CI, where scripts/setup.sh installs them, it fails instead).
Asserts that the harness works and both systems enforce the policy, never on timings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.peer.__main__ import cannot_run, main
from tests.conftest import require

FIELDS = ("run", "date", "system", "n", "k", "rules", "reps", "version", "flows", "cold_start", "restart", "membership_change",
          "rule_added", "apply_policy", "rss_kib", "traffic", "traffic_ok", "seconds")
TIMED = ("cold_start", "restart", "membership_change", "rule_added", "apply_policy")

pytestmark = pytest.mark.ovs


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    require(cannot_run(), "bench/peer (Open vSwitch and OVN)")
    tmp = tmp_path_factory.mktemp("peer")
    out, results = tmp / "benchmarks.md", tmp / "peer.jsonl"
    out.write_text("# Benchmarks\n\n## bench/other\n\nkept\n")
    code = main(["--n", "10", "--k", "4", "--reps", "1", "--install-sizes", "--results", str(results),
                 "--out", str(out)])
    assert code == 0, "bench.peer failed (the traffic check, or a step)"
    text = out.read_text()
    assert "## bench/other\n\nkept" in text and "## bench/peer: Goldilocks and OVN side by side" in text
    return [json.loads(line) for line in Path(results).read_text().splitlines()]


def test_one_json_line_per_system_with_every_field(records: list[dict]) -> None:
    assert sorted(r["system"] for r in records) == ["goldilocks", "ovn"]
    for r in records:
        assert not [f for f in FIELDS if f not in r], r["system"]
        for key in TIMED:
            assert r[key]["n"] == 1 and r[key]["median_ms"] > 0, (r["system"], key)
        assert r["flows"]["total"] > r["flows"]["without_policy"] > 0
        assert r["rss_kib"]["total"] > 0
    gold = next(r for r in records if r["system"] == "goldilocks")
    for key in ("membership_change", "rule_added"):  # read from the controller's "bundle ... with N flow mods"
        assert gold[key]["flow_mods"] > 0, key


def test_both_systems_enforce_the_policy(records: list[dict]) -> None:
    for r in records:
        assert r["traffic_ok"], (r["system"], r["traffic"])
        assert {c["want"] for c in r["traffic"]} == {True, False}, "the check has allowed and denied pairs"
