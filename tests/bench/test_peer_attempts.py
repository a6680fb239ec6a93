"""bench/peer tries a failed system once more, records both attempts, and reports a run that
never succeeded as failed (exit 1) but one that succeeded on its second attempt as measured.

The systems here are stand-ins that fail on cue: what is under test is the harness's
bookkeeping, and a real OVN set-up that hangs cannot be made to on demand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.peer import __main__ as peer
from bench.peer.report import failed_attempts
from bench.peer.workload import Workload


def _system(outcomes: list[str]) -> Any:
    """A measure that fails or succeeds in the order of `outcomes`."""
    def measure(workload: Workload, reps: int, log: Any) -> dict[str, Any]:
        if outcomes.pop(0) == "fail":
            raise RuntimeError("ovn-nbctl sync ... failed: terminating with signal 14 (Alarm clock)\n--- ovn-northd.log")
        return {"system": "ovn", "traffic_ok": True}
    return measure


@pytest.mark.parametrize(("outcomes", "failed"), [
    (["fail", "ok"], []),
    (["fail", "fail"], ["ovn N=12"]),
    (["ok"], []),
])
def test_a_failed_run_is_tried_once_more_and_both_attempts_are_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outcomes: list[str], failed: list[str]) -> None:
    monkeypatch.setitem(peer.MEASURES, "ovn", _system(list(outcomes)))
    results = tmp_path / "peer.jsonl"
    args = peer.parse_args(["--n", "12", "--systems", "ovn", "--install-sizes", "--results", str(results), "--reps", "1"])
    records = peer.run(args)
    written = [json.loads(line) for line in results.read_text().splitlines()]
    assert written == records
    assert [("error" in r, r["attempt"]) for r in records] == [(o == "fail", i + 1) for i, o in enumerate(outcomes)]
    assert peer.failures(records) == failed
    lines = failed_attempts(records)
    later = " (measured on the next attempt)" if not failed else ""
    assert lines == [f"- ovn N=12{later}: ovn-nbctl sync ... failed: terminating with signal 14 (Alarm clock)"] * outcomes.count("fail")
