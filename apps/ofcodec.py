"""FlowSpec <-> os-ken OpenFlow messages: the southbound encoder and the flow-dump decoder.

Works with os_ken.ofproto.ofproto_v1_4 / ofproto_v1_4_parser and, unchanged, with the v1_3
pair. Every action means exactly what controller/flows/render.py writes in ovs-ofctl syntax.

Decoding is the inverse of encoding *after* OVS has had the flow: OVS stores flows in its own
canonical form, so the decoder folds every form OVS may hand back (all-ones masks, register
writes as set_field or reg_load, a masked ct_mark write, NXM names for OXM fields) onto the one
FlowSpec we installed. A reconnect with nothing changed must therefore diff to zero flow mods.
Anything Goldilocks never writes raises DecodeError, so the caller treats it as foreign.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from os_ken.ofproto import nicira_ext
from os_ken.ofproto import ofproto_v1_4 as _of14

from controller.flows.pipeline import REG_ZONE
from controller.flows.reconcile import FlowOp, OpKind
from controller.flows.types import (
    FIELD_BITS,
    Action,
    Conjunction,
    Ct,
    FlowSpec,
    GotoTable,
    Match,
    MatchField,
    Move,
    Output,
    OutputInPort,
    SetField,
    int_to_ip,
    int_to_mac,
    ip_to_int,
    mac_to_int,
)

# os-ken takes and returns these as text, every other field as an int.
_MAC_FIELDS = frozenset({"eth_src", "eth_dst", "arp_sha", "arp_tha"})
_IP_FIELDS = frozenset({"ipv4_src", "ipv4_dst", "arp_spa", "arp_tpa"})
# nicira_ext's NXM_CT_RECIRC_NONE: "no recirculation" in the ct action's table byte.
CT_RECIRC_NONE = 255
CT_FLAG_COMMIT = 1  # NX_CT_F_COMMIT
_CT_MARK = "ct_mark"

OsKen = Any  # os-ken ships no type information; its messages are plain objects to us.


class DecodeError(ValueError):
    """A flow or action Goldilocks never writes (the caller replaces such a flow)."""


# ---- values ---------------------------------------------------------------------------------


def to_osken(name: str, value: int) -> int | str:
    """Our int -> the form os-ken's OXM codec expects for `name`."""
    if name in _MAC_FIELDS:
        return int_to_mac(value)
    if name in _IP_FIELDS:
        return int_to_ip(value)
    return value


def from_osken(name: str, value: object) -> int:
    """os-ken's value for `name` (MAC/IP text or int) -> our int."""
    if isinstance(value, int):
        return value
    if isinstance(value, str) and name in _MAC_FIELDS:
        return mac_to_int(value)
    if isinstance(value, str) and name in _IP_FIELDS:
        return ip_to_int(value)
    raise DecodeError(f"unexpected value {value!r} for field {name}")


def _full(name: str) -> int:
    return (1 << FIELD_BITS[name]) - 1


def field_name(name: object) -> str:
    """os-ken's name for a field -> ours; OVS may answer with the NXM header of an OXM field
    (os-ken calls those '<name>_nxm'), which is the same field."""
    if not isinstance(name, str):
        raise DecodeError(f"unknown field header {name!r}")
    for candidate in (name, name.removesuffix("_nxm")):
        if candidate in FIELD_BITS:
            return candidate
    raise DecodeError(f"field {name} is not one Goldilocks uses")


# ---- match ----------------------------------------------------------------------------------


def encode_match(parser: ModuleType, match: Match) -> OsKen:
    kwargs: dict[str, object] = {}
    for mf in match.fields:
        value = to_osken(mf.name, mf.value)
        kwargs[mf.name] = value if mf.mask is None else (value, to_osken(mf.name, mf.mask))
    return parser.OFPMatch(**kwargs)


def decode_match(match: OsKen) -> Match:
    fields = []
    for raw_name, raw in match.items():
        name = field_name(raw_name)
        value, mask = raw if isinstance(raw, tuple) else (raw, None)
        # MatchField drops an all-ones mask and clears value bits outside the mask.
        fields.append(MatchField(name, from_osken(name, value),
                                 None if mask is None else from_osken(name, mask)))
    try:
        return Match.from_fields(fields)
    except ValueError as exc:
        raise DecodeError(str(exc)) from None


# ---- actions: encode ------------------------------------------------------------------------


def encode_action(ofp: ModuleType, parser: ModuleType, action: Action) -> OsKen:
    if isinstance(action, Output):
        return parser.OFPActionOutput(action.port)
    if isinstance(action, OutputInPort):
        return parser.OFPActionOutput(ofp.OFPP_IN_PORT)
    if isinstance(action, SetField):
        return parser.OFPActionSetField(**{action.field: to_osken(action.field, action.value)})
    if isinstance(action, Move):
        return parser.NXActionRegMove(src_field=action.src, dst_field=action.dst,
                                      n_bits=FIELD_BITS[action.dst], src_ofs=0, dst_ofs=0)
    if isinstance(action, Ct):
        return _encode_ct(parser, action)
    if isinstance(action, Conjunction):
        # The wire carries the clause 0-based; ovs-ofctl's conjunction(id,k/n) is 1-based.
        return parser.NXActionConjunction(clause=action.clause - 1, n_clauses=action.n_clauses,
                                          id_=action.id)
    raise TypeError(f"cannot encode {action!r} as an action")


def zone_ofs_nbits(zone_field: str) -> int:
    # Same zone width as render.py: the declared width of the zone register, else 16 bits.
    bits = REG_ZONE.bits if zone_field == REG_ZONE.field else 16
    return nicira_ext.ofs_nbits(0, bits - 1)


def _encode_ct(parser: ModuleType, ct: Ct) -> OsKen:
    inner = [] if ct.set_mark is None else [parser.OFPActionSetField(ct_mark=ct.set_mark)]
    return parser.NXActionCT(
        flags=CT_FLAG_COMMIT if ct.commit else 0, zone_src=ct.zone_field,
        zone_ofs_nbits=zone_ofs_nbits(ct.zone_field),
        recirc_table=CT_RECIRC_NONE if ct.table is None else ct.table, alg=0, actions=inner,
    )


def encode_instructions(ofp: ModuleType, parser: ModuleType,
                        actions: tuple[Action, ...]) -> list[OsKen]:
    """apply_actions, then goto_table last; no actions at all is a drop: no instructions."""
    goto = [a for a in actions if isinstance(a, GotoTable)]
    if len(goto) > 1 or (goto and actions[-1] is not goto[0]):
        raise ValueError(f"goto_table must be the single last action: {actions!r}")
    applied = [encode_action(ofp, parser, a) for a in actions if not isinstance(a, GotoTable)]
    instructions: list[OsKen] = []
    if applied:
        instructions.append(parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, applied))
    if goto:
        instructions.append(parser.OFPInstructionGotoTable(goto[0].table))
    return instructions


# ---- flow mods and dump requests -----------------------------------------------------------


_COMMANDS = {OpKind.ADD: "OFPFC_ADD", OpKind.MODIFY: "OFPFC_MODIFY_STRICT",
             OpKind.DELETE: "OFPFC_DELETE_STRICT"}


def flow_mod(ofp: ModuleType, parser: ModuleType, datapath: OsKen, op: FlowOp) -> OsKen:
    """One flow mod for one planned operation. Permanent flows (no timeouts), no buffered
    packet, flags 0 (no RESET_COUNTS: a strict modify keeps the flow's counters).

    cookie_mask 0: strict modify/delete go by key alone, whatever cookie is installed. Beware:
    in OpenFlow 1.2+ a MODIFY_STRICT never changes the installed cookie (OVS keeps the old
    one); an ADD on the same key does, and OVS keeps its counters (tests/ovs pins both).
    """
    flow = op.flow
    deleting = op.kind is OpKind.DELETE
    return parser.OFPFlowMod(
        datapath, cookie=flow.cookie, cookie_mask=0, table_id=flow.table,
        command=getattr(ofp, _COMMANDS[op.kind]), idle_timeout=0, hard_timeout=0,
        priority=flow.priority, buffer_id=ofp.OFP_NO_BUFFER, out_port=ofp.OFPP_ANY,
        out_group=ofp.OFPG_ANY, flags=0, match=encode_match(parser, flow.match),
        instructions=[] if deleting else encode_instructions(ofp, parser, flow.actions),
    )


def flow_stats_request(ofp: ModuleType, parser: ModuleType, datapath: OsKen, cookie: int,
                       cookie_mask: int) -> OsKen:
    """Dump every table, but only flows under our cookie prefix: others' flows are not ours."""
    return parser.OFPFlowStatsRequest(
        datapath, flags=0, table_id=ofp.OFPTT_ALL, out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY,
        cookie=cookie, cookie_mask=cookie_mask, match=parser.OFPMatch(),
    )


# ---- actions: decode ------------------------------------------------------------------------


def decode_flow_stats(stats: OsKen) -> FlowSpec:
    """One entry of a flow stats reply -> the FlowSpec it holds (timeouts and counters are
    not part of a flow's identity or meaning here)."""
    return FlowSpec(table=stats.table_id, priority=stats.priority,
                    match=decode_match(stats.match),
                    actions=decode_instructions(stats.instructions), cookie=stats.cookie)


def decode_instructions(instructions: list[OsKen]) -> tuple[Action, ...]:
    actions: list[Action] = []
    goto: list[Action] = []
    applied = 0
    for inst in instructions:
        kind = type(inst).__name__
        if kind == "OFPInstructionGotoTable":
            goto.append(GotoTable(inst.table_id))
        elif kind == "OFPInstructionActions" and _is_apply(inst):
            applied += 1
            actions.extend(decode_action(a) for a in inst.actions)
        else:
            what = f"{kind} (type {getattr(inst, 'type', '?')})"
            raise DecodeError(f"instruction {what} is not one Goldilocks writes")
    if applied > 1 or len(goto) > 1:
        raise DecodeError("more than one apply_actions or goto_table instruction")
    return tuple(actions + goto)


def _is_apply(inst: OsKen) -> bool:
    # The decoder takes no ofproto module; OFPIT_APPLY_ACTIONS has one value in OF1.1-1.5.
    return bool(inst.type == _of14.OFPIT_APPLY_ACTIONS)


def decode_action(action: OsKen) -> Action:
    kind = type(action).__name__
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise DecodeError(f"action {kind} is not one Goldilocks writes")
    return decoder(action)


def _decode_output(action: OsKen) -> Action:
    # OFPP_IN_PORT has one value in OF1.1+; max_len only matters for output to CONTROLLER.
    return OutputInPort() if action.port == _of14.OFPP_IN_PORT else Output(action.port)


def _decode_set_field(action: OsKen) -> Action:
    name = field_name(action.key)
    value, mask = action.value if isinstance(action.value, tuple) else (action.value, None)
    mask_int = None if mask is None else from_osken(name, mask)
    return _full_write(name, from_osken(name, value), mask_int)


def _decode_reg_load(action: OsKen) -> Action:
    """load:value->dst[start..end] (NXAST_REG_LOAD): only a whole-field write is ours."""
    name = field_name(action.dst)
    start, nbits = action.ofs_nbits >> 6, (action.ofs_nbits & 0x3F) + 1
    if start != 0 or nbits != FIELD_BITS[name]:
        raise DecodeError(f"partial register load into {name}[{start}..{start + nbits - 1}]")
    return SetField(name, action.value)


def _decode_reg_load2(action: OsKen) -> Action:
    name = field_name(action.dst)
    mask = None if action.mask is None else from_osken(name, action.mask)
    return _full_write(name, from_osken(name, action.value), mask)


def _full_write(name: str, value: int, mask: int | None) -> SetField:
    if mask is not None and mask != _full(name):
        raise DecodeError(f"masked write {value:#x}/{mask:#x} to {name}")
    return SetField(name, value)


def _decode_move(action: OsKen) -> Action:
    src, dst = field_name(action.src_field), field_name(action.dst_field)
    width = FIELD_BITS[dst]
    if action.src_ofs or action.dst_ofs or action.n_bits != width or FIELD_BITS[src] != width:
        raise DecodeError(f"partial move {src}->{dst} ({action.n_bits} bits)")
    return Move(src, dst)


def _decode_conjunction(action: OsKen) -> Action:
    return Conjunction(id=action.id, clause=action.clause + 1, n_clauses=action.n_clauses)


def _decode_ct(action: OsKen) -> Action:
    if action.flags & ~CT_FLAG_COMMIT or action.alg:
        raise DecodeError(f"ct with flags {action.flags:#x} / alg {action.alg}")
    if not action.zone_src:
        raise DecodeError("ct with an immediate zone")
    zone = field_name(action.zone_src)
    if action.zone_ofs_nbits != zone_ofs_nbits(zone):
        bits = nicira_ext.ofs_nbits_str(action.zone_ofs_nbits)
        raise DecodeError(f"ct zone from {zone}{bits}")
    table = None if action.recirc_table == CT_RECIRC_NONE else action.recirc_table
    return Ct(zone_field=zone, commit=bool(action.flags & CT_FLAG_COMMIT), table=table,
              set_mark=_decode_ct_mark(action.actions))


def _decode_ct_mark(inner: list[OsKen]) -> int | None:
    """ct(exec(...)): we only ever write ct_mark, whole (OVS may return it with a full mask)."""
    if not inner:
        return None
    writes = [decode_action(a) for a in inner]
    if len(writes) != 1 or not isinstance(writes[0], SetField) or writes[0].field != _CT_MARK:
        raise DecodeError(f"ct exec actions {writes!r}")
    return writes[0].value


_DECODERS = {
    "OFPActionOutput": _decode_output,
    "OFPActionSetField": _decode_set_field,
    "NXActionRegLoad": _decode_reg_load,
    "NXActionRegLoad2": _decode_reg_load2,
    "NXActionRegMove": _decode_move,
    "NXActionConjunction": _decode_conjunction,
    "NXActionCT": _decode_ct,
}
