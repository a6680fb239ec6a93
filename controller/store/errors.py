"""What the store raises, and the snapshot it hands the engine."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from controller.model import Inventory
from controller.policy.validate import Problem
from controller.store.records import ContextRecord, PolicyRevision


class StoreError(Exception):
    """Base of every refusal by the store."""


class NotFound(StoreError):
    """The named object does not exist."""


class Conflict(StoreError):
    """The change clashes with what is stored; the message names the field,
    e.g. "mac 02:00:00:00:00:01: already used by vm web1"."""


class Rejected(StoreError):
    """A policy document failed its check; nothing changed but the audit log."""

    def __init__(self, problems: Iterable[Problem], what: str = "policy") -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        count = len(self.problems)
        lines = [f"{what} rejected: {count} problem{'s' if count != 1 else ''}"]
        lines += [f"  {p}" for p in self.problems]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class StoredState:
    """Everything the engine needs to rebuild itself (DESIGN.md §7: no truth only in memory)."""

    inventory: Inventory  # VMs carry platform facts (tags) only
    directory: dict[str, frozenset[str]]
    policy: PolicyRevision | None  # the active revision
    contexts: tuple[ContextRecord, ...]  # unexpired, guest and authoritative
