"""Version 7: transforms. A job names its routes' pipeline, and a delivery is unique
per (destination, instance, generation, pipeline): ``job_instances`` is rebuilt
(SQLite cannot alter a constraint)."""

from alembic import op

from dicomrouter.store.migrations import legacy

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    legacy.apply(op.get_bind(), 7)
