"""FlowSpec -> OpenFlow bytes: the southbound encoder for exactly what Goldilocks sends.

os-ken builds a parser object per flow mod, then a bundle-add object around it, and serializes
both through generic, introspective code: over 100 µs per flow, most of an install. This module
writes the same bytes (tests/unit/test_ofwire.py holds them byte-equal to os-ken's) with
struct.pack and precomputed headers, and caches the flow-mod body of each (op kind, FlowSpec):
a FlowSpec is a frozen value, so its encoding never changes, and per message only the xid,
bundle id and flags are packed in front of it.

Messages: OFPT_BUNDLE_CONTROL / OFPT_BUNDLE_ADD_MESSAGE (OpenFlow 1.4), or the ONF bundle
extension's experimenter messages (OpenFlow 1.3), wrapping OFPT_FLOW_MOD (add, modify_strict,
delete_strict); OFPT_BARRIER_REQUEST after the adds and after the commit. The flow-mod body is
the same in 1.3 and 1.4 (1.4's `importance` is 1.3's pad, both 0), so one cache serves both;
only header version bytes differ.

What an action means is ofcodec's business (and render.py's); the two must stay in step, which
the byte-equality test enforces. Decoding flow dumps stays in apps/ofcodec.py.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from os_ken.ofproto import nicira_ext, ofproto_common
from os_ken.ofproto import ofproto_v1_3 as _of13
from os_ken.ofproto import ofproto_v1_4 as _of14

from apps.ofcodec import CT_FLAG_COMMIT, CT_RECIRC_NONE, zone_ofs_nbits
from controller.flows.reconcile import FlowOp, OpKind
from controller.flows.types import (
    FIELD_BITS,
    Action,
    Conjunction,
    Ct,
    FlowSpec,
    GotoTable,
    Match,
    Move,
    Output,
    OutputInPort,
    SetField,
)

OF13, OF14 = _of13.OFP_VERSION, _of14.OFP_VERSION
MAX_XID = _of14.MAX_XID
# Encoded flow-mod bodies kept per op kind: a 100k-flow bridge fits twice over. Past that the
# cache starts again empty (simple, and bounded however long the controller runs).
BODY_CACHE_SIZE = 1 << 18
# Flow mods per socket write: big enough to amortize a queue slot and a syscall, small enough
# that the switch parses the first adds while we still encode the rest.
CHUNK_OPS = 512

_HEADER = struct.Struct("!BBHI")  # ofp_header: version, type, length, xid
_PAD8 = tuple(b"\0" * n for n in range(8))


def _pad8(data: bytes) -> bytes:
    return data + _PAD8[-len(data) % 8]


# ---- OXM fields -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Oxm:
    """One match field's TLV headers. The class/field numbers are os-ken's tables (the one
    place they are declared); the width is FIELD_BITS."""

    size: int  # value bytes
    exact: bytes  # header of the field with no mask
    masked: bytes  # header of value+mask
    encode: Callable[[int, int | None], bytes]  # (value, mask) -> the whole TLV


def _oxm(name: str) -> _Oxm:
    number = _of14.oxm_from_user_header(name)  # (class << 7) | field, as os-ken orders them
    size = FIELD_BITS[name] // 8
    exact = struct.pack("!I", number << 9 | size)
    masked = struct.pack("!I", number << 9 | 1 << 8 | 2 * size)

    def encode(value: int, mask: int | None) -> bytes:  # a closure: no attribute loads per field
        if mask is None:
            return exact + value.to_bytes(size, "big")
        return masked + value.to_bytes(size, "big") + mask.to_bytes(size, "big")

    return _Oxm(size, exact, masked, encode)


_OXM: dict[str, _Oxm] = {name: _oxm(name) for name in FIELD_BITS}
_ENCODE_FIELD = {name: oxm.encode for name, oxm in _OXM.items()}
_MATCH_HEAD = struct.Struct("!HH")  # ofp_match: type OFPMT_OXM, length without padding


def encode_match(match: Match) -> bytes:
    # os-ken writes fields sorted by OXM type (NXM registers first, then OpenFlow basic), which
    # also puts prerequisites first. A TLV starts with its big-endian header, type in the top
    # bits, and no two fields share a type: sorting the TLV bytes is sorting by type.
    tlvs = b"".join(sorted([_ENCODE_FIELD[f.name](f.value, f.mask) for f in match.fields]))
    return _pad8(_MATCH_HEAD.pack(_of14.OFPMT_OXM, 4 + len(tlvs)) + tlvs)


# ---- actions ----------------------------------------------------------------------------------

_OUTPUT = struct.Struct("!HHIH6x")  # type, len, port, max_len
_SET_FIELD_HEAD = struct.Struct("!HH")
_NX_HEAD = struct.Struct("!HHIH")  # OFPAT_EXPERIMENTER, len, NX_VENDOR_ID, subtype
_NX_HEAD_SIZE = _NX_HEAD.size
_REG_MOVE = struct.Struct("!HHH")  # n_bits, src_ofs, dst_ofs; then the two NXM headers
_CONJUNCTION = struct.Struct("!BBI")  # clause (0-based), n_clauses, id
_CT = struct.Struct("!H4sHB3xH")  # flags, zone_src header, zone_ofs_nbits, recirc_table, alg


def _nx(subtype: int, body: bytes) -> bytes:
    length = _NX_HEAD_SIZE + len(body)
    length += -length % 8
    return _pad8(_NX_HEAD.pack(_of14.OFPAT_EXPERIMENTER, length, ofproto_common.NX_EXPERIMENTER_ID,
                               subtype) + body)


def _output(port: int) -> bytes:
    return _OUTPUT.pack(_of14.OFPAT_OUTPUT, _OUTPUT.size, port, _of14.OFPCML_MAX)


def _set_field(field: str, value: int) -> bytes:
    tlv = _OXM[field].encode(value, None)
    length = _SET_FIELD_HEAD.size + len(tlv)
    return _pad8(_SET_FIELD_HEAD.pack(_of14.OFPAT_SET_FIELD, length + -length % 8) + tlv)


def _move(move: Move) -> bytes:
    body = _REG_MOVE.pack(FIELD_BITS[move.dst], 0, 0) + _OXM[move.src].exact + _OXM[move.dst].exact
    return _nx(nicira_ext.NXAST_REG_MOVE, body)


def _conjunction(conj: Conjunction) -> bytes:
    # The wire carries the clause 0-based; ovs-ofctl's conjunction(id,k/n) is 1-based.
    return _nx(nicira_ext.NXAST_CONJUNCTION, _CONJUNCTION.pack(conj.clause - 1, conj.n_clauses, conj.id))


def _ct(ct: Ct) -> bytes:
    inner = b"" if ct.set_mark is None else _set_field("ct_mark", ct.set_mark)
    table = CT_RECIRC_NONE if ct.table is None else ct.table
    body = _CT.pack(CT_FLAG_COMMIT if ct.commit else 0, _OXM[ct.zone_field].exact,
                    zone_ofs_nbits(ct.zone_field), table, 0)
    return _nx(nicira_ext.NXAST_CT, body + inner)


_ACTION_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    Output: lambda a: _output(a.port),
    OutputInPort: lambda a: _output(_of14.OFPP_IN_PORT),
    SetField: lambda a: _set_field(a.field, a.value),
    Move: _move,
    Ct: _ct,
    Conjunction: _conjunction,
}


def encode_action(action: Action) -> bytes:
    encode = _ACTION_ENCODERS.get(type(action))
    if encode is None:
        raise TypeError(f"cannot encode {action!r} as an action")
    return encode(action)


_INSTRUCTION_ACTIONS = struct.Struct("!HH4x")
_GOTO_TABLE = struct.Struct("!HHB3x")


class _Cache(dict[Any, bytes]):
    """A plain dict keyed by the frozen value itself. Not lru_cache: that allocates a key tuple
    and a list node per entry, objects the garbage collector then walks again and again during
    a 100k-flow install (measured: ~40% of the cold encode time went to the GC). Only the
    engine thread encodes."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def keep(self, key: Any, value: bytes) -> bytes:
        if len(self) >= self.size:
            self.clear()
        self[key] = value
        return value


def encode_instructions(actions: tuple[Action, ...]) -> bytes:
    """apply_actions, then goto_table last; no actions at all is a drop: no instructions. Not
    cached by itself: hashing a tuple of action dataclasses by value runs Python code per action
    and costs as much as encoding it (the flow-mod body cache covers a flow sent again)."""
    applied: list[bytes] = []
    goto: GotoTable | None = None
    for action in actions:
        if goto is not None:
            raise ValueError(f"goto_table must be the single last action: {actions!r}")
        if type(action) is GotoTable:
            goto = action
        else:
            applied.append(encode_action(action))
    out = b""
    if applied:
        data = b"".join(applied)
        out = _INSTRUCTION_ACTIONS.pack(_of14.OFPIT_APPLY_ACTIONS, _INSTRUCTION_ACTIONS.size + len(data)) + data
    if goto is not None:
        out += _GOTO_TABLE.pack(_of14.OFPIT_GOTO_TABLE, _GOTO_TABLE.size, goto.table)
    return out


# ---- flow mods --------------------------------------------------------------------------------

# ofp_flow_mod after its header, up to the match: cookie, cookie_mask, table_id, command,
# idle_timeout, hard_timeout, priority, buffer_id, out_port, out_group, flags, importance (1.4;
# pad in 1.3; 0 in both).
_FLOW_MOD = struct.Struct("!QQBBHHHIIIHH")
_ADD, _MODIFY, _DELETE = OpKind.ADD, OpKind.MODIFY, OpKind.DELETE
_BODIES: dict[OpKind, _Cache] = {kind: _Cache(BODY_CACHE_SIZE) for kind in OpKind}
_ADD_BODIES, _MODIFY_BODIES, _DELETE_BODIES = _BODIES[_ADD], _BODIES[_MODIFY], _BODIES[_DELETE]


def flow_mod_body(kind: OpKind, flow: FlowSpec) -> bytes:
    """Everything of the flow mod for `kind` of `flow` after its ofp_header, cached by spec.
    (Kinds are told apart by identity: an Enum's hash is Python code, run per flow.)"""
    cache = _ADD_BODIES if kind is _ADD else _MODIFY_BODIES if kind is _MODIFY else _DELETE_BODIES
    body = cache.get(flow)  # one hash of the spec to find it, one more to keep a new one
    return body if body is not None else cache.keep(flow, _flow_mod_body(kind, flow))


def clear_caches() -> None:
    """Forget every encoding (benchmarks measure a cold install with it)."""
    for cache in _BODIES.values():
        cache.clear()


def _flow_mod_body(kind: OpKind, flow: FlowSpec) -> bytes:
    """Same semantics as ofcodec.flow_mod: permanent, no buffer, flags 0, cookie_mask 0
    (strict modify/delete go by key alone)."""
    command = (_of14.OFPFC_ADD if kind is _ADD else
               _of14.OFPFC_MODIFY_STRICT if kind is _MODIFY else _of14.OFPFC_DELETE_STRICT)
    head = _FLOW_MOD.pack(flow.cookie, 0, flow.table, command, 0, 0, flow.priority,
                          _of14.OFP_NO_BUFFER, _of14.OFPP_ANY, _of14.OFPG_ANY, 0, 0)
    body = head + encode_match(flow.match)
    return body if kind is _DELETE else body + encode_instructions(flow.actions)


# ---- bundles ----------------------------------------------------------------------------------
#
# Beware (checked on OVS 3.1, tests/ovs/test_ofwire_ovs.py): OVS checks each flow mod as it is
# added to a bundle, and one it refuses there is left out of the bundle; a commit would then
# apply the others. Only failures at commit time (e.g. a full table) roll the whole bundle back.
# So a bundle goes in two phases: "staged" (open, the adds, a barrier) and, once the barrier's
# reply shows that no add was refused (a switch answers in order, so every add's error comes
# before it), "commit" (commit, barrier); after a refusal, a discard instead of the commit.


@dataclass(frozen=True)
class _Version:
    """How one OpenFlow version frames bundle messages: OF1.4's own message types, or OF1.3's
    ONF experimenter messages carrying the same bodies."""

    version: int
    flags: int  # atomic | ordered
    open: int
    commit: int
    discard: int
    ctrl_type: int
    add_type: int
    ctrl_head: bytes = b""  # between ofp_header and the bundle-control body
    add_head: bytes = b""  # between ofp_header and the bundle-add body


def _onf(exp_type: int) -> bytes:
    return struct.pack("!II", ofproto_common.ONF_EXPERIMENTER_ID, exp_type)


_VERSIONS = {
    OF14: _Version(OF14, _of14.OFPBF_ATOMIC | _of14.OFPBF_ORDERED, _of14.OFPBCT_OPEN_REQUEST,
                   _of14.OFPBCT_COMMIT_REQUEST, _of14.OFPBCT_DISCARD_REQUEST,
                   _of14.OFPT_BUNDLE_CONTROL, _of14.OFPT_BUNDLE_ADD_MESSAGE),
    OF13: _Version(OF13, _of13.ONF_BF_ATOMIC | _of13.ONF_BF_ORDERED, _of13.ONF_BCT_OPEN_REQUEST,
                   _of13.ONF_BCT_COMMIT_REQUEST, _of13.ONF_BCT_DISCARD_REQUEST,
                   _of13.OFPT_EXPERIMENTER, _of13.OFPT_EXPERIMENTER,
                   _onf(_of13.ONF_ET_BUNDLE_CONTROL), _onf(_of13.ONF_ET_BUNDLE_ADD_MESSAGE)),
}
_BUNDLE_CTRL = struct.Struct("!IHH")  # bundle_id, type, flags
_BUNDLE_ADD = struct.Struct("!I2xH")  # bundle_id, pad, flags; then the inner message


class BundleEncoder:
    """The messages of one atomic, ordered bundle, for one OpenFlow version and bundle id."""

    def __init__(self, version: int, bundle_id: int) -> None:
        v = _VERSIONS.get(version)
        if v is None:
            raise ValueError(f"no bundles in OpenFlow version {version:#x}")
        self._v, self._id = v, bundle_id & 0xFFFFFFFF
        ctrl_len = _HEADER.size + len(v.ctrl_head) + _BUNDLE_CTRL.size
        self._ctrl = struct.Struct(f"!BBHI{len(v.ctrl_head)}s" + _BUNDLE_CTRL.format[1:])
        self._ctrl_fixed = (v.version, v.ctrl_type, ctrl_len)
        # ofp_header, [ONF experimenter head], bundle-add body, then the inner flow mod's header;
        # both xids are the same (OF1.4.0 7.3.9.2, ONF bundle extension 3.3).
        self._add = struct.Struct(f"!BBHI{len(v.add_head)}s" + _BUNDLE_ADD.format[1:]
                                  + _HEADER.format[1:])
        self._add_size = self._add.size - _HEADER.size  # outer length = this + inner length

    def open(self, xid: int) -> bytes:
        return self._control(xid, self._v.open)

    def commit(self, xid: int) -> bytes:
        return self._control(xid, self._v.commit)

    def discard(self, xid: int) -> bytes:
        return self._control(xid, self._v.discard)

    def _control(self, xid: int, what: int) -> bytes:
        return self._ctrl.pack(*self._ctrl_fixed, xid, self._v.ctrl_head, self._id, what, self._v.flags)

    def add(self, xid: int, op: FlowOp) -> bytes:
        body = flow_mod_body(op.kind, op.flow)
        inner = _HEADER.size + len(body)
        v = self._v
        return self._add.pack(v.version, v.add_type, self._add_size + inner, xid, v.add_head,
                              self._id, v.flags, v.version, _of14.OFPT_FLOW_MOD, inner, xid) + body

    def barrier(self, xid: int) -> bytes:
        return _HEADER.pack(self._v.version, _of14.OFPT_BARRIER_REQUEST, _HEADER.size, xid)


@dataclass(frozen=True)
class BundleXids:
    """The xids of one bundle's messages, one consecutive block, so every reply (an error names
    the xid of the add it refuses) can be matched before anything is sent: open, one per op,
    the staged barrier, commit, the final barrier. A discard is sent instead of the commit,
    never with it, so it takes the commit's xid."""

    first: int
    n_ops: int

    def open(self) -> int:
        return self.first

    def op(self, i: int) -> int:
        return (self.first + 1 + i) & MAX_XID

    def staged(self) -> int:
        return (self.first + 1 + self.n_ops) & MAX_XID

    def commit(self) -> int:
        return (self.first + 2 + self.n_ops) & MAX_XID

    def discard(self) -> int:
        return self.commit()

    def barrier(self) -> int:
        return (self.first + 3 + self.n_ops) & MAX_XID

    def ops(self, ops: Sequence[FlowOp]) -> dict[int, FlowOp]:
        return {self.op(i): op for i, op in enumerate(ops)}

    @staticmethod
    def count(n_ops: int) -> int:
        return n_ops + 4


def reserve_xids(datapath: Any, n_ops: int) -> BundleXids:
    """A bundle's block of xids, taken from an os-ken datapath's own counter (the one its
    set_xid advances), so no other message of this connection reuses one of them."""
    first = (datapath.xid + 1) & MAX_XID
    datapath.xid = (datapath.xid + BundleXids.count(n_ops)) & MAX_XID
    return BundleXids(first, n_ops)


def encode_staged(version: int, bundle_id: int, xids: BundleXids, ops: Sequence[FlowOp],
                  chunk_ops: int = CHUNK_OPS) -> Iterator[bytes]:
    """Phase one: open, one add per op, the staged barrier; as buffers of up to `chunk_ops`
    adds each, so the caller can write the first while the rest is still being encoded."""
    enc = BundleEncoder(version, bundle_id)
    return _chunks(enc, xids, ops, enc.barrier(xids.staged()), chunk_ops)


def encode_direct(version: int, bundle_id: int, xids: BundleXids, ops: Sequence[FlowOp],
                  chunk_ops: int = CHUNK_OPS) -> Iterator[bytes]:
    """One phase: open, one add per op, the commit and the final barrier (the staged barrier's
    xid stays unused). Only for ops of shapes the switch has accepted before (`flow_shape`)."""
    enc = BundleEncoder(version, bundle_id)
    return _chunks(enc, xids, ops, enc.commit(xids.commit()) + enc.barrier(xids.barrier()), chunk_ops)


def _chunks(enc: BundleEncoder, xids: BundleXids, ops: Sequence[FlowOp], tail: bytes,
            chunk_ops: int) -> Iterator[bytes]:
    chunk = [enc.open(xids.open())]
    add, first = enc.add, xids.first + 1
    for i, op in enumerate(ops):
        chunk.append(add((first + i) & MAX_XID, op))
        if len(chunk) >= chunk_ops:
            yield b"".join(chunk)
            chunk = []
    chunk.append(tail)
    yield b"".join(chunk)


# ---- what the switch has accepted -------------------------------------------------------------

# Fields whose value decides which other fields and actions a flow may use (OVS checks those
# prerequisites when it parses a flow mod): their values are part of a shape, other values not.
_PREREQUISITE_FIELDS = frozenset({"eth_type", "ip_proto"})

Shape = tuple[int, tuple[tuple[str, Any], ...], tuple[tuple[Any, ...], ...]]


_ACTION_SHAPES: dict[type, Callable[[Any], tuple[Any, ...]]] = {
    Output: lambda a: ("output", a.port >= _of14.OFPP_MAX),
    OutputInPort: lambda a: ("output_in_port",),
    SetField: lambda a: ("set_field", a.field),
    Move: lambda a: ("move", a.src, a.dst),
    Ct: lambda a: ("ct", a.zone_field, a.commit, a.table, a.set_mark is not None),
    Conjunction: lambda a: ("conjunction", a.clause, a.n_clauses),
    GotoTable: lambda a: ("goto_table", a.table),
}


def flow_shape(flow: FlowSpec) -> Shape:
    """What a switch's acceptance of a flow mod depends on: the table, which fields it matches
    (masked or not, with the values of prerequisite fields), and its actions without their
    addresses, ports, ids or register values. Open vSwitch refuses a flow mod for its form
    (prerequisites, datapath features such as conntrack, action consistency), and a form it
    accepted once it accepts again. (Written for speed: the app learns the shapes of every
    flow of a committed bundle, 10k flows after a first install.)"""
    prerequisites = _PREREQUISITE_FIELDS
    fields = tuple([(f.name, f.value) if f.name in prerequisites else (f.name, f.mask is not None)
                    for f in flow.match.fields])
    return flow.table, fields, tuple([_ACTION_SHAPES[type(a)](a) for a in flow.actions])


def encode_commit(version: int, bundle_id: int, xids: BundleXids) -> bytes:
    """Phase two when the switch refused nothing: commit, then the final barrier."""
    enc = BundleEncoder(version, bundle_id)
    return enc.commit(xids.commit()) + enc.barrier(xids.barrier())


def encode_discard(version: int, bundle_id: int, xids: BundleXids) -> bytes:
    """Phase two when the switch refused an add: the bundle is dropped, nothing applied."""
    return BundleEncoder(version, bundle_id).discard(xids.discard())
