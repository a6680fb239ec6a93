"""Storing flow snapshots (controller/flowsnap.py) of the bridges the controller has in sync.

A bridge that reaches "in sync" is snapshotted once it has been quiet for QUIET_S, and again every REFRESH_S while the state
generation or the first context expiry has moved (agents' heartbeats extend expiries without
changing flows). The work runs on its own thread, off the engine's; the engine only answers
one call for the bridge's table.

The stamp (generation, first expiry) is read before the table: a write after it moves the
generation past the stamp and the snapshot is refused at the next start. A write committed
just before it whose event the engine has not yet taken would slip through until the next
snapshot; the API posts its event right after committing, so that window is the few
instructions between the two.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from apps.ofwire import flow_mod_body
from controller.flows.reconcile import OpKind
from controller.flowsnap import OF14, FlowSnapshot, flow_mod_message
from controller.runtime import Runtime, SyncState

LOG = logging.getLogger("goldilocks.snapshots")

QUIET_S = 2.0  # after a bridge's last "in sync": a burst of changes costs one snapshot
REFRESH_S = 30.0
EXPIRY_GRACE_S = 5.0  # a context that expired this recently may still have flows (engine ticks 0.25 s)


class SnapshotStore(Protocol):
    def snapshot_stamp(self, now: float, grace: float) -> tuple[int, float | None] | None: ...

    def store_flow_snapshot(self, snapshot: FlowSnapshot) -> None: ...


class Switches(Protocol):
    def switch_ports(self, dpid: int) -> tuple[int, frozenset[tuple[int, str]]] | None: ...


@dataclass(frozen=True, eq=False)
class _Written:
    generation: int
    valid_until: float | None
    table: Any  # the installed table it holds (the runtime replaces, never mutates, one)

    def same(self, generation: int, valid_until: float | None, table: Any) -> bool:
        return (self.generation, self.valid_until) == (generation, valid_until) and self.table is table


class SnapshotWriter:
    def __init__(self, store: SnapshotStore, call: Callable[[Callable[[Runtime], Any]], Any],
                 switches: Switches, config_digest: str, clock: Callable[[], float] = time.time) -> None:
        self._store, self._call, self._switches = store, call, switches
        self._digest, self._clock = config_digest, clock
        self._due: dict[str, float] = {}  # hypervisor -> monotonic time its snapshot is due
        self._written: dict[str, _Written] = {}
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="flow-snapshots", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=5.0)

    def in_sync(self, hypervisor: str) -> None:
        """The bridge has just reached in sync (called on the engine thread: no work here)."""
        with self._wake:
            self._due[hypervisor] = time.monotonic() + QUIET_S
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                if self._stop:
                    return
                now = time.monotonic()
                ready = [hv for hv, at in self._due.items() if at <= now]
                if not ready:
                    self._wake.wait(timeout=max(0.0, min(self._due.values(), default=now + 1.0) - now))
                    continue
                for hv in ready:
                    self._due[hv] = now + REFRESH_S
            for hv in ready:
                try:
                    self.store_snapshot(hv)
                except Exception:  # the next refresh tries again; enforcement never depends on it
                    LOG.exception("could not store the flow snapshot of %s", hv)

    def store_snapshot(self, hypervisor: str) -> None:
        """Store the bridge's snapshot now, unless it is not in sync, its switch is gone or
        does not speak OpenFlow 1.4, a context has just expired, or nothing moved since the last."""
        now = self._clock()
        stamp = self._store.snapshot_stamp(now, EXPIRY_GRACE_S)
        if stamp is None:
            return  # a context has just expired: the engine may not have applied it yet
        generation, valid_until = stamp
        table = self._call(lambda runtime: _in_sync_table(runtime, hypervisor))
        if table is None:
            return  # a change is in flight: its own "in sync" brings us back
        dpid, installed = table
        last = self._written.get(hypervisor)
        if last is not None and last.same(generation, valid_until, installed):
            return
        switch = self._switches.switch_ports(dpid)
        if switch is None or switch[0] != OF14:
            return  # gone, or a version the restorer does not serve
        # In one atomic bundle the order of adds does not matter: no sort.
        messages = tuple([flow_mod_message(flow_mod_body(OpKind.ADD, flow)) for flow in installed.values()])
        self._store.store_flow_snapshot(FlowSnapshot(dpid, generation, self._digest, switch[1], valid_until,
                                                     now, messages))
        self._written[hypervisor] = _Written(generation, valid_until, installed)
        LOG.info("flow snapshot of %s stored: %d flows, generation %d", hypervisor, len(messages), generation)


def _in_sync_table(runtime: Runtime, hypervisor: str) -> tuple[int, Any] | None:
    """(dpid, installed table) of a bridge in sync; None otherwise. Runs on the engine thread."""
    try:
        b = runtime.bridge(hypervisor)
    except KeyError:
        return None
    if b.state is not SyncState.IN_SYNC or b.dpid is None or b.installed is None:
        return None
    return b.dpid, b.installed
