"""Desired versus installed: the difference as an ordered plan of flow operations.

OpenFlow names a flow by (table, priority, match); a flow whose key stays but whose actions
or cookie change is modified in place rather than deleted and re-added, so counters and the
packets in flight through it are not disturbed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from operator import attrgetter

from controller.flows.types import FlowSpec, Match

FlowKey = tuple[int, int, Match]
# A switch's flows by key. The runtime treats each one as a value: a change makes a new table
# (a dict copy keeps the hashes, so it costs far less than rebuilding one from flows).
FlowTable = Mapping[FlowKey, FlowSpec]


class OpKind(str, Enum):
    ADD = "add"
    MODIFY = "modify"  # strict modify: same key, new actions/cookie
    DELETE = "delete"  # strict delete by key


@dataclass(frozen=True, order=True)
class FlowOp:
    kind: OpKind
    flow: FlowSpec  # for DELETE: the installed flow being removed


@dataclass(frozen=True)
class Diff:
    add: frozenset[FlowSpec]
    modify: frozenset[tuple[FlowSpec, FlowSpec]]  # (installed, desired)
    delete: frozenset[FlowSpec]

    @property
    def empty(self) -> bool:
        return not (self.add or self.modify or self.delete)

    def __len__(self) -> int:
        return len(self.add) + len(self.modify) + len(self.delete)


def keyed(flows: Iterable[FlowSpec]) -> dict[FlowKey, FlowSpec]:
    return {f.key: f for f in flows}


def diff(desired: Iterable[FlowSpec], installed: Iterable[FlowSpec] | FlowTable) -> Diff:
    """`desired` holds one flow per key, as compiled tables do (tests/unit/test_compile.py)."""
    have = installed if isinstance(installed, Mapping) else keyed(installed)
    if not have:  # an empty bridge: everything is an add (a frozenset is taken as it is)
        return Diff(add=frozenset(desired), modify=frozenset(), delete=frozenset())
    want = keyed(desired)
    return Diff(
        add=frozenset(f for k, f in want.items() if k not in have),
        modify=frozenset((have[k], f) for k, f in want.items() if k in have and have[k] != f),
        delete=frozenset(f for k, f in have.items() if k not in want),
    )


def _is_verdict(flow: FlowSpec) -> bool:
    """A conjunction's conj_id flow (conj_id sorts first among a match's fields)."""
    fields = flow.match.fields
    return bool(fields) and fields[0].name == "conj_id"


_PRIORITY, _TABLE = attrgetter("priority"), attrgetter("table")


def _ordered(flows: Iterable[FlowSpec]) -> list[FlowSpec]:
    """By table, then priority from high to low. Within one priority the order carries no
    meaning, and comparing matches is slow; two stable sorts on attributes keep the keys in C."""
    out = sorted(flows, key=_PRIORITY, reverse=True)
    out.sort(key=_TABLE)
    return out


def _clauses_and_verdicts(flows: Iterable[FlowSpec]) -> tuple[list[FlowSpec], list[FlowSpec]]:
    clauses: list[FlowSpec] = []
    verdicts: list[FlowSpec] = []
    for f in _ordered(flows):
        (verdicts if _is_verdict(f) else clauses).append(f)
    return clauses, verdicts


def plan(d: Diff) -> tuple[FlowOp, ...]:
    """Operations in a safe order for one atomic bundle, and for switches without bundles:
    deletions of grants first (break before make for what is going away), then changed flows,
    then additions — except that a conjunction's conj_id flow goes in after its clauses and
    out before them, so no half-built conjunction ever acts.
    """
    kept, verdicts = _clauses_and_verdicts(d.delete)
    deletes = verdicts + kept
    # OVS's strict modify keeps a flow's old cookie: a flow that changes owner is re-added
    # (an add on an existing key replaces it in place, counters kept).
    modifies = _ordered(new for old, new in d.modify if old.cookie == new.cookie)
    recookied = _ordered(new for old, new in d.modify if old.cookie != new.cookie)
    clauses, verdicts = _clauses_and_verdicts(d.add)
    adds = clauses + verdicts
    delete, modify, add = OpKind.DELETE, OpKind.MODIFY, OpKind.ADD
    return (
        tuple([FlowOp(delete, f) for f in deletes])
        + tuple([FlowOp(modify, f) for f in modifies])
        + tuple([FlowOp(add, f) for f in recookied + adds])
    )


def apply_plan(installed: Iterable[FlowSpec], ops: Iterable[FlowOp]) -> frozenset[FlowSpec]:
    """What a switch holds after executing `ops` (used to check plans; pure)."""
    return frozenset(apply_to_table(keyed(installed), ops).values())


def apply_to_table(installed: FlowTable, ops: Iterable[FlowOp]) -> dict[FlowKey, FlowSpec]:
    """A new table: `installed` after `ops` (`installed` itself is left as it was)."""
    table = dict(installed)
    pop, delete = table.pop, OpKind.DELETE
    for op in ops:
        flow = op.flow
        if op.kind is delete:
            pop(flow.key, None)
        else:
            table[flow.key] = flow
    return table


def net_diff(installed: FlowTable, steps: Iterable[FlowOp]) -> Diff:
    """The difference between `installed` and `installed` after `steps`, over the flows the
    steps touch only: several queued changes become one plan without comparing whole tables."""
    steps = tuple(steps)
    touched = {op.flow.key: installed.get(op.flow.key) for op in steps}
    if not touched:
        return Diff(frozenset(), frozenset(), frozenset())
    before = {k: f for k, f in touched.items() if f is not None}
    return diff(apply_to_table(before, steps).values(), before)
