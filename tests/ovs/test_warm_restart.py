"""Flow snapshots end to end, on real OVS with the real controller process: a controller that
has had its bridges in sync stores their snapshots; killed with kill -9 while ovs-vswitchd
loses every flow (as a restart of both would leave them), the next process puts each table
back before it has even imported os-ken, and the full controller then finds nothing to change.
And it fails closed: once the database has changed, or a bridge's ports, or the configuration,
the snapshot is refused, the bridge stays empty (everything dropped) until the full controller
has compiled the new state, and then holds exactly that."""

from __future__ import annotations

import re
from pathlib import Path

from controller.model import Hypervisor
from controller.store import Store
from fleet.control import wait_for
from tests.ovs import test_controller as _controller_tests
from tests.ovs.test_controller import Lab

lab = _controller_tests.lab  # a private OVS, two hypervisor bridges, the example VMs plugged

TIMEOUT = 60.0  # generous: OVS's reconnect backoff, and other tests may share the machine


def snapshots_stored(lab: Lab) -> None:
    lab.start()
    lab.converged()
    wait_for("both bridges' flow snapshots", lambda: all(f"flow snapshot of {hv} stored" in lab.log()
                                                         for hv in lab.bridges), timeout=TIMEOUT)


def empty_the_bridges(lab: Lab) -> None:
    for bridge in lab.bridges.values():
        lab.ovs.del_flows(bridge)
        assert lab.ovs.dump_flows(bridge) == []


def in_sync_lines(log: str) -> list[str]:
    return re.findall(r"bridge of \S+ in sync: .*", log)


def restart_on_emptied_bridges(lab: Lab, before: dict[str, object]) -> str:
    """kill -9, every bridge emptied, started again: its log once the tables are `before` again
    and the full controller is in sync on both bridges."""
    lab.kill9()
    empty_the_bridges(lab)
    lab.start()
    wait_for("both tables back", lambda: all(lab.installed(hv) == before[hv] for hv in lab.bridges), timeout=TIMEOUT)
    wait_for("the full controller in sync on both bridges", lambda: len(in_sync_lines(lab.log())) >= 2, timeout=TIMEOUT)
    return lab.log()


def test_an_emptied_bridge_gets_its_table_back_before_the_controller_is_up_and_nothing_changes_after(lab: Lab) -> None:
    snapshots_stored(lab)
    before = {hv: lab.installed(hv) for hv in lab.bridges}
    log = restart_on_emptied_bridges(lab, before)
    restored = re.findall(r": restored (\d+) flow mods from its snapshot", log)
    assert len(restored) == 2, log
    assert sorted(int(n) for n in restored) == sorted(len(before[hv]) for hv in lab.bridges)
    # from the plan the first start left beside the configuration, before even parsing it
    assert re.search(r"flow restores started from the restore plan \S+goldilocks\.yaml\.restore, before the "
                     r"configuration was parsed", log), log
    # before os-ken was even loaded, and the full controller then sent nothing at all
    assert log.rindex(": restored") < log.index("loading app apps.goldilocks_app"), log
    assert all("(0 bundles, 0 flow mods sent so far)" in line for line in in_sync_lines(log)), log
    assert {hv: lab.installed(hv) for hv in lab.bridges} == before


def test_a_plan_others_could_have_written_is_ignored_and_the_start_restores_after_parsing(lab: Lab) -> None:
    # The plan names the database whose flows go onto the bridges: one that is group- or
    # world-writable is not trusted. The start reads the configuration file instead, restores
    # all the same, and leaves a private plan for the next.
    snapshots_stored(lab)
    before = {hv: lab.installed(hv) for hv in lab.bridges}
    plan = lab.tmp / "goldilocks.yaml.restore"
    plan.chmod(0o666)
    log = restart_on_emptied_bridges(lab, before)
    assert "from the restore plan" not in log, log
    assert len(re.findall(r": restored \d+ flow mods from its snapshot", log)) == 2, log
    assert plan.stat().st_mode & 0o777 == 0o600


def test_a_changed_database_refuses_the_snapshot_and_the_bridge_stays_closed_until_the_controller_compiles(
        lab: Lab, tmp_path: Path) -> None:
    snapshots_stored(lab)
    lab.kill9()
    empty_the_bridges(lab)
    # an offline change to the state the snapshot was compiled from
    store = Store(f"sqlite:///{lab.tmp / 'goldilocks.db'}")
    store.upsert_hypervisor(Hypervisor("hv-spare", None, 99), actor="ops")
    store.close()
    lab.start()
    wait_for("the full controller in sync on both bridges", lambda: len(in_sync_lines(lab.log())) >= 2, timeout=TIMEOUT)
    log = lab.log()
    assert ": restored" not in log, log
    assert len(re.findall(r"flow snapshot not restored: the database changed since the snapshot", log)) == 2, log
    assert all("(0 bundles" not in line for line in in_sync_lines(log)), log  # the controller installed them
    lab.converged()


def test_a_bridge_whose_ports_changed_is_left_to_the_controller(lab: Lab) -> None:
    snapshots_stored(lab)
    lab.kill9()
    empty_the_bridges(lab)
    lab.ovs.vsctl("add-port", lab.bridges["hv1"], "spare0", "--", "set", "Interface", "spare0", "type=internal",
                  "ofport_request=77")
    lab.start()
    wait_for("the full controller in sync on both bridges", lambda: len(in_sync_lines(lab.log())) >= 2, timeout=TIMEOUT)
    log = lab.log()
    assert re.search(r"hv1: flow snapshot not restored: the bridge's ports changed since the snapshot \(new: 77 spare0\)",
                     log), log
    assert len(re.findall(r"hv2: restored \d+ flow mods from its snapshot", log)) == 1, log  # hv2's ports did not change
    lab.ovs.vsctl("del-port", lab.bridges["hv1"], "spare0")
