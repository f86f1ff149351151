"""Version 8: destination groups (``type: group``). A job remembers the group it was
planned through (``jobs.via_group``); a study's member (``group_affinity``) and a
``round_robin`` group's next turn (``group_rotation``) are new tables."""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_INTEGER = sa.Integer().with_variant(sa.BigInteger(), "postgresql")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("via_group", sa.String(128), nullable=True))
    op.create_table(
        "group_affinity",
        sa.Column("group_name", sa.String(128), primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), primary_key=True),
        sa.Column("member", sa.String(128), nullable=False),
        sa.Column("assigned_at", sa.Float, nullable=False),
    )
    op.create_table(
        "group_rotation",
        sa.Column("group_name", sa.String(128), primary_key=True),
        sa.Column("next_index", _INTEGER, nullable=False),
    )
