"""The runtime: the engine plus what Goldilocks knows of every switch, as one pure state machine.

The shell feeds it inventory/context/policy events and switch events (connected, flows dumped,
bundle committed or failed, time passing) and executes the switch commands it returns. Per
bridge it keeps what is installed, so a reconnect diffs the dump against the desired flows and
repairs only the difference — it never flushes — and a failed bundle leaves the bridge marked
out of sync, retried with backoff, while other bridges carry on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import Union

from controller.commands import FlushZones, ProgramBridge
from controller.engine import Engine
from controller.events import Event
from controller.flows.pipeline import rule_cookie
from controller.flows.reconcile import FlowOp, FlowTable, apply_to_table, diff, keyed, net_diff, plan
from controller.flows.types import FlowSpec

BACKOFF_FIRST = 0.5  # seconds
BACKOFF_MAX = 30.0


class SyncState(str, Enum):
    DISCONNECTED = "disconnected"
    DUMPING = "dumping"  # asked the switch for its flows
    APPLYING = "applying"  # a bundle is in flight
    IN_SYNC = "in_sync"
    BACKOFF = "backoff"  # the last bundle failed; dump again at retry_at


# ---- switch events (from the os-ken app) -----------------------------------------------------


@dataclass(frozen=True)
class SwitchConnected:
    dpid: int


@dataclass(frozen=True)
class SwitchDisconnected:
    dpid: int


@dataclass(frozen=True)
class FlowsDumped:
    dpid: int
    flows: frozenset[FlowSpec]  # every flow under the Goldilocks cookie prefix
    undecodable: int = 0  # flows under our prefix the codec could not read (replaced)


@dataclass(frozen=True)
class BundleCommitted:
    dpid: int
    bundle: int


@dataclass(frozen=True)
class BundleFailed:
    dpid: int
    bundle: int
    error: str  # names the flow and rule the switch refused, when known


@dataclass(frozen=True)
class CountersRead:
    """Packet and byte counts by cookie from one switch (for rule hit counts; not engine state)."""

    dpid: int
    counters: Mapping[int, tuple[int, int]]


@dataclass(frozen=True)
class Tick:
    """Time passes; due retries fire."""


SwitchEvent = Union[SwitchConnected, SwitchDisconnected, FlowsDumped, BundleCommitted, BundleFailed, CountersRead, Tick]


# ---- switch commands (to the os-ken app) -----------------------------------------------------


@dataclass(frozen=True)
class RequestDump:
    dpid: int


@dataclass(frozen=True)
class SendBundle:
    """One atomic bundle of flow mods, then a barrier."""

    dpid: int
    bundle: int
    ops: tuple[FlowOp, ...]


@dataclass(frozen=True)
class FlushConntrack:
    dpid: int
    zones: tuple[int, ...]


@dataclass(frozen=True)
class ReadCounters:
    dpid: int
    cookies: tuple[int, ...]  # one per rule: the switch sums each rule's flows


SwitchCommand = Union[RequestDump, SendBundle, FlushConntrack, ReadCounters]

COUNTERS_EVERY = 10.0  # seconds between rule hit-count polls of each in-sync bridge


@dataclass(frozen=True)
class BridgeSync:
    hypervisor: str
    dpid: int | None = None
    state: SyncState = SyncState.DISCONNECTED
    installed: FlowTable | None = None  # what the switch holds, by key; None: unknown until dumped
    pending: tuple[FlowOp, ...] = ()
    bundle: int = 0
    # The engine's steps since the in-flight bundle's target, in order: the next bundle.
    queued: tuple[FlowOp, ...] = ()
    failures: int = 0
    retry_at: float | None = None
    last_error: str | None = None
    bundles_sent: int = 0
    flow_mods_sent: int = 0


class Runtime:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._bridges: dict[str, BridgeSync] = {
            hv: BridgeSync(hv, dpid=record.dpid) for hv, record in engine.hypervisor_records().items()}
        self._connected: set[int] = set()  # dpids connected, mapped to a hypervisor or not
        self._next_bundle = 1
        # What the last inventory/context/policy event did to each bridge's desired flows.
        self.last_effect: dict[str, dict[str, int]] = {}
        self._counters_at: float | None = None

    # ---- reading -----------------------------------------------------------------------------

    def bridge(self, hypervisor: str) -> BridgeSync:
        return self._bridges[hypervisor]

    def bridges(self) -> tuple[BridgeSync, ...]:
        return tuple(self._bridges[hv] for hv in sorted(self._bridges))

    def connected(self, dpid: int | None) -> bool:
        return dpid is not None and dpid in self._connected

    def _hv_of(self, dpid: int) -> str | None:
        return next((b.hypervisor for b in self._bridges.values() if b.dpid == dpid), None)

    # ---- writing -----------------------------------------------------------------------------

    def handle(self, event: Event | SwitchEvent, now: float) -> list[SwitchCommand]:
        if isinstance(event, SwitchConnected):
            self._connected.add(event.dpid)
            return self._connect(event.dpid)
        if isinstance(event, SwitchDisconnected):
            self._connected.discard(event.dpid)
            return self._on_bridge(event.dpid, lambda b: (replace(b, state=SyncState.DISCONNECTED, installed=None,
                                                                   pending=(), queued=()), []))
        if isinstance(event, FlowsDumped):
            return self._on_bridge(event.dpid, lambda b: self._dumped(b, event.flows))
        if isinstance(event, BundleCommitted):
            return self._on_bridge(event.dpid, lambda b: self._committed(b, event.bundle))
        if isinstance(event, BundleFailed):
            return self._on_bridge(event.dpid, lambda b: self._failed(b, event, now))
        if isinstance(event, Tick):
            return self._retry_due(now) + self._counters_due(now)
        if isinstance(event, CountersRead):
            return []  # the shell keeps hit counts; nothing for the engine
        return self._engine_event(event)

    def _engine_event(self, event: Event) -> list[SwitchCommand]:
        out: list[SwitchCommand] = []
        commands = self.engine.handle(event)
        self.last_effect = {c.hypervisor: _count_ops(c.ops) for c in commands if isinstance(c, ProgramBridge)}
        records = self.engine.hypervisor_records()
        for gone in set(self._bridges) - set(records):
            del self._bridges[gone]
        # OVSDB may just have told us which hypervisor a (connected) dpid is.
        for hv, record in records.items():
            b = self._bridges.setdefault(hv, BridgeSync(hv))
            if record.dpid != b.dpid:
                self._bridges[hv] = replace(b, dpid=record.dpid, state=SyncState.DISCONNECTED, installed=None)
                if record.dpid is not None and record.dpid in self._connected:
                    out += self._connect(record.dpid)
        for cmd in commands:
            b = self._bridges[cmd.hypervisor]
            if isinstance(cmd, ProgramBridge):
                new, cmds = self._changed(b, cmd.ops)
                self._bridges[cmd.hypervisor] = new
                out += cmds
            elif isinstance(cmd, FlushZones) and b.dpid is not None and b.dpid in self._connected:
                out.append(FlushConntrack(b.dpid, cmd.zones))
        return out

    def _on_bridge(self, dpid: int, step) -> list[SwitchCommand]:
        hv = self._hv_of(dpid)
        if hv is None:
            return []  # not (yet) a bridge we manage: its OVSDB will tell us
        new, cmds = step(self._bridges[hv])
        self._bridges[hv] = new
        return cmds

    def _connect(self, dpid: int) -> list[SwitchCommand]:
        def step(b: BridgeSync) -> tuple[BridgeSync, list[SwitchCommand]]:
            return replace(b, state=SyncState.DUMPING, installed=None, pending=(), queued=()), [RequestDump(dpid)]
        return self._on_bridge(dpid, step)

    def _send(self, b: BridgeSync, ops: tuple[FlowOp, ...]) -> tuple[BridgeSync, list[SwitchCommand]]:
        if not ops:
            return replace(b, state=SyncState.IN_SYNC, pending=(), queued=(), failures=0,
                           retry_at=None), []
        bundle = self._next_bundle
        self._next_bundle += 1
        assert b.dpid is not None
        new = replace(b, state=SyncState.APPLYING, pending=ops, bundle=bundle, queued=(),
                      bundles_sent=b.bundles_sent + 1, flow_mods_sent=b.flow_mods_sent + len(ops))
        return new, [SendBundle(b.dpid, bundle, ops)]

    def _dumped(self, b: BridgeSync, flows: frozenset[FlowSpec]) -> tuple[BridgeSync, list[SwitchCommand]]:
        if b.state is not SyncState.DUMPING:
            return b, []
        b = replace(b, installed=keyed(flows))
        return self._send(b, plan(diff(self.engine.desired(b.hypervisor), b.installed)))

    def _changed(self, b: BridgeSync, ops: tuple[FlowOp, ...]) -> tuple[BridgeSync, list[SwitchCommand]]:
        if b.state is SyncState.IN_SYNC:
            # In sync, the bridge holds the engine's previous desired flows, and `ops` are
            # exactly the engine's step from those to the new ones.
            return self._send(b, ops)
        if b.state is SyncState.APPLYING:
            return replace(b, queued=b.queued + ops), []
        return b, []  # disconnected, dumping or backing off: the next dump reconciles

    def _committed(self, b: BridgeSync, bundle: int) -> tuple[BridgeSync, list[SwitchCommand]]:
        if b.state is not SyncState.APPLYING or bundle != b.bundle or b.installed is None:
            return b, []
        installed = apply_to_table(b.installed, b.pending)
        b = replace(b, installed=installed, pending=(), failures=0, retry_at=None, last_error=None)
        # The switch now holds the desired flows the bundle was planned for; what changed
        # since is exactly the queued steps, so only the flows they touch are compared.
        return self._send(b, plan(net_diff(installed, b.queued)))

    def _failed(self, b: BridgeSync, event: BundleFailed, now: float) -> tuple[BridgeSync, list[SwitchCommand]]:
        if event.bundle != b.bundle:
            return b, []
        failures = b.failures + 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1))
        # An atomic bundle that failed changed nothing; still, trust only a fresh dump.
        return replace(b, state=SyncState.BACKOFF, pending=(), failures=failures, retry_at=now + delay,
                       last_error=event.error, installed=None), []

    def _counters_due(self, now: float) -> list[SwitchCommand]:
        if self._counters_at is None:
            self._counters_at = now
        if now - self._counters_at < COUNTERS_EVERY:
            return []
        self._counters_at = now
        cookies = tuple(rule_cookie(rule.id) for rule in self.engine.view().policy.rules)
        return [ReadCounters(b.dpid, cookies) for b in self._bridges.values()
                if b.state is SyncState.IN_SYNC and b.dpid is not None and b.dpid in self._connected]

    def _retry_due(self, now: float) -> list[SwitchCommand]:
        out: list[SwitchCommand] = []
        for hv, b in self._bridges.items():
            if b.state is SyncState.BACKOFF and b.retry_at is not None and now >= b.retry_at:
                if b.dpid is not None and b.dpid in self._connected:
                    self._bridges[hv] = replace(b, state=SyncState.DUMPING, retry_at=None)
                    out.append(RequestDump(b.dpid))
                else:
                    self._bridges[hv] = replace(b, state=SyncState.DISCONNECTED, retry_at=None)
        return out


def _count_ops(ops: Iterable[FlowOp]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in ops:
        counts[op.kind.value] = counts.get(op.kind.value, 0) + 1
    return counts


def dpids(commands: Iterable[SwitchCommand]) -> set[int]:
    return {c.dpid for c in commands}
