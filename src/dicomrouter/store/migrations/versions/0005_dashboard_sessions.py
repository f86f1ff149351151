"""Version 5: dashboard sessions on the server (``http_sessions``, a new table)."""

from alembic import op

from dicomrouter.store.migrations import legacy

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    legacy.apply(op.get_bind(), 5)
