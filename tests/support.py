"""Small shared helpers for tests."""

from __future__ import annotations

from controller.events import ContextReported
from controller.model import VM, Attr, Provenance


def logout_event(vm: VM) -> ContextReported:
    """The agent's next report for `vm`: the same guest context with nobody logged in
    (directory groups derive from logins, so they go too)."""
    kept = frozenset(f for f in vm.facts if f.provenance is Provenance.GUEST
                     and f.attr not in (Attr.USER, Attr.USERGROUP))
    return ContextReported(vm.uuid, Provenance.GUEST, kept)


def login_again_event(vm: VM) -> ContextReported:
    """`vm`'s original guest report (as loaded), logins included."""
    return ContextReported(vm.uuid, Provenance.GUEST, frozenset(
        f for f in vm.facts if f.provenance is Provenance.GUEST and f.attr is not Attr.USERGROUP))
