"""What the REST API needs from the running controller, and the values it gets back.

The API writes to the store first (the source of truth) and then hands the engine the event
that the committed change implies; it reads verdicts, members, status and counters from the
engine. `controller.facade.EngineFacade` implements this port for the real engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

from controller.events import Event
from controller.identity.groups import GroupDef
from controller.model import VM
from controller.policy.explain import Explanation, Membership
from controller.policy.schema import Policy
from controller.policy.whatif import FlowCountChange, PairChange, WhatIf

__all__ = ["BridgeStatus", "ControllerPort", "FlowCountChange", "PairChange", "RuleHits", "WhatIf"]


@dataclass(frozen=True)
class BridgeStatus:
    hypervisor: str
    dpid: int | None
    connected: bool
    state: str  # runtime.SyncState value
    desired_flows: int
    installed_flows: int | None  # None until dumped
    last_error: str | None
    failures: int


@dataclass(frozen=True)
class RuleHits:
    rule_id: str
    packets: int
    bytes: int
    last_hit: float | None  # epoch seconds of the first poll that saw the counters grow


class ControllerPort(Protocol):
    def submit(self, event: Event) -> None:
        """Hand the engine a change that is already committed to the store."""

    def explain(self, src: str, dst: str, protocol: str, port: int) -> Explanation:
        """src: VM name; dst: VM name or IPv4. LookupError names what is unknown."""

    def vm(self, name_or_uuid: str) -> VM | None:
        """The VM as the engine sees it: effective facts, where OVSDB has it plugged."""

    def group_members(self, group: str) -> tuple[VM, ...] | None:
        """None if no such group in the active policy."""

    def membership(self, group: str, vm: str) -> Membership | None:
        """Why `vm` is or is not in `group`; None if either is unknown."""

    def whatif(self, policy: Policy, groups: Mapping[str, GroupDef]) -> WhatIf: ...

    def status(self) -> tuple[BridgeStatus, ...]: ...

    def rule_hits(self) -> Mapping[str, RuleHits]: ...

    def quarantined(self) -> Mapping[str, tuple[str, ...]]:
        """Quarantined VM uuids and why."""

    def healthy(self) -> bool:
        """The engine thread is alive and answering."""
