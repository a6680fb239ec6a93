"""Receive-path guard: reject malformed OpenFlow messages before os-ken parses them.

os-ken 4.2.2's parsers walk nested TLVs with loops of the form
``while offset < end: elem = parse(buf, offset); offset += elem.length``; an element
whose length field is 0 makes such a loop spin forever (a published 2024 Ryu issue:
``OFPHello`` with a zero-length element, zero-length buckets, instructions, flow-stats
entries, port/table-feature properties...). A switch, or anything that reaches the
OpenFlow port, can thereby hang the thread reading its connection and burn a CPU.

``check_message`` is a pure, bounded validator for ONE complete OpenFlow 1.3 (0x04) or
1.4 (0x05) message, header included. It is an *allowlist*: only the message types (and
multipart reply types) the controller needs from a switch are accepted, and every nested
TLV is walked with exactly the boundaries os-ken's parser will use. Every walk checks
that a length is at least its type's minimum (so each iteration advances by >= 4 bytes),
is a multiple of 8 where the spec says so, and that the element fits inside its parent.

``install_guard`` wraps ``os_ken.ofproto.ofproto_parser.msg`` (which
``Datapath._recv_loop`` looks up at call time) so that a message failing the check is
logged and its connection closed; other connections are untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

Reason = str | None
Check = Callable[[bytes, int, int], Reason]  # (data, element offset, element length)

OFP13: Final = 0x04
OFP14: Final = 0x05
HEADER_SIZE: Final = 8
MULTIPART_HEADER_SIZE: Final = 16
NX_EXPERIMENTER_ID: Final = 0x00002320

_MSG_NAMES: Final[Mapping[int, str]] = {
    0: "HELLO", 1: "ERROR", 2: "ECHO_REQUEST", 3: "ECHO_REPLY", 4: "EXPERIMENTER",
    6: "FEATURES_REPLY", 8: "GET_CONFIG_REPLY", 10: "PACKET_IN", 11: "FLOW_REMOVED",
    12: "PORT_STATUS", 19: "MULTIPART_REPLY", 21: "BARRIER_REPLY", 25: "ROLE_REPLY",
    27: "GET_ASYNC_REPLY", 30: "ROLE_STATUS", 31: "TABLE_STATUS", 32: "REQUESTFORWARD",
    33: "BUNDLE_CONTROL",
}


def _u16(data: bytes, off: int) -> int:
    return int.from_bytes(data[off:off + 2], "big")


def _u32(data: bytes, off: int) -> int:
    return int.from_bytes(data[off:off + 4], "big")


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


# ---------------------------------------------------------------------------
# Generic TLV walk


@dataclass(frozen=True)
class Tlv:
    """How to walk a list of length-prefixed elements, the way os-ken's parser does."""

    name: str
    len_at: int  # offset of the big-endian u16 length inside the element
    min_len: int  # >= 4: every iteration advances by at least this much
    multiple: int = 1  # the length must be a multiple of this
    padded: bool = False  # advance by the length rounded up to 8 (ofp properties)


def walk(data: bytes, start: int, end: int, spec: Tlv, check: Check | None = None) -> Reason:
    """Walk elements in data[start:end]; each must be well-formed and fit exactly."""
    off = start
    while off < end:
        if off + max(spec.len_at + 2, 4) > end:
            return f"{spec.name} at offset {off}: {end - off} bytes left, header truncated"
        length = _u16(data, off + spec.len_at)
        if length < spec.min_len:
            return f"{spec.name} at offset {off}: length {length} < minimum {spec.min_len}"
        if length % spec.multiple:
            return f"{spec.name} at offset {off}: length {length} not a multiple of {spec.multiple}"
        step = _round8(length) if spec.padded else length
        if off + step > end:
            return f"{spec.name} at offset {off}: length {step} overruns its parent (ends at {end})"
        reason = check(data, off, length) if check else None
        if reason:
            return reason
        off += step
    return None


def fixed_entries(data: bytes, start: int, end: int, name: str, size: int) -> Reason:
    """A body of fixed-size entries."""
    if (end - start) % size:
        return f"{name} at offset {start}: body of {end - start} bytes is not n * {size}"
    return None


def exact(data: bytes, start: int, end: int, name: str, size: int) -> Reason:
    if end - start != size:
        return f"{name} at offset {start}: {end - start} bytes, expected {size}"
    return None


# ---------------------------------------------------------------------------
# OXM match


def _check_oxm(data: bytes, off: int, end: int) -> tuple[int, Reason]:
    """One OXM TLV at off; returns (its size, reason)."""
    if off + 4 > end:
        return 0, f"OXM at offset {off}: header truncated"
    header = _u32(data, off)
    oxm_class, hasmask, oxm_len = header >> 16, (header >> 8) & 1, header & 0xFF
    exp_hdr = 0
    if oxm_class == 0xFFFF:
        exp_hdr = 6 if (header >> 9) & 0x7F == 0 else 4
    value_len = oxm_len - exp_hdr
    if hasmask:
        if value_len % 2:
            return 0, f"OXM at offset {off}: masked value length {value_len} is odd"
        value_len //= 2
    if value_len <= 0:
        return 0, f"OXM at offset {off}: payload length {oxm_len} leaves no value"
    if off + 4 + oxm_len > end:
        return 0, f"OXM at offset {off}: length {oxm_len} overruns its parent (ends at {end})"
    return 4 + oxm_len, None


def check_match(data: bytes, off: int, end: int) -> tuple[int, Reason]:
    """ofp_match at off inside [off, end); returns (padded size, reason)."""
    if off + 4 > end:
        return 0, f"ofp_match at offset {off}: header truncated"
    mtype, length = _u16(data, off), _u16(data, off + 2)
    if mtype != 1:
        return 0, f"ofp_match at offset {off}: type {mtype} is not OFPMT_OXM"
    if length < 4:
        return 0, f"ofp_match at offset {off}: length {length} < minimum 4"
    if off + _round8(length) > end:
        return 0, f"ofp_match at offset {off}: length {length} overruns its parent (ends at {end})"
    pos, stop = off + 4, off + length
    while pos < stop:
        size, reason = _check_oxm(data, pos, stop)
        if reason:
            return 0, reason
        pos += size  # size >= 5
    return _round8(length), None


# ---------------------------------------------------------------------------
# Actions and instructions

ACTION = Tlv("action", len_at=2, min_len=8, multiple=8)
INSTRUCTION = Tlv("instruction", len_at=2, min_len=8, multiple=8)

# type -> exact length of the fixed-size OpenFlow 1.3/1.4 actions
_FIXED_ACTIONS: Final[Mapping[int, int]] = {
    0: 16, 11: 8, 12: 8, 15: 8, 16: 8, 17: 8, 18: 8, 19: 8, 20: 8,
    21: 8, 22: 8, 23: 8, 24: 8, 26: 8, 27: 8,
}
_SET_FIELD: Final = 25
_EXPERIMENTER: Final = 0xFFFF
# Nicira subtypes whose os-ken parsers contain no length-driven loop (or, for CT,
# one we validate): LEARN (16) and CONTROLLER2 (37) walk nested TLVs and are refused.
_NX_SUBTYPES: Final = frozenset(
    {1, 2, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15, 17, 18, 19, 20, 21, 23, 24, 25, 26,
     27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 38, 39, 43, 48}
)
_NX_CT: Final = 35
_NX_CT_HEADER: Final = 24


def check_action(data: bytes, off: int, length: int) -> Reason:
    atype = _u16(data, off)
    if atype in _FIXED_ACTIONS:
        want = _FIXED_ACTIONS[atype]
        return None if length == want else (
            f"action type {atype} at offset {off}: length {length}, expected {want}")
    if atype == _SET_FIELD:
        return _check_oxm(data, off + 4, off + length)[1]
    if atype == _EXPERIMENTER:
        return _check_nx_action(data, off, length)
    return f"action at offset {off}: type {atype} not allowed"


def _check_nx_action(data: bytes, off: int, length: int) -> Reason:
    if length < 16:
        return f"experimenter action at offset {off}: length {length} < minimum 16"
    experimenter, subtype = _u32(data, off + 4), _u16(data, off + 8)
    if experimenter != NX_EXPERIMENTER_ID or subtype not in _NX_SUBTYPES:
        return (f"experimenter action at offset {off}: experimenter {experimenter:#x} "
                f"subtype {subtype} not allowed")
    if subtype != _NX_CT:
        return None
    if length < _NX_CT_HEADER:
        return f"NX ct action at offset {off}: length {length} < minimum {_NX_CT_HEADER}"
    return walk(data, off + _NX_CT_HEADER, off + length, ACTION, check_action)


def _check_actions_in(data: bytes, start: int, end: int) -> Reason:
    return walk(data, start, end, ACTION, check_action)


_INSTRUCTION_SIZES: Final[Mapping[int, int]] = {1: 8, 2: 24, 6: 8}  # goto, metadata, meter
_ACTION_INSTRUCTIONS: Final = frozenset({3, 4, 5})  # write, apply, clear actions


def check_instruction(data: bytes, off: int, length: int) -> Reason:
    itype = _u16(data, off)
    if itype in _INSTRUCTION_SIZES:
        want = _INSTRUCTION_SIZES[itype]
        return None if length == want else (
            f"instruction type {itype} at offset {off}: length {length}, expected {want}")
    if itype in _ACTION_INSTRUCTIONS:
        return _check_actions_in(data, off + 8, off + length)
    return f"instruction at offset {off}: type {itype} not allowed"


# ---------------------------------------------------------------------------
# Properties (OpenFlow 1.4 style: type, length excluding padding, padded to 8)

EXPERIMENTER_PROP_MIN: Final = 12


def props(name: str, minimums: Mapping[int, int]) -> Callable[[bytes, int, int], Reason]:
    """A checker for a property list; minimums maps each allowed type to its minimum length."""
    spec = Tlv(f"{name} property", len_at=2, min_len=4, padded=True)

    def check(data: bytes, off: int, length: int) -> Reason:
        ptype = _u16(data, off)
        if ptype not in minimums:
            return f"{name} property at offset {off}: type {ptype} not allowed"
        if length < minimums[ptype]:
            return (f"{name} property type {ptype} at offset {off}: "
                    f"length {length} < minimum {minimums[ptype]}")
        return None

    def run(data: bytes, start: int, end: int) -> Reason:
        return walk(data, start, end, spec, check)

    return run


_PORT_PROPS = props("port", {0: 32, 1: 40, 0xFFFF: EXPERIMENTER_PROP_MIN})
_PORT_STATS_PROPS = props("port stats", {0: 40, 1: 44, 0xFFFF: EXPERIMENTER_PROP_MIN})
_TABLE_DESC_PROPS = props("table desc", {2: 8, 3: 8, 0xFFFF: EXPERIMENTER_PROP_MIN})
_ROLE_PROPS = props("role status", {0xFFFF: EXPERIMENTER_PROP_MIN})
_BUNDLE_PROPS = props("bundle", {0xFFFF: EXPERIMENTER_PROP_MIN})

# ---------------------------------------------------------------------------
# Multipart bodies

FLOW_STATS = Tlv("flow stats entry", len_at=0, min_len=56, multiple=8)
FLOW_STATS_FIXED: Final = 48
GROUP_DESC = Tlv("group desc entry", len_at=0, min_len=8, multiple=8)
BUCKET = Tlv("bucket", len_at=0, min_len=16, multiple=8)
PORT14 = Tlv("port", len_at=4, min_len=40, multiple=8)  # port_no precedes length
PORT_STATS14 = Tlv("port stats entry", len_at=0, min_len=80, multiple=8)
TABLE_FEATURES = Tlv("table features entry", len_at=0, min_len=64, multiple=8)
TABLE_FEATURE_PROP = Tlv("table feature property", len_at=2, min_len=4, padded=True)
FEATURE_ID = Tlv("instruction/action id", len_at=2, min_len=4)


def check_flow_stats(data: bytes, off: int, length: int) -> Reason:
    end = off + length
    match_size, reason = check_match(data, off + FLOW_STATS_FIXED, end)
    if reason:
        return reason
    return walk(data, off + FLOW_STATS_FIXED + match_size, end, INSTRUCTION, check_instruction)


def check_bucket(data: bytes, off: int, length: int) -> Reason:
    return _check_actions_in(data, off + 16, off + length)


def check_group_desc(data: bytes, off: int, length: int) -> Reason:
    return walk(data, off + 8, off + length, BUCKET, check_bucket)


def check_port14(data: bytes, off: int, length: int) -> Reason:
    return _PORT_PROPS(data, off + 40, off + length)


def check_port_stats14(data: bytes, off: int, length: int) -> Reason:
    return _PORT_STATS_PROPS(data, off + 80, off + length)


def _check_oxm_ids(data: bytes, start: int, end: int) -> Reason:
    pos = start
    while pos < end:
        if pos + 4 > end:
            return f"OXM id at offset {pos}: header truncated"
        size = 8 if _u16(data, pos) == 0xFFFF else 4
        if pos + size > end:
            return f"OXM id at offset {pos}: overruns its parent (ends at {end})"
        pos += size
    return None


def _check_feature_id(data: bytes, off: int, length: int) -> Reason:
    if _u16(data, off) == 0xFFFF and length < 8:
        return f"experimenter id at offset {off}: length {length} < minimum 8"
    return None


_INSTRUCTION_ID_PROPS: Final = frozenset({0, 1, 4, 5, 6, 7})
_NEXT_TABLES_PROPS: Final = frozenset({2, 3})
_OXM_ID_PROPS: Final = frozenset({8, 10, 12, 13, 14, 15})
_EXPERIMENTER_PROPS: Final = frozenset({0xFFFE, 0xFFFF})


def check_table_feature_prop(data: bytes, off: int, length: int) -> Reason:
    ptype, start, end = _u16(data, off), off + 4, off + length
    if ptype in _INSTRUCTION_ID_PROPS:
        return walk(data, start, end, FEATURE_ID, _check_feature_id)
    if ptype in _OXM_ID_PROPS:
        return _check_oxm_ids(data, start, end)
    if ptype in _NEXT_TABLES_PROPS:
        return None
    if ptype in _EXPERIMENTER_PROPS:
        return None if length >= EXPERIMENTER_PROP_MIN else (
            f"table feature property at offset {off}: length {length} < minimum 12")
    return f"table feature property at offset {off}: type {ptype} not allowed"


def check_table_features(data: bytes, off: int, length: int) -> Reason:
    return walk(data, off + 64, off + length, TABLE_FEATURE_PROP, check_table_feature_prop)


Body = Callable[[bytes, int, int], Reason]  # (data, body start, body end)


def _tlvs(spec: Tlv, check: Check) -> Body:
    return lambda data, start, end: walk(data, start, end, spec, check)


def _fixed(name: str, size: int) -> Body:
    return lambda data, start, end: fixed_entries(data, start, end, name, size)


def _single(name: str, size: int) -> Body:
    return lambda data, start, end: exact(data, start, end, name, size)


_COMMON_MULTIPART: Final[Mapping[int, Body]] = {
    0: _single("DESC", 1056),
    1: _tlvs(FLOW_STATS, check_flow_stats),
    2: _single("AGGREGATE", 24),
    3: _fixed("TABLE stats entry", 24),
    7: _tlvs(GROUP_DESC, check_group_desc),
    8: _single("GROUP_FEATURES", 40),
    11: _single("METER_FEATURES", 16),
    12: _tlvs(TABLE_FEATURES, check_table_features),
}
MULTIPART_BODIES: Final[Mapping[int, Mapping[int, Body]]] = {
    OFP13: {**_COMMON_MULTIPART, 4: _fixed("PORT_STATS entry", 112),
            13: _fixed("PORT_DESC entry", 64)},
    OFP14: {**_COMMON_MULTIPART, 4: _tlvs(PORT_STATS14, check_port_stats14),
            13: _tlvs(PORT14, check_port14)},
}


# ---------------------------------------------------------------------------
# Messages

HELLO_ELEMENT = Tlv("hello element", len_at=2, min_len=4)  # os-ken advances by length


def _check_hello_element(data: bytes, off: int, length: int) -> Reason:
    etype = _u16(data, off)
    return None if etype == 1 else f"hello element at offset {off}: type {etype} not allowed"


def _hello(data: bytes, version: int) -> Reason:
    if version < OFP13:  # os-ken ignores the body of pre-1.3 hellos
        return None
    return walk(data, HEADER_SIZE, len(data), HELLO_ELEMENT, _check_hello_element)


def _error(data: bytes, version: int) -> Reason:
    if len(data) < 12:
        return f"length {len(data)} < minimum 12"
    if _u16(data, 8) == 0xFFFF and len(data) < 16:
        return f"experimenter error: length {len(data)} < minimum 16"
    return None


def _at_least(size: int) -> Callable[[bytes, int], Reason]:
    return lambda data, version: None if len(data) >= size else (
        f"length {len(data)} < minimum {size}")


def _exactly(size: int) -> Callable[[bytes, int], Reason]:
    return lambda data, version: None if len(data) == size else (
        f"length {len(data)}, expected {size}")


def _packet_in(data: bytes, version: int) -> Reason:
    size, reason = check_match(data, 24, len(data))
    if reason:
        return reason
    if 24 + size + 2 > len(data):
        return f"packet data offset {24 + size + 2} beyond the message end {len(data)}"
    return None


def _flow_removed(data: bytes, version: int) -> Reason:
    return check_match(data, 48, len(data))[1]


def _port_status(data: bytes, version: int) -> Reason:
    if version == OFP13:
        return None if len(data) == 80 else f"length {len(data)}, expected 80"
    if len(data) < 16 + 40:
        return f"length {len(data)} < minimum 56"
    port_len = _u16(data, 16 + PORT14.len_at)
    if 16 + port_len != len(data):
        return f"port at offset 16: length {port_len} does not fill the message"
    return walk(data, 16, len(data), PORT14, check_port14)


def _multipart_reply(data: bytes, version: int) -> Reason:
    if len(data) < MULTIPART_HEADER_SIZE:
        return f"length {len(data)} < minimum {MULTIPART_HEADER_SIZE}"
    mp_type = _u16(data, 8)
    body = MULTIPART_BODIES[version].get(mp_type)
    if body is None:
        return f"multipart type {mp_type} not allowed"
    reason = body(data, MULTIPART_HEADER_SIZE, len(data))
    return f"multipart type {mp_type}: {reason}" if reason else None


def _role_status(data: bytes, version: int) -> Reason:
    if len(data) < 24:
        return f"length {len(data)} < minimum 24"
    return _ROLE_PROPS(data, 24, len(data))


def _table_status(data: bytes, version: int) -> Reason:
    if len(data) < 24:
        return f"length {len(data)} < minimum 24"
    desc_len = _u16(data, 16)
    if desc_len < 8 or 16 + desc_len != len(data):
        return f"table desc at offset 16: length {desc_len} does not fill the message"
    return _TABLE_DESC_PROPS(data, 24, len(data))


def _bundle_control(data: bytes, version: int) -> Reason:
    if len(data) < 16:
        return f"length {len(data)} < minimum 16"
    return _BUNDLE_PROPS(data, 16, len(data))


ONF_EXPERIMENTER_ID: Final = 0x4F4E4600
ONF_ET_BUNDLE_CONTROL: Final = 2300


def _onf_bundle_control(data: bytes, version: int) -> Reason:
    """OpenFlow 1.3 answers our bundles with the ONF extension; nothing else experimental passes."""
    if len(data) < 24:
        return f"length {len(data)} < minimum 24"
    experimenter, exp_type = _u32(data, 8), _u32(data, 12)
    if experimenter != ONF_EXPERIMENTER_ID or exp_type != ONF_ET_BUNDLE_CONTROL:
        return f"experimenter {experimenter:#x} type {exp_type}: only the ONF bundle control reply is allowed"
    return _BUNDLE_PROPS(data, 24, len(data))


MessageCheck = Callable[[bytes, int], Reason]  # (whole message, version)

_COMMON_MESSAGES: Final[Mapping[int, MessageCheck]] = {
    0: _hello, 1: _error, 2: _at_least(8), 3: _at_least(8), 6: _exactly(32),
    8: _exactly(12), 10: _packet_in, 11: _flow_removed, 12: _port_status,
    19: _multipart_reply, 21: _exactly(8), 25: _exactly(24),
}
MESSAGES: Final[Mapping[int, Mapping[int, MessageCheck]]] = {
    OFP13: {**_COMMON_MESSAGES, 4: _onf_bundle_control},
    OFP14: {**_COMMON_MESSAGES, 30: _role_status, 31: _table_status, 33: _bundle_control},
}
HELLO_VERSIONS: Final = range(0x01, 0x07)  # os-ken has parsers for 1.0 .. 1.5


def check_message(data: bytes) -> str | None:
    """None if one complete OpenFlow message is safe to hand to os-ken, else why not."""
    if len(data) < HEADER_SIZE:
        return f"message of {len(data)} bytes is shorter than the OpenFlow header"
    version, msg_type, length = data[0], data[1], _u16(data, 2)
    name = _MSG_NAMES.get(msg_type, f"type {msg_type}")
    if length != len(data):
        return f"{name}: header length {length} != message size {len(data)}"
    if msg_type == 0 and version in HELLO_VERSIONS:
        check: MessageCheck | None = _hello
    elif version not in MESSAGES:
        return f"{name}: OpenFlow version {version:#04x} not allowed"
    else:
        check = MESSAGES[version].get(msg_type)
    if check is None:
        return f"{name} (version {version:#04x}): message type not allowed"
    reason = check(bytes(data), version)
    return f"{name} (version {version:#04x}): {reason}" if reason else None


# ---------------------------------------------------------------------------
# Hook into os-ken's receive path

_GUARD_MARK: Final = "_goldilocks_guard"
_LOG = logging.getLogger(__name__)


def _describe(datapath: Any) -> str:
    dpid = getattr(datapath, "id", None)
    dpid_str = f"{dpid:016x}" if isinstance(dpid, int) else "unknown"
    return f"address={getattr(datapath, 'address', None)} dpid={dpid_str}"


def _close(datapath: Any) -> None:
    """Mark the datapath DEAD (ends _recv_loop; _deactivate then closes the socket)."""
    close = getattr(datapath, "close", None)
    if close is None:
        return
    try:
        close()
    except OSError:
        pass


def _is_dead(datapath: Any) -> bool:
    from os_ken.controller.handler import DEAD_DISPATCHER

    return getattr(datapath, "state", None) == DEAD_DISPATCHER


def guarded(original: Callable[..., Any], log: logging.Logger) -> Callable[..., Any]:
    def msg(datapath: Any, version: int, msg_type: int, msg_len: int, xid: int,
            buf: bytes | bytearray) -> Any:
        if _is_dead(datapath):
            return None  # already rejected: drop whatever is left in the buffer
        reason = check_message(bytes(buf))
        if reason is None:
            return original(datapath, version, msg_type, msg_len, xid, buf)
        log.warning("closing OpenFlow connection %s: malformed message: %s",
                    _describe(datapath), reason)
        _close(datapath)
        return None

    setattr(msg, _GUARD_MARK, original)
    return msg


def install_guard(log: logging.Logger | None = None) -> None:
    """Wrap os_ken.ofproto.ofproto_parser.msg with check_message (idempotent)."""
    from os_ken.ofproto import ofproto_parser

    if hasattr(ofproto_parser.msg, _GUARD_MARK):
        return
    ofproto_parser.msg = guarded(ofproto_parser.msg, log or _LOG)


def uninstall_guard() -> None:
    """Restore os-ken's own parser entry point (for tests)."""
    from os_ken.ofproto import ofproto_parser

    original = getattr(ofproto_parser.msg, _GUARD_MARK, None)
    if original is not None:
        ofproto_parser.msg = original
