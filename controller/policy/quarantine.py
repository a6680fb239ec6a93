"""Quarantine: isolate one VM above every operator rule, leaving only a remediation group reachable.

Pure values and functions. The engine keeps a `QuarantineState` per VM and steps it with the
VM's current triggers after every event; the compiler (`controller.flows.compile.quarantine_part`)
turns the quarantined set into flows. docs/quarantine.md describes the behaviour.

A VM is quarantined when a trigger *fires* — a reason that did not hold before starts to hold —
or when an operator asks. It stays quarantined until an operator releases it, even if every
trigger clears. Releasing acknowledges the triggers that hold at that moment: they do not
quarantine the VM again until they have cleared and fired anew.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from controller.model import VM, Attr, Provenance

EDR_CHECK = "edr"  # the posture check an EDR verdict arrives as (authoritative, through the API)
REASON_EDR = "edr verdict"
REASON_SILENT = "agent silent"


def posture_reason(check: str) -> str:
    return f"posture check {check} failed"


def operator_reason(reason: str, by: str) -> str:
    return f"operator {by}: {reason}"


@dataclass(frozen=True)
class QuarantinePolicy:
    """Which triggers quarantine a VM, and which group stays reachable from a quarantined VM."""

    on_edr: bool = True  # an authoritative posture.edr=fail (an EDR verdict through the API)
    on_posture_fail: bool = False  # a guest posture check turns fail
    posture_checks: tuple[str, ...] = ()  # the checks watched; empty = any failing check
    on_agent_silent: bool = False  # the VM's guest context expired (its agent went silent)
    remediation_group: str | None = "remediation"  # None: nothing stays reachable


DEFAULT_QUARANTINE = QuarantinePolicy()  # what a configuration without `quarantine:` gets
# An engine built without a quarantine policy (tools, tests, the shell until it passes the
# configured one): quarantine only on an operator's request, no automatic trigger.
MANUAL_ONLY = QuarantinePolicy(on_edr=False)


@dataclass(frozen=True)
class QuarantineState:
    """One VM's quarantine: why it is quarantined (empty: it is not) and which trigger reasons
    an operator acknowledged when releasing it."""

    reasons: tuple[str, ...] = ()
    released: frozenset[str] = frozenset()

    @property
    def quarantined(self) -> bool:
        return bool(self.reasons)


def triggers(vm: VM, silent: bool, qp: QuarantinePolicy) -> tuple[str, ...]:
    """The quarantine reasons that hold for `vm` now, in a stable order."""
    reasons: list[str] = []
    if qp.on_edr and any(f.value == "fail" and f.provenance is Provenance.AUTHORITATIVE
                         for f in vm.facts if f.attr is Attr.POSTURE and f.key == EDR_CHECK):
        reasons.append(REASON_EDR)
    if qp.on_posture_fail:
        failing = sorted({f.key for f in vm.facts
                          if f.attr is Attr.POSTURE and f.value == "fail"
                          and not (f.key == EDR_CHECK and f.provenance is Provenance.AUTHORITATIVE)})
        reasons.extend(posture_reason(c) for c in failing if not qp.posture_checks or c in qp.posture_checks)
    if qp.on_agent_silent and silent:
        reasons.append(REASON_SILENT)
    return tuple(reasons)


def step(state: QuarantineState, current: Iterable[str]) -> QuarantineState:
    """The state after the VM's triggers became `current`: a reason that holds and was neither
    acknowledged at release nor already recorded fires (and quarantines); acknowledged reasons
    that stopped holding are forgotten, so they can fire again."""
    now = tuple(current)
    released = state.released & frozenset(now)
    fired = tuple(r for r in now if r not in released and r not in state.reasons)
    return QuarantineState(state.reasons + fired, released)


def request(state: QuarantineState, reason: str, by: str) -> QuarantineState:
    """An operator quarantines the VM by hand."""
    text = operator_reason(reason, by)
    if text in state.reasons:
        return state
    return QuarantineState(state.reasons + (text,), state.released)


def release(state: QuarantineState, current: Iterable[str]) -> QuarantineState:
    """An operator releases the VM: the triggers holding now are acknowledged."""
    return QuarantineState((), frozenset(current))
