"""At start the service says when every monitored bridge is past the heavy part of a (re)start,
so the REST API can start then instead of slowing the first snapshot and flows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.boot import unbound
from controller.config import Config, HypervisorConfig
from controller.engine import Engine
from controller.events import BoundPort, PortsObserved
from controller.runtime import FlowsDumped, Runtime, SwitchCommand, SwitchConnected
from controller.scenario import load_scenario
from controller.service import Service

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finance-identity.yaml"
NOWHERE = "unix:/nonexistent/goldilocks-test/db.sock"  # the monitors start but never connect


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    sc = load_scenario(EXAMPLE)
    hypervisors = {hv: HypervisorConfig(hv, NOWHERE, f"br-{hv}") for hv in sc.inventory.hypervisors}
    engine = Engine(unbound(sc.inventory), sc.directory, sc.policy, sc.groups)  # as after a restart
    svc = Service(Config(tmp_path / "goldilocks.yaml", None, hypervisors=hypervisors), Runtime(engine))
    sent: list[SwitchCommand] = []
    svc.attach_southbound(sent.append)
    svc.start_engine()
    try:
        yield svc
    finally:
        svc.stop()


def observed(svc: Service, hv: str) -> PortsObserved:
    """What hv's OVSDB monitor would report: its dpid and every VM of the scenario plugged there."""
    record = load_scenario(EXAMPLE).inventory
    ports = tuple(BoundPort(nic.ofport or 1, nic.mac, vm.uuid) for vm in record.vms.values() if vm.hypervisor == hv
                  for nic in vm.vnics)
    return PortsObserved(hv, record.hypervisors[hv].dpid, record.hypervisors[hv].uplink_ofport, ports)


def settle(svc: Service) -> bool:
    svc.call(lambda rt: None)  # what was posted has been handled
    return svc.settled.is_set()


def test_not_settled_before_the_monitors_start_nor_before_their_snapshots(service: Service) -> None:
    assert not settle(service)  # the engine ticks, but which bridges count is not known yet
    service.start_monitors()
    assert len(service.monitors) == 2
    assert not settle(service)


def test_a_bridge_whose_switch_is_not_connected_settles_with_its_snapshot(service: Service) -> None:
    service.start_monitors()
    service.post(observed(service, "hv1"))
    assert not settle(service), "hv2 has no snapshot yet"
    service.post(observed(service, "hv2"))
    assert settle(service)


def test_a_connected_bridge_settles_once_its_first_flows_are_sent(service: Service) -> None:
    service.start_monitors()
    dpids = {hv: observed(service, hv).dpid for hv in ("hv1", "hv2")}
    for hv, dpid in dpids.items():
        assert dpid is not None
        service.post(SwitchConnected(dpid))
        service.post(observed(service, hv))
    assert not settle(service), "both bridges are dumping"
    service.post(FlowsDumped(dpids["hv1"], frozenset()))
    assert not settle(service)
    service.post(FlowsDumped(dpids["hv2"], frozenset()))
    assert settle(service), "both bridges are applying their first flows"


def test_without_monitored_bridges_there_is_nothing_to_wait_for(tmp_path: Path) -> None:
    sc = load_scenario(EXAMPLE)
    svc = Service(Config(tmp_path / "goldilocks.yaml", None), Runtime(Engine(sc.inventory, sc.directory, sc.policy, sc.groups)))
    svc.start_engine()
    try:
        svc.start_monitors()
        assert svc.settled.is_set()
    finally:
        svc.stop()
