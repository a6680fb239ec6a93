"""Initial schema: inventory, directory, context, principals, policy revisions, audit log.

Revision ID: 0001
Revises:
Create Date: 2026-11-27

Written out in full rather than importing controller.store.schema: a migration must keep
creating the schema of its own day, whatever the models become later.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON(none_as_null=True)


def upgrade() -> None:
    _inventory()
    _directory_and_context()
    _principals()
    _policy()
    _audit()


def _inventory() -> None:
    op.create_table(
        "hypervisors",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("uplink_ofport", sa.BigInteger(), nullable=True),
        sa.Column("dpid", sa.String(20), nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_hypervisors"),
        sa.UniqueConstraint("dpid", name="uq_hypervisors_dpid"),
    )
    op.create_table(
        "vms",
        sa.Column("uuid", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("hypervisor", sa.String(255), nullable=False),
        sa.ForeignKeyConstraint(["hypervisor"], ["hypervisors.name"],
                                name="fk_vms_hypervisor_hypervisors", ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("uuid", name="pk_vms"),
        sa.UniqueConstraint("name", name="uq_vms_name"),
    )
    op.create_index("ix_vms_hypervisor", "vms", ["hypervisor"])
    op.create_table(
        "vnics",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("vm_uuid", sa.String(64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("mac", sa.String(17), nullable=False),
        sa.Column("ofport", sa.BigInteger(), nullable=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.ForeignKeyConstraint(["vm_uuid"], ["vms.uuid"], name="fk_vnics_vm_uuid_vms", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_vnics"),
        sa.UniqueConstraint("mac", name="uq_vnics_mac"),
    )
    op.create_index("ix_vnics_vm_uuid", "vnics", ["vm_uuid"])
    op.create_table(
        "vnic_ips",
        sa.Column("ip", sa.String(15), nullable=False),
        sa.Column("vnic_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["vnic_id"], ["vnics.id"], name="fk_vnic_ips_vnic_id_vnics", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("ip", name="pk_vnic_ips"),
    )
    op.create_index("ix_vnic_ips_vnic_id", "vnic_ips", ["vnic_id"])
    op.create_table(
        "tags",
        sa.Column("vm_uuid", sa.String(64), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("observed_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(["vm_uuid"], ["vms.uuid"], name="fk_tags_vm_uuid_vms", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("vm_uuid", "key", name="pk_tags"),
    )
    op.create_table(
        "settings",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("value", JSON, nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_settings"),
    )


def _directory_and_context() -> None:
    op.create_table(
        "directory_users",
        sa.Column("name", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_directory_users"),
    )
    op.create_table(
        "directory_memberships",
        sa.Column("user", sa.String(255), nullable=False),
        sa.Column("group", sa.String(255), nullable=False),
        sa.ForeignKeyConstraint(["user"], ["directory_users.name"],
                                name="fk_directory_memberships_user_directory_users", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("user", "group", name="pk_directory_memberships"),
    )
    op.create_table(
        "contexts",
        sa.Column("vm_uuid", sa.String(64), nullable=False),
        sa.Column("provenance", sa.String(16), nullable=False),
        sa.Column("facts", JSON, nullable=False),
        sa.Column("reported_by", sa.String(255), nullable=False),
        sa.Column("observed_at", sa.Double(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(["vm_uuid"], ["vms.uuid"], name="fk_contexts_vm_uuid_vms", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("vm_uuid", "provenance", name="pk_contexts"),
    )
    op.create_index("ix_contexts_expires_at", "contexts", ["expires_at"])


def _principals() -> None:
    op.create_table(
        "principals",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("hypervisor", sa.String(255), nullable=True),
        sa.Column("token_id", sa.String(32), nullable=True),
        sa.Column("token_scheme", sa.String(16), nullable=False),
        sa.Column("token_salt", sa.String(64), nullable=False),
        sa.Column("token_hash", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("revoked_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_principals"),
        sa.UniqueConstraint("token_id", name="uq_principals_token_id"),
    )


def _policy() -> None:
    op.create_table(
        "policy_revisions",
        sa.Column("number", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("document", JSON, nullable=False),
        sa.Column("author", sa.String(255), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("published_at", sa.Double(), nullable=True),
        sa.Column("published_by", sa.String(255), nullable=True),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("based_on", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("number", name="pk_policy_revisions"),
    )
    for state in ("active", "draft"):
        op.create_index(
            f"uq_policy_revisions_one_{state}", "policy_revisions", ["state"], unique=True,
            sqlite_where=sa.text(f"state = '{state}'"), postgresql_where=sa.text(f"state = '{state}'"),
        )


def _audit() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(255), nullable=False),
        sa.Column("before", JSON, nullable=True),
        sa.Column("after", JSON, nullable=True),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("details", JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    for column in ("action", "actor", "target"):
        op.create_index(f"ix_audit_log_{column}", "audit_log", [column])
    _append_only_triggers()


def _append_only_triggers() -> None:
    # The store has no method that edits the audit log; these stop anyone else with SQL access.
    if op.get_context().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'audit log is append-only'; END $$"
        )
        op.execute(
            "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
            "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()"
        )
        # Row triggers do not fire on TRUNCATE.
        op.execute(
            "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
            "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()"
        )
        return
    for verb in ("update", "delete"):
        op.execute(
            f"CREATE TRIGGER audit_log_no_{verb} BEFORE {verb.upper()} ON audit_log "
            "BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END"
        )


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_truncate ON audit_log")
        op.execute("DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log")
        op.execute("DROP FUNCTION IF EXISTS audit_log_append_only()")
    for table in ("audit_log", "policy_revisions", "principals", "contexts", "directory_memberships",
                  "directory_users", "settings", "tags", "vnic_ips", "vnics", "vms", "hypervisors"):
        op.drop_table(table)
