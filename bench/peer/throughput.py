"""Flow-install throughput against the `ovs-ofctl --bundle add-flows` floor.

Two views: bench/install's own (a fixed set of N compiled flows, the real os-ken app and
Service, connect → in sync; reused, not copied), and this workload's (the very flows Goldilocks
installed for it, re-added with `ovs-ofctl --bundle add-flows` into an empty bridge, against
Goldilocks' switch connected → all flows from the cold start).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.ovs.harness import OvsSandbox


def bundle_floor(ovs: OvsSandbox, flows: list[str], reps: int) -> float:
    """Median seconds of `ovs-ofctl --bundle add-flows` of `flows` into a fresh netdev bridge."""
    times = []
    with tempfile.NamedTemporaryFile("w", suffix=".flows", dir=ovs.dir, delete=False) as f:
        f.write("\n".join(flows) + "\n")
    for rep in range(reps):
        bridge = ovs.add_bridge(f"glfloor{rep}", protocols="OpenFlow14")
        start = time.monotonic()
        ovs.ofctl("add-flows", bridge, "--bundle", f.name)
        times.append(time.monotonic() - start)
        ovs.del_bridge(bridge)
    Path(f.name).unlink()
    return statistics.median(times)


def bench_install(sizes: tuple[int, ...], reps: int, log: Any = print) -> list[dict[str, Any]]:
    """bench/install's throughput part (floor and Goldilocks install), one record per size."""
    from bench.install import compiled_flows, measure_floor, run_child

    with OvsSandbox() as ovs:
        floor = measure_floor(ovs.dir, sizes, compiled_flows(), reps, ovs.dir)
        gold = run_child(ovs.netns, ["--child", "throughput", "--sizes", ",".join(map(str, sizes)), "--profile", "0",
                                     "--sandbox", str(ovs.dir), "--throughput-reps", str(reps), "--reps", "1"],
                         timeout=900)
    out = []
    for n in sizes:
        runs = gold["runs"][str(n)]
        g = statistics.median(r["in_sync"] for r in runs)
        out.append({"flows": n, "floor_s": round(floor[n]["s"], 4), "goldilocks_s": round(g, 4),
                    "floor_flows_per_s": round(n / floor[n]["s"]), "goldilocks_flows_per_s": round(n / g),
                    "ratio": round(floor[n]["s"] / g, 3), "n": len(runs)})
        log(f"install {n:,} flows: floor {floor[n]['s']:.3f} s, goldilocks {g:.3f} s")
    return out
