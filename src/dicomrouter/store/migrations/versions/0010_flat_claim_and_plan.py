"""Version 10: the claim and the planner's look-up of waiting jobs read what they
need, however long the queue (issue 14: claim and plan cost flat from 1k to 1M
queued jobs; docs/benchmarks.md).

- ``ix_jobs_waiting``, new: a destination's waiting jobs (``scheduled``, ``pending``:
  a partial index) in claim order (``priority DESC, id``), with ``next_attempt_at``.
  The claim reads its first 200 entries instead of sorting every job due.
- ``ix_jobs_resource`` becomes (destination, resource_uid, state), was (destination,
  level, resource_uid): the planner asks for a list of resources at any level, and
  neither database skips a column, so it read every job of the destination.

On PostgreSQL, ``CREATE INDEX`` here runs in the transaction that opens the index
(every revision does, with the schema check), and holds a SHARE lock on ``jobs``
until it commits: claims and planning wait while it builds (a few seconds per million
jobs on the machine of docs/benchmarks.md). ``CREATE INDEX CONCURRENTLY`` would not
block them, but it cannot run inside a transaction block. A large queue is upgraded
at a quiet time, or the operator builds both indexes beforehand with ``CONCURRENTLY``
under the same names and definitions: this revision then finds them and skips them.

Each step is skipped when it is done already (see 0008)."""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_RESOURCE = ["destination", "resource_uid", "state"]
# The expression the claim filters with (schema.JOB_WAITING): the same terms, in the
# same order, or SQLite does not use the partial index.
_WAITING = sa.text("state IN ('scheduled', 'pending')")


def upgrade() -> None:
    indexes = {ix["name"]: ix for ix in sa.inspect(op.get_bind()).get_indexes("jobs")}
    resource = indexes.get("ix_jobs_resource")
    if resource is not None and resource["column_names"] != _RESOURCE:
        op.drop_index("ix_jobs_resource", table_name="jobs")
        resource = None
    if resource is None:
        op.create_index("ix_jobs_resource", "jobs", _RESOURCE)
    if "ix_jobs_waiting" not in indexes:
        op.create_index(
            "ix_jobs_waiting",
            "jobs",
            ["destination", sa.text("priority DESC"), "id", "next_attempt_at"],
            sqlite_where=_WAITING,
            postgresql_where=_WAITING,
        )
