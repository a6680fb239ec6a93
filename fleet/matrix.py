"""Reachability matrices: expected vs observed, and the table a person reads. Pure.

A cell is (source VM, destination VM, probe); a probe is `ping` or `tcp/PORT`. True means the
probe got through (allowed), False that it did not (denied).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

Cell = tuple[str, str, str]


@dataclass(frozen=True)
class Grid:
    """Which cells a matrix has: rows are sources, columns (destination, probe)."""

    sources: tuple[str, ...]
    columns: tuple[tuple[str, str], ...]

    @staticmethod
    def of(sources: Iterable[str], targets: Iterable[tuple[str, Iterable[str]]]) -> Grid:
        return Grid(tuple(sources), tuple((dst, probe) for dst, probes in targets for probe in probes))

    def cells(self) -> tuple[Cell, ...]:
        """Every cell but a VM probing itself."""
        return tuple((src, dst, probe) for src in self.sources for dst, probe in self.columns if src != dst)


def expected_matrix(grid: Grid, allowed: frozenset[Cell]) -> dict[Cell, bool]:
    return {cell: cell in allowed for cell in grid.cells()}


def mismatches(expected: Mapping[Cell, bool], observed: Mapping[Cell, bool]) -> tuple[Cell, ...]:
    """Cells whose observation differs from the expectation (a missing observation differs)."""
    return tuple(cell for cell, want in expected.items() if observed.get(cell) is not want)


def verdict(value: bool | None) -> str:
    return {True: "allow", False: "deny", None: "?"}[value]


def render(grid: Grid, expected: Mapping[Cell, bool], observed: Mapping[Cell, bool]) -> str:
    """The matrix as a table: one row per source, a column per destination and probe. A cell
    that is not as expected is upper-cased and marked `!`, and listed under the table."""
    header = [["from \\ to", *(dst for dst, _ in grid.columns)], ["", *(probe for _, probe in grid.columns)]]
    rows = []
    for src in grid.sources:
        row = [src]
        for dst, probe in grid.columns:
            cell = (src, dst, probe)
            if src == dst:
                row.append("-")
            elif observed.get(cell) is expected.get(cell):
                row.append(verdict(observed.get(cell)))
            else:
                row.append(verdict(observed.get(cell)).upper() + " !")
        rows.append(row)
    table = header + rows
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(2, "  ".join("-" * w for w in widths))
    for src, dst, probe in mismatches(expected, observed):
        lines.append(f"! {src} -> {dst} {probe}: expected {verdict(expected[(src, dst, probe)])}, "
                     f"got {verdict(observed.get((src, dst, probe)))}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Tally:
    passed: int = 0
    failed: int = 0

    def add(self, ok: bool) -> Tally:
        return Tally(self.passed + ok, self.failed + (not ok))

    def summary(self) -> str:
        return f"{self.passed} passed, {self.failed} failed"
