"""Version 2: destinations paused by an operator (``admin_paused``), and the indexes
of the operator surface (time windows, accession search, route history)."""

from alembic import op

from dicomrouter.store.migrations import legacy

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    legacy.apply(op.get_bind(), 2)
