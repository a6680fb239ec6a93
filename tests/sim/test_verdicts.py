"""The compiled flows, run through the evaluator across a fleet, give `explain`'s verdicts:
for every VM pair and every service in the examples, for replies, spoofed packets, external
peers, and established connections whose grant is withdrawn."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from controller.engine import Engine
from controller.events import ContextExpiry, ContextReported, DirectoryChanged, PolicyChanged
from controller.flows.compile import compile_bridge
from controller.flows.fleet import Fleet, ip_packet, reply_of
from controller.flows.types import ip_to_int, mac_to_int
from controller.model import VM, Provenance
from controller.policy.explain import explain
from controller.scenario import Scenario, load_scenario
from tests.support import login_again_event, logout_event

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def _engine(sc: Scenario) -> Engine:
    return Engine(sc.inventory, sc.directory, sc.policy, sc.groups)


def _fleet(engine: Engine) -> Fleet:
    world = engine.world()
    return Fleet.of(world.inventory, {hv: compile_bridge(world, hv) for hv in world.inventory.hypervisors})


def _probes(world_vms: list[VM]) -> list[tuple[str, int]]:
    ports = {("tcp", p) for p in (22, 80, 443, 5432, 5433, 8080, 9999)} | {("udp", 53), ("icmp", 0)}
    for vm in world_vms:
        for app in {f.key for f in vm.facts if f.attr.value == "app"}:
            ports.update((p.protocol, p.low) for p in vm.app_ports(app) if p.protocol in ("tcp", "udp"))
    return sorted(ports)


def _packet(src: VM, dst: VM, proto: str, port: int, sport: int = 40000) -> dict[str, int]:
    return ip_packet(src.vnics[0].mac, dst.vnics[0].mac, src.ips[0], dst.ips[0], proto, port, sport)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_pair_and_service_matches_explain(path: Path) -> None:
    sc = load_scenario(path)
    engine = _engine(sc)
    world = engine.world()
    vms = sorted(world.inventory.vms.values(), key=lambda v: v.name)
    checked = allowed = 0
    for src in vms:
        for dst in vms:
            if src is dst:
                continue
            for proto, port in _probes(vms):
                fleet = _fleet(engine)  # fresh conntrack per probe
                verdict = explain(world, sc.groups, src, dst, proto, port)
                there = fleet.send(src, _packet(src, dst, proto, port))
                assert there.delivered == verdict.allowed, (
                    f"{src.name}->{dst.name} {proto}/{port}: explain says {verdict.verdict}, "
                    f"flows {'deliver' if there.delivered else 'drop'} ({there.hops[-1][1].rules()})")
                checked += 1
                if verdict.allowed:
                    allowed += 1
                    assert there.where == dst.name
                    back = fleet.send(dst, reply_of(_packet(src, dst, proto, port)))
                    assert back.delivered and back.where == src.name, f"reply {dst.name}->{src.name} dropped"
    assert allowed and allowed < checked  # the examples exercise both verdicts


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_a_reply_without_a_connection_is_dropped(path: Path) -> None:
    engine = _engine(load_scenario(path))
    vms = list(engine.world().inventory.vms.values())
    fleet = _fleet(engine)
    for a in vms:
        for b in vms:
            if a is not b:
                # A SYN-ACK-looking packet from b that no connection from a explains.
                pkt = reply_of(_packet(a, b, "tcp", 65000, sport=40001))
                verdict = explain(engine.world(), engine.groups, b, a, "tcp", 40001)
                assert fleet.send(b, pkt).delivered == verdict.allowed


def test_spoofed_source_mac_or_ip_is_dropped() -> None:
    sc = load_scenario(EXAMPLES[0].parent / "three-tier.yaml")
    engine = _engine(sc)
    world = engine.world()
    web1, app1, admin1 = (world.inventory.vm_by_name(n) for n in ("web1", "app1", "admin1"))
    assert explain(world, sc.groups, web1, app1, "tcp", 8080).allowed
    fleet = _fleet(engine)
    assert fleet.send(web1, _packet(web1, app1, "tcp", 8080)).delivered
    spoof_ip = _packet(web1, app1, "tcp", 8080) | {"ipv4_src": ip_to_int(admin1.ips[0])}
    spoof_mac = _packet(web1, app1, "tcp", 8080) | {"eth_src": mac_to_int(admin1.vnics[0].mac)}
    assert not fleet.send(web1, spoof_ip).delivered
    assert not fleet.send(web1, spoof_mac).delivered
    # admin1 may ssh anywhere, but web1 pretending to be admin1 may not.
    spoof_admin = _packet(admin1, app1, "tcp", 22)
    assert fleet.send(admin1, spoof_admin).delivered
    assert not fleet.send(web1, spoof_admin).delivered


def test_external_clients_reach_web_only() -> None:
    sc = load_scenario(EXAMPLES[0].parent / "three-tier.yaml")
    engine = _engine(sc)
    world = engine.world()
    gw = world.inventory.gateway
    assert gw is not None
    fleet = _fleet(engine)
    for vm in world.inventory.vms.values():
        pkt = ip_packet(gw.mac, vm.vnics[0].mac, "198.51.100.7", vm.ips[0], "tcp", 443)
        want = explain(world, sc.groups, vm, "198.51.100.7", "tcp", 443)  # only for the gateway check
        assert want.verdict in ("allow", "deny")
        got = fleet.send_external(vm.hypervisor, pkt)
        assert got.delivered == vm.name.startswith("web"), vm.name


def _finance() -> tuple[Engine, VM, VM, Fleet]:
    sc = load_scenario(EXAMPLES[0].parent / "finance-identity.yaml")
    engine = _engine(sc)
    world = engine.world()
    desk, ledger = world.inventory.vm_by_name("fin-desk1"), world.inventory.vm_by_name("ledger-db")
    return engine, desk, ledger, _fleet(engine)


def _reprogram(fleet: Fleet, engine: Engine) -> None:
    fleet.reprogram({hv: engine.desired(hv) for hv in engine.hypervisors()})


def test_established_connection_is_cut_when_the_user_logs_out() -> None:
    """alice (finance) on fin-desk1 holds a ledger connection; her logout ends it both ways."""
    engine, desk, ledger, fleet = _finance()
    syn = _packet(desk, ledger, "tcp", 5432)
    assert fleet.send(desk, syn).delivered
    assert fleet.send(ledger, reply_of(syn)).delivered
    assert fleet.send(desk, syn).delivered  # established, original direction

    engine.handle(logout_event(desk))
    assert not explain(engine.world(), engine.groups, engine.world().inventory.vms[desk.uuid], ledger, "tcp", 5432).allowed
    _reprogram(fleet, engine)
    assert not fleet.send(desk, syn).delivered, "established original-direction packet still passes"
    assert not fleet.send(ledger, reply_of(syn)).delivered, "reply of a revoked connection still passes"

    # Logging in again grants new connections, but the revoked one stays dead.
    engine.handle(login_again_event(desk))
    _reprogram(fleet, engine)
    assert not fleet.send(desk, syn).delivered
    assert fleet.send(desk, _packet(desk, ledger, "tcp", 5432, sport=40002)).delivered


def test_directory_change_revokes_like_a_logout() -> None:
    engine, desk, ledger, fleet = _finance()
    syn = _packet(desk, ledger, "tcp", 5432)
    assert fleet.send(desk, syn).delivered
    engine.handle(DirectoryChanged("alice", frozenset({"engineering"})))
    _reprogram(fleet, engine)
    assert not fleet.send(desk, syn).delivered
    assert not fleet.send(ledger, reply_of(syn)).delivered


def test_rule_removed_cuts_established_and_disabled_rule_enforces_nothing() -> None:
    sc = load_scenario(EXAMPLES[0].parent / "three-tier.yaml")
    engine = _engine(sc)
    world = engine.world()
    web1, app2 = world.inventory.vm_by_name("web1"), world.inventory.vm_by_name("app2")
    fleet = _fleet(engine)
    pkt = _packet(web1, app2, "tcp", 8080)
    assert fleet.send(web1, pkt).delivered
    deciding = explain(world, sc.groups, web1, app2, "tcp", 8080).rule
    assert deciding is not None
    disabled = tuple(replace(r, enabled=False) if r.id == deciding.id else r for r in sc.policy.rules)
    engine.handle(PolicyChanged(replace(sc.policy, rules=disabled), sc.groups))
    _reprogram(fleet, engine)
    assert not fleet.send(web1, pkt).delivered
    assert not fleet.send(app2, reply_of(pkt)).delivered


def test_monitor_rule_changes_no_verdict() -> None:
    sc = load_scenario(EXAMPLES[0].parent / "three-tier.yaml")
    monitored = [r for r in sc.policy.rules if r.monitor]
    assert monitored, "three-tier.yaml ships a monitor rule"
    engine = _engine(sc)
    world = engine.world()
    without = replace(sc.policy, rules=tuple(r for r in sc.policy.rules if not r.monitor))
    other = Engine(sc.inventory, sc.directory, without, sc.groups)
    vms = list(world.inventory.vms.values())
    for src in vms:
        for dst in vms:
            if src is not dst:
                for proto, port in (("tcp", 5432), ("tcp", 8080), ("icmp", 0)):
                    a = _fleet(engine).send(src, _packet(src, dst, proto, port)).delivered
                    b = _fleet(other).send(src, _packet(src, dst, proto, port)).delivered
                    assert a == b


def test_context_past_its_ttl_revokes_its_grants_and_cuts_established_connections() -> None:
    """An agent that goes silent: its guest context expires, and with it the login grant —
    established connections included — while platform-based access stays."""
    engine, desk, ledger, fleet = _finance()
    guest = frozenset(f for f in desk.facts if f.provenance is Provenance.GUEST and f.attr.value != "usergroup")
    engine.handle(ContextReported(desk.uuid, Provenance.GUEST, guest, expires_at=1000.0))
    _reprogram(fleet, engine)
    syn = _packet(desk, ledger, "tcp", 5432)
    assert fleet.send(desk, syn).delivered
    engine.handle(ContextReported(desk.uuid, Provenance.GUEST, guest, expires_at=1015.0))  # a heartbeat
    assert engine.handle(ContextExpiry(1010.0)) == [], "not yet expired"
    assert fleet.send(desk, syn).delivered
    assert engine.handle(ContextExpiry(1015.0)), "expiry changes flows"
    _reprogram(fleet, engine)
    assert not fleet.send(desk, syn).delivered, "the established connection survived the expiry"
    assert not fleet.send(ledger, reply_of(syn)).delivered
    ping = _packet(desk, ledger, "icmp", 0)
    assert fleet.send(desk, ping).delivered, "platform-based access (desktops may ping) stays"


def _crossed_address(world, groups) -> tuple[VM, VM, VM, str, int]:
    """(src, b, c, proto, port): policy lets src reach c but not b, and b runs beside src."""
    vms = sorted(world.inventory.vms.values(), key=lambda v: v.name)
    for src in vms:
        for b in vms:
            if b is src or b.hypervisor != src.hypervisor:
                continue
            for c in vms:
                for proto, port in _probes(vms):
                    if c not in (src, b) and explain(world, groups, src, c, proto, port).allowed \
                            and not explain(world, groups, src, b, proto, port).allowed:
                        return src, b, c, proto, port
    raise AssertionError("the example has no such triple")


def test_a_packet_to_one_vm_by_mac_and_another_by_ip_is_dropped() -> None:
    """Egress judges the IPv4 destination; delivery follows the MAC. A packet for b's MAC carrying
    c's address (which src may reach) must not reach b, whom src may not reach."""
    sc = load_scenario(EXAMPLES[0].parent / "three-tier.yaml")
    engine = _engine(sc)
    world = engine.world()
    src, b, c, proto, port = _crossed_address(world, sc.groups)
    fleet = _fleet(engine)
    assert fleet.send(src, _packet(src, c, proto, port)).where == c.name
    crossed = _packet(src, c, proto, port) | {"eth_dst": mac_to_int(b.vnics[0].mac)}
    assert not fleet.send(src, crossed).delivered
