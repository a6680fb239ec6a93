"""A fault found in user input, with where it is: the one shape every validator reports in.

On its own, with nothing imported, because the configuration loader needs it before
`goldilocks run` has loaded anything slow (controller/warmstart.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Problem:
    location: str  # e.g. "policy.rules[2].services[1]", "groups.finance-desktops"
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"
