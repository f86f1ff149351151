"""Version 8: destination groups (``type: group``). A job remembers the group it was
planned through (``jobs.via_group``); a study's member (``group_affinity``) and a
``round_robin`` group's next turn (``group_rotation``) are new tables.

Each step is skipped when its column or table is there already, as the legacy steps
are: an index made by a dicomrouter that had schema 8 before Alembic (its
``meta_info`` says 8, it has no ``alembic_version``) is stamped at 0007 and comes
through here with all of it."""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_INTEGER = sa.Integer().with_variant(sa.BigInteger(), "postgresql")


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    tables = set(inspector.get_table_names())
    if "via_group" not in {c["name"] for c in inspector.get_columns("jobs")}:
        op.add_column("jobs", sa.Column("via_group", sa.String(128), nullable=True))
    if "group_affinity" not in tables:
        op.create_table(
            "group_affinity",
            sa.Column("group_name", sa.String(128), primary_key=True),
            sa.Column("study_instance_uid", sa.String(64), primary_key=True),
            sa.Column("member", sa.String(128), nullable=False),
            sa.Column("assigned_at", sa.Float, nullable=False),
        )
    if "group_rotation" not in tables:
        op.create_table(
            "group_rotation",
            sa.Column("group_name", sa.String(128), primary_key=True),
            sa.Column("next_index", _INTEGER, nullable=False),
        )
