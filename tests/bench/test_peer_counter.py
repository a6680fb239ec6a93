"""bench/peer's in-process flow counter agrees with `ovs-ofctl dump-aggregate` on a real bridge.

Both systems' restarts are timed by polling it, so a wrong count would time the wrong moment.
Skips without root or OVS (on CI it fails instead).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.peer.common import FlowCounter, OvsSandbox, flow_count
from tests.conftest import require
from tests.ovs.harness import unavailable_reason

pytestmark = pytest.mark.ovs

BRIDGE = "cnt0"


def _flows(n: int) -> str:
    return "".join(f"table={i % 7},priority={100 + i % 3},ip,nw_dst=10.1.{i // 256}.{i % 256},actions=drop\n"
                   for i in range(n))


def test_counts_what_dump_aggregate_counts_in_every_table(tmp_path: Path) -> None:
    require(unavailable_reason(), "Open vSwitch")
    flows = tmp_path / "flows.txt"
    flows.write_text(_flows(1500))
    with OvsSandbox() as ovs:
        ovs.vsctl("add-br", BRIDGE, "--", "set", "bridge", BRIDGE, "datapath_type=netdev", "fail_mode=secure")
        with FlowCounter(ovs, BRIDGE) as counter:
            assert counter.count() == flow_count(ovs, BRIDGE) == 0
            ovs.ofctl("add-flows", BRIDGE, str(flows), "--bundle")
            assert counter.count() == flow_count(ovs, BRIDGE) == 1500
            ovs.ofctl("del-flows", BRIDGE, "table=3")
            assert counter.count() == flow_count(ovs, BRIDGE) == 1500 - 214
            ovs.del_flows(BRIDGE)
            assert counter.count() == 0
