"""FlowSpec -> the text `ovs-ofctl -O OpenFlow14 add-flows BRIDGE -` accepts.

Built field by field from the typed values, never by splicing user strings into flow text.
"""

from __future__ import annotations

from collections.abc import Iterable

from controller.flows.pipeline import REG_ZONE
from controller.flows.types import (
    CT_FLAG_NAMES,
    Action,
    Conjunction,
    Ct,
    FlowSpec,
    GotoTable,
    MatchField,
    Move,
    Output,
    OutputInPort,
    SetField,
    int_to_ip,
    int_to_mac,
)

_OFCTL_NAME = {"ip_proto": "nw_proto", "ipv4_src": "ip_src", "ipv4_dst": "ip_dst", "icmpv4_type": "icmp_type"}
_NXM_NAME = {
    "eth_src": "NXM_OF_ETH_SRC", "eth_dst": "NXM_OF_ETH_DST", "arp_sha": "NXM_NX_ARP_SHA",
    "arp_tha": "NXM_NX_ARP_THA", "arp_spa": "NXM_OF_ARP_SPA", "arp_tpa": "NXM_OF_ARP_TPA",
    **{f"reg{i}": f"NXM_NX_REG{i}" for i in range(16)},
}
_MAC_FIELDS = {"eth_src", "eth_dst", "arp_sha", "arp_tha"}
_IP_FIELDS = {"ipv4_src", "ipv4_dst", "arp_spa", "arp_tpa"}


def render_value(name: str, value: int) -> str:
    if name in _MAC_FIELDS:
        return int_to_mac(value)
    if name in _IP_FIELDS:
        return int_to_ip(value)
    if name in ("eth_type", "ct_mark") or name.startswith("reg"):
        return f"{value:#x}" if name != "eth_type" else f"0x{value:04x}"
    return str(value)


def render_ct_state(value: int, mask: int | None) -> str:
    mask = 0x3F if mask is None else mask
    return "".join(("+" if value & bit else "-") + name for bit, name in CT_FLAG_NAMES if mask & bit)


def render_match_field(mf: MatchField) -> str:
    name = _OFCTL_NAME.get(mf.name, mf.name)
    if mf.name == "ct_state":
        return f"ct_state={render_ct_state(mf.value, mf.mask)}"
    value = render_value(mf.name, mf.value)
    if mf.mask is None:
        return f"{name}={value}"
    if mf.name in ("tcp_dst", "udp_dst"):
        return f"{name}={mf.value:#x}/{mf.mask:#x}"
    return f"{name}={value}/{render_value(mf.name, mf.mask)}"


def render_action(action: Action) -> str:
    if isinstance(action, Output):
        return f"output:{action.port}"
    if isinstance(action, OutputInPort):
        return "in_port"
    if isinstance(action, SetField):
        return f"set_field:{render_value(action.field, action.value)}->{action.field}"
    if isinstance(action, Move):
        return f"move:{_NXM_NAME[action.src]}[]->{_NXM_NAME[action.dst]}[]"
    if isinstance(action, Conjunction):
        return f"conjunction({action.id},{action.clause}/{action.n_clauses})"
    if isinstance(action, GotoTable):
        return f"goto_table:{action.table}"
    if isinstance(action, Ct):
        zone_bits = REG_ZONE.bits if action.zone_field == REG_ZONE.field else 16
        parts = ["commit"] if action.commit else []
        parts.append(f"zone={_NXM_NAME[action.zone_field]}[0..{zone_bits - 1}]")
        if action.table is not None:
            parts.append(f"table={action.table}")
        if action.set_mark is not None:
            parts.append(f"exec(set_field:{action.set_mark:#x}->ct_mark)")
        return f"ct({','.join(parts)})"
    raise TypeError(f"cannot render {action!r}")


def render_flow(flow: FlowSpec) -> str:
    head = [f"table={flow.table}", f"priority={flow.priority}", f"cookie={flow.cookie:#x}"]
    head += [render_match_field(mf) for mf in flow.match.fields]
    actions = ",".join(render_action(a) for a in flow.actions) or "drop"
    return f"{','.join(head)} actions={actions}"


def render_flows(flows: Iterable[FlowSpec]) -> str:
    """One flow per line, in pipeline order, ready for `ovs-ofctl add-flows`."""
    ordered = sorted(flows, key=lambda f: (f.table, -f.priority, render_flow(f)))
    return "".join(render_flow(f) + "\n" for f in ordered)
