"""SQLAlchemy tables of the store. Only controller.store imports this module: everything
outside it sees the values of controller.model and controller.store.records.

The Alembic migrations (controller/store/migrations) create these tables; a test holds the
two in step, so a model change without a migration fails CI rather than a deployment.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Explicit constraint names: Alembic can only alter or drop what it can name, and SQLite
# batch migrations need them.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Plain JSON, not JSONB: policy documents are kept verbatim, key order included.
Json = JSON(none_as_null=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class HypervisorRow(Base):
    __tablename__ = "hypervisors"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    uplink_ofport: Mapped[int | None] = mapped_column(BigInteger)  # OpenFlow ports exceed int32
    # Datapath ids span the full 64 bits, beyond a signed BIGINT: kept as decimal text.
    dpid: Mapped[str | None] = mapped_column(String(20), unique=True)


class VmRow(Base):
    __tablename__ = "vms"

    uuid: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    hypervisor: Mapped[str] = mapped_column(
        ForeignKey("hypervisors.name", ondelete="RESTRICT"), index=True
    )
    vnics: Mapped[list[VnicRow]] = relationship(
        back_populates="vm", cascade="all, delete-orphan", order_by="VnicRow.position",
        lazy="selectin",
    )
    tags: Mapped[list[TagRow]] = relationship(
        back_populates="vm", cascade="all, delete-orphan", order_by="TagRow.key", lazy="selectin"
    )


class VnicRow(Base):
    __tablename__ = "vnics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    vm_uuid: Mapped[str] = mapped_column(ForeignKey("vms.uuid", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # a VM's vNICs keep their order
    mac: Mapped[str] = mapped_column(String(17), unique=True)
    ofport: Mapped[int | None] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(255), default="")
    vm: Mapped[VmRow] = relationship(back_populates="vnics")
    ips: Mapped[list[VnicIpRow]] = relationship(
        back_populates="vnic", cascade="all, delete-orphan", order_by="VnicIpRow.position",
        lazy="selectin",
    )


class VnicIpRow(Base):
    __tablename__ = "vnic_ips"

    ip: Mapped[str] = mapped_column(String(15), primary_key=True)  # one owner per address
    vnic_id: Mapped[int] = mapped_column(ForeignKey("vnics.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    vnic: Mapped[VnicRow] = relationship(back_populates="ips")


class TagRow(Base):
    __tablename__ = "tags"

    vm_uuid: Mapped[str] = mapped_column(ForeignKey("vms.uuid", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    observed_at: Mapped[float] = mapped_column(Double)
    vm: Mapped[VmRow] = relationship(back_populates="tags")


class SettingRow(Base):
    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)  # "gateway"
    value: Mapped[Any] = mapped_column(Json)


class DirectoryUserRow(Base):
    __tablename__ = "directory_users"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    groups: Mapped[list[DirectoryMembershipRow]] = relationship(
        cascade="all, delete-orphan", lazy="selectin"
    )


class DirectoryMembershipRow(Base):
    __tablename__ = "directory_memberships"

    user: Mapped[str] = mapped_column(
        ForeignKey("directory_users.name", ondelete="CASCADE"), primary_key=True
    )
    group: Mapped[str] = mapped_column(String(255), primary_key=True)


class ContextRow(Base):
    __tablename__ = "contexts"

    vm_uuid: Mapped[str] = mapped_column(ForeignKey("vms.uuid", ondelete="CASCADE"), primary_key=True)
    provenance: Mapped[str] = mapped_column(String(16), primary_key=True)  # guest | authoritative
    facts: Mapped[list[dict[str, Any]]] = mapped_column(Json)
    reported_by: Mapped[str] = mapped_column(String(255))
    observed_at: Mapped[float] = mapped_column(Double)
    expires_at: Mapped[float | None] = mapped_column(Double, index=True)


class PrincipalRow(Base):
    __tablename__ = "principals"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    hypervisor: Mapped[str | None] = mapped_column(String(255))
    # Public part of a generated token ("gl_<token_id>_<secret>"), so authentication finds the
    # row without trying every hash; NULL for a token the operator chose (bootstrap).
    token_id: Mapped[str | None] = mapped_column(String(32), unique=True)
    token_scheme: Mapped[str] = mapped_column(String(16))  # sha256 | scrypt
    token_salt: Mapped[str] = mapped_column(String(64))  # hex
    token_hash: Mapped[str] = mapped_column(String(128))  # hex; never the token itself
    created_at: Mapped[float] = mapped_column(Double)
    revoked_at: Mapped[float | None] = mapped_column(Double)


class RevisionRow(Base):
    __tablename__ = "policy_revisions"
    __table_args__ = (
        # At most one active and one draft revision, whatever a buggy caller does.
        Index("uq_policy_revisions_one_active", "state", unique=True,
              sqlite_where=text("state = 'active'"), postgresql_where=text("state = 'active'")),
        Index("uq_policy_revisions_one_draft", "state", unique=True,
              sqlite_where=text("state = 'draft'"), postgresql_where=text("state = 'draft'")),
    )

    number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    state: Mapped[str] = mapped_column(String(16))
    document: Mapped[dict[str, Any]] = mapped_column(Json)
    author: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[float] = mapped_column(Double)
    published_at: Mapped[float | None] = mapped_column(Double)
    published_by: Mapped[str | None] = mapped_column(String(255))
    comment: Mapped[str] = mapped_column(Text, default="")
    based_on: Mapped[int | None] = mapped_column(Integer)


class AuditRow(Base):
    """Append-only: the store has no method that changes a row, and database triggers refuse
    UPDATE and DELETE from anyone else."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Double)
    actor: Mapped[str] = mapped_column(String(255), index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str] = mapped_column(String(255), index=True)
    before: Mapped[Any] = mapped_column(Json, nullable=True)  # None: nothing existed
    after: Mapped[Any] = mapped_column(Json, nullable=True)  # None: nothing exists now
    outcome: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(Json)


class StateGenerationRow(Base):
    """One row: bumped by every write that can change flows, so a flow snapshot can tell whether
    the state it was compiled from is still the state (controller/flowsnap.py)."""

    __tablename__ = "state_generation"
    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class FlowSnapshotRow(Base):
    __tablename__ = "flow_snapshots"

    dpid: Mapped[str] = mapped_column(String(20), primary_key=True)  # decimal text, as in hypervisors
    generation: Mapped[int] = mapped_column(BigInteger)
    config_digest: Mapped[str] = mapped_column(String(64))
    ports: Mapped[str] = mapped_column(Text)  # JSON [[ofport, name], ...]
    valid_until: Mapped[float | None] = mapped_column(Double)
    taken_at: Mapped[float] = mapped_column(Double)
    flow_mods: Mapped[bytes] = mapped_column(LargeBinary)
