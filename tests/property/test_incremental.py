"""Incremental recompute equals full recompute, over random event sequences.

After every event the engine's per-bridge desired flows must be exactly what compiling the
same world from scratch gives, and the operations it emitted must carry each bridge from the
old flows to the new ones.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.commands import FlushZones, ProgramBridge
from controller.engine import Engine
from controller.events import (
    BoundPort,
    ContextExpiry,
    ContextReported,
    DirectoryChanged,
    GatewayChanged,
    HypervisorUpserted,
    PolicyChanged,
    PortsObserved,
    QuarantineReleased,
    QuarantineRequested,
    VmRemoved,
    VmUpserted,
)
from controller.flows.compile import compile_bridge
from controller.flows.reconcile import apply_plan
from controller.identity.groups import GroupDef
from controller.identity.selector import parse_selector
from controller.model import (
    VM,
    Attr,
    Fact,
    Gateway,
    Hypervisor,
    Inventory,
    Provenance,
    VNic,
    parse_port,
)
from controller.policy.quarantine import QuarantinePolicy
from controller.policy.schema import (
    Action,
    AnyEndpoint,
    AppService,
    CidrEndpoint,
    GroupEndpoint,
    Policy,
    Rule,
)

HVS = ("hv1", "hv2", "hv3")
N_VMS = 6
TIERS = ("web", "app", "db")
USERS = ("alice", "bob", "carol")
SELECTORS = {
    "web": ("tag.tier == 'web'", "tag.tier in {'web', 'app'}"),
    "db": ("tag.tier == 'db'", "tag.tier == 'db' || app == 'postgres'"),
    "finance": ("tag.tier == 'web' && usergroup == 'finance'", "has(tag.tier) && user == 'alice'"),
    "linux": ("os == 'linux' && tag.tier != 'db'", "hypervisor == 'hv1' && has(tag.tier)"),
}


def make_vm(i: int, hv: str, tier: str | None, extra_ip: bool) -> VM:
    ips = (f"10.0.0.{i + 1}",) + ((f"10.0.1.{i + 1}",) if extra_ip else ())
    nic = VNic(f"02:00:00:00:00:{i + 1:02x}", ips, i + 1, f"tap{i}")
    facts = frozenset({Fact(Attr.TAG, "tier", tier, Provenance.PLATFORM)}) if tier else frozenset()
    return VM(f"vm-{i}", f"vm{i}", hv, (nic,), facts)


def guest_facts(users: tuple[str, ...], pg_port: int | None, os: str | None) -> frozenset[Fact]:
    facts = {Fact(Attr.USER, "", u, Provenance.GUEST) for u in users}
    if pg_port is not None:
        facts.add(Fact(Attr.APP, "postgres", f"tcp/{pg_port}", Provenance.GUEST))
    if os:
        facts.add(Fact(Attr.OS, "", os, Provenance.GUEST))
    return frozenset(facts)


def groups_for(choice: dict[str, int]) -> dict[str, GroupDef]:
    return {g: GroupDef(g, parse_selector(SELECTORS[g][choice.get(g, 0)]), SELECTORS[g][choice.get(g, 0)])
            for g in SELECTORS}


def base_rules() -> list[Rule]:
    return [
        Rule("web-app", "application", 10, GroupEndpoint("web"), GroupEndpoint("db"),
             (parse_port("tcp/8080"), parse_port("tcp/9000-9100")), Action.ALLOW),
        Rule("to-pg", "application", 20, GroupEndpoint("web"), GroupEndpoint("db"), (AppService("postgres"),), Action.ALLOW),
        Rule("any-pg", "application", 30, AnyEndpoint(), AnyEndpoint(), (AppService("postgres"),), Action.ALLOW),
        Rule("fin", "application", 5, GroupEndpoint("finance"), GroupEndpoint("db"), (), Action.ALLOW),
        Rule("ext", "infrastructure", 1, CidrEndpoint("192.0.2.0/24"), GroupEndpoint("linux"), (parse_port("tcp/22"),), Action.ALLOW),
        Rule("block", "emergency", 1, GroupEndpoint("linux"), AnyEndpoint(), (parse_port("udp/53"),), Action.DENY),
        Rule("watch", "application", 40, GroupEndpoint("web"), AnyEndpoint(), (parse_port("icmp"),), Action.REJECT, monitor=True),
    ]


vm_events = st.builds(
    lambda i, hv, tier, extra: VmUpserted(make_vm(i, hv, tier, extra)),
    st.integers(0, N_VMS - 1), st.sampled_from(HVS), st.sampled_from((None,) + TIERS), st.booleans(),
)
remove_events = st.builds(lambda i: VmRemoved(f"vm-{i}"), st.integers(0, N_VMS - 1))
context_events = st.builds(
    lambda i, users, pg, os, auth, ttl: ContextReported(
        f"vm-{i}", Provenance.AUTHORITATIVE if auth else Provenance.GUEST, guest_facts(tuple(users), pg, os), ttl),
    st.integers(0, N_VMS - 1), st.lists(st.sampled_from(USERS), max_size=2, unique=True),
    st.sampled_from((None, 5432, 5433)), st.sampled_from((None, "linux", "windows")), st.booleans(),
    st.sampled_from((None, 10.0, 20.0)),
)
expiry_events = st.builds(ContextExpiry, st.sampled_from((5.0, 10.0, 15.0, 25.0)))
directory_events = st.builds(
    lambda u, gs: DirectoryChanged(u, frozenset(gs)),
    st.sampled_from(USERS), st.lists(st.sampled_from(("finance", "staff")), max_size=2, unique=True),
)


@st.composite
def policy_events(draw: st.DrawFn) -> PolicyChanged:
    rules = []
    for r in base_rules():
        if draw(st.integers(0, 4)) == 0:
            continue  # rule removed
        if draw(st.booleans()):
            r = Rule(r.id, r.tier, r.position, r.source, r.destination, r.services, r.action,
                     enabled=draw(st.booleans()), monitor=draw(st.booleans()))
        rules.append(r)
    choice = {g: draw(st.integers(0, 1)) for g in SELECTORS}
    return PolicyChanged(Policy(tuple(rules)), groups_for(choice))


infra_events = st.one_of(
    st.builds(lambda hv, up: HypervisorUpserted(Hypervisor(hv, up)), st.sampled_from(HVS), st.sampled_from((None, 100, 101))),
    st.builds(lambda on: GatewayChanged(Gateway("10.0.0.254", "02:00:00:00:00:fe") if on else None), st.booleans()),
)

@st.composite
def ports_observed(draw: st.DrawFn) -> PortsObserved:
    """An OVSDB snapshot: some VMs plugged on one hypervisor, ofports reused between VMs."""
    hv = draw(st.sampled_from(HVS))
    vms = draw(st.lists(st.integers(0, N_VMS - 1), max_size=4, unique=True))
    ofports = draw(st.lists(st.integers(1, 8), min_size=len(vms), max_size=len(vms), unique=True))
    ports = tuple(BoundPort(p, f"02:00:00:00:00:{i + 1:02x}", f"vm-{i}") for i, p in zip(vms, ofports))
    return PortsObserved(hv, None, draw(st.sampled_from((None, 100))), ports)


quarantine_events = st.one_of(
    st.builds(lambda i: QuarantineRequested(f"vm-{i}", "test", "ops"), st.integers(0, N_VMS - 1)),
    st.builds(lambda i: QuarantineReleased(f"vm-{i}", "ops"), st.integers(0, N_VMS - 1)),
    st.builds(lambda i, verdict, check: ContextReported(
        f"vm-{i}", Provenance.AUTHORITATIVE if check == "edr" else Provenance.GUEST,
        frozenset({Fact(Attr.POSTURE, check, verdict, Provenance.AUTHORITATIVE if check == "edr" else Provenance.GUEST)})),
        st.integers(0, N_VMS - 1), st.sampled_from(("pass", "fail")), st.sampled_from(("edr", "disk"))),
)
# Every trigger on; the remediation group is one the policy defines (and changes).
QUARANTINE = QuarantinePolicy(on_edr=True, on_posture_fail=True, on_agent_silent=True, remediation_group="db")


events = st.one_of(quarantine_events, expiry_events, ports_observed(), ports_observed(), vm_events, vm_events, remove_events, context_events, context_events, directory_events,
                   policy_events(), infra_events)


def fresh_engine() -> Engine:
    inventory = Inventory({hv: Hypervisor(hv, 100) for hv in HVS},
                          {f"vm-{i}": make_vm(i, HVS[i % 3], TIERS[i % 3], False) for i in range(3)},
                          Gateway("10.0.0.254", "02:00:00:00:00:fe"))
    return Engine(inventory, {"alice": frozenset({"finance"})}, Policy(tuple(base_rules())), groups_for({}),
                  quarantine=QUARANTINE)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events, min_size=1, max_size=12))
def test_incremental_equals_full(sequence: list) -> None:
    engine = fresh_engine()
    installed = {hv: engine.desired(hv) for hv in HVS}
    for event in sequence:
        commands = engine.handle(event)
        world = engine.world()
        for cmd in commands:
            if isinstance(cmd, ProgramBridge):
                installed[cmd.hypervisor] = apply_plan(installed[cmd.hypervisor], cmd.ops)
        for hv in HVS:
            full = compile_bridge(world, hv)
            assert engine.desired(hv) == full, f"after {event!r}: incremental differs on {hv}"
            assert installed[hv] == full, f"after {event!r}: emitted ops do not reach the desired flows on {hv}"


def test_a_port_handed_to_another_vm_flushes_its_zone_and_moves_flows() -> None:
    engine = fresh_engine()
    first = engine.handle(PortsObserved("hv1", 1, 100, (BoundPort(7, "02:00:00:00:00:01", "vm-0"),)))
    assert not any(isinstance(c, FlushZones) for c in first)
    assert engine.world().inventory.vms["vm-0"].vnics[0].ofport == 7
    then = engine.handle(PortsObserved("hv1", 1, 100, (BoundPort(7, "02:00:00:00:00:04", "vm-3"),)))
    assert FlushZones("hv1", (7,)) in then
    vms = engine.world().inventory.vms
    assert vms["vm-0"].vnics[0].ofport is None, "the old VM keeps nothing of the port"
    flows = engine.desired("hv1")
    port7 = [f for f in flows if (m := f.match.get("in_port")) is not None and m.value == 7]
    assert port7 == [] or all(f.match.get("eth_src") is None or f.match.get("eth_src").value != 0x020000000001
                              for f in port7)


def test_no_op_event_sends_nothing() -> None:
    engine = fresh_engine()
    vm = engine.world().inventory.vms["vm-0"]
    assert engine.handle(VmUpserted(make_vm(0, vm.hypervisor, "web", False))) == []


def test_one_context_change_touches_only_affected_flows() -> None:
    engine = fresh_engine()
    before = {hv: engine.desired(hv) for hv in HVS}
    commands = engine.handle(ContextReported("vm-2", Provenance.GUEST, guest_facts((), 5433, None)))
    changed = {c.hypervisor: len(c.ops) for c in commands}
    assert changed, "the app port moved: flows must change"
    for hv, n in changed.items():
        assert n < len(before[hv]) / 4, f"{hv}: {n} ops for one app-port change is not incremental"
