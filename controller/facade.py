"""EngineFacade: the controller port the REST API talks to (controller.api.port.ControllerPort).

Writes become events for the one engine thread; reads run as calls on that thread (so they
see a consistent state) and return immutable values. Heavier reads (what-if) take a snapshot on
the engine thread and compute outside it, so the engine is never held up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

from controller.api.port import BridgeStatus, RuleHits, WhatIf
from controller.events import Event
from controller.flows.pipeline import CookieKind, cookie_ident, cookie_kind, rule_number
from controller.identity.groups import GroupDef
from controller.model import VM
from controller.policy.explain import Explanation, Membership, explain, membership
from controller.policy.schema import Policy
from controller.policy.whatif import whatif
from controller.runtime import Runtime

T = TypeVar("T")
Call = Callable[[Callable[[Runtime], T]], T]


class HitCounter:
    """Per-rule packet and byte counts from flow statistics, summed over every bridge and table.

    Conjunction clause flows carry no statistics in OVS; the conj_id flows do, and they carry the
    rule's cookie, so summing by cookie counts each rule's connections exactly once per bridge
    it crosses."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[int, int], tuple[int, int]] = {}  # (dpid, cookie) -> last counters
        self._totals: dict[int, list[float]] = {}  # rule number -> [packets, bytes, last_hit]

    def update(self, dpid: int, counters: Mapping[int, tuple[int, int]], now: float) -> None:
        with self._lock:
            for cookie, (packets, nbytes) in counters.items():
                if cookie_kind(cookie) is not CookieKind.RULE:
                    continue
                old_p, old_b = self._seen.get((dpid, cookie), (0, 0))
                # Counters restart when a flow is re-added: count from zero again.
                dp, db = (packets - old_p, nbytes - old_b) if packets >= old_p else (packets, nbytes)
                self._seen[(dpid, cookie)] = (packets, nbytes)
                total = self._totals.setdefault(cookie_ident(cookie), [0, 0, 0.0])
                total[0] += dp
                total[1] += db
                if dp > 0:
                    total[2] = now

    def hits(self, rule_ids: list[str]) -> dict[str, RuleHits]:
        with self._lock:
            out = {}
            for rid in rule_ids:
                p, b, last = self._totals.get(rule_number(rid), [0, 0, 0.0])
                out[rid] = RuleHits(rid, int(p), int(b), float(last) or None)
            return out


class EngineFacade:
    def __init__(self, call: Call, post: Callable[[Event], None], hits: HitCounter | None = None,
                 alive: Callable[[], bool] = lambda: True) -> None:
        self._call = call
        self._post = post
        self.hits = hits or HitCounter()
        self._alive = alive

    @staticmethod
    def local(runtime: Runtime, clock: Callable[[], float] = time.monotonic) -> "EngineFacade":
        """For tests and tools: run everything in the caller's thread, under one lock."""
        lock = threading.RLock()

        def call(fn: Callable[[Runtime], T]) -> T:
            with lock:
                return fn(runtime)

        def post(event: Event) -> None:
            with lock:
                runtime.handle(event, clock())

        return EngineFacade(call, post)

    # ---- ControllerPort ----------------------------------------------------------------------

    def submit(self, event: Event) -> None:
        self._post(event)

    def explain(self, src: str, dst: str, protocol: str, port: int) -> Explanation:
        def run(rt: Runtime) -> Explanation:
            world = rt.engine.view()
            src_vm = _find(world.inventory.vms.values(), src)
            if src_vm is None:
                raise LookupError(f"no VM named {src!r}")
            dst_vm = _find(world.inventory.vms.values(), dst)
            return explain(world, rt.engine.groups, src_vm, dst_vm if dst_vm is not None else dst, protocol, port)
        return self._call(run)

    def vm(self, name_or_uuid: str) -> VM | None:
        return self._call(lambda rt: _find(rt.engine.view().inventory.vms.values(), name_or_uuid))

    def group_members(self, group: str) -> tuple[VM, ...] | None:
        def run(rt: Runtime) -> tuple[VM, ...] | None:
            world = rt.engine.view()
            if group not in rt.engine.groups:
                return None
            vms = world.inventory.vms
            return tuple(sorted((vms[u] for u in world.members.get(group, frozenset()) if u in vms), key=lambda v: v.name))
        return self._call(run)

    def membership(self, group: str, vm: str) -> Membership | None:
        def run(rt: Runtime) -> Membership | None:
            gdef = rt.engine.groups.get(group)
            target = _find(rt.engine.view().inventory.vms.values(), vm)
            if gdef is None or target is None:
                return None
            return membership(gdef, target)
        return self._call(run)

    def whatif(self, policy: Policy, groups: Mapping[str, GroupDef]) -> WhatIf:
        snapshot = self._call(lambda rt: (rt.engine.world(), dict(rt.engine.groups)))
        return whatif(snapshot[0], snapshot[1], policy, groups)

    def status(self) -> tuple[BridgeStatus, ...]:
        def run(rt: Runtime) -> tuple[BridgeStatus, ...]:
            return tuple(
                BridgeStatus(b.hypervisor, b.dpid, rt.connected(b.dpid), b.state.value,
                             len(rt.engine.desired(b.hypervisor)), None if b.installed is None else len(b.installed),
                             b.last_error, b.failures)
                for b in rt.bridges())
        return self._call(run)

    def rule_hits(self) -> Mapping[str, RuleHits]:
        ids = self._call(lambda rt: [r.id for r in rt.engine.view().policy.rules])
        return self.hits.hits(ids)

    def quarantined(self) -> Mapping[str, tuple[str, ...]]:
        return self._call(lambda rt: dict(rt.engine.quarantined()))

    def healthy(self) -> bool:
        if not self._alive():
            return False
        try:
            return self._call(lambda rt: True)
        except Exception:
            return False


def _find(vms: object, name_or_uuid: str) -> VM | None:
    for vm in vms:  # type: ignore[attr-defined]
        if vm.name == name_or_uuid or vm.uuid == name_or_uuid.lower():
            return vm
    return None
