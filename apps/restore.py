"""Put a saved flow table back onto a switch whose table is empty, before the controller is up.

The controller takes about a second to import os-ken and SQLAlchemy. A switch that restarted
while the controller was down (fail_mode=secure: its table is empty, so it forwards nothing)
would wait all that time, and then for the full controller's reconcile. This module serves such
a switch first, on a connection the caller has made (controller/warmstart.py dials the bridge's
management socket): it shakes hands, tells the caller what the switch is (SwitchView), lets it
choose what to install, installs that in one atomic OpenFlow 1.4 bundle and closes the
connection. The flows stay; the full controller reconciles the bridge as on any start.

Standard library only, on purpose: importing this must cost milliseconds (a test holds
`goldilocks run` to no os_ken or sqlalchemy in sys.modules, nor dataclasses, typing, logging or
socket: together those cost ~40 ms of a start that puts 800 flows back in ~70 ms, so values here
are named tuples, and the caller hands in a plain _socket). So the OpenFlow constants it needs
are declared here, with the spec's names; a test checks every value against os-ken's
ofproto_v1_4. It speaks only OpenFlow 1.4 (bundles are native there); a switch speaking another
version is left alone.

Bundles go in two phases, as apps/ofwire.py explains: OVS checks each flow mod as it is added
and leaves a refused one out of the bundle, so a blind commit would apply the rest. Here the adds
are followed by a barrier; an error before its reply gets a discard, otherwise a commit.
"""

from __future__ import annotations

import select
import struct
import time
from collections import deque, namedtuple
from collections.abc import Sequence

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see above)
if TYPE_CHECKING:
    import _socket
    from collections.abc import Callable, Iterable

# ---- OpenFlow 1.4 constants (names from the spec; values checked against os-ken by a test) --

OFP_VERSION = 0x05
OFP_HEADER_SIZE = 8

OFPT_HELLO = 0
OFPT_ERROR = 1
OFPT_ECHO_REQUEST = 2
OFPT_ECHO_REPLY = 3
OFPT_FEATURES_REQUEST = 5
OFPT_FEATURES_REPLY = 6
OFPT_FLOW_MOD = 14
OFPT_MULTIPART_REQUEST = 18
OFPT_MULTIPART_REPLY = 19
OFPT_BARRIER_REQUEST = 20
OFPT_BARRIER_REPLY = 21
OFPT_BUNDLE_CONTROL = 33
OFPT_BUNDLE_ADD_MESSAGE = 34

OFPHET_VERSIONBITMAP = 1

OFPMP_AGGREGATE = 2
OFPMP_PORT_DESC = 13
OFPMPF_REPLY_MORE = 1 << 0

OFPP_MAX = 0xFFFFFF00
OFPP_ANY = 0xFFFFFFFF
OFPG_ANY = 0xFFFFFFFF
OFPTT_ALL = 0xFF
OFPMT_OXM = 1

OFPBCT_OPEN_REQUEST = 0
OFPBCT_COMMIT_REQUEST = 4
OFPBCT_COMMIT_REPLY = 5
OFPBCT_DISCARD_REQUEST = 6
OFPBF_ATOMIC = 1 << 0
OFPBF_ORDERED = 1 << 1

OFP_PORT_SIZE = 40  # ofp_port without its properties
OFP_MATCH_SIZE = 8  # ofp_match with no field, padded
OFP_FLOW_MOD_SIZE = 56  # ofp_flow_mod with an empty (padded) match, no instructions

OFPET_HELLO_FAILED = 0
OFPET_BAD_REQUEST = 1
OFPET_BAD_ACTION = 2
OFPET_BAD_INSTRUCTION = 3
OFPET_BAD_MATCH = 4
OFPET_FLOW_MOD_FAILED = 5
OFPET_BUNDLE_FAILED = 17
OFPET_EXPERIMENTER = 0xFFFF
# ofp_error_type, indexed by value (0..17).
OFPET_NAMES = (
    "OFPET_HELLO_FAILED", "OFPET_BAD_REQUEST", "OFPET_BAD_ACTION", "OFPET_BAD_INSTRUCTION",
    "OFPET_BAD_MATCH", "OFPET_FLOW_MOD_FAILED", "OFPET_GROUP_MOD_FAILED",
    "OFPET_PORT_MOD_FAILED", "OFPET_TABLE_MOD_FAILED", "OFPET_QUEUE_OP_FAILED",
    "OFPET_SWITCH_CONFIG_FAILED", "OFPET_ROLE_REQUEST_FAILED", "OFPET_METER_MOD_FAILED",
    "OFPET_TABLE_FEATURES_FAILED", "OFPET_BAD_PROPERTY", "OFPET_ASYNC_CONFIG_FAILED",
    "OFPET_FLOW_MONITOR_FAILED", "OFPET_BUNDLE_FAILED",
)
# The codes of the error types a handshake, a flow mod or a bundle can fail with, indexed by
# value, so a reason says OFPBIC_BAD_TABLE_ID rather than "type 3 code 2".
OFP_ERROR_CODE_NAMES: dict[int, tuple[str, ...]] = {
    OFPET_HELLO_FAILED: ("OFPHFC_INCOMPATIBLE", "OFPHFC_EPERM"),
    OFPET_BAD_REQUEST: (
        "OFPBRC_BAD_VERSION", "OFPBRC_BAD_TYPE", "OFPBRC_BAD_MULTIPART", "OFPBRC_BAD_EXPERIMENTER",
        "OFPBRC_BAD_EXP_TYPE", "OFPBRC_EPERM", "OFPBRC_BAD_LEN", "OFPBRC_BUFFER_EMPTY",
        "OFPBRC_BUFFER_UNKNOWN", "OFPBRC_BAD_TABLE_ID", "OFPBRC_IS_SLAVE", "OFPBRC_BAD_PORT",
        "OFPBRC_BAD_PACKET", "OFPBRC_MULTIPART_BUFFER_OVERFLOW",
        "OFPBRC_MULTIPART_REQUEST_TIMEOUT", "OFPBRC_MULTIPART_REPLY_TIMEOUT",
    ),
    OFPET_BAD_ACTION: (
        "OFPBAC_BAD_TYPE", "OFPBAC_BAD_LEN", "OFPBAC_BAD_EXPERIMENTER", "OFPBAC_BAD_EXP_TYPE",
        "OFPBAC_BAD_OUT_PORT", "OFPBAC_BAD_ARGUMENT", "OFPBAC_EPERM", "OFPBAC_TOO_MANY",
        "OFPBAC_BAD_QUEUE", "OFPBAC_BAD_OUT_GROUP", "OFPBAC_MATCH_INCONSISTENT",
        "OFPBAC_UNSUPPORTED_ORDER", "OFPBAC_BAD_TAG", "OFPBAC_BAD_SET_TYPE", "OFPBAC_BAD_SET_LEN",
        "OFPBAC_BAD_SET_ARGUMENT",
    ),
    OFPET_BAD_INSTRUCTION: (
        "OFPBIC_UNKNOWN_INST", "OFPBIC_UNSUP_INST", "OFPBIC_BAD_TABLE_ID", "OFPBIC_UNSUP_METADATA",
        "OFPBIC_UNSUP_METADATA_MASK", "OFPBIC_BAD_EXPERIMENTER", "OFPBIC_BAD_EXP_TYPE",
        "OFPBIC_BAD_LEN", "OFPBIC_EPERM", "OFPBIC_DUP_INST",
    ),
    OFPET_BAD_MATCH: (
        "OFPBMC_BAD_TYPE", "OFPBMC_BAD_LEN", "OFPBMC_BAD_TAG", "OFPBMC_BAD_DL_ADDR_MASK",
        "OFPBMC_BAD_NW_ADDR_MASK", "OFPBMC_BAD_WILDCARDS", "OFPBMC_BAD_FIELD", "OFPBMC_BAD_VALUE",
        "OFPBMC_BAD_MASK", "OFPBMC_BAD_PREREQ", "OFPBMC_DUP_FIELD", "OFPBMC_EPERM",
    ),
    OFPET_FLOW_MOD_FAILED: (
        "OFPFMFC_UNKNOWN", "OFPFMFC_TABLE_FULL", "OFPFMFC_BAD_TABLE_ID", "OFPFMFC_OVERLAP",
        "OFPFMFC_EPERM", "OFPFMFC_BAD_TIMEOUT", "OFPFMFC_BAD_COMMAND", "OFPFMFC_BAD_FLAGS",
        "OFPFMFC_CANT_SYNC", "OFPFMFC_BAD_PRIORITY",
    ),
    OFPET_BUNDLE_FAILED: (
        "OFPBFC_UNKNOWN", "OFPBFC_EPERM", "OFPBFC_BAD_ID", "OFPBFC_BUNDLE_EXIST",
        "OFPBFC_BUNDLE_CLOSED", "OFPBFC_OUT_OF_BUNDLES", "OFPBFC_BAD_TYPE", "OFPBFC_BAD_FLAGS",
        "OFPBFC_MSG_BAD_LEN", "OFPBFC_MSG_BAD_XID", "OFPBFC_MSG_UNSUP", "OFPBFC_MSG_CONFLICT",
        "OFPBFC_MSG_TOO_MANY", "OFPBFC_MSG_FAILED", "OFPBFC_TIMEOUT", "OFPBFC_BUNDLE_IN_PROGRESS",
    ),
}

# Wire layouts (all big-endian, as the spec's structs).
OFP_HEADER = struct.Struct("!BBHI")  # ofp_header: version, type, length, xid
_HELLO_ELEM = struct.Struct("!HH")  # ofp_hello_elem_header: type, length (without padding)
_FEATURES = struct.Struct("!Q")  # ofp_switch_features starts with datapath_id (every version)
_MULTIPART = struct.Struct("!HH4x")  # ofp_multipart_request/reply: type, flags
_PORT = struct.Struct("!IH2x6s2x16s")  # ofp_port: port_no, length, hw_addr, name; then more
# ofp_aggregate_stats_request: table_id, out_port, out_group, cookie, cookie_mask, then an
# ofp_match with no field (type, length 4, padding)
_AGGREGATE_REQUEST = struct.Struct("!B3xII4xQQHH4x")
_AGGREGATE_REPLY = struct.Struct("!QQI4x")  # packet_count, byte_count, flow_count
_ERROR = struct.Struct("!HH")  # ofp_error_msg: type, code
_EXPERIMENTER_ERROR = struct.Struct("!HHI")  # type (0xffff), exp_code, experimenter
_MATCH = struct.Struct("!HH")  # ofp_match: type, length (without padding)
# The body of an aggregate request for every flow (bench/peer/common.py counts with it too).
AGGREGATE_ALL = _AGGREGATE_REQUEST.pack(OFPTT_ALL, OFPP_ANY, OFPG_ANY, 0, 0, OFPMT_OXM, _MATCH.size)
_BUNDLE_CTRL_BODY = struct.Struct("!IHH")  # ofp_bundle_ctrl_msg after its ofp_header: bundle_id, type, flags
_BUNDLE_CTRL = struct.Struct("!BBHI" + _BUNDLE_CTRL_BODY.format[1:])
# ofp_header, bundle_id, pad, flags, then the inner message's own ofp_header (its xid rewritten)
_BUNDLE_ADD = struct.Struct("!BBHII2xHBBHI")
_BUNDLE_ADD_SIZE = _BUNDLE_ADD.size - OFP_HEADER_SIZE  # outer length = this + inner length
MAX_FLOW_MOD_SIZE = 0xFFFF - _BUNDLE_ADD_SIZE  # the bundle add's u16 length must hold it
_FLOW_MOD_MATCH_OFFSET = OFP_FLOW_MOD_SIZE - OFP_MATCH_SIZE  # ofp_match ends ofp_flow_mod

BUNDLE_ID = 1  # bundles are per connection, and a restore opens only one
BUNDLE_FLAGS = OFPBF_ATOMIC | OFPBF_ORDERED
# Flow mods per write: one syscall carries ~75 kB; between writes, errors already in are
# looked at, so a refused add stops the sending early (the bundle is discarded anyway).
CHUNK_FLOW_MODS = 512
VERSION_NAMES = {1: "1.0", 2: "1.1", 3: "1.2", 4: "1.3", 5: "1.4", 6: "1.5"}


# ---- public values --------------------------------------------------------------------------


class SwitchView(namedtuple("SwitchView", "dpid version ports flow_count")):
    """What the restorer learnt from a switch before deciding."""

    __slots__ = ()
    dpid: int
    version: int  # the negotiated OpenFlow version (only 0x05, OF1.4, is served)
    ports: frozenset[tuple[int, str]]  # (port_no, name) of every port numbered below OFPP_MAX
    flow_count: int  # flows in all tables (OFPMP_AGGREGATE over table 0xff, any cookie)


class Outcome(namedtuple("Outcome", "dpid installed reason")):
    __slots__ = ()
    dpid: int | None  # None if the handshake did not get that far
    installed: int  # flow mods committed; 0 when skipped or failed
    reason: str  # "" when installed; otherwise what stopped it, naming the problem


Choice = Sequence[bytes] | str  # complete OFPT_FLOW_MOD messages to install, or why not


class _Failed(Exception):
    """Ends a restore early; its message becomes the Outcome's reason."""


def _version_name(version: int) -> str:
    return f"OpenFlow {VERSION_NAMES.get(version, '?')} (version {version:#04x})"


# ---- one connection: framing, echo replies, deadlines -------------------------------------


class _Message(namedtuple("_Message", "version type xid body")):
    __slots__ = ()
    version: int
    type: int
    xid: int
    body: bytes  # everything after the ofp_header


class _Channel:
    """A non-blocking switch connection. Writing and reading go on together (poll for both),
    so a switch that answers while we still send (errors for refused adds) can never fill both
    socket buffers and stall the two of us; echo requests are answered whenever they arrive.
    Every wait has its own deadline, `timeout` from its start; an echo does not extend it."""

    def __init__(self, sock: _socket.socket, timeout: float) -> None:
        sock.setblocking(False)
        self._sock, self._timeout = sock, timeout
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._in = bytearray()
        self._out = bytearray()
        self._received: deque[_Message] = deque()
        self._next_xid = 1

    def xids(self, n: int) -> int:
        """Reserve n consecutive xids; returns the first."""
        first, self._next_xid = self._next_xid, self._next_xid + n
        return first

    def send(self, data: bytes, what: str) -> None:
        """Write all of `data` (reading whatever arrives meanwhile)."""
        self._out += data
        deadline = time.monotonic() + self._timeout
        while self._out:
            self._pump(deadline, f"the switch to take {what}")

    def receive(self, what: str) -> _Message:
        """The next message from the switch, echo requests excepted (answered here)."""
        deadline = time.monotonic() + self._timeout
        while not self._received:
            self._pump(deadline, what)
        return self._received.popleft()

    def take_received(self) -> list[_Message]:
        """The messages already read, without waiting for more."""
        messages = list(self._received)
        self._received.clear()
        return messages

    def _pump(self, deadline: float, what: str) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Failed(f"timed out after {float(self._timeout)} s waiting for {what}")
        self._poll.modify(self._sock, select.POLLIN | (select.POLLOUT if self._out else 0))
        try:
            events = self._poll.poll(remaining * 1000)
            for _, event in events:
                if event & select.POLLNVAL:
                    raise _Failed(f"the connection was closed while we waited for {what}")
                if event & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    self._read(what)
                if event & select.POLLOUT and self._out:
                    del self._out[: self._sock.send(self._out)]
        except (BlockingIOError, InterruptedError):
            pass  # a spurious wake-up: poll again
        except OSError as exc:
            raise _Failed(f"connection failed waiting for {what}: {exc}") from exc

    def _read(self, what: str) -> None:
        data = self._sock.recv(1 << 16)
        if not data:
            raise _Failed(f"the switch closed the connection while we waited for {what}")
        self._in += data
        offset = 0
        while len(self._in) - offset >= OFP_HEADER_SIZE:
            version, msg_type, length, xid = OFP_HEADER.unpack_from(self._in, offset)
            if length < OFP_HEADER_SIZE:
                raise _Failed(f"malformed message from the switch (length {length}) "
                              f"while we waited for {what}")
            if len(self._in) - offset < length:
                break
            body = bytes(self._in[offset + OFP_HEADER_SIZE: offset + length])
            offset += length
            if msg_type == OFPT_ECHO_REQUEST:  # keep the switch from timing us out
                self._out += OFP_HEADER.pack(version, OFPT_ECHO_REPLY, length, xid) + body
            else:
                self._received.append(_Message(version, msg_type, xid, body))
        del self._in[:offset]


def _message(msg_type: int, xid: int, body: bytes = b"", version: int = OFP_VERSION) -> bytes:
    return OFP_HEADER.pack(version, msg_type, OFP_HEADER_SIZE + len(body), xid) + body


def _describe_error(body: bytes) -> str:
    """An OFPT_ERROR body as names: 'OFPET_BAD_INSTRUCTION (3), OFPBIC_BAD_TABLE_ID (2)'."""
    if len(body) < _ERROR.size:
        return "a malformed error message"
    err_type, code = _ERROR.unpack_from(body)
    if err_type == OFPET_EXPERIMENTER and len(body) >= _EXPERIMENTER_ERROR.size:
        _, exp_code, experimenter = _EXPERIMENTER_ERROR.unpack_from(body)
        return f"OFPET_EXPERIMENTER, experimenter {experimenter:#010x} code {exp_code}"
    type_name = OFPET_NAMES[err_type] if err_type < len(OFPET_NAMES) else "unknown error type"
    codes = OFP_ERROR_CODE_NAMES.get(err_type, ())
    code_name = codes[code] if code < len(codes) else "code"
    return f"{type_name} ({err_type}), {code_name} ({code})"


def _reply(channel: _Channel, xid: int, msg_type: int, what: str) -> _Message:
    """Our request's reply, skipping asynchronous messages (port status, ...)."""
    while True:
        msg = channel.receive(what)
        if msg.type == OFPT_ERROR and msg.xid == xid:
            raise _Failed(f"the switch sent an error instead of {what}: "
                          f"{_describe_error(msg.body)}")
        if msg.type == msg_type and msg.xid == xid:
            return msg


# ---- the handshake ------------------------------------------------------------------------


def _bitmap_versions(body: bytes) -> frozenset[int] | None:
    """The versions of a hello's OFPHET_VERSIONBITMAP element, or None if it has none."""
    offset = 0
    while len(body) - offset >= _HELLO_ELEM.size:
        elem_type, length = _HELLO_ELEM.unpack_from(body, offset)
        if length < _HELLO_ELEM.size or offset + length > len(body):
            raise _Failed(f"malformed hello from the switch (element length {length})")
        if elem_type == OFPHET_VERSIONBITMAP:
            words = body[offset + _HELLO_ELEM.size: offset + length]
            # Bitmap word i holds versions 32*i..32*i+31, bit j of it being version 32*i+j.
            return frozenset(32 * i + j for i in range(len(words) // 4) for j in range(32)
                             if int.from_bytes(words[4 * i: 4 * i + 4], "big") >> j & 1)
        offset += length + -length % 8  # elements are padded to 8 bytes
    return None


def _negotiate(hello: _Message) -> int | None:
    """OpenFlow 1.3.1+ version negotiation from our side. We said version 0x05 without a
    bitmap, which offers every version up to 0x05; the switch may list its own exactly."""
    offered = _bitmap_versions(hello.body)
    if offered is None:
        return min(OFP_VERSION, hello.version)
    common = [v for v in offered if v <= OFP_VERSION]
    return max(common) if common else None


class _Asked(namedtuple("_Asked", "features ports count")):
    """The xids of the OpenFlow 1.4 requests a restore sends once the hellos are through."""

    __slots__ = ()
    features: int
    ports: int
    count: int


def _ask(channel: _Channel) -> _Asked:
    """The requests a restore needs (features, port description, aggregate flow count), in one
    write: the switch reads them in one pass of its main loop, where one at a time each would
    wait for a pass of its own (~0.7 ms at 100 ports, ~10 ms at 2,000, in ovs-vswitchd's
    userspace datapath). Only after the hellos: OVS drops a connection that sends a message in
    a version other than the one negotiated."""
    asked = _Asked(*(channel.xids(1) for _ in range(3)))
    channel.send(_message(OFPT_FEATURES_REQUEST, asked.features)
                 + _multipart_request(asked.ports, OFPMP_PORT_DESC, b"")
                 + _multipart_request(asked.count, OFPMP_AGGREGATE, AGGREGATE_ALL),
                 "the features, port description and flow count requests")
    return asked


def _hello(channel: _Channel) -> int:
    """Exchange hellos; returns the negotiated version (raises when there is none)."""
    channel.send(_message(OFPT_HELLO, channel.xids(1)), "our hello")
    while (msg := channel.receive("the switch's hello")).type != OFPT_HELLO:
        if msg.type == OFPT_ERROR:
            raise _Failed(f"the switch sent an error instead of a hello: "
                          f"{_describe_error(msg.body)}")
    version = _negotiate(msg)
    if version is None:
        offered = sorted(_bitmap_versions(msg.body) or ())
        raise _Failed(f"no OpenFlow version in common: the switch offers "
                      f"{', '.join(_version_name(v) for v in offered)}; only "
                      f"{_version_name(OFP_VERSION)} is restored")
    return version


def _features(channel: _Channel, version: int, xid: int | None = None) -> int:
    """The datapath id (first in the features reply of every OpenFlow version): the reply to
    request `xid`, or to one sent now in `version`."""
    if xid is None:
        xid = channel.xids(1)
        channel.send(_message(OFPT_FEATURES_REQUEST, xid, version=version), "the features request")
    reply = _reply(channel, xid, OFPT_FEATURES_REPLY, "the features reply")
    if len(reply.body) < _FEATURES.size:
        raise _Failed(f"malformed features reply ({len(reply.body)} bytes of body)")
    return int(_FEATURES.unpack_from(reply.body)[0])


def _multipart_request(xid: int, mp_type: int, body: bytes) -> bytes:
    return _message(OFPT_MULTIPART_REQUEST, xid, _MULTIPART.pack(mp_type, 0) + body)


def _multipart(channel: _Channel, xid: int, mp_type: int, what: str) -> Iterable[bytes]:
    """The body of each part of the reply to multipart request `xid` (OFPMPF_REPLY_MORE)."""
    while True:
        reply = _reply(channel, xid, OFPT_MULTIPART_REPLY, what)
        if len(reply.body) < _MULTIPART.size:
            raise _Failed(f"malformed {what} ({len(reply.body)} bytes of body)")
        got_type, flags = _MULTIPART.unpack_from(reply.body)
        if got_type != mp_type:
            raise _Failed(f"malformed {what}: multipart type {got_type}, not {mp_type}")
        yield reply.body[_MULTIPART.size:]
        if not flags & OFPMPF_REPLY_MORE:
            return


def _parse_ports(data: bytes) -> Iterable[tuple[int, str]]:
    """(port_no, name) of each OF1.4 ofp_port; each steps by its own length (properties)."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < OFP_PORT_SIZE:
            raise _Failed(f"malformed port description: {len(data) - offset} trailing bytes")
        port_no, length, _, name = _PORT.unpack_from(data, offset)
        if length < OFP_PORT_SIZE or offset + length > len(data):
            raise _Failed(f"malformed port description: port {port_no} has length {length}")
        yield port_no, name.split(b"\0", 1)[0].decode("utf-8", "replace")
        offset += length


def _ports(channel: _Channel, xid: int) -> frozenset[tuple[int, str]]:
    parts = _multipart(channel, xid, OFPMP_PORT_DESC, "port description")
    return frozenset(port for part in parts for port in _parse_ports(part)
                     if port[0] < OFPP_MAX)  # not LOCAL, CONTROLLER, ...


def _flow_count(channel: _Channel, xid: int) -> int:
    """Flows in every table, whatever their cookie (the request: AGGREGATE_ALL)."""
    parts = list(_multipart(channel, xid, OFPMP_AGGREGATE, "aggregate flow statistics"))
    if len(parts) != 1 or len(parts[0]) < _AGGREGATE_REPLY.size:
        raise _Failed(f"malformed aggregate flow statistics ({len(parts)} parts, "
                      f"{sum(map(len, parts))} bytes)")
    return int(_AGGREGATE_REPLY.unpack_from(parts[0])[2])


# ---- the choice ----------------------------------------------------------------------------


def _flow_mod_problem(msg: object) -> str:
    """What is wrong with one message given to install ("" if it is a sound OF1.4 flow mod).
    Checked before anything is sent, so a bad snapshot never half-opens a bundle."""
    if not isinstance(msg, bytes | bytearray):
        return f"it is {type(msg).__name__}, not bytes"
    if len(msg) < OFP_FLOW_MOD_SIZE:
        return f"only {len(msg)} bytes (a flow mod has at least {OFP_FLOW_MOD_SIZE})"
    version, msg_type, length, _ = OFP_HEADER.unpack_from(msg)
    if version != OFP_VERSION:
        return f"version {version:#04x}, not {OFP_VERSION:#04x}"
    if msg_type != OFPT_FLOW_MOD:
        return f"message type {msg_type}, not OFPT_FLOW_MOD ({OFPT_FLOW_MOD})"
    if length != len(msg):
        return f"its header says {length} bytes but it has {len(msg)}"
    if length % 8:
        return f"its length {length} is not a multiple of 8"
    if length > MAX_FLOW_MOD_SIZE:
        return f"{length} bytes is too long to fit in a bundle add message"
    match_type, match_length = _MATCH.unpack_from(msg, _FLOW_MOD_MATCH_OFFSET)
    if match_type != OFPMT_OXM:
        return f"match type {match_type}, not OFPMT_OXM ({OFPMT_OXM})"
    padded = match_length + -match_length % 8
    if match_length < _MATCH.size or _FLOW_MOD_MATCH_OFFSET + padded > length:
        return f"its match length {match_length} does not fit in {length} bytes"
    return ""


def _flow_mods(choice: object) -> Sequence[bytes]:
    """`choice` as flow mods to install, all checked; raises with the first problem."""
    if isinstance(choice, bytes | bytearray) or not isinstance(choice, Sequence):
        raise _Failed(f"choose returned {type(choice).__name__}, not a sequence of flow mods "
                      f"or a reason")
    if not choice:
        raise _Failed("no flow mods to restore")
    for i, msg in enumerate(choice):
        if problem := _flow_mod_problem(msg):
            raise _Failed(f"flow mod #{i} (of {len(choice)}) is malformed: {problem}; "
                          f"nothing was sent")
    return choice


def _choose(choose: Callable[[SwitchView], Choice], view: SwitchView) -> Choice:
    try:
        return choose(view)
    except Exception as exc:  # the caller's code: report it, never let it kill the thread
        raise _Failed(f"choose failed: {exc!r}") from exc


# ---- the bundle ----------------------------------------------------------------------------


class _Xids(namedtuple("_Xids", "open n")):
    """One consecutive block: open, one per flow mod, staged barrier, commit (or discard),
    final barrier. An error names the xid of what it refuses: this says which that was."""

    __slots__ = ()
    open: int
    n: int

    def add(self, i: int) -> int:
        return self.open + 1 + i

    @property
    def staged(self) -> int:
        return self.open + 1 + self.n

    @property
    def commit(self) -> int:
        return self.open + 2 + self.n

    @property
    def barrier(self) -> int:
        return self.open + 3 + self.n

    def name(self, xid: int) -> str:
        if self.add(0) <= xid < self.add(self.n):
            return f"flow mod #{xid - self.add(0)} (of {self.n})"
        names = {self.open: "the bundle open", self.staged: "the barrier after the adds",
                 self.commit: "the bundle commit", self.barrier: "the barrier after the commit"}
        return names.get(xid, f"xid {xid}")


def _control(xid: int, what: int) -> bytes:
    return _BUNDLE_CTRL.pack(OFP_VERSION, OFPT_BUNDLE_CONTROL, _BUNDLE_CTRL.size, xid,
                             BUNDLE_ID, what, BUNDLE_FLAGS)


def _adds(flow_mods: Sequence[bytes], xids: _Xids, start: int, stop: int) -> bytes:
    """Bundle add messages for flow mods [start, stop), joined; each inner message's xid is
    rewritten to its outer one (OF1.4.0 7.3.9.2: they must be equal)."""
    parts: list[bytes | memoryview] = []
    for i in range(start, stop):
        inner = flow_mods[i]
        xid = xids.add(i)
        parts.append(_BUNDLE_ADD.pack(OFP_VERSION, OFPT_BUNDLE_ADD_MESSAGE,
                                      _BUNDLE_ADD_SIZE + len(inner), xid, BUNDLE_ID,
                                      BUNDLE_FLAGS, OFP_VERSION, OFPT_FLOW_MOD, len(inner), xid))
        parts.append(memoryview(inner)[OFP_HEADER_SIZE:])
    return b"".join(parts)


def _refusals(messages: Iterable[_Message], xids: _Xids) -> list[str]:
    return [f"the switch refused {xids.name(m.xid)}: {_describe_error(m.body)}"
            for m in messages if m.type == OFPT_ERROR]


def _until_barrier(channel: _Channel, xid: int, what: str) -> list[_Message]:
    """Every message before the reply to barrier `xid` (a switch answers in order)."""
    messages = []
    while not ((msg := channel.receive(what)).type == OFPT_BARRIER_REPLY and msg.xid == xid):
        messages.append(msg)
    return messages


def _refused(refusals: list[str]) -> str:
    more = f" ({len(refusals) - 1} more refused)" if len(refusals) > 1 else ""
    return f"{refusals[0]}{more}"


def _stage(channel: _Channel, flow_mods: Sequence[bytes], xids: _Xids) -> list[str]:
    """Phase one: open, the adds, a barrier. Returns the refusals (empty: all were taken)."""
    channel.send(_control(xids.open, OFPBCT_OPEN_REQUEST), "the bundle open")
    refusals: list[str] = []
    for start in range(0, xids.n, CHUNK_FLOW_MODS):
        stop = min(start + CHUNK_FLOW_MODS, xids.n)
        channel.send(_adds(flow_mods, xids, start, stop), f"flow mods #{start}-{stop - 1}")
        refusals += _refusals(channel.take_received(), xids)
        if refusals:
            break  # the bundle will be discarded: the rest need not be sent
    channel.send(_message(OFPT_BARRIER_REQUEST, xids.staged), "the barrier after the adds")
    messages = _until_barrier(channel, xids.staged, "the reply to the barrier after the adds")
    return refusals + _refusals(messages, xids)


def _discard(channel: _Channel, xids: _Xids) -> None:
    """Best effort: closing the connection drops an uncommitted bundle as well."""
    try:
        channel.send(_control(xids.commit, OFPBCT_DISCARD_REQUEST), "the bundle discard")
        _reply(channel, xids.commit, OFPT_BUNDLE_CONTROL, "the discard reply")
    except _Failed:
        pass


def _commit(channel: _Channel, xids: _Xids) -> None:
    channel.send(_control(xids.commit, OFPBCT_COMMIT_REQUEST)
                 + _message(OFPT_BARRIER_REQUEST, xids.barrier), "the bundle commit")
    messages = _until_barrier(channel, xids.barrier, "the reply to the barrier after the commit")
    if refusals := _refusals(messages, xids):
        raise _Failed(f"{_refused(refusals)}; nothing was installed")
    if not any(_is_commit_reply(m, xids.commit) for m in messages):
        raise _Failed("the switch answered the barrier after the commit without a commit reply")


def _is_commit_reply(m: _Message, xid: int) -> bool:
    return (m.type == OFPT_BUNDLE_CONTROL and m.xid == xid and len(m.body) >= _BUNDLE_CTRL_BODY.size
            and _BUNDLE_CTRL_BODY.unpack_from(m.body)[1] == OFPBCT_COMMIT_REPLY)


def _install(channel: _Channel, flow_mods: Sequence[bytes]) -> int:
    xids = _Xids(channel.xids(len(flow_mods) + 4), len(flow_mods))
    if refusals := _stage(channel, flow_mods, xids):
        _discard(channel, xids)
        raise _Failed(f"{_refused(refusals)}; bundle discarded, nothing installed")
    _commit(channel, xids)
    return len(flow_mods)


# ---- one connection, start to end -----------------------------------------------------------


def restore_connection(sock: _socket.socket, choose: Callable[[SwitchView], Choice],
                       timeout: float = 5.0) -> Outcome:
    """Serve one switch connection: handshake, SwitchView, choose, install; always closes
    `sock`. Never raises: socket errors, timeouts, refusals and malformed replies come back as
    the Outcome's reason. `timeout` bounds each wait for the switch on its own."""
    dpid: int | None = None
    try:
        channel = _Channel(sock, timeout)
        version = _hello(channel)
        if version != OFP_VERSION:  # the log names the switch all the same
            return Outcome(_features(channel, version), 0, f"the switch speaks {_version_name(version)}; "
                                                           f"only {_version_name(OFP_VERSION)} is restored")
        asked = _ask(channel)
        dpid = _features(channel, version, asked.features)
        view = SwitchView(dpid, version, _ports(channel, asked.ports), _flow_count(channel, asked.count))
        choice = _choose(choose, view)
        if isinstance(choice, str):
            return Outcome(dpid, 0, choice)
        return Outcome(dpid, _install(channel, _flow_mods(choice)), "")
    except _Failed as failed:
        return Outcome(dpid, 0, str(failed))
    except OSError as exc:  # e.g. setblocking on a socket the switch already reset
        return Outcome(dpid, 0, f"connection failed: {exc}")
    except Exception as exc:  # noqa: BLE001 - a bug here must not end the thread unreported
        return Outcome(dpid, 0, f"unexpected error in the restorer: {exc!r}")
    finally:
        try:
            sock.close()
        except OSError:
            pass
