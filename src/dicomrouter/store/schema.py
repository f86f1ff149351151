"""The index schema (SQLAlchemy Core). SQLite by default; written to run on PostgreSQL.

Times are stored as POSIX seconds (float) so that comparisons and arithmetic are
identical on every backend.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    literal_column,
)
from sqlalchemy import Integer as _Integer

metadata = MetaData()

#: Every integer column: SQLite's INTEGER is 64-bit already (and an ``INTEGER PRIMARY
#: KEY`` must stay one, the rowid); PostgreSQL's is 32-bit, too small for sizes in
#: bytes and for any id a client may send (the API's largest id is a plain 404).
Integer = _Integer().with_variant(BigInteger(), "postgresql")

SCHEMA_VERSION = 10
"""Bumped with each schema change: the number of its revision in ``store/migrations``.
Every change to a table below, a new table included, comes with that revision: an
existing index is only ever changed by revisions (the notes "added to version 7
before its release" below date from before Alembic, when ``create_all`` ran on every
start)."""

meta_info = Table(
    "meta_info",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

instances = Table(
    "instances",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("sop_instance_uid", String(64), nullable=False, unique=True),
    Column("sop_class_uid", String(64), nullable=False),
    Column("transfer_syntax_uid", String(64), nullable=False),
    Column("study_instance_uid", String(64), nullable=False, index=True),
    Column("series_instance_uid", String(64), nullable=False, index=True),
    Column("patient_id", String(64), nullable=False, default="", index=True),
    Column("patient_name", String(324), nullable=False, default=""),
    Column("accession_number", String(64), nullable=False, default=""),
    Column("study_date", String(8), nullable=False, default=""),
    Column("study_description", String(64), nullable=False, default=""),
    Column("modality", String(16), nullable=False, default=""),
    Column("path", Text, nullable=False),
    Column("size", Integer, nullable=False),
    Column("received_at", Float, nullable=False),
    Column("calling_ae", String(16), nullable=False, default=""),
    Column("called_ae", String(16), nullable=False, default=""),
    Column("source_address", String(64), nullable=False, default=""),
    # Bumped each time the same SOP Instance UID is received again (overwrite policy).
    Column("generation", Integer, nullable=False, default=1),
    # 0 until the rules stage has looked at this generation of the instance.
    Column("routed", Integer, nullable=False, default=0),
    # Set when retention deleted this generation's file (store/retention.py): the row
    # stays, as a tombstone, so the trace still says where it went and when it was purged.
    Column("purged_at", Float),
    Column("purge_reason", Text),
)
Index("ix_instances_unrouted", instances.c.routed, instances.c.id)
# For the operator surface: time windows (throughput, backtests, study search order)
# and accession search.
Index("ix_instances_received_at", instances.c.received_at)
Index("ix_instances_accession", instances.c.accession_number)
# Retention: live objects oldest first (purged_at IS NULL), tombstones by age, and
# (with size) what is stored, counted from the index alone.
Index("ix_instances_live", instances.c.purged_at, instances.c.received_at, instances.c.size)

route_matches = Table(
    "route_matches",
    metadata,
    Column("instance_id", Integer, ForeignKey("instances.id"), primary_key=True),
    Column("route", String(128), primary_key=True),
    Column("generation", Integer, primary_key=True),
    Column("matched_at", Float, nullable=False),
)
Index("ix_route_matches_route", route_matches.c.route, route_matches.c.matched_at)

# Instances the planner could not plan (``instances.routed = -1``): the index write
# failed (disk full, database error) or the header could not be read. The planner
# tries each again at ``next_attempt_at`` with a growing delay, so none waits for a
# restart or an operator; the row goes when the instance is planned.
unplanned = Table(
    "unplanned",
    metadata,
    Column("instance_id", Integer, ForeignKey("instances.id"), primary_key=True),
    Column("generation", Integer, nullable=False),
    Column("attempts", Integer, nullable=False, default=1),
    Column("first_failed_at", Float, nullable=False),
    Column("next_attempt_at", Float, nullable=False, index=True),
    Column("last_error", Text, nullable=False, default=""),
)

# Each long-running process of a node says it is alive every few seconds; readiness
# (``/readyz``) is a fresh heartbeat of the receiver and of the dispatch process.
# Keyed by node, so that several nodes on one index can each report.
process_heartbeats = Table(
    "process_heartbeats",
    metadata,
    Column("node", String(128), primary_key=True),
    Column("role", String(32), primary_key=True),  # receiver | dispatch
    Column("pid", Integer, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
    Column("ok", Integer, nullable=False, default=1),  # the process's own check passed
    Column("detail", Text, nullable=False, default=""),  # why not ok, or what it serves
    # What the process runs (the nodes view): the dicomrouter release, the
    # configuration version, and a receiver's open associations.
    Column("software_version", String(64), nullable=False, default="", server_default=""),
    Column("config_version", Integer),
    Column("open_associations", Integer, nullable=False, default=0, server_default="0"),
)

# Pending series/study triggers: fire when now - last_arrival >= stable_after.
triggers = Table(
    "triggers",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("route", String(128), nullable=False),
    Column("level", String(16), nullable=False),
    Column("uid", String(64), nullable=False),
    Column("study_instance_uid", String(64), nullable=False),
    Column("last_arrival", Float, nullable=False),
    Column("pending", Integer, nullable=False, default=1),
    Column("fired_at", Float),
    UniqueConstraint("route", "level", "uid", name="uq_trigger"),
)
Index("ix_triggers_pending", triggers.c.pending, triggers.c.last_arrival)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("destination", String(128), nullable=False),
    Column("level", String(16), nullable=False),  # instance|series|study|patient
    Column("resource_uid", String(64), nullable=False),
    Column("study_instance_uid", String(64), nullable=False, default=""),
    Column("routes", Text, nullable=False, default=""),  # comma-separated route names
    # The routes' pipeline (``routes[].transform``) this job sends through; "" for
    # none. Routes with different pipelines to one destination make separate jobs.
    Column("transform", String(128), nullable=False, default="", server_default=""),
    # scheduled|pending|in_progress|completed|warning|failed|canceled
    Column("state", String(16), nullable=False),
    Column("priority", Integer, nullable=False, default=0),
    # Delivery attempts: each one uses up retry.max_attempts.
    Column("attempts", Integer, nullable=False, default=0),
    # Times the destination could not be reached at all: these do not use up
    # retry.max_attempts (the destination is paused and probed instead).
    Column("connection_failures", Integer, nullable=False, default=0, server_default="0"),
    Column("next_attempt_at", Float, nullable=False),
    Column("lease_owner", String(128)),
    Column("lease_expires_at", Float),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("last_error", Text),
    # The group (``type: group``) the planner chose this job's destination for; None
    # when a route named the destination itself. Its waiting work may move to another
    # member of that group (queue/groups.py).
    Column("via_group", String(128)),
)
Index("ix_jobs_claim", jobs.c.destination, jobs.c.state, jobs.c.next_attempt_at)
#: A job waiting to be claimed (``scheduled`` or ``pending``: queue/states.py
#: WAITING_STATES), written with literals: a partial index is used only by a query
#: whose condition is this very expression (SQLite: the same terms, in the same order;
#: a bound parameter would not do), so a claim of a backlog filters with it.
JOB_WAITING = jobs.c.state.in_([literal_column("'scheduled'"), literal_column("'pending'")])
# The claim of a backlog (schema 10): a destination's waiting jobs in the order they
# are claimed, so that taking the first 200 reads about 200 entries, however long the
# queue (with ix_jobs_claim, it read and sorted every job due; it still does when only
# a few are due: queue/jobs.py). ``next_attempt_at`` is in it to pass over jobs
# backing off without reading their rows.
Index(
    "ix_jobs_waiting",
    jobs.c.destination,
    jobs.c.priority.desc(),
    jobs.c.id,
    jobs.c.next_attempt_at,
    sqlite_where=JOB_WAITING,
    postgresql_where=JOB_WAITING,
)
# The planner's "is a job for this resource waiting already?" (destination and a list
# of resource UIDs, any level): resource_uid second (schema 10; it came after level,
# which neither database skips, so that query read every job of the destination).
Index("ix_jobs_resource", jobs.c.destination, jobs.c.resource_uid, jobs.c.state)
Index("ix_jobs_study", jobs.c.study_instance_uid)
Index("ix_jobs_state", jobs.c.state)
Index("ix_jobs_created", jobs.c.created_at)

# Per-instance delivery state inside a job: a retry resends only what did not arrive.
job_instances = Table(
    "job_instances",
    metadata,
    Column("job_id", Integer, ForeignKey("jobs.id"), primary_key=True),
    Column("instance_id", Integer, ForeignKey("instances.id"), primary_key=True),
    Column("destination", String(128), nullable=False),
    Column("generation", Integer, nullable=False),
    # pending|completed|warning|failed|canceled|skipped
    Column("state", String(16), nullable=False, default="pending"),
    Column("status", Integer),
    Column("message", Text),
    Column("updated_at", Float, nullable=False),
    # The job's route pipeline (``jobs.transform``), repeated for the constraint below.
    Column("transform", String(128), nullable=False, default="", server_default=""),
    # How it went out: the pipelines applied with their versions and the config
    # version, and the syntax it was sent in (None: byte for byte as received).
    Column("sent_as", Text),
    # The SOP Instance UID the destination received, when a transform changed it.
    Column("sent_uid", String(64)),
    # Storage commitment of this delivery: pending|committed|failed (None: not asked),
    # and the Transaction UID it was asked under (``commitments``).
    Column("commitment", String(16)),
    Column("commitment_uid", String(64)),
    # One delivery of one generation of an instance per destination and route
    # pipeline, however many routes.
    UniqueConstraint(
        "destination", "instance_id", "generation", "transform", name="uq_delivery_v7"
    ),
)
Index("ix_job_instances_state", job_instances.c.job_id, job_instances.c.state)
Index("ix_job_instances_commitment", job_instances.c.commitment_uid)
Index("ix_job_instances_updated", job_instances.c.updated_at)
# Retention: "has every delivery of this instance settled?"
Index("ix_job_instances_instance", job_instances.c.instance_id, job_instances.c.state)

# Storage commitment transactions (N-ACTION sent, N-EVENT-REPORT awaited): one per
# batch committed; its deliveries name it in ``job_instances.commitment_uid``.
commitments = Table(
    "commitments",
    metadata,
    Column("transaction_uid", String(64), primary_key=True),
    Column("destination", String(128), nullable=False),
    Column("job_ids", Text, nullable=False),  # comma-separated
    Column("sent_at", Float, nullable=False),
    Column("deadline", Float, nullable=False),
    # pending|committed|failed (some or all failed)|timed_out|refused (not supported)
    Column("state", String(16), nullable=False, default="pending"),
    Column("instances", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("message", Text),
    Column("finished_at", Float),
)
Index("ix_commitments_state", commitments.c.state, commitments.c.deadline)
Index("ix_commitments_finished", commitments.c.finished_at)

attempts = Table(
    "attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False, index=True),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float),
    Column("outcome", String(16)),  # completed|warning|retry|failed|unavailable|interrupted
    Column("sent", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("message", Text),
)

destination_state = Table(
    "destination_state",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("state", String(16), nullable=False, default="ok"),  # ok|paused (unreachable)
    # Paused by an operator (API, dashboard): nothing is sent until resumed by hand.
    Column("admin_paused", Integer, nullable=False, default=0, server_default="0"),
    Column("consecutive_failures", Integer, nullable=False, default=0),
    Column("paused_since", Float),
    Column("next_probe_at", Float),
    Column("last_error", Text),
    Column("last_success_at", Float),
    Column("updated_at", Float, nullable=False),
    # Health is shared by every node; one probes a paused destination: the one named
    # here, until probe_until (the database's clock), after which another takes over.
    Column("probe_owner", String(255)),
    Column("probe_until", Float),
)

# Which member of a group (``type: group``) each study goes to: chosen when the
# study is first planned for the group, kept while that member is up, moved with the
# study's waiting work when it is paused (queue/groups.py). A study is never split.
group_affinity = Table(
    "group_affinity",
    metadata,
    Column("group_name", String(128), primary_key=True),
    Column("study_instance_uid", String(64), primary_key=True),
    Column("member", String(128), nullable=False),
    Column("assigned_at", Float, nullable=False),
)

# Where a ``round_robin`` group's next choice starts: the index in ``members``
# after the last member chosen.
group_rotation = Table(
    "group_rotation",
    metadata,
    Column("group_name", String(128), primary_key=True),
    Column("next_index", Integer, nullable=False, default=0),
)

# What the runtime loop guards decided about an instance (queue/loops.py): ``held``
# (it came back from a destination we had just sent it to: not forwarded again until
# released) or ``not_sent_back`` (a route named the peer that sent it). No foreign
# key: the row is history, and must not stop the instance from being purged.
loop_events = Table(
    "loop_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),  # held | not_sent_back
    Column("instance_id", Integer, nullable=False),
    Column("generation", Integer, nullable=False),
    Column("sop_instance_uid", String(64), nullable=False),
    Column("study_instance_uid", String(64), nullable=False),
    Column("destination", String(128), nullable=False),
    Column("at", Float, nullable=False),
    Column("reason", Text, nullable=False, default=""),
    Column("released_at", Float),
    Column("released_by", String(128)),
)
Index("ix_loop_events_kind", loop_events.c.kind, loop_events.c.at)
Index("ix_loop_events_instance", loop_events.c.instance_id, loop_events.c.generation)
Index("ix_loop_events_study", loop_events.c.study_instance_uid)

# Append-only: who did what, when (config changes, manual actions, rejected
# associations, failed logins, alerts). Nothing updates or deletes rows here.
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False, index=True),
    Column("actor", String(128), nullable=False),  # user, token name, or "system"
    Column("source", String(64), nullable=False, default=""),  # IP address or process
    Column("action", String(64), nullable=False, index=True),
    Column("target", String(256), nullable=False, default=""),
    Column("outcome", String(16), nullable=False, default="ok"),  # ok|denied|failed
    Column("detail", Text, nullable=False, default="{}"),  # JSON
)

# One row per retention run (the sweeper, or ``dicomrouter purge``): what it deleted,
# and what it saw (eligible, kept because undelivered) for the status page.
purge_runs = Table(
    "purge_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("started_at", Float, nullable=False, index=True),
    Column("ended_at", Float),
    Column("actor", String(128), nullable=False),
    Column("purged", Integer, nullable=False, default=0),
    Column("purged_bytes", Integer, nullable=False, default=0),
    Column("evicted", Integer, nullable=False, default=0),
    Column("orphans", Integer, nullable=False, default=0),
    Column("history_rows", Integer, nullable=False, default=0),
    Column("audit_rows", Integer, nullable=False, default=0),
    Column("stored", Integer, nullable=False, default=0),
    Column("stored_bytes", Integer, nullable=False, default=0),
    Column("eligible", Integer, nullable=False, default=0),
    Column("eligible_bytes", Integer, nullable=False, default=0),
    Column("undelivered", Integer, nullable=False, default=0),
    Column("undelivered_bytes", Integer, nullable=False, default=0),
    Column("error", Text),
)

# Every configuration that was applied, newest last: list, diff, roll back.
config_versions = Table(
    "config_versions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("applied_at", Float, nullable=False),
    Column("author", String(128), nullable=False),
    Column("source", String(32), nullable=False),  # startup|api|sighup|rollback|import
    Column("sha256", String(64), nullable=False),
    Column("yaml", Text, nullable=False),
    Column("comment", Text, nullable=False, default=""),
)

# Dashboard sessions, so that logging out ends one on the server (a signed cookie
# alone stays valid until it expires). The cookie holds a random token; only its
# SHA-256 is kept here.
http_sessions = Table(
    "http_sessions",
    metadata,
    Column("id", String(64), primary_key=True),  # sha256 hex of the cookie's token
    Column("user", String(128), nullable=False, index=True),
    Column("created_at", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("expires_at", Float, nullable=False, index=True),  # last_seen + lifetime
    Column("source", String(64), nullable=False, default=""),  # address at login
)

# The optional re-identification mapping of de-identifying pipelines (a
# ``deidentify`` step with ``mapping``): original -> pseudonym, one row per
# (pipeline, kind, original). The original is AES-GCM encrypted (``sealed``) under a
# key from the environment, never stored here; ``lookup`` is an HMAC of it under the
# same key, so a row is found (and recorded once) without decrypting any; the
# pseudonym is in clear, indexed, for look-ups by pseudonym. Read only by admins,
# through control.reidentify, audited. Not touched by retention: a mapping is needed
# as long as the pseudonymous data may come back. No foreign key: it outlives the
# instances it was made from. Added to version 7 before its release:
# ``metadata.create_all`` creates it on an existing index, so no migration.
pseudonym_map = Table(
    "pseudonym_map",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("pipeline", String(128), nullable=False),
    Column("kind", String(16), nullable=False),  # patient|date_offset|study|series|instance
    Column("lookup", String(64), nullable=False),  # HMAC-SHA256 hex of the original
    Column("pseudonym", String(128), nullable=False, index=True),
    Column("sealed", Text, nullable=False),  # base64(nonce + AES-256-GCM ciphertext)
    Column("key_id", String(16), nullable=False),  # names the key, derived from it
    Column("recorded_at", Float, nullable=False),
    UniqueConstraint("pipeline", "kind", "lookup", name="uq_pseudonym_map_original"),
)
Index("ix_pseudonym_map_lookup", pseudonym_map.c.lookup)

# Event notifications (observe/notify.py), the outbox: one row per event and webhook,
# written by the alerter thread of the HTTP process when it detects the event (never
# by the dispatch loop) and deleted ``notifications.keep`` after it was sent.
# ``event_id`` is derived from the event itself (e.g. the job and its finish time), so
# detecting it again is a no-op (the unique constraint) and the receiver can use it to
# de-duplicate: delivery is at least once. Added to version 7 before its release:
# ``metadata.create_all`` creates it on an existing index, so no migration.
notification_outbox = Table(
    "notification_outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(200), nullable=False),
    Column("event", String(32), nullable=False),  # study_received|job_completed|study_delivered
    Column("webhook", String(128), nullable=False),
    Column("subject", String(128), nullable=False, default=""),  # study UID or job id
    Column("payload", Text, nullable=False),  # the JSON POSTed, built at detection
    Column("occurred_at", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("state", String(16), nullable=False, default="pending"),  # pending|sent|dropped
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    Column("sent_at", Float),
    Column("last_error", Text),
    UniqueConstraint("event_id", "webhook", name="uq_notification_event"),
)
Index(
    "ix_notification_outbox_due", notification_outbox.c.state, notification_outbox.c.next_attempt_at
)
Index("ix_notification_outbox_created", notification_outbox.c.created_at)

# How far each detector of notification events has looked: the last ``attempts.id``
# seen (job_completed), the end of the last quiet-time window (study_received). Written
# in the transaction that adds the events found, so a restart neither loses nor
# repeats them. Same note as above: version 7, no migration.
notification_marks = Table(
    "notification_marks",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

__all__ = [
    "audit_log",
    "config_versions",
    "attempts",
    "destination_state",
    "group_affinity",
    "group_rotation",
    "http_sessions",
    "instances",
    "job_instances",
    "jobs",
    "loop_events",
    "meta_info",
    "metadata",
    "notification_marks",
    "notification_outbox",
    "process_heartbeats",
    "pseudonym_map",
    "purge_runs",
    "route_matches",
    "triggers",
    "unplanned",
]
