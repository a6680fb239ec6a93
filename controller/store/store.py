"""The store: the source of truth (DESIGN.md §7). Every write runs in one transaction together
with its audit entry; every read hands out immutable values, never rows.

Writes are serialized: by a lock in this process, by BEGIN IMMEDIATE on SQLite (across
processes) and by a transaction-scoped advisory lock on PostgreSQL (across controllers). Writes
are rare next to reads, and serializing them turns every "check, then insert" into a
deterministic Conflict naming the field instead of a constraint error from a race.
"""

from __future__ import annotations

import fnmatch
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from sqlalchemy import Engine, bindparam, delete, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from controller.flowsnap import FlowSnapshot, encode_ports, pack_flow_mods
from controller.model import VM, Attr, Fact, Gateway, Hypervisor, Inventory, Provenance, VNic
from controller.policy.validate import Problem
from controller.scenario import Scenario
from controller.store import checks, codec, tokens
from controller.store.database import SQLITE_BEGIN, WRITE_LOCK, migrate, open_engine
from controller.store.errors import Conflict, NotFound, Rejected, StoredState
from controller.store.records import (
    AuditEntry,
    ContextRecord,
    PolicyRevision,
    Principal,
    RevisionState,
    Role,
)
from controller.store.schema import (
    AuditRow,
    ContextRow,
    DirectoryMembershipRow,
    DirectoryUserRow,
    FlowSnapshotRow,
    HypervisorRow,
    PrincipalRow,
    RevisionRow,
    SettingRow,
    StateGenerationRow,
    TagRow,
    VmRow,
    VnicIpRow,
    VnicRow,
)

Check = Callable[[Mapping[str, Any]], Sequence[Problem]]
SYSTEM = "system"


class Store:
    def __init__(self, url: str, *, clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self._clock = clock
        self._engine: Engine = open_engine(url)
        self._postgres = self._engine.dialect.name == "postgresql"
        self._writer = self._engine.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})
        # load_state must see one moment, not each query its own (PostgreSQL's default).
        self._snapshot = (
            self._engine.execution_options(isolation_level="REPEATABLE READ")
            if self._postgres else self._engine
        )
        self._lock = threading.Lock()
        migrate(self._engine)

    def close(self) -> None:
        self._engine.dispose()

    # ---- transactions ----------------------------------------------------------------------

    @contextmanager
    def _read(self, engine: Engine | None = None) -> Iterator[Session]:
        with Session(engine or self._engine) as session, session.begin():
            yield session
            if session.info.get(_AUDIT_PENDING):
                raise RuntimeError("audit entries made in a read transaction would be lost; use _write")

    @contextmanager
    def _write(self, *, flows: bool = True) -> Iterator[Session]:
        """One write transaction. Unless the caller says its write cannot change any flow
        (`flows=False`: principals, drafts, audit entries, snapshots), it bumps the state
        generation, which a flow snapshot is checked against: a path that forgets to say
        so costs a restore, never lets a stale one through."""
        with self._lock, Session(self._writer, expire_on_commit=False) as session:
            try:
                with session.begin():
                    if self._postgres:
                        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITE_LOCK})
                    if flows:
                        _bump_generation(session)
                    yield session
                    _store_audit(session)
            except IntegrityError as exc:
                # The checks should have caught it; the constraint is the last line of defence.
                raise Conflict(f"conflicting change: {str(exc.orig).splitlines()[0]}") from exc

    def _audit(
        self, session: Session, actor: str, action: str, target: str,
        before: Any = None, after: Any = None, *, outcome: str = "ok",
        details: Mapping[str, Any] | None = None,
    ) -> None:
        # Written by _write in one statement as the transaction ends, in the order given.
        session.info.setdefault(_AUDIT_PENDING, []).append({
            "at": self._clock(), "actor": actor, "action": action, "target": target, "before": before,
            "after": after, "outcome": outcome, "details": _plain(details or {}),
        })

    # ---- principals ------------------------------------------------------------------------

    def bootstrap_admin(self, token: str | None = None) -> str | None:
        with self._write(flows=False) as session:
            if session.scalar(select(func.count()).select_from(PrincipalRow)):
                return None
            plaintext, hashed = (token, tokens.chosen(token)) if token else tokens.generate()
            row = self._new_principal(session, "admin", Role.ADMIN, None, hashed)
            self._audit(session, SYSTEM, "token.bootstrap", "principal:admin",
                        after=codec.principal_json(codec.principal_of(row)))
        return plaintext

    def create_principal(
        self, name: str, role: Role, hypervisor: str | None = None, *, actor: str
    ) -> tuple[Principal, str]:
        role = Role(role)
        _principal_args(name, role, hypervisor)
        with self._write(flows=False) as session:
            if session.get(PrincipalRow, name) is not None:
                raise Conflict(f"name {name}: already used by a principal")
            plaintext, hashed = tokens.generate()
            principal = codec.principal_of(self._new_principal(session, name, role, hypervisor, hashed))
            self._audit(session, actor, "token.create", f"principal:{name}",
                        after=codec.principal_json(principal))
        return principal, plaintext

    def _new_principal(
        self, session: Session, name: str, role: Role, hypervisor: str | None, hashed: tokens.TokenHash
    ) -> PrincipalRow:
        row = PrincipalRow(
            name=name, role=role.value, hypervisor=hypervisor, token_id=hashed.token_id,
            token_scheme=hashed.scheme, token_salt=hashed.salt, token_hash=hashed.digest,
            created_at=self._clock(), revoked_at=None,
        )
        session.add(row)
        session.flush()
        return row

    def authenticate(self, token: str) -> Principal | None:
        if not token:
            return None
        token_id = tokens.token_id_of(token)
        with self._read() as session:
            # A generated token names its row; a chosen one is tried against the few rows
            # that have no token id (the bootstrap admin).
            rows = session.execute(_LIVE_TOKEN, {"token_id": token_id}) if token_id else session.execute(_LIVE_CHOSEN)
            for row in rows:
                stored = tokens.TokenHash(row.token_id, row.token_scheme, row.token_salt, row.token_hash)
                if tokens.verify(token, stored):
                    return codec.principal_of(row)
        return None

    def list_principals(self) -> list[Principal]:
        with self._read() as session:
            rows = session.scalars(select(PrincipalRow).order_by(PrincipalRow.name))
            return [codec.principal_of(r) for r in rows]

    def revoke_principal(self, name: str, *, actor: str) -> Principal:
        with self._write(flows=False) as session:
            row = session.get(PrincipalRow, name)
            if row is None:
                raise NotFound(f"principal {name}: no such principal")
            before = codec.principal_of(row)
            if row.revoked_at is None:
                self._keep_an_admin(session, row)
                row.revoked_at = self._clock()
            after = codec.principal_of(row)
            self._audit(session, actor, "token.revoke", f"principal:{name}",
                        codec.principal_json(before), codec.principal_json(after))
        return after

    def _keep_an_admin(self, session: Session, row: PrincipalRow) -> None:
        # Nobody could ever create a token again (bootstrap only runs on an empty table).
        if row.role != Role.ADMIN.value:
            return
        admins = session.scalar(select(func.count()).select_from(PrincipalRow).where(
            PrincipalRow.role == Role.ADMIN.value, PrincipalRow.revoked_at.is_(None)))
        if admins == 1:
            raise Conflict(f"principal {row.name}: is the last admin; create another admin first")

    # ---- hypervisors and gateway -----------------------------------------------------------

    def list_hypervisors(self) -> list[Hypervisor]:
        with self._read() as session:
            rows = session.scalars(select(HypervisorRow).order_by(HypervisorRow.name))
            return [codec.hypervisor_of(r) for r in rows]

    def upsert_hypervisor(self, hv: Hypervisor, *, actor: str) -> Hypervisor:
        with self._write() as session:
            return self._upsert_hypervisor(session, hv, actor)

    def _upsert_hypervisor(self, session: Session, hv: Hypervisor, actor: str) -> Hypervisor:
        checks.hypervisor_fits(session, hv)
        row = session.get(HypervisorRow, hv.name)
        before = None if row is None else codec.hypervisor_json(codec.hypervisor_of(row))
        if row is None:
            row = HypervisorRow(name=hv.name)
            session.add(row)
        row.uplink_ofport = hv.uplink_ofport
        row.dpid = None if hv.dpid is None else str(hv.dpid)
        session.flush()
        stored = codec.hypervisor_of(row)
        self._audit(session, actor, "hypervisor.upsert", f"hypervisor:{hv.name}",
                    before, codec.hypervisor_json(stored))
        return stored

    def delete_hypervisor(self, name: str, *, actor: str) -> Hypervisor:
        with self._write() as session:
            row = session.get(HypervisorRow, name)
            if row is None:
                raise NotFound(f"hypervisor {name}: no such hypervisor")
            vms = session.scalars(select(VmRow.name).where(VmRow.hypervisor == name).order_by(VmRow.name)).all()
            if vms:
                raise Conflict(f"hypervisor {name}: still hosts vm {', '.join(vms)}")
            gone = codec.hypervisor_of(row)
            session.delete(row)
            self._audit(session, actor, "hypervisor.delete", f"hypervisor:{name}",
                        codec.hypervisor_json(gone), None)
        return gone

    def gateway(self) -> Gateway | None:
        with self._read() as session:
            return checks.stored_gateway(session)

    def set_gateway(self, gw: Gateway | None, *, actor: str) -> None:
        with self._write() as session:
            self._set_gateway(session, gw, actor)

    def _set_gateway(self, session: Session, gw: Gateway | None, actor: str) -> None:
        before = checks.stored_gateway(session)
        row = session.get(SettingRow, checks.GATEWAY_KEY)
        if gw is None:
            if row is not None:
                session.delete(row)
        else:
            gw = checks.normalized_gateway(gw)
            checks.gateway_fits(session, gw)
            if row is None:
                session.add(SettingRow(key=checks.GATEWAY_KEY, value=codec.gateway_json(gw)))
            else:
                row.value = codec.gateway_json(gw)
        self._audit(session, actor, "gateway.set", "gateway",
                    codec.gateway_json(before), codec.gateway_json(gw))

    # ---- VMs -------------------------------------------------------------------------------

    def list_vms(
        self, *, hypervisor: str | None = None, tag: tuple[str, str] | None = None,
        name_glob: str | None = None,
    ) -> list[VM]:
        query = select(VmRow).order_by(VmRow.name)
        if hypervisor is not None:
            query = query.where(VmRow.hypervisor == hypervisor)
        if tag is not None:
            query = query.where(VmRow.tags.any((TagRow.key == tag[0]) & (TagRow.value == tag[1])))
        with self._read() as session:
            vms = [codec.vm_of(r) for r in session.scalars(query)]
        if name_glob is not None:
            vms = [vm for vm in vms if fnmatch.fnmatchcase(vm.name, name_glob)]
        return vms

    def vm_uuid(self, uuid_or_name: str) -> str | None:
        with self._read() as session:
            return _vm_uuid(session, uuid_or_name)

    def get_vm(self, uuid_or_name: str) -> VM | None:
        with self._read() as session:
            uuid = _vm_uuid(session, uuid_or_name)
            return None if uuid is None else _load_vm(session, uuid)

    def create_vm(self, vm: VM, *, actor: str) -> VM:
        vm = checks.normalized_vm(vm)
        with self._write() as session:
            return self._create_vm(session, vm, actor)

    def _create_vm(self, session: Session, vm: VM, actor: str) -> VM:
        existing = session.get(VmRow, vm.uuid)
        if existing is not None:
            raise Conflict(f"uuid {vm.uuid}: already used by vm {existing.name}")
        checks.vm_fits(session, vm)
        stored = self._insert_vm(session, vm, actor)
        session.flush()
        return stored

    def _insert_vm(self, session: Session, vm: VM, actor: str) -> VM:
        row = VmRow(uuid=vm.uuid, name=vm.name, hypervisor=vm.hypervisor)
        session.add(row)
        _fill_vm(row, vm)
        stored = codec.vm_of(row)
        self._audit(session, actor, "vm.create", f"vm:{vm.uuid}", None, codec.vm_json(stored))
        return stored

    def update_vm(self, vm: VM, *, actor: str) -> VM:
        vm = checks.normalized_vm(vm)
        with self._write() as session:
            row = checks.vm_row(session, vm.uuid)
            before = codec.vm_of(row)
            checks.vm_fits(session, vm)
            _clear_vm(session, row)
            row.name, row.hypervisor = vm.name, vm.hypervisor
            _fill_vm(row, vm)
            session.flush()
            stored = codec.vm_of(row)
            self._audit(session, actor, "vm.update", f"vm:{vm.uuid}",
                        codec.vm_json(before), codec.vm_json(stored))
        return stored

    def delete_vm(self, uuid: str, *, actor: str) -> VM:
        with self._write() as session:
            row = checks.vm_row(session, uuid)
            gone = codec.vm_of(row)
            contexts = [codec.context_json(codec.context_of(c)) for c in _context_rows(session, uuid)]
            # Explicitly, not only by ON DELETE CASCADE: the audit entry lists what went.
            session.execute(delete(ContextRow).where(ContextRow.vm_uuid == uuid))
            session.delete(row)
            self._audit(session, actor, "vm.delete", f"vm:{uuid}",
                        {**codec.vm_json(gone), "contexts": contexts}, None)
        return gone

    def set_tags(self, uuid: str, tags: Mapping[str, str], *, actor: str) -> VM:
        for key, value in tags.items():
            checks.tag_key(key)
            if not isinstance(value, str):
                # ValueError like every other bad input here: callers map it to one answer (422).
                raise ValueError(f"tag {key}: value must be a string, got {value!r}")  # noqa: TRY004
        with self._write() as session:
            before = _load_vm(session, uuid)
            if before is None:
                raise NotFound(f"vm {uuid}: no such VM")
            now = self._clock()
            # An unchanged tag keeps the time it was first observed with that value.
            kept = {f.key: f.observed_at for f in before.facts if tags.get(f.key) == f.value}
            new = [{"vm_uuid": uuid, "key": k, "value": v, "observed_at": kept.get(k, now)}
                   for k, v in sorted(tags.items())]
            session.execute(_DELETE_TAGS, {"uuid": uuid})
            if new:
                session.execute(_INSERT_TAGS, new)
            stored = VM(before.uuid, before.name, before.hypervisor, before.vnics, frozenset(
                Fact(Attr.TAG, t["key"], t["value"], Provenance.PLATFORM, t["observed_at"]) for t in new))
            self._audit(session, actor, "vm.tags", f"vm:{uuid}",
                        codec.vm_json(before), codec.vm_json(stored))
        return stored

    # ---- context ---------------------------------------------------------------------------

    def put_context(
        self, uuid: str, provenance: Provenance, facts: frozenset[Fact], *, actor: str,
        observed_at: float, expires_at: float | None = None,
    ) -> ContextRecord:
        provenance = Provenance(provenance)
        checks.context_facts(facts, provenance)
        record = ContextRecord(uuid, provenance, frozenset(facts), actor, observed_at, expires_at)
        with self._write(flows=False) as session:
            checks.vm_row(session, uuid)
            if self._put_context(session, record, actor):
                _bump_generation(session)
        return record

    def _put_context(self, session: Session, record: ContextRecord, actor: str) -> bool:
        """Whether the claims changed (False: a heartbeat, which only moves the clock)."""
        row = session.get(ContextRow, (record.vm_uuid, record.provenance.value))
        before = None if row is None else codec.context_json(codec.context_of(row))
        if row is not None and _heartbeat(codec.context_of(row), record):
            # The same claims from the same reporter, still live: only the clock moves. An agent
            # heartbeats every few seconds; auditing each would bury the changes that matter.
            # Nor does it bump the generation: a later expiry only makes a snapshot's
            # valid_until (the earlier one) conservative.
            row.observed_at = record.observed_at
            row.expires_at = record.expires_at
            return False
        if row is None:
            row = ContextRow(vm_uuid=record.vm_uuid, provenance=record.provenance.value)
            session.add(row)
        row.facts = codec.facts_to_json(record.facts)
        row.reported_by = record.reported_by
        row.observed_at = record.observed_at
        row.expires_at = record.expires_at
        self._audit(session, actor, f"context.{record.provenance}", f"vm:{record.vm_uuid}",
                    before, codec.context_json(record))
        return True

    def get_context(self, uuid: str) -> list[ContextRecord]:
        """Every source's record for the VM, expired ones included (load_state drops those)."""
        with self._read() as session:
            return [codec.context_of(r) for r in _context_rows(session, uuid)]

    # ---- directory -------------------------------------------------------------------------

    def directory(self) -> dict[str, frozenset[str]]:
        with self._read() as session:
            return _directory(session)

    def set_directory_user(self, user: str, groups: frozenset[str], *, actor: str) -> None:
        if not user.strip():
            raise ValueError("a directory user needs a name")
        with self._write() as session:
            self._set_directory_user(session, user, frozenset(groups), actor, keep_empty=False)

    def _set_directory_user(
        self, session: Session, user: str, groups: frozenset[str], actor: str, *, keep_empty: bool
    ) -> None:
        row = session.get(DirectoryUserRow, user)
        before = None if row is None else sorted(m.group for m in row.groups)
        if row is not None:
            session.delete(row)
            session.flush()  # the memberships go first, so re-adding the same ones cannot clash
        if groups or keep_empty:
            row = DirectoryUserRow(name=user)
            row.groups = [DirectoryMembershipRow(user=user, group=g) for g in sorted(groups)]
            session.add(row)
        after = sorted(groups) if groups or keep_empty else None
        self._audit(session, actor, "directory.set", f"user:{user}",
                    None if before is None else {"groups": before},
                    None if after is None else {"groups": after})

    # ---- policy revisions ------------------------------------------------------------------

    def active_revision(self) -> PolicyRevision | None:
        return self._one_in_state(RevisionState.ACTIVE)

    def draft(self) -> PolicyRevision | None:
        return self._one_in_state(RevisionState.DRAFT)

    def _one_in_state(self, state: RevisionState) -> PolicyRevision | None:
        with self._read() as session:
            return _revision_in(session, state)

    def revision(self, number: int) -> PolicyRevision | None:
        with self._read() as session:
            row = session.get(RevisionRow, number)
            return None if row is None else codec.revision_of(row)

    def history(self) -> list[PolicyRevision]:
        with self._read() as session:
            rows = session.scalars(select(RevisionRow).order_by(RevisionRow.number.desc()))
            return [codec.revision_of(r) for r in rows]

    def save_draft(self, document: Mapping[str, Any], *, actor: str, comment: str = "") -> PolicyRevision:
        doc = _document(document)
        with self._write(flows=False) as session:
            old = _revision_in(session, RevisionState.DRAFT)
            if old is None:
                active = _revision_in(session, RevisionState.ACTIVE)
                draft = PolicyRevision(
                    number=_next_number(session), state=RevisionState.DRAFT, document=doc, author=actor,
                    created_at=self._clock(), comment=comment, based_on=None if active is None else active.number,
                )
                session.execute(_INSERT_REVISION, codec.revision_row(draft))
            else:
                draft = replace(old, document=doc, comment=comment or old.comment)
                session.execute(_REVISE, {"revision": draft.number, "document": doc, "comment": draft.comment})
            self._audit(session, actor, "policy.draft", f"policy:{draft.number}",
                        None if old is None else codec.revision_json(old), codec.revision_json(draft))
        return draft

    def discard_draft(self, *, actor: str) -> PolicyRevision:
        with self._write(flows=False) as session:
            draft = _revision_in(session, RevisionState.DRAFT)
            if draft is None:
                raise NotFound("draft: there is no draft policy")
            discarded = replace(draft, state=RevisionState.DISCARDED)
            session.execute(_DISCARD, {"revision": draft.number})
            self._audit(session, actor, "policy.discard", f"policy:{draft.number}",
                        codec.revision_json(draft), codec.revision_json(discarded))
        return discarded

    def publish_draft(self, *, actor: str, check: Check) -> PolicyRevision:
        problems: list[Problem] = []
        published: PolicyRevision | None = None
        with self._write() as session:
            draft = _revision_in(session, RevisionState.DRAFT)
            if draft is None:
                raise NotFound("draft: there is no draft policy to publish")
            # Checked inside the write transaction: nobody can change the draft in between.
            problems = list(check(draft.document))
            if problems:
                self._audit_rejection(session, actor, "policy.publish", draft.number, problems)
            else:
                published = self._activate(session, draft, actor, stored=True)
                self._audit(session, actor, "policy.publish", f"policy:{draft.number}",
                            codec.revision_json(draft), codec.revision_json(published))
        if published is None:
            raise Rejected(problems, f"draft {draft.number}")
        return published

    def revert_to(self, number: int, *, actor: str, check: Callable[..., Sequence[Problem]]) -> PolicyRevision:
        problems: list[Problem] = []
        reverted: PolicyRevision | None = None
        with self._write() as session:
            source = session.get(RevisionRow, number)
            if source is None:
                raise NotFound(f"revision {number}: no such policy revision")
            if source.state == RevisionState.DRAFT.value:
                raise Conflict(f"revision {number}: is the draft; publish it instead")
            # Checked again: the inventory or the checks may have changed since it was active.
            problems = list(check(source.document))
            if problems:
                self._audit_rejection(session, actor, "policy.revert", number, problems)
            else:
                # A draft in progress stays as it is; the copy goes straight to active.
                copy = PolicyRevision(
                    number=_next_number(session), state=RevisionState.DRAFT, document=_document(source.document),
                    author=actor, created_at=self._clock(), comment=f"revert to revision {number}", based_on=number,
                )
                reverted = self._activate(session, copy, actor, stored=False)
                self._audit(session, actor, "policy.revert", f"policy:{reverted.number}",
                            None, codec.revision_json(reverted), details={"copied_from": number})
        if reverted is None:
            raise Rejected(problems, f"revision {number}")
        return reverted

    def _activate(self, session: Session, revision: PolicyRevision, actor: str, *, stored: bool) -> PolicyRevision:
        """Archive the active revision, then make `revision` the active one: the stored draft's
        row in place, or (not `stored`) a new row. Plain statements, in that order: at most one
        revision is ever active."""
        session.execute(_ARCHIVE_ACTIVE)
        active = replace(revision, state=RevisionState.ACTIVE, published_at=self._clock(), published_by=actor)
        if stored:
            session.execute(_PUBLISH, {"revision": active.number, "at": active.published_at, "by": actor})
        else:
            session.execute(_INSERT_REVISION, codec.revision_row(active))
        return active

    def _audit_rejection(
        self, session: Session, actor: str, action: str, number: int, problems: Sequence[Problem]
    ) -> None:
        count = len(problems)
        self._audit(session, actor, action, f"policy:{number}",
                    outcome=f"rejected: {count} problem{'s' if count != 1 else ''}",
                    details={"problems": [{"location": p.location, "message": p.message} for p in problems]})

    # ---- audit -----------------------------------------------------------------------------

    def audit_log(
        self, *, limit: int = 100, offset: int = 0, actor: str | None = None,
        action_prefix: str | None = None, target: str | None = None,
    ) -> list[AuditEntry]:
        query = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit).offset(offset)
        if actor is not None:
            query = query.where(AuditRow.actor == actor)
        if action_prefix:
            query = query.where(AuditRow.action.startswith(action_prefix, autoescape=True))
        if target is not None:
            query = query.where(AuditRow.target == target)
        with self._read() as session:
            return [_audit_entry(r) for r in session.scalars(query)]

    def record_rejection(
        self, *, actor: str, action: str, target: str, why: str, details: Mapping[str, Any] | None = None
    ) -> None:
        with self._write(flows=False) as session:
            self._audit(session, actor, action, target, outcome=f"rejected: {why}", details=details)

    def quarantine_state(self) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
        """(quarantined VM -> reasons, released VM -> the reasons its release acknowledged)."""
        with self._read() as session:
            row = session.get(SettingRow, QUARANTINE_KEY)
            value = row.value if row is not None else {}
            return ({u: tuple(r) for u, r in (value.get("quarantined") or {}).items()},
                    {u: tuple(r) for u, r in (value.get("released") or {}).items()})

    def save_quarantine(self, quarantined: Mapping[str, Sequence[str]], released: Mapping[str, Sequence[str]],
                        *, actor: str) -> None:
        """Persist the engine's quarantine state (a restart must not set anyone free)."""
        value = {"quarantined": {u: list(r) for u, r in sorted(quarantined.items())},
                 "released": {u: list(r) for u, r in sorted(released.items())}}
        with self._write() as session:
            row = session.get(SettingRow, QUARANTINE_KEY)
            before = None if row is None else row.value
            if before == value:
                return
            if row is None:
                session.add(SettingRow(key=QUARANTINE_KEY, value=value))
            else:
                row.value = value
            self._audit(session, actor, "quarantine.state", "quarantine", before, value)

    def record_event(self, *, actor: str, action: str, target: str, details: Mapping[str, Any]) -> None:
        """Something that happened without a stored change, e.g. what a context change did to flows."""
        with self._write(flows=False) as session:
            self._audit(session, actor, action, target, details=details)

    # ---- flow snapshots (controller/flowsnap.py) --------------------------------------------

    def snapshot_stamp(self, now: float, grace: float) -> tuple[int, float | None] | None:
        """(state generation, first future context expiry) to stamp a snapshot taken now with,
        in one read; None while a context expired less than `grace` seconds ago, which the
        engine may not have applied yet (its flows would be in the snapshot)."""
        with self._read() as session:
            generation = session.scalar(select(StateGenerationRow.value).where(StateGenerationRow.id == 1))
            expiry = ContextRow.expires_at
            if session.scalar(select(func.count()).where(expiry > now - grace, expiry <= now)):
                return None
            return generation or 0, session.scalar(select(func.min(expiry)).where(expiry > now))

    def store_flow_snapshot(self, snapshot: FlowSnapshot) -> None:
        """Keep a bridge's snapshot (replacing its last); not a state change, nor audited: it is
        derived from the audited state and is checked against it before any use."""
        with self._write(flows=False) as session:
            session.merge(FlowSnapshotRow(
                dpid=str(snapshot.dpid), generation=snapshot.generation, config_digest=snapshot.config_digest,
                ports=encode_ports(snapshot.ports), valid_until=snapshot.valid_until, taken_at=snapshot.taken_at,
                flow_mods=pack_flow_mods(snapshot.flow_mods)))

    # ---- the engine's view -----------------------------------------------------------------

    def load_state(self, now: float) -> StoredState:
        with self._read(self._snapshot) as session:
            inventory = Inventory(
                hypervisors={r.name: codec.hypervisor_of(r) for r in session.scalars(select(HypervisorRow))},
                vms={r.uuid: codec.vm_of(r) for r in session.scalars(select(VmRow))},
                gateway=checks.stored_gateway(session),
            )
            active = _revision_in(session, RevisionState.ACTIVE)
            live = select(ContextRow).where(
                ContextRow.expires_at.is_(None) | (ContextRow.expires_at > now)
            ).order_by(ContextRow.vm_uuid, ContextRow.provenance)
            contexts = tuple(codec.context_of(r) for r in session.scalars(live))
            return StoredState(
                inventory, _directory(session), active, contexts
            )

    def import_scenario(self, scenario: Scenario, document: Mapping[str, Any], *, actor: str = SYSTEM) -> None:
        doc = _document(document)
        inventory = scenario.inventory
        vms = [_platform_part(vm) for vm in inventory.vms.values()]
        with self._write() as session:
            if session.scalar(select(func.count()).select_from(VmRow)):
                raise Conflict("vms: the store already has VMs; import only seeds an empty store")
            if session.scalar(select(func.count()).select_from(RevisionRow)):
                raise Conflict("policy: the store already has a policy; import only seeds an empty store")
            for hv in inventory.hypervisors.values():
                self._upsert_hypervisor(session, hv, actor)
            if inventory.gateway is not None:
                self._set_gateway(session, inventory.gateway, actor)
            # parse_scenario has checked the whole inventory for clashes (names, MACs, IPs,
            # ofports, hypervisors) and the store is empty: no VM can clash with a stored one, so
            # no per-VM queries (they made seeding 2000 VMs take 50 s).
            for vm in vms:
                self._insert_vm(session, checks.normalized_vm(vm), actor)
            session.flush()
            for user, groups in sorted(scenario.directory.items()):
                self._set_directory_user(session, user, frozenset(groups), actor, keep_empty=True)
            for record in _scenario_contexts(inventory, actor):
                self._put_context(session, record, actor)
            first = PolicyRevision(number=1, state=RevisionState.DRAFT, document=doc, author=actor,
                                   created_at=self._clock(), comment="imported from a scenario")
            policy = self._activate(session, first, actor, stored=False)
            self._audit(session, actor, "scenario.import", "store", None, {
                "hypervisors": sorted(inventory.hypervisors), "vms": sorted(vm.name for vm in vms),
                "users": sorted(scenario.directory), "policy": policy.number,
            })


# ---- helpers --------------------------------------------------------------------------------

QUARANTINE_KEY = "quarantine"


# Hot paths (a membership change, a publish, every request's token) use these tables with
# plain statements: the ORM's identity map and unit of work cost about 3x as much per query.
_GENERATION = StateGenerationRow.__table__
_REVISIONS = RevisionRow.__table__
_AUDIT = AuditRow.__table__
_PRINCIPALS = PrincipalRow.__table__
_VMS, _VNICS, _VNIC_IPS, _TAGS = VmRow.__table__, VnicRow.__table__, VnicIpRow.__table__, TagRow.__table__
_AUDIT_PENDING = "goldilocks.audit"  # session.info key: a transaction's audit entries, not yet written

# Built once: a statement object caches its own cache key, so reusing one skips building the
# statement and keying SQLAlchemy's compiled cache each time (about 4x cheaper per query).
_BUMP_GENERATION = _GENERATION.update().where(_GENERATION.c.id == 1).values(value=_GENERATION.c.value + 1)
_INSERT_AUDIT = _AUDIT.insert()
_LIVE_TOKEN = select(_PRINCIPALS).where(_PRINCIPALS.c.revoked_at.is_(None),
                                        _PRINCIPALS.c.token_id == bindparam("token_id"))
_LIVE_CHOSEN = select(_PRINCIPALS).where(_PRINCIPALS.c.revoked_at.is_(None), _PRINCIPALS.c.token_id.is_(None))
_VM_UUID = (select(_VMS.c.uuid).where((_VMS.c.uuid == bindparam("key")) | (_VMS.c.name == bindparam("key")))
            .order_by(_VMS.c.uuid != bindparam("key")).limit(1))
_VM_HEAD = select(_VMS.c.name, _VMS.c.hypervisor).where(_VMS.c.uuid == bindparam("uuid"))
_VM_NICS = (select(_VNICS.c.id, _VNICS.c.mac, _VNICS.c.ofport, _VNICS.c.name, _VNIC_IPS.c.ip)
            .outerjoin(_VNIC_IPS, _VNIC_IPS.c.vnic_id == _VNICS.c.id).where(_VNICS.c.vm_uuid == bindparam("uuid"))
            .order_by(_VNICS.c.position, _VNIC_IPS.c.position))
_VM_TAGS = select(_TAGS.c.key, _TAGS.c.value, _TAGS.c.observed_at).where(_TAGS.c.vm_uuid == bindparam("uuid"))
_DELETE_TAGS = _TAGS.delete().where(_TAGS.c.vm_uuid == bindparam("uuid"))
_INSERT_TAGS = _TAGS.insert()
_REVISION_IN = select(_REVISIONS).where(_REVISIONS.c.state == bindparam("state"))
_ARCHIVE_ACTIVE = (_REVISIONS.update().where(_REVISIONS.c.state == RevisionState.ACTIVE.value)
                   .values(state=RevisionState.ARCHIVED.value))
_PUBLISH = (_REVISIONS.update().where(_REVISIONS.c.number == bindparam("revision"))
            .values(state=RevisionState.ACTIVE.value, published_at=bindparam("at"), published_by=bindparam("by")))
_REVISE = _REVISIONS.update().where(_REVISIONS.c.number == bindparam("revision"))
_DISCARD = (_REVISIONS.update().where(_REVISIONS.c.number == bindparam("revision"))
            .values(state=RevisionState.DISCARDED.value))
_INSERT_REVISION = _REVISIONS.insert()


def _bump_generation(session: Session) -> None:
    session.execute(_BUMP_GENERATION)


def _store_audit(session: Session) -> None:
    pending = session.info.pop(_AUDIT_PENDING, None)
    if pending:
        session.execute(_INSERT_AUDIT, pending)


def _vm_uuid(session: Session, uuid_or_name: str) -> str | None:
    """The uuid of the VM with this uuid, or else with this name."""
    return session.execute(_VM_UUID, {"key": uuid_or_name}).scalar()


def _load_vm(session: Session, uuid: str) -> VM | None:
    key = {"uuid": uuid}
    head = session.execute(_VM_HEAD, key).first()
    if head is None:
        return None
    return codec.vm_from(uuid, head.name, head.hypervisor, session.execute(_VM_NICS, key).all(),
                         session.execute(_VM_TAGS, key).all())


def _claims(facts: frozenset[Fact]) -> frozenset[tuple[object, ...]]:
    return frozenset((f.attr, f.key, f.value, f.provenance) for f in facts)


def _heartbeat(stored: ContextRecord, new: ContextRecord) -> bool:
    live = stored.expires_at is None or stored.expires_at > new.observed_at
    return live and stored.reported_by == new.reported_by and _claims(stored.facts) == _claims(new.facts)


def _principal_args(name: str, role: Role, hypervisor: str | None) -> None:
    if not name.strip():
        raise ValueError("a principal needs a name")
    if role == Role.RELAY and not hypervisor:
        raise ValueError("a relay principal needs the hypervisor it speaks for")
    if role != Role.RELAY and hypervisor is not None:
        raise ValueError(f"only relay principals have a hypervisor, not {role}")


def _fill_vm(row: VmRow, vm: VM) -> None:
    row.vnics = [_vnic_row(i, nic) for i, nic in enumerate(vm.vnics)]
    row.tags = [TagRow(key=f.key, value=f.value, observed_at=f.observed_at) for f in sorted(vm.facts)]


def _vnic_row(position: int, nic: VNic) -> VnicRow:
    row = VnicRow(position=position, mac=nic.mac, ofport=nic.ofport, name=nic.name)
    row.ips = [VnicIpRow(ip=ip, position=i) for i, ip in enumerate(nic.ips)]
    return row


def _clear_vm(session: Session, row: VmRow) -> None:
    # The unit of work inserts before it deletes: without this flush, a vNIC kept with the
    # same MAC (or a tag with the same key) would clash with its own old row.
    row.vnics.clear()
    row.tags.clear()
    session.flush()


def _context_rows(session: Session, uuid: str) -> list[ContextRow]:
    query = select(ContextRow).where(ContextRow.vm_uuid == uuid).order_by(ContextRow.provenance)
    return list(session.scalars(query))


def _directory(session: Session) -> dict[str, frozenset[str]]:
    return {
        row.name: frozenset(m.group for m in row.groups)
        for row in session.scalars(select(DirectoryUserRow).order_by(DirectoryUserRow.name))
    }


def _revision_in(session: Session, state: RevisionState) -> PolicyRevision | None:
    """The revision in `state` (at most one is active, at most one a draft)."""
    row = session.execute(_REVISION_IN, {"state": state.value}).first()
    return None if row is None else codec.revision_of(row)



def _next_number(session: Session) -> int:
    # Safe without a sequence: writes are serialized (see the module docstring).
    return (session.scalar(select(func.max(RevisionRow.number))) or 0) + 1


def _plain(value: Any) -> Any:
    """A JSON-able deep copy (tuples become lists); ValueError if it is not JSON-able."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not JSON-serializable: {exc}") from exc


def _document(document: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(document, Mapping):
        raise ValueError(f"a policy document is a mapping, got {type(document).__name__}")  # noqa: TRY004
    plain: dict[str, Any] = _plain(dict(document))
    return plain


def _audit_entry(row: AuditRow) -> AuditEntry:
    return AuditEntry(row.id, row.at, row.actor, row.action, row.target, row.before, row.after,
                      row.outcome, row.details)


def _platform_part(vm: VM) -> VM:
    return VM(vm.uuid, vm.name, vm.hypervisor, vm.vnics,
              frozenset(f for f in vm.facts if f.provenance == Provenance.PLATFORM))


def _scenario_contexts(inventory: Inventory, actor: str) -> list[ContextRecord]:
    """A scenario VM's guest and authoritative facts, as one context record per source."""
    records = []
    for vm in sorted(inventory.vms.values(), key=lambda v: v.uuid):
        for provenance in (Provenance.GUEST, Provenance.AUTHORITATIVE):
            facts = frozenset(f for f in vm.facts if f.provenance == provenance)
            if facts:
                observed = max(f.observed_at for f in facts)
                records.append(ContextRecord(vm.uuid, provenance, facts, actor, observed, None))
    return records
