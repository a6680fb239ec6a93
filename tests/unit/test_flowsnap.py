"""controller/flowsnap.py: when a stored flow table may go back onto a switch (only an empty
one, with the same ports, database generation, configuration and unexpired contexts), the blob
format, and that `goldilocks run` reaches the restorer without loading anything slow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.flowsnap import (
    FlowSnapshot,
    _plain_ports,
    decode_ports,
    encode_ports,
    flow_mod_message,
    pack_flow_mods,
    refusal,
    sqlite_path,
    unpack_flow_mods,
)

ROOT = Path(__file__).resolve().parents[2]
PORTS = frozenset({(1, "vnet0"), (2, "vnet1"), (100, "uplink0")})
SNAP = FlowSnapshot(dpid=1, generation=7, config_digest="abc", ports=PORTS, valid_until=1000.0, taken_at=10.0,
                    flow_mods=(flow_mod_message(b"\x00" * 40),))
FITS = {"version": 5, "ports": PORTS, "flow_count": 0, "generation": 7, "digest": "abc", "now": 500.0}


def test_a_snapshot_that_fits_the_switch_and_the_state_may_go_back() -> None:
    assert refusal(SNAP, **FITS) is None  # type: ignore[arg-type]
    assert refusal(SNAP._replace(valid_until=None), **{**FITS, "now": 1e12}) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(("change", "reason"), [
    ({"flow_count": 3}, "the bridge holds 3 flows"),
    ({"version": 4}, "OpenFlow version 0x4"),
    ({"generation": 8}, "the database changed since the snapshot (generation 7 -> 8)"),
    ({"generation": None}, "the database changed"),
    ({"digest": "abd"}, "the configuration file changed"),
    ({"now": 1000.0}, "a context the snapshot relied on has expired"),
    ({"ports": PORTS - {(2, "vnet1")}}, "ports changed since the snapshot (gone: 2 vnet1)"),
    ({"ports": PORTS - {(2, "vnet1")} | {(2, "vnet9")}}, "(gone: 2 vnet1; new: 2 vnet9)"),
])
def test_anything_else_keeps_the_bridge_closed_for_the_controller_and_says_why(change: dict, reason: str) -> None:
    found = refusal(SNAP, **{**FITS, **change})  # type: ignore[arg-type]
    assert found is not None and reason in found


def test_no_snapshot_is_refused_too() -> None:
    assert refusal(None, **FITS) == "no flow snapshot for this bridge"  # type: ignore[arg-type]


def test_flow_mods_pack_and_unpack_and_a_damaged_blob_is_named() -> None:
    mods = (flow_mod_message(b"\x01" * 48), flow_mod_message(b"\x02" * 64))
    blob = pack_flow_mods(mods)
    assert unpack_flow_mods(blob) == mods
    with pytest.raises(ValueError, match="cut at byte 128"):
        unpack_flow_mods(blob + b"\x05\x0e")
    with pytest.raises(ValueError, match="no OpenFlow 1.4 flow mod at byte 0"):
        unpack_flow_mods(b"\x04" + blob[1:])


def test_only_a_sqlite_file_has_snapshots() -> None:
    assert sqlite_path("sqlite:////var/lib/goldilocks/g.db") == "/var/lib/goldilocks/g.db"
    assert sqlite_path("sqlite:///:memory:") is None
    assert sqlite_path("postgresql+psycopg://u@h/db") is None


def test_goldilocks_run_reaches_the_restorer_before_anything_slow_is_imported() -> None:
    # What `goldilocks run --config FILE` has loaded when it starts restoring from FILE's plan
    # (controller/cli.py): not the controller, and not the standard modules that cost a start
    # milliseconds each (the YAML parser, argparse, logging, dataclasses, typing, re, ...).
    slow = {"os_ken", "sqlalchemy", "networkx", "ovs", "yaml", "argparse", "logging", "dataclasses", "typing",
            "re", "json", "enum", "socket", "hashlib", "pathlib", "threading", "sqlite3", "datetime",
            "_sqlite3", "functools",  # read while the restores shake hands (controller/warmstart.py)
            "controller.engine", "controller.config"}
    probe = (f"import sys; import controller.cli; slow = {sorted(slow)!r}; "
             "print(sorted(m for m in slow if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["[]"]


def test_the_installed_goldilocks_command_imports_nothing_before_controller_cli() -> None:
    # A generated console-script wrapper imports `re` before calling main: ~7 ms of every
    # restart (bin/goldilocks). -X importtime prints each module as its import ends, so what
    # the command loaded before the restorer shows up above controller.cli's line.
    command = Path(sys.executable).parent / "goldilocks"
    out = subprocess.run([sys.executable, "-X", "importtime", str(command), "--help"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    top_level = [line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines()
                 if line.startswith("import time:") and not line.rsplit("|", 1)[1].startswith("  ")]
    before = top_level[:top_level.index("controller.cli")]
    started = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"],
                             capture_output=True, text=True, check=True, cwd=ROOT).stderr
    interpreter = {line.rsplit("|", 1)[1].strip() for line in started.splitlines() if line.startswith("import time:")}
    assert [m for m in before if m not in interpreter] == []


@pytest.mark.parametrize("ports", [
    frozenset(),
    frozenset({(1, "vnet0"), (2, "vnet1"), (100, "uplink0"), (65534, "br-int")}),
    frozenset({(7, "tap-3f2a:eth0"), (8, "a/b.c@d+e=f_g")}),
    frozenset({(1, "")}),
])
def test_plain_port_names_are_read_back_without_json(ports: frozenset[tuple[int, str]]) -> None:
    text = encode_ports(ports)
    assert _plain_ports(text) == ports
    assert decode_ports(text) == ports


@pytest.mark.parametrize("ports", [
    frozenset({(1, 'x"y')}), frozenset({(1, "a b")}), frozenset({(2, "caf\u00e9")}), frozenset({(3, "é")}),
    frozenset({(4, "a], [5, ")}), frozenset({(5, "back\\slash")}),
])
def test_other_port_names_go_through_json(ports: frozenset[tuple[int, str]]) -> None:
    text = encode_ports(ports)
    assert _plain_ports(text) is None
    assert decode_ports(text) == ports


@given(st.frozensets(st.tuples(st.integers(0, 0xFFFFFEFF), st.text(max_size=16)), max_size=8))
def test_any_ports_read_back_as_written(ports: frozenset[tuple[int, str]]) -> None:
    text = encode_ports(ports)
    assert decode_ports(text) == ports
    assert decode_ports(text) == frozenset((n, name) for n, name in json.loads(text))


@pytest.mark.parametrize("text", ['[[1, "a"]', '[[01, "a"]]', '[[1,"a"]]', '[[1, "a"], [1, "a"]]x', '[[-1, "a"]]',
                                  '[[1, "a"],  [2, "b"]]', '[[2, "b"], [1, "a"]]'])
def test_text_json_would_not_write_is_not_read_as_plain(text: str) -> None:
    assert _plain_ports(text) is None
