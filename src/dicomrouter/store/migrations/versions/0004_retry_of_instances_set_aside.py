"""Version 4: instances an earlier version set aside for good (``routed = -1``)
are retried (``unplanned``)."""

from alembic import op

from dicomrouter.store.migrations import legacy

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    legacy.apply(op.get_bind(), 4)
