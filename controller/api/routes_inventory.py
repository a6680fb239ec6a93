"""Inventory: hypervisors, the gateway, VMs (with their vNICs) and tags."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from controller.api import convert
from controller.api import schemas as s
from controller.api.auth import READ, WRITE, allow
from controller.api.deps import Services, Svc
from controller.api.errors import Unprocessable
from controller.events import (
    GatewayChanged,
    HypervisorRemoved,
    HypervisorUpserted,
    VmRemoved,
    VmTagsReplaced,
    VmUpserted,
)
from controller.model import VM, Gateway, Hypervisor
from controller.scenario import default_vm_uuid
from controller.store import NotFound
from controller.store.records import Principal

router = APIRouter(tags=["inventory"])
Reader = Annotated[Principal, Depends(allow(*READ))]
Writer = Annotated[Principal, Depends(allow(*WRITE))]


def _hv_out(hv: Hypervisor) -> s.HypervisorOut:
    return s.HypervisorOut(name=hv.name, uplink_ofport=hv.uplink_ofport, dpid=hv.dpid)


# ---- hypervisors ----------------------------------------------------------------------------


@router.get("/hypervisors", response_model=list[s.HypervisorOut], summary="List hypervisors")
def list_hypervisors(who: Reader, svc: Svc) -> list[s.HypervisorOut]:
    return [_hv_out(hv) for hv in svc.store.list_hypervisors()]


@router.get("/hypervisors/{name}", response_model=s.HypervisorOut, summary="One hypervisor")
def get_hypervisor(name: str, who: Reader, svc: Svc) -> s.HypervisorOut:
    for hv in svc.store.list_hypervisors():
        if hv.name == name:
            return _hv_out(hv)
    raise NotFound(f"hypervisor {name}: no such hypervisor")


@router.put("/hypervisors/{name}", response_model=s.HypervisorOut, summary="Create or replace a hypervisor")
def put_hypervisor(name: Annotated[str, Path(min_length=1, max_length=128, pattern=s.NAME_PATTERN)], body: s.HypervisorIn, who: Writer, svc: Svc) -> s.HypervisorOut:
    stored = svc.store.upsert_hypervisor(Hypervisor(name, body.uplink_ofport, body.dpid), actor=who.name)
    svc.controller.submit(HypervisorUpserted(stored))
    return _hv_out(stored)


@router.delete("/hypervisors/{name}", response_model=s.HypervisorOut, summary="Delete a hypervisor with no VMs")
def delete_hypervisor(name: str, who: Writer, svc: Svc) -> s.HypervisorOut:
    gone = svc.store.delete_hypervisor(name, actor=who.name)
    svc.controller.submit(HypervisorRemoved(gone.name))
    return _hv_out(gone)


# ---- gateway --------------------------------------------------------------------------------


@router.get("/gateway", response_model=s.GatewayOut, summary="The fabric gateway (404 if none)")
def get_gateway(who: Reader, svc: Svc) -> s.GatewayOut:
    gw = svc.store.gateway()
    if gw is None:
        raise NotFound("gateway: none configured")
    return s.GatewayOut(ip=gw.ip, mac=gw.mac)


@router.put("/gateway", response_model=s.GatewayOut, summary="Set the fabric gateway")
def put_gateway(body: s.GatewayIn, who: Writer, svc: Svc) -> s.GatewayOut:
    gw = Gateway(body.ip, body.mac)
    svc.store.set_gateway(gw, actor=who.name)
    svc.controller.submit(GatewayChanged(gw))
    return s.GatewayOut(ip=gw.ip, mac=gw.mac)


@router.delete("/gateway", response_model=s.GatewayOut, summary="Remove the fabric gateway")
def delete_gateway(who: Writer, svc: Svc) -> s.GatewayOut:
    gw = svc.store.gateway()
    if gw is None:
        raise NotFound("gateway: none configured")
    svc.store.set_gateway(None, actor=who.name)
    svc.controller.submit(GatewayChanged(None))
    return s.GatewayOut(ip=gw.ip, mac=gw.mac)


# ---- VMs ------------------------------------------------------------------------------------


def find_vm(svc: Services, ref: str) -> VM:
    vm = svc.store.get_vm(ref) or svc.store.get_vm(ref.lower())
    if vm is None:
        raise NotFound(f"vm {ref}: no such VM")
    return vm


def _tag_filter(tag: str | None) -> tuple[str, str] | None:
    if tag is None:
        return None
    key, sep, value = tag.partition("=")
    if not sep or not key:
        raise Unprocessable(["query", "tag"], f"expected KEY=VALUE, got {tag!r}")
    return key, value


def _upserted(svc: Services, stored: VM) -> VM:
    vm = convert.engine_vm_of(stored, svc.store, svc.controller, svc.clock())
    svc.controller.submit(VmUpserted(vm))
    return vm


def find_uuid(svc: Services, ref: str) -> str:
    """The uuid of the VM `ref` names (uuid or name), without loading its record."""
    uuid = svc.store.vm_uuid(ref) or svc.store.vm_uuid(ref.lower())
    if uuid is None:
        raise NotFound(f"vm {ref}: no such VM")
    return uuid


@router.get("/vms", response_model=list[s.VmOut], summary="List VMs")
def list_vms(
    who: Reader, svc: Svc,
    hypervisor: Annotated[str | None, Query(description="only VMs on this hypervisor")] = None,
    tag: Annotated[str | None, Query(description="KEY=VALUE: only VMs with this tag")] = None,
    name: Annotated[str | None, Query(description="glob on the VM name, e.g. web*")] = None,
) -> list[s.VmOut]:
    vms = svc.store.list_vms(hypervisor=hypervisor, tag=_tag_filter(tag), name_glob=name)
    return [convert.vm_out(vm) for vm in vms]


@router.post("/vms", response_model=s.VmOut, status_code=201, summary="Create a VM")
def create_vm(body: s.VmCreate, who: Writer, svc: Svc) -> s.VmOut:
    uuid = body.uuid or default_vm_uuid(body.name)
    stored = svc.store.create_vm(convert.vm_in(body, uuid, svc.clock()), actor=who.name)
    _upserted(svc, stored)
    return convert.vm_out(stored)


@router.get("/vms/{vm}", response_model=s.VmDetail, summary="One VM (by uuid or name), with the engine's view")
def get_vm(vm: str, who: Reader, svc: Svc) -> s.VmDetail:
    stored = find_vm(svc, vm)
    return convert.vm_detail(stored, svc.controller.vm(stored.uuid))


@router.put("/vms/{vm}", response_model=s.VmOut, summary="Replace a VM's record (name, hypervisor, vNICs, tags)")
def replace_vm(vm: str, body: s.VmReplace, who: Writer, svc: Svc) -> s.VmOut:
    old = find_vm(svc, vm)
    stored = svc.store.update_vm(convert.vm_in(body, old.uuid, svc.clock(), old), actor=who.name)
    _upserted(svc, stored)
    return convert.vm_out(stored)


@router.delete("/vms/{vm}", response_model=s.VmOut, summary="Delete a VM and its context")
def delete_vm(vm: str, who: Writer, svc: Svc) -> s.VmOut:
    gone = svc.store.delete_vm(find_uuid(svc, vm), actor=who.name)
    svc.controller.submit(VmRemoved(gone.uuid))
    return convert.vm_out(gone)


@router.put("/vms/{vm}/tags", response_model=s.VmOut, summary="Replace a VM's tags")
def put_tags(vm: str, body: s.TagsIn, who: Writer, svc: Svc) -> s.VmOut:
    stored = svc.store.set_tags(find_uuid(svc, vm), dict(body.tags), actor=who.name)
    # Only the tags changed: the engine keeps the VM's context and binding, so the flows
    # can go out without first reading them back from the store and the engine.
    svc.controller.submit(VmTagsReplaced(stored.uuid, stored.facts))
    return convert.vm_out(stored)
