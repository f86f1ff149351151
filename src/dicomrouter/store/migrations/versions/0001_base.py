"""The first schema, the base of every upgrade. Nothing to do: an index is never
built by running revisions (a new one is created at the head, ``create_all``),
and one this old only ever existed on SQLite."""

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass
