"""The `## bench/peer` section of docs/benchmarks.md, from one invocation's JSON records."""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import bench.compile as compile_bench

SECTION = "## bench/peer: Goldilocks and OVN side by side"


@dataclass(frozen=True)
class Figure:
    """One row of the table: how to read it from a run record, and the issue's target (if any)."""

    name: str
    read: Callable[[dict[str, Any]], float | None]
    unit: str
    target: float | None = None  # Goldilocks / OVN must be at most this
    p95: Callable[[dict[str, Any]], float | None] | None = None
    judged_at: int | None = None  # the N the target is set for (None: every N)


def _get(*keys: str) -> Callable[[dict[str, Any]], float | None]:
    def read(r: dict[str, Any]) -> float | None:
        value: Any = r
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value

    return read


def _per_vm(r: dict[str, Any]) -> float | None:
    return r["flows"]["total"] / r["n"]


def _rss_mib(key: str) -> Callable[[dict[str, Any]], float | None]:
    def read(r: dict[str, Any]) -> float | None:
        value = r["rss_kib"].get(key)
        return None if value is None else value / 1024

    return read


FIGURES = (
    Figure("policy flows (with − without policy)", _get("flows", "policy"), "", 1.0),
    Figure("total flows on the bridge", _get("flows", "total"), ""),
    Figure("total flows per VM", _per_vm, "", 0.5),
    Figure("conjunctive flows", _get("flows", "conjunctive"), ""),
    Figure("flows without policy", _get("flows", "without_policy"), ""),
    # Issue 7's cold start, as its reference measures OVN: the process killed and started again on
    # its own state (OVN: the SB database; Goldilocks: its database), the bridge emptied.
    Figure("cold start: restart → all flows, bridge emptied (each on its own state)",
           _get("restart", "median_ms"), "ms", 0.5, _get("restart", "p95_ms")),
    Figure("Goldilocks from an empty database (seeded from the scenario) → all flows; OVN: its restart",
           _get("cold_start", "median_ms"), "ms", None, _get("cold_start", "p95_ms")),
    Figure("OpenFlow echo round trip on the bridge", _get("switch_echo", "median_ms"), "ms",
           None, _get("switch_echo", "p95_ms")),
    # Issue 7: ≤ a tenth of OVN's at N=2,000, and nearly flat as N grows (see `flatness`).
    Figure("membership change → on bridge", _get("membership_change", "median_ms"), "ms", 0.1,
           _get("membership_change", "p95_ms"), judged_at=2000),
    Figure("rule added → on bridge", _get("rule_added", "median_ms"), "ms", 0.5, _get("rule_added", "p95_ms")),
    Figure("apply policy to bound ports → on bridge", _get("apply_policy", "median_ms"), "ms", None,
           _get("apply_policy", "p95_ms")),
    Figure("RSS, all of the system's processes", _rss_mib("total"), "MiB"),
    Figure("RSS, per-hypervisor agent (ovn-controller)", _rss_mib("ovn-controller"), "MiB"),
)


REFERENCE = ("OVN reference figures given with issue 7 (OVN 23.03.1, 2 cores, OVS 3.1 userspace, one hypervisor, "
             "K=10 groups, 8 ACLs, port security on; medians of 5), for judging this machine's OVN measurements:")
REFERENCE_ROWS = (
    "| N | policy / total flows | port added to port group → on bridge | ACL added → on bridge | ovn-controller cold restart |",
    "|---|---|---|---|---|",
    "| 100 | 1,123 / 3,948 | 24–31 ms | 29–31 ms | ~150 ms |",
    "| 500 | 5,293 / 18,918 | 84–87 ms | 74–106 ms | ~0.75 s |",
    "| 1,000 | 10,509 / 37,634 | 133–194 ms | 140–185 ms | ~2.9–3.6 s |",
    "| 2,000 | 20,941 / 75,066 | 417 ms | 486 ms | ~17.9 s |",
)


def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "ms":
        if value == 0:
            return "< 0.05"  # Summary keeps tenths of a millisecond
        return f"{value:.2f}" if value < 1 else f"{value:,.1f}" if value < 100 else f"{value:,.0f}"
    if unit == "MiB":
        return f"{value:,.1f}"
    return f"{value:,.1f}" if value != int(value) else f"{int(value):,}"


def _cell(fig: Figure, r: dict[str, Any] | None) -> str:
    if r is None:
        return "—"
    main = fmt_value(fig.read(r), fig.unit)
    p95 = fig.p95(r) if fig.p95 else None
    return main if p95 is None else f"{main} ({fmt_value(p95, fig.unit)})"


def _ratio(fig: Figure, g: dict[str, Any] | None, o: dict[str, Any] | None, n: int) -> tuple[str, str]:
    a, b = (fig.read(g) if g else None), (fig.read(o) if o else None)
    if a is None or not b:
        return "—", "—"
    ratio = a / b
    if fig.target is None:
        return f"{ratio:.2f}", ""
    if fig.judged_at is not None and n != fig.judged_at:
        return f"{ratio:.2f}", f"(≤ {fig.target:g} at N={fig.judged_at:,})"
    return f"{ratio:.2f}", f"≤ {fig.target:g}: {'met' if ratio <= fig.target else '**not met**'}"


def table(runs: dict[tuple[str, int], dict[str, Any]], ns: list[int]) -> list[str]:
    lines = ["| N | figure | Goldilocks | OVN | Goldilocks / OVN | target |", "|---|---|---|---|---|---|"]
    for n in ns:
        g, o = runs.get(("goldilocks", n)), runs.get(("ovn", n))
        for fig in FIGURES:
            if fig.name.startswith("RSS, per-hypervisor") and o is None:
                continue
            ratio, target = _ratio(fig, g, o, n)
            unit = f" ({fig.unit})" if fig.unit else ""
            lines.append(f"| {n:,} | {fig.name}{unit} | {_cell(fig, g)} | {_cell(fig, o)} | {ratio} | {target} |")
        lines.append(f"| {n:,} | traffic check (allowed pass, denied drop) | {_traffic(g)} | {_traffic(o)} | | |")
    return lines


def flatness(runs: dict[tuple[str, int], dict[str, Any]], ns: list[int]) -> list[str]:
    """The membership change across N, for each system: the issue wants Goldilocks' nearly flat."""
    out = []
    for system in ("goldilocks", "ovn"):
        times = [(n, runs[(system, n)]["membership_change"]["median_ms"]) for n in ns if (system, n) in runs]
        if len(times) > 1:
            lo, hi = min(t for _, t in times), max(t for _, t in times)
            steps = ", ".join(f"{t:.1f} ms at N={n:,}" for n, t in times)
            out.append(f"- {system}: {steps}; largest / smallest {hi / lo:.2f}")
    return out


def _traffic(r: dict[str, Any] | None) -> str:
    if r is None:
        return "—"
    held = sum(1 for c in r["traffic"] if c["want"] == c["got"])
    return f"{'ok' if r['traffic_ok'] else '**FAILED**'} ({held}/{len(r['traffic'])})"


Runs = dict[tuple[str, int], dict[str, Any]]
SPLIT_HEAD = ("| N | change | Goldilocks: `Engine.handle` alone (in-process) | API call returned | bundle sent (log) "
              "| in sync (log) | on bridge | OVN: northd | ovn-controller | --wait=hv returned "
              "| last flow event on br-int |")
COLD_HEAD = ("| N | Goldilocks, empty database: start → OpenFlow listening | → switch connected | → first dump (engine "
             "built from the store) | → all flows | install alone (log: dump → in sync) | `ovs-ofctl --bundle "
             "add-flows` of the same flows | Goldilocks restart: start → snapshot restored (log) | → all flows "
             "| → full controller in sync | OVN: restart → first flow | → all flows |")


def _ms_row(label: str, cells: list[Any]) -> str:
    return f"| {label} | " + " | ".join(fmt_value(c, "ms") for c in cells) + " |"


def _head(head: str) -> list[str]:
    return [head, "|" + "---|" * head.count(" | ") + "---|"]


def splits(runs: Runs, ns: list[int]) -> list[str]:
    """Where each system's change time goes."""
    lines = _head(SPLIT_HEAD)
    for n in ns:
        g, o = runs.get(("goldilocks", n), {}), runs.get(("ovn", n), {})
        for key, label in (("membership_change", "membership"), ("rule_added", "rule added"),
                           ("apply_policy", "apply policy")):
            gs, os_ = g.get(key, {}), o.get(key, {})
            cells = [g.get("engine_in_process", {}).get(f"{key}_ms"), gs.get("api_median_ms"),
                     gs.get("bundle_sent_median_ms"), gs.get("in_sync_median_ms"), gs.get("median_ms"),
                     os_.get("northd_median_ms"), os_.get("controller_median_ms"), os_.get("median_ms"),
                     os_.get("bridge_median_ms")]
            lines.append(_ms_row(f"{n:,} | {label}", cells))
    return lines


def cold_split(runs: Runs, ns: list[int]) -> list[str]:
    lines = _head(COLD_HEAD)
    for n in ns:
        g, o = runs.get(("goldilocks", n), {}), runs.get(("ovn", n), {})
        gc, oc, inst, gr = g.get("cold_start", {}), o.get("cold_start", {}), g.get("install", {}), g.get("restart", {})
        cells = [gc.get("start_to_listening_median_ms"), gc.get("start_to_switch_connected_median_ms"),
                 gc.get("start_to_first_dump_median_ms"), gc.get("median_ms"), inst.get("goldilocks_ms"),
                 inst.get("floor_ms"), gr.get("start_to_restored_median_ms"), gr.get("median_ms"),
                 gr.get("start_to_in_sync_median_ms"), oc.get("first_flow_median_ms"), oc.get("median_ms")]
        lines.append(_ms_row(f"{n:,}", cells))
    return lines


def install_table(records: list[dict[str, Any]]) -> list[str]:
    lines = [("| flows | `ovs-ofctl --bundle add-flows` (s) | flows/s | Goldilocks connect → in sync (s) | flows/s "
             "| Goldilocks / floor (target ≥ 80%) |"), "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['flows']:,} | {r['floor_s']:.3f} | {r['floor_flows_per_s']:,} | {r['goldilocks_s']:.3f} "
                     f"| {r['goldilocks_flows_per_s']:,} | {r['ratio']:.0%}: {'met' if r['ratio'] >= 0.8 else '**not met**'} |")
    return lines


def versions() -> list[str]:
    def first(cmd: list[str]) -> str:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        return (done.stdout.splitlines() or ["unknown"])[0].strip()

    return [f"- Kernel: {platform.release()}", f"- OVS: {first(['ovs-vswitchd', '--version'])} (userspace datapath)",
            f"- OVN: {first(['ovn-northd', '--version'])}, {first(['ovn-controller', '--version'])}"]


def _run_dated(info: list[str], records: list[dict[str, Any]]) -> list[str]:
    """The machine's lines with the run's own dates, not the time of rendering (`--render`)."""
    dates = sorted(r["date"] for r in records if "date" in r)
    if not dates:
        return info
    when = f"- Date: measured {dates[0]} to {dates[-1]} (each record's time as it was written)"
    return [when if line.startswith("- Date:") else line for line in info]


def render(records: list[dict[str, Any]], behind: list[str], intro: str) -> str:
    runs = {(r["system"], r["n"]): r for r in records if r["system"] in ("goldilocks", "ovn") and "error" not in r}
    ns = sorted({n for _, n in runs})
    failed = failed_attempts(records)
    installs = [r for r in records if r["system"] == "install"]
    loads = ", ".join(f"{r['system']} N={r['n']:,}: {r['load_at_start']:g}" for r in records if "load_at_start" in r)
    lines = [SECTION, "", intro, "", *_run_dated(compile_bench.machine_info(), records), *versions(),
             f"- Load average (1 min) as each run started: {loads or 'not recorded'}", "",
             "### Both systems, same run (median, p95 in brackets)", "", *table(runs, ns), "",
             "Membership change across N (medians; the target: nearly flat, and ≤ 0.1× OVN's at N=2,000):", "",
             *flatness(runs, ns), "",
             "### Where the change time goes (medians, ms from the start of the change)", "", *splits(runs, ns), "",
             "### Cold start (medians, ms)", "", *cold_split(runs, ns), ""]
    if installs:
        lines += ["### Flow-install throughput against the `ovs-ofctl --bundle add-flows` floor (bench/install's flows)",
                  "", *install_table(installs), ""]
    if failed:
        lines += ["### Failed attempts (see the JSON line for the whole error)", "", *failed, ""]
    lines += ["### Where Goldilocks is behind, and why", "", *(behind or ["- Nowhere in this run."]), "",
              REFERENCE, "", *REFERENCE_ROWS, ""]
    return "\n".join(lines)


def measured(records: list[dict[str, Any]]) -> set[tuple[str, int]]:
    """(system, N) of every attempt that did not fail."""
    return {(r["system"], r["n"]) for r in records if "error" not in r}


def failed_attempts(records: list[dict[str, Any]]) -> list[str]:
    """One line per failed attempt: what failed, and whether a later attempt measured it."""
    done = measured(records)
    return [f"- {r['system']} N={r['n']:,}"
            f"{' (measured on the next attempt)' if (r['system'], r['n']) in done else ''}: {_first_line(r['error'])}"
            for r in records if "error" in r]


def _first_line(error: str) -> str:
    """What failed: the error's first line (log tails, when attached, follow it)."""
    return (error.strip().splitlines() or ["?"])[0]


def write_section(path: Path, section: str) -> None:
    """Replace only this benchmark's section (bench/compile's helper, with our heading)."""
    with mock.patch.object(compile_bench, "SECTION", SECTION):
        compile_bench.write_section(path, section)
