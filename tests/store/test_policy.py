"""Policy revisions: one draft at a time, checked publication in one transaction, reverts
as new revisions, a history that keeps everything."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest

from controller.policy.validate import Problem
from controller.store import NotFound, Rejected, Store
from controller.store.records import RevisionState

Check = Callable[[Mapping[str, Any]], Sequence[Problem]]
S = RevisionState


def doc(port: int = 80, group: str = "web") -> dict[str, Any]:
    return {
        "groups": {"web": "tag.tier == 'web'"},
        "rules": [{"id": "to-web", "tier": "application", "position": 10, "source": "any",
                   "destination": {"group": group}, "services": [f"tcp/{port}"], "action": "allow"}],
    }


def test_the_valid_document_passes_the_real_check(check: Check) -> None:
    assert check(doc()) == []
    assert check(doc(group="nope")) != []


def test_save_replace_and_discard_draft(store: Store) -> None:
    assert store.draft() is None and store.active_revision() is None
    first = store.save_draft(doc(80), actor="alice", comment="open web")
    assert (first.number, first.state, first.author, first.based_on, first.comment) == (1, S.DRAFT, "alice", None, "open web")
    assert first.document == doc(80)

    second = store.save_draft(doc(8080), actor="bob")
    assert second.number == 1 and second.document == doc(8080)  # the same draft, replaced
    assert second.comment == "open web"
    assert store.draft() == second

    discarded = store.discard_draft(actor="bob")
    assert discarded.state == S.DISCARDED
    assert store.draft() is None
    with pytest.raises(NotFound):
        store.discard_draft(actor="bob")
    assert store.save_draft(doc(), actor="alice").number == 2  # numbers are never reused


def test_documents_are_stored_verbatim(store: Store) -> None:
    document = {"rules": [], "groups": {"zeta": "tag.a == 'z'", "alpha": "tag.a == 'a'"}, "x": [1, 2.5, None, True]}
    store.save_draft(document, actor="alice")
    stored = store.draft()
    assert stored is not None and stored.document == document
    assert list(stored.document["groups"]) == ["zeta", "alpha"]  # key order kept


def test_publish_with_problems_changes_nothing_but_the_audit_log(store: Store, check: Check) -> None:
    store.save_draft(doc(), actor="alice")
    active = store.publish_draft(actor="alice", check=check)
    draft = store.save_draft(doc(group="nope"), actor="bob")

    with pytest.raises(Rejected) as caught:
        store.publish_draft(actor="bob", check=check)
    assert caught.value.problems and all(isinstance(p, Problem) for p in caught.value.problems)
    assert "nope" in str(caught.value)
    assert store.active_revision() == active
    assert store.draft() == draft
    rejection = store.audit_log(limit=1)[0]
    assert (rejection.actor, rejection.action, rejection.target) == ("bob", "policy.publish", f"policy:{draft.number}")
    assert rejection.outcome.startswith("rejected: ")
    assert any("nope" in p["message"] for p in rejection.details["problems"])


def test_publish_archives_the_active_revision(store: Store, check: Check) -> None:
    with pytest.raises(NotFound):
        store.publish_draft(actor="alice", check=check)
    store.save_draft(doc(80), actor="alice")
    one = store.publish_draft(actor="carol", check=check)
    assert (one.number, one.state, one.published_by) == (1, S.ACTIVE, "carol")
    assert one.published_at is not None and one.published_at >= one.created_at
    assert store.draft() is None

    two_draft = store.save_draft(doc(443), actor="alice")
    assert two_draft.based_on == 1
    two = store.publish_draft(actor="carol", check=check)
    assert two.number == 2 and store.active_revision() == two
    old = store.revision(1)
    assert old is not None and old.state == S.ARCHIVED and old.document == doc(80)


def test_revert_creates_a_new_active_revision(store: Store, check: Check) -> None:
    for port in (80, 443):
        store.save_draft(doc(port), actor="alice")
        store.publish_draft(actor="alice", check=check)
    pending = store.save_draft(doc(8443), actor="bob")

    three = store.revert_to(1, actor="carol", check=check)
    assert (three.number, three.state, three.based_on, three.published_by) == (4, S.ACTIVE, 1, "carol")
    assert three.document == doc(80)
    assert store.active_revision() == three
    assert store.draft() == pending  # a draft in progress is left alone
    assert [(r.number, r.state) for r in store.history()] == [
        (4, S.ACTIVE), (3, S.DRAFT), (2, S.ARCHIVED), (1, S.ARCHIVED),
    ]
    with pytest.raises(NotFound):
        store.revert_to(99, actor="carol", check=check)


def test_revert_is_checked_too(store: Store, check: Check) -> None:
    store.save_draft(doc(), actor="alice")
    store.publish_draft(actor="alice", check=check)
    refuse: Check = lambda _doc: [Problem("groups.web", "no longer valid")]
    with pytest.raises(Rejected):
        store.revert_to(1, actor="carol", check=refuse)
    assert [r.number for r in store.history()] == [1]
    assert store.audit_log(limit=1)[0].outcome == "rejected: 1 problem"


def test_history_is_newest_first(store: Store, check: Check) -> None:
    store.save_draft(doc(1), actor="a")
    store.discard_draft(actor="a")
    store.save_draft(doc(2), actor="a")
    store.publish_draft(actor="a", check=check)
    store.save_draft(doc(3), actor="a")
    assert [(r.number, r.state) for r in store.history()] == [(3, S.DRAFT), (2, S.ACTIVE), (1, S.DISCARDED)]
    assert store.load_state(now=0.0).policy == store.revision(2)
