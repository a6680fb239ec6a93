"""Outputs of the engine: what the shell must do to the world."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from controller.flows.reconcile import FlowOp


@dataclass(frozen=True)
class ProgramBridge:
    """Apply these operations to one hypervisor's bridge, as one atomic bundle."""

    hypervisor: str
    ops: tuple[FlowOp, ...]


@dataclass(frozen=True)
class FlushZones:
    """Forget the conntrack entries of these zones: their port now belongs to someone else."""

    hypervisor: str
    zones: tuple[int, ...]


Command = Union[ProgramBridge, FlushZones]
