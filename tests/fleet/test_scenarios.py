"""Every shipped simulation, on a real Mininet fleet with real Open vSwitch, a real controller,
relays and agents (root). Each prints its matrices to the terminal as it runs, so the CI log
shows them; a mismatch fails the test. Also the demo, end to end, and that nothing is left
behind (interfaces, mounts, processes)."""

from __future__ import annotations

import io
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.ovs import unavailable_reason
from fleet.runner import play, run_file, started
from fleet.spec import load_simulation
from tests.conftest import require
from tests.fleet.test_spec import ROOT, SCENARIOS

pytestmark = [pytest.mark.ovs, pytest.mark.filterwarnings("ignore::DeprecationWarning:mininet.node")]


@pytest.fixture(autouse=True)
def _machine() -> None:
    require(unavailable_reason(), "Mininet simulation")


def leftovers(before: set[str], prefix: str = r"g[0-9a-f]{4}") -> set[str]:
    """Network devices, mounts and processes that a simulation made and did not remove."""
    return snapshot(prefix) - before


def snapshot(prefix: str = r"g[0-9a-f]{4}") -> set[str]:
    """Fleet interfaces (by name prefix); mounts and processes of a simulation whose run
    directory is gone (a simulation running next to this one is not a leftover of it)."""
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    devices = {f"link {m}" for m in re.findall(rf"^\d+: ({prefix}[a-z]\d*)", links, re.MULTILINE)}
    mounts = {f"mount {line.split()[1]}" for line in Path("/proc/mounts").read_text().splitlines()
              if "/run/goldilocks" in line or orphaned(line)}
    procs = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # Mininet's helper shells: the switches' carry the prefix; the controller's is "c0".
        if orphaned(cmd) or re.search(rf"mininet:({prefix}\w*|c0)$", cmd.strip()):
            procs.add(f"process {cmdline.parent.name}: {cmd.strip()[:120]}")
    return devices | mounts | procs


def orphaned(text: str) -> bool:
    """Names a simulation run directory that no longer exists."""
    return any(not Path(d).exists() for d in re.findall(r"/tmp/glsim-[A-Za-z0-9_]+", text))


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_passes_on_a_mininet_fleet(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = "gt" + secrets.token_hex(2)  # this run's interfaces, whatever else runs meanwhile
    before = snapshot(prefix)
    out = io.StringIO()

    class Tee(io.StringIO):
        def write(self, text: str) -> int:
            out.write(text)
            with capsys.disabled():
                sys.stdout.write(text)
            return len(text)

    with capsys.disabled():
        print()
    tally = run_file(str(path.relative_to(ROOT)), Tee(), prefix=prefix)
    text = out.getvalue()
    assert tally.failed == 0, text
    assert tally.passed > 0
    assert re.search(r"^    from \\ to ", text, re.MULTILINE), "no matrix table printed"
    assert text.rstrip().endswith(f"{tally.passed} passed, 0 failed")
    assert leftovers(before, prefix) == set()


def test_the_migration_check_sees_a_vms_flows() -> None:
    """The left-behind check after a migration has teeth: it finds a plugged VM's flows."""
    sim = load_simulation(ROOT / "mininet" / "scenarios" / "migration.yaml")
    trimmed = sim.__class__(**{**sim.__dict__, "steps": sim.steps[:1]})
    with started(trimmed, io.StringIO()) as run:
        assert play(run).failed == 0
        fleet = run.fleet
        vm = "fin-desk1"
        assert fleet.local_flows(fleet.where[vm], vm, fleet.ofports[vm])  # type: ignore[attr-defined]
        other = next(hv for hv in ("hv1", "hv2") if hv != fleet.where[vm])  # type: ignore[attr-defined]
        assert fleet.local_flows(other, vm, 999) == []  # type: ignore[attr-defined]


def test_the_demo_runs_the_identity_story_and_leaves_nothing_behind() -> None:
    before = snapshot()
    proc = subprocess.run([sys.executable, "-m", "controller.cli", "demo"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "6 passed, 0 failed" in out
    assert out.count("from \\ to") == 4
    assert "/api/v1" in out and "Admin token: " in out and "goldilocks explain --src fin-desk1" in out
    assert "fin-desk1 -> ledger-db tcp/5432: DENY" in out
    assert out.rstrip().endswith("relays and agents are gone.")
    assert leftovers(before) == set()
