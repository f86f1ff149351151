"""Version 9: several nodes on one index.

- ``process_heartbeats`` says what each process runs: the dicomrouter release
  (``software_version``), the configuration version (``config_version``) and, for a
  receiver, its open associations (``open_associations``), so the nodes view shows
  every node from the index alone.
- ``destination_state`` names the node that probes a paused destination
  (``probe_owner``) until ``probe_until``: health is shared, one node probes, and
  another takes over when that lease runs out.

Each step is skipped when its column is there already (see 0008)."""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def _add_missing(table: str, columns: list[sa.Column]) -> None:
    present = {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}
    for column in columns:
        if column.name not in present:
            op.add_column(table, column)


def upgrade() -> None:
    _add_missing(
        "process_heartbeats",
        [
            sa.Column("software_version", sa.String(64), nullable=False, server_default=""),
            sa.Column("config_version", sa.Integer, nullable=True),
            sa.Column("open_associations", sa.Integer, nullable=False, server_default="0"),
        ],
    )
    _add_missing(
        "destination_state",
        [
            sa.Column("probe_owner", sa.String(255), nullable=True),
            sa.Column("probe_until", sa.Float, nullable=True),
        ],
    )
