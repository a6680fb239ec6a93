"""Inputs to the engine. Each is a value; the shell turns OVSDB rows, agent reports, API calls
and switch messages into these."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Union

from controller.identity.groups import GroupDef
from controller.model import VM, Fact, Gateway, Hypervisor, Provenance
from controller.policy.schema import Policy


@dataclass(frozen=True)
class HypervisorUpserted:
    hypervisor: Hypervisor


@dataclass(frozen=True)
class HypervisorRemoved:
    """No longer managed: its bridge keeps whatever flows it has."""

    name: str


@dataclass(frozen=True)
class GatewayChanged:
    gateway: Gateway | None


@dataclass(frozen=True)
class VmUpserted:
    """A VM appeared or its platform record (name, hypervisor, vNICs, tags) changed."""

    vm: VM


@dataclass(frozen=True)
class VmTagsReplaced:
    """A VM's platform tags were replaced (the operator's tags, each with when it was first
    observed with its value); its other facts and its binding stay as the engine has them."""

    uuid: str
    tags: frozenset[Fact]


@dataclass(frozen=True)
class VmRemoved:
    uuid: str


@dataclass(frozen=True)
class ContextReported:
    """The complete context one source reports for one VM: replaces that source's facts."""

    uuid: str
    provenance: Provenance  # GUEST (agent via relay) or AUTHORITATIVE (IdP, EDR)
    facts: frozenset[Fact]
    expires_at: float | None = None  # epoch seconds; past it these facts stop counting


@dataclass(frozen=True)
class ContextExpiry:
    """Wall-clock time passes: context whose time to live is over is dropped, and every grant
    that rested on it is revoked (established connections included)."""

    now: float


@dataclass(frozen=True)
class DirectoryChanged:
    user: str
    groups: frozenset[str]


@dataclass(frozen=True)
class PolicyChanged:
    policy: Policy
    groups: Mapping[str, GroupDef]


@dataclass(frozen=True, order=True)
class BoundPort:
    """A vNIC as the hypervisor's OVSDB shows it: which VM (vm-id), which MAC, which ofport."""

    ofport: int
    mac: str
    vm_uuid: str


@dataclass(frozen=True)
class PortsObserved:
    """Everything one hypervisor's OVSDB says about its bridge, as a full snapshot."""

    hypervisor: str
    dpid: int | None
    uplink_ofport: int | None
    ports: tuple[BoundPort, ...]


@dataclass(frozen=True)
class QuarantineRequested:
    """An operator isolates a VM by hand (see controller/policy/quarantine.py)."""

    uuid: str
    reason: str
    by: str


@dataclass(frozen=True)
class QuarantineReleased:
    """An operator ends a VM's quarantine; the triggers holding now do not quarantine it again
    until they clear and fire anew."""

    uuid: str
    by: str


Event = Union[QuarantineRequested, QuarantineReleased, ContextExpiry, PortsObserved, HypervisorUpserted, HypervisorRemoved, GatewayChanged, VmUpserted, VmTagsReplaced, VmRemoved, ContextReported, DirectoryChanged, PolicyChanged]
