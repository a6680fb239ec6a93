"""Inputs to the engine. Each is a value; the shell turns OVSDB rows, agent reports, API calls
and switch messages into these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

from controller.identity.groups import GroupDef
from controller.model import VM, Fact, Gateway, Hypervisor, Provenance
from controller.policy.schema import Policy


@dataclass(frozen=True)
class HypervisorUpserted:
    hypervisor: Hypervisor


@dataclass(frozen=True)
class GatewayChanged:
    gateway: Gateway | None


@dataclass(frozen=True)
class VmUpserted:
    """A VM appeared or its platform record (name, hypervisor, vNICs, tags) changed."""

    vm: VM


@dataclass(frozen=True)
class VmRemoved:
    uuid: str


@dataclass(frozen=True)
class ContextReported:
    """The complete context one source reports for one VM: replaces that source's facts."""

    uuid: str
    provenance: Provenance  # GUEST (agent via relay) or AUTHORITATIVE (IdP, EDR)
    facts: frozenset[Fact]


@dataclass(frozen=True)
class DirectoryChanged:
    user: str
    groups: frozenset[str]


@dataclass(frozen=True)
class PolicyChanged:
    policy: Policy
    groups: Mapping[str, GroupDef]


Event = Union[HypervisorUpserted, GatewayChanged, VmUpserted, VmRemoved, ContextReported, DirectoryChanged, PolicyChanged]
