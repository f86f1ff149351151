"""Version 6: connection failures are counted apart from delivery attempts; open
jobs get theirs from the attempts they recorded."""

from alembic import op

from dicomrouter.store.migrations import legacy

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    legacy.apply(op.get_bind(), 6)
