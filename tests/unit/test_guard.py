"""apps.guard.check_message: rejects the malformed fixtures, accepts real messages, is bounded."""

from __future__ import annotations

import logging
import struct
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from os_ken.controller.handler import DEAD_DISPATCHER, MAIN_DISPATCHER
from os_ken.ofproto import (
    ofproto_parser,
    ofproto_v1_3,
    ofproto_v1_3_parser,
    ofproto_v1_4,
    ofproto_v1_4_parser,
)

from apps import guard
from apps.guard import check_message

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "malformed"
PROTOCOLS: dict[int, tuple[Any, Any]] = {
    4: (ofproto_v1_3, ofproto_v1_3_parser),
    5: (ofproto_v1_4, ofproto_v1_4_parser),
}


def load_fixture(path: Path) -> bytes:
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    return bytes.fromhex("".join(ln for ln in lines if ln and not ln.startswith("#")))


FIXTURE_PATHS = sorted(FIXTURES.glob("*.hex"))


def datapath(version: int) -> SimpleNamespace:
    ofp, parser = PROTOCOLS[version]
    return SimpleNamespace(ofproto=ofp, ofproto_parser=parser, id=None, address=("t", 0),
                           state=MAIN_DISPATCHER)


def header(version: int, msg_type: int, body: bytes, xid: int = 7) -> bytes:
    return struct.pack("!BBHI", version, msg_type, 8 + len(body), xid) + body


def serialized(msg: Any) -> bytes:
    msg.serialize()
    return bytes(msg.buf)


def match_bytes(version: int, **fields: Any) -> bytes:
    buf = bytearray()
    PROTOCOLS[version][1].OFPMatch(**fields).serialize(buf, 0)
    return bytes(buf)


def instructions_bytes(version: int, insts: list[Any]) -> bytes:
    buf = bytearray()
    for inst in insts:
        inst.serialize(buf, len(buf))
    return bytes(buf)


def flow_entry(version: int, match: bytes, insts: bytes) -> bytes:
    body = struct.pack("!BxIIHHHH4xQQQ", 0, 1, 2, 100, 0, 0, 0, 0xABC, 5, 6) + match + insts
    return struct.pack("!H", 2 + len(body)) + body


def multipart(version: int, mp_type: int, body: bytes) -> bytes:
    return header(version, 19, struct.pack("!HH4x", mp_type, 0) + body)


def flow_stats_reply(version: int) -> bytes:
    p = PROTOCOLS[version][1]
    from os_ken.ofproto import nicira_ext  # noqa: F401  (registers NX actions)

    actions = [
        p.OFPActionSetField(eth_dst="00:11:22:33:44:55"),
        p.NXActionCT(flags=1, zone_src="", zone_ofs_nbits=5, recirc_table=3, alg=0,
                     actions=[p.NXActionNAT(flags=0)]),
        p.NXActionConjunction(clause=1, n_clauses=2, id_=7),
        p.OFPActionOutput(3),
    ]
    insts = [p.OFPInstructionActions(PROTOCOLS[version][0].OFPIT_APPLY_ACTIONS, actions),
             p.OFPInstructionGotoTable(4)]
    match = match_bytes(version, in_port=1, eth_type=0x0800, ipv4_src=("10.0.0.0", "255.0.0.0"))
    return multipart(version, 1, flow_entry(version, match, instructions_bytes(version, insts)))


def group_desc_reply(version: int) -> bytes:
    p = PROTOCOLS[version][1]
    buf = bytearray()
    p.OFPBucket(actions=[p.OFPActionOutput(2)]).serialize(buf, 0)
    return multipart(version, 7, struct.pack("!HBxI", 8 + len(buf), 0, 1) + bytes(buf))


def port_v13() -> bytes:
    return struct.pack("!I4x6s2x16sIIIIIIII", 1, b"\x00\x11\x22\x33\x44\x55", b"eth0",
                       0, 4, 0, 0, 0, 0, 0, 0)


def port_v14() -> bytes:
    eth = struct.pack("!HH4xIIIIII", 0, 32, 0, 0, 0, 0, 0, 0)
    return struct.pack("!IH2x6s2x16sII", 1, 40 + len(eth), b"\x00\x11\x22\x33\x44\x55",
                       b"eth0", 0, 4) + eth


def valid_messages() -> dict[str, bytes]:
    msgs: dict[str, bytes] = {}
    for v in (4, 5):
        p = PROTOCOLS[v][1]
        dp = datapath(v)
        bitmap = p.OFPHelloElemVersionBitmap([4, 5])
        msgs[f"hello_v{v}"] = serialized(p.OFPHello(dp, elements=[bitmap]))
        msgs[f"echo_reply_v{v}"] = serialized(p.OFPEchoReply(dp, data=b"ping"))
        msgs[f"echo_request_v{v}"] = serialized(p.OFPEchoRequest(dp, data=b""))
        msgs[f"barrier_reply_v{v}"] = header(v, 21, b"")
        msgs[f"error_v{v}"] = serialized(p.OFPErrorMsg(dp, type_=1, code=2, data=b"\x04\x0e"))
        msgs[f"features_reply_v{v}"] = header(v, 6, struct.pack("!QIBB2xII", 1, 256, 254, 0, 0, 0))
        msgs[f"flow_stats_v{v}"] = flow_stats_reply(v)
        msgs[f"flow_stats_empty_v{v}"] = multipart(v, 1, b"")
        msgs[f"group_desc_v{v}"] = group_desc_reply(v)
        msgs[f"desc_v{v}"] = multipart(v, 0, struct.pack("!256s256s256s32s256s", *[b"x"] * 5))
        msgs[f"packet_in_v{v}"] = header(v, 10, struct.pack("!IHBBQ", 0xFFFFFFFF, 14, 0, 0, 0)
                                         + match_bytes(v, in_port=2) + b"\0\0" + b"\xab" * 14)
    msgs["port_status_v4"] = header(4, 12, struct.pack("!B7x", 2) + port_v13())
    msgs["port_status_v5"] = header(5, 12, struct.pack("!B7x", 2) + port_v14())
    msgs["port_desc_v4"] = multipart(4, 13, port_v13() * 2)
    msgs["port_desc_v5"] = multipart(5, 13, port_v14() * 2)
    msgs["bundle_control_v5"] = header(5, 33, struct.pack("!IHH", 9, 1, 0))
    return msgs


VALID = valid_messages()


def parse_with_os_ken(data: bytes, timeout: float = 5.0) -> tuple[bool, Any]:
    """Parse with os-ken's unguarded parser in a daemon thread; (finished, result)."""
    version, msg_type, msg_len, xid = ofproto_parser.header(data)
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(guard_original()(datapath(version), version, msg_type, msg_len, xid,
                                           bytearray(data)))
        except Exception as exc:  # noqa: BLE001 - any exception is a bounded outcome
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive(), result[0] if result else None


def guard_original() -> Any:
    return getattr(ofproto_parser.msg, "_goldilocks_guard", ofproto_parser.msg)


def test_there_are_fixtures() -> None:
    names = {p.stem for p in FIXTURE_PATHS}
    for required in ("hello_zero_length_element", "group_desc_bucket_len0_v13",
                     "flow_stats_action_len0_v13", "flow_stats_instruction_len0_v13",
                     "flow_stats_entry_len0_v13", "port_desc_prop_len0_v14",
                     "table_features_prop_len0_v13", "packet_in_match_len0_v13"):
        assert required in names
    for path in FIXTURE_PATHS:
        assert path.read_text().startswith("# "), path
        assert "os-ken 4.2.2 unguarded:" in path.read_text().splitlines()[0], path


def test_published_hello_is_the_fixture() -> None:
    assert load_fixture(FIXTURES / "hello_zero_length_element.hex") == bytes.fromhex(
        "04000010000000130001000000000010")


@pytest.mark.parametrize("path", FIXTURE_PATHS, ids=lambda p: p.stem)
def test_rejects_every_fixture(path: Path) -> None:
    reason = check_message(load_fixture(path))
    assert isinstance(reason, str) and reason


def test_reason_names_type_and_offset() -> None:
    reason = check_message(load_fixture(FIXTURES / "hello_zero_length_element.hex"))
    assert reason is not None
    assert "HELLO" in reason and "offset 8" in reason and "length 0" in reason


@pytest.mark.parametrize("name", sorted(VALID))
def test_accepts_valid_message_that_os_ken_parses(name: str) -> None:
    data = VALID[name]
    assert check_message(data) is None
    finished, parsed = parse_with_os_ken(data)
    assert finished
    assert parsed is not None and not isinstance(parsed, Exception), parsed


@pytest.mark.parametrize("data,fragment", [
    (header(4, 14, b"\0" * 48), "type not allowed"),  # FLOW_MOD from a switch
    (header(4, 4, struct.pack("!II", 0x2320, 1)), "EXPERIMENTER"),  # experimenter
    (header(6, 2, b""), "version"),
    (multipart(5, 10, b""), "multipart type 10 not allowed"),  # METER_CONFIG
    (b"\x04\x00\x00", "shorter"),
])
def test_rejects_unlisted(data: bytes, fragment: str) -> None:
    reason = check_message(data)
    assert reason is not None and fragment in reason


def test_hello_of_other_versions_is_allowed_for_negotiation() -> None:
    assert check_message(header(6, 0, struct.pack("!HHI", 1, 8, 0x70))) is None
    assert check_message(header(1, 0, b"")) is None


# --- fuzz-ish: bounded, total, and what it accepts os-ken parses in bounded time

MSG_TYPES = [0, 1, 2, 3, 6, 8, 10, 11, 12, 19, 21, 25, 30, 31, 33]


def assert_total_and_safe(data: bytes) -> None:
    reason = check_message(data)
    assert reason is None or isinstance(reason, str)
    if reason is None:
        finished, _ = parse_with_os_ken(data)
        assert finished, f"os-ken hung on an accepted message: {data.hex()}"


FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    assert_total_and_safe(data)


@FUZZ
@given(st.sampled_from([4, 5]), st.sampled_from(MSG_TYPES), st.binary(max_size=300))
def test_random_bodies_with_valid_header(version: int, msg_type: int, body: bytes) -> None:
    assert_total_and_safe(header(version, msg_type, body))


@FUZZ
@given(st.sampled_from(sorted(VALID)), st.data())
def test_truncations(name: str, data: st.DataObject) -> None:
    msg = VALID[name]
    cut = data.draw(st.integers(min_value=0, max_value=len(msg)))
    truncated = bytearray(msg[:cut])
    if len(truncated) >= 4:
        truncated[2:4] = struct.pack("!H", len(truncated))
    assert_total_and_safe(bytes(truncated))


@FUZZ
@given(st.sampled_from(sorted(VALID)), st.data())
def test_zeroed_or_random_length_fields(name: str, data: st.DataObject) -> None:
    msg = bytearray(VALID[name])
    if len(msg) <= 8:
        return
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        off = data.draw(st.integers(min_value=8, max_value=len(msg) - 2))
        msg[off:off + 2] = data.draw(st.sampled_from([b"\0\0", b"\0\x04", b"\xff\xff",
                                                      b"\0\x01", b"\0\x08"]))
    assert_total_and_safe(bytes(msg))


# --- the hook


@pytest.fixture
def installed() -> Any:
    guard.install_guard()
    yield
    guard.uninstall_guard()


def test_install_is_idempotent(installed: None) -> None:
    wrapped = ofproto_parser.msg
    guard.install_guard()
    assert ofproto_parser.msg is wrapped


class FakeDatapath(SimpleNamespace):
    def close(self) -> None:
        self.state = DEAD_DISPATCHER
        self.closed = True


def test_hook_closes_connection_and_logs(installed: None,
                                         caplog: pytest.LogCaptureFixture) -> None:
    data = load_fixture(FIXTURES / "hello_zero_length_element.hex")
    dp = FakeDatapath(id=0x1234, address=("10.0.0.9", 4321), state=MAIN_DISPATCHER, closed=False,
                      ofproto=ofproto_v1_3, ofproto_parser=ofproto_v1_3_parser)
    with caplog.at_level(logging.WARNING, logger="apps.guard"):
        result = ofproto_parser.msg(dp, 4, 0, len(data), 0x13, bytearray(data))
    assert result is None and dp.closed
    assert "10.0.0.9" in caplog.text and "0000000000001234" in caplog.text
    assert "HELLO" in caplog.text


def test_hook_passes_valid_messages(installed: None) -> None:
    data = VALID["flow_stats_v5"]
    dp = FakeDatapath(id=1, address=("a", 1), state=MAIN_DISPATCHER, closed=False,
                      ofproto=ofproto_v1_4, ofproto_parser=ofproto_v1_4_parser)
    result = ofproto_parser.msg(dp, 5, 19, len(data), 7, bytearray(data))
    assert isinstance(result, ofproto_v1_4_parser.OFPFlowStatsReply)
    assert not dp.closed


def test_onf_bundle_control_reply_passes_on_openflow13_and_other_experimenters_do_not() -> None:
    """Goldilocks sends OF1.3 bundles with the ONF extension: the switch's reply must not close it."""
    import struct

    from apps.guard import check_message

    reply = struct.pack("!BBHIIIIHH", 0x04, 4, 24, 7, 0x4F4E4600, 2300, 1, 1, 3)  # OPEN_REPLY
    assert check_message(reply) is None
    other = struct.pack("!BBHIIIIHH", 0x04, 4, 24, 7, 0x00002320, 2300, 1, 1, 3)
    assert check_message(other) is not None
    short = struct.pack("!BBHII", 0x04, 4, 16, 7, 0x4F4E4600) + b"\0\0\0\0"
    assert check_message(short) is not None
