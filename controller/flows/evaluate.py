"""A small OpenFlow evaluator with conntrack and conjunctive match, for verdicts without a switch.

It follows the OVS semantics Goldilocks relies on (ovs-fields(7) "Conjunctive Match Fields",
ovs-actions(7) "ct"): highest priority wins; a completed conjunction is looked up again with
conj_id set, ignoring conjunctive flows; `ct(table=N)` fills ct_state/ct_mark and continues at N.
Tests compare its verdicts with `explain` and with `ovs-appctl ofproto/trace` on real OVS.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from controller.flows.types import (
    CT_EST,
    CT_NEW,
    CT_RPL,
    CT_TRK,
    FIELD_BITS,
    Conjunction,
    Ct,
    FlowSpec,
    GotoTable,
    Move,
    Output,
    OutputInPort,
    SetField,
)

Packet = dict[str, int]  # match-field name -> value; plus tcp_src/udp_src for conntrack tuples

MAX_STEPS = 64
_ZERO_REGISTERS: Packet = {name: 0 for name in FIELD_BITS if name.startswith("reg")}  # as OVS starts every packet


class EvaluationError(RuntimeError):
    pass


@dataclass
class Conntrack:
    """Connections by zone. Keys are the original-direction 5-tuple."""

    entries: dict[tuple[int, tuple[int, ...]], int] = field(default_factory=dict)  # -> ct_mark

    @staticmethod
    def _tuple(pkt: Packet, reverse: bool) -> tuple[int, ...]:
        proto = pkt.get("ip_proto", 0)
        sport = pkt.get("tcp_src", pkt.get("udp_src", 0))
        dport = pkt.get("tcp_dst", pkt.get("udp_dst", 0))
        src, dst = pkt.get("ipv4_src", 0), pkt.get("ipv4_dst", 0)
        return (proto, dst, dport, src, sport) if reverse else (proto, src, sport, dst, dport)

    def lookup(self, zone: int, pkt: Packet) -> tuple[int, int]:
        """(ct_state, ct_mark) for this packet in `zone`."""
        if (zone, self._tuple(pkt, False)) in self.entries:
            return CT_TRK | CT_EST, self.entries[(zone, self._tuple(pkt, False))]
        if (zone, self._tuple(pkt, True)) in self.entries:
            return CT_TRK | CT_EST | CT_RPL, self.entries[(zone, self._tuple(pkt, True))]
        return CT_TRK | CT_NEW, 0

    def commit(self, zone: int, pkt: Packet, mark: int | None) -> None:
        fwd, rev = (zone, self._tuple(pkt, False)), (zone, self._tuple(pkt, True))
        key = rev if rev in self.entries and fwd not in self.entries else fwd
        old = self.entries.get(key, 0)
        self.entries[key] = old if mark is None else mark


@dataclass(frozen=True)
class Step:
    table: int
    flow: FlowSpec | None  # None: no flow matched (table miss = drop)


@dataclass(frozen=True)
class Result:
    outputs: tuple[int, ...]  # ports the packet left through; empty = dropped
    steps: tuple[Step, ...]
    packet: Mapping[str, int]  # after all rewrites

    @property
    def dropped(self) -> bool:
        return not self.outputs

    def rules(self) -> tuple[str, ...]:
        return tuple(s.flow.origin for s in self.steps if s.flow is not None and s.flow.origin.startswith("rule:"))


class FlowTable:
    """Flows of one bridge, indexed by table, for repeated evaluation."""

    def __init__(self, flows: Iterable[FlowSpec]) -> None:
        self.by_table: dict[int, list[FlowSpec]] = {}
        for f in sorted(flows, key=lambda f: -f.priority):
            self.by_table.setdefault(f.table, []).append(f)

    def lookup(self, table: int, pkt: Packet) -> FlowSpec | None:
        flows = self.by_table.get(table, [])
        i = 0
        while i < len(flows):
            prio = flows[i].priority
            same = []
            while i < len(flows) and flows[i].priority == prio:
                same.append(flows[i])
                i += 1
            hit = self._at_priority(same, pkt, flows)
            if hit is not None:
                return hit
        return None

    def _at_priority(self, flows: list[FlowSpec], pkt: Packet, all_flows: list[FlowSpec]) -> FlowSpec | None:
        hard = [f for f in flows if _matches(f, pkt) and not _is_conjunctive(f)]
        if len(hard) > 1 and len({(f.actions) for f in hard}) > 1:
            raise EvaluationError(f"ambiguous: {len(hard)} flows at priority {flows[0].priority} match")
        if hard:
            return hard[0]
        clauses: dict[int, set[int]] = {}
        sizes: dict[int, int] = {}
        for f in flows:
            if _is_conjunctive(f) and _matches(f, pkt):
                for a in f.actions:
                    assert isinstance(a, Conjunction)
                    clauses.setdefault(a.id, set()).add(a.clause)
                    sizes[a.id] = a.n_clauses
        done = [cid for cid, got in clauses.items() if len(got) == sizes[cid]]
        if len(done) > 1:
            raise EvaluationError(f"overlapping conjunctions {done} at priority {flows[0].priority}")
        for cid in done:
            with_id = dict(pkt, conj_id=cid)
            hit = next((f for f in all_flows if f.match.get("conj_id") is not None
                        and not _is_conjunctive(f) and _matches(f, with_id)), None)
            if hit is not None:
                return hit
        return None


def _is_conjunctive(flow: FlowSpec) -> bool:
    return bool(flow.actions) and all(isinstance(a, Conjunction) for a in flow.actions)


def _matches(flow: FlowSpec, pkt: Packet) -> bool:
    for mf in flow.match.fields:
        value = pkt.get(mf.name)
        if value is None or not mf.matches(value):
            return False
    return True


def evaluate(table: FlowTable, packet: Packet, conntrack: Conntrack) -> Result:
    """Run one packet through a bridge from table 0."""
    pkt: Packet = {**_ZERO_REGISTERS, "ct_state": 0, "ct_mark": 0, **packet}
    pkt.pop("conj_id", None)
    outputs: list[int] = []
    steps: list[Step] = []
    current: int | None = 0
    while current is not None:
        if len(steps) >= MAX_STEPS:
            raise EvaluationError("pipeline loops")
        flow = table.lookup(current, pkt)
        steps.append(Step(current, flow))
        current = None if flow is None else _apply(flow, pkt, outputs, conntrack)
    return Result(tuple(outputs), tuple(steps), dict(pkt))


def _apply(flow: FlowSpec, pkt: Packet, outputs: list[int], conntrack: Conntrack) -> int | None:
    """Execute the actions of `flow`; return the next table, if any."""
    for action in flow.actions:
        if isinstance(action, SetField):
            pkt[action.field] = action.value
        elif isinstance(action, Move):
            pkt[action.dst] = pkt.get(action.src, 0) & ((1 << FIELD_BITS[action.dst]) - 1)
        elif isinstance(action, Output):
            if action.port != pkt.get("in_port"):  # OpenFlow never outputs to the in_port
                outputs.append(action.port)
        elif isinstance(action, OutputInPort):
            outputs.append(pkt["in_port"])
        elif isinstance(action, Ct):
            zone = pkt.get(action.zone_field, 0) & 0xFFFF
            if action.commit:
                conntrack.commit(zone, pkt, action.set_mark)
            if action.table is not None:
                pkt["ct_state"], pkt["ct_mark"] = conntrack.lookup(zone, pkt)
                return action.table
        elif isinstance(action, GotoTable):
            return action.table
        elif isinstance(action, Conjunction):
            raise EvaluationError("a conjunctive flow was selected as a final match")
    return None
