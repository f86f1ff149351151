"""Version 3: retention's tombstones (``purged_at``, ``purge_reason``) and the
indexes its queries walk."""

from alembic import op

from dicomrouter.store.migrations import legacy

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    legacy.apply(op.get_bind(), 3)
