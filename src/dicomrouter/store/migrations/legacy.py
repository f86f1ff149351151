"""The in-place upgrades of the index before Alembic (schema versions 2 to 7).

An index made by a dicomrouter of that time says its version in ``meta_info``
(``schema``), and nothing else: it has no ``alembic_version``. Upgrading it does
what those versions did, step by step, as the revisions ``0002`` to ``0007``
(``versions/``), each one calling :func:`apply`: first create the tables it lacks
(the schema of version 7, frozen below: what ``create_all`` did before every
upgrade), then that version's statements. Only SQLite indexes are this old.
"""

from __future__ import annotations

import re

from sqlalchemy import Connection, inspect

#: Upgrades of an existing index, by the version they produce (as they were written).
MIGRATIONS: dict[int, list[str]] = {
    2: [
        "ALTER TABLE destination_state ADD COLUMN admin_paused INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX IF NOT EXISTS ix_instances_received_at ON instances (received_at)",
        "CREATE INDEX IF NOT EXISTS ix_instances_accession ON instances (accession_number)",
        "CREATE INDEX IF NOT EXISTS ix_route_matches_route ON route_matches (route, matched_at)",
        "CREATE INDEX IF NOT EXISTS ix_jobs_state ON jobs (state)",
        "CREATE INDEX IF NOT EXISTS ix_jobs_created ON jobs (created_at)",
        "CREATE INDEX IF NOT EXISTS ix_job_instances_updated ON job_instances (updated_at)",
    ],
    3: [
        "ALTER TABLE instances ADD COLUMN purged_at FLOAT",
        "ALTER TABLE instances ADD COLUMN purge_reason TEXT",
        "CREATE INDEX IF NOT EXISTS ix_instances_live ON instances (purged_at, received_at, size)",
        "CREATE INDEX IF NOT EXISTS ix_job_instances_instance "
        "ON job_instances (instance_id, state)",
    ],
    # Instances an earlier version set aside for good (routed = -1) are retried now.
    4: [
        "INSERT INTO unplanned (instance_id, generation, attempts, first_failed_at, "
        "next_attempt_at, last_error) SELECT id, generation, 1, received_at, 0, "
        "'set aside by an earlier version, which never retried it' FROM instances "
        "WHERE routed = -1 AND id NOT IN (SELECT instance_id FROM unplanned)",
    ],
    # 5: the http_sessions table (server-side dashboard sessions) is new: create_all
    # makes it, nothing else changes.
    5: [],
    # Connection failures (unreachable destination) are counted apart from delivery
    # attempts; open jobs get theirs from the attempts they already recorded.
    6: [
        "ALTER TABLE jobs ADD COLUMN connection_failures INTEGER NOT NULL DEFAULT 0",
        "UPDATE jobs SET connection_failures = (SELECT count(*) FROM attempts "
        "WHERE attempts.job_id = jobs.id AND attempts.outcome = 'unavailable') "
        "WHERE state IN ('scheduled', 'pending', 'in_progress')",
    ],
    # Transforms: a job names its routes' pipeline, and a delivery is unique per
    # (destination, instance, generation, pipeline). The unique constraint changes,
    # so job_instances is rebuilt (SQLite cannot alter a constraint).
    7: [
        "ALTER TABLE jobs ADD COLUMN transform VARCHAR(128) NOT NULL DEFAULT ''",
        "CREATE TABLE job_instances_v7 ("
        "job_id INTEGER NOT NULL REFERENCES jobs (id), "
        "instance_id INTEGER NOT NULL REFERENCES instances (id), "
        "destination VARCHAR(128) NOT NULL, generation INTEGER NOT NULL, "
        "state VARCHAR(16) NOT NULL, status INTEGER, message TEXT, "
        "updated_at FLOAT NOT NULL, transform VARCHAR(128) NOT NULL DEFAULT '', "
        "sent_as TEXT, sent_uid VARCHAR(64), commitment VARCHAR(16), "
        "commitment_uid VARCHAR(64), PRIMARY KEY (job_id, instance_id), "
        "CONSTRAINT uq_delivery_v7 UNIQUE (destination, instance_id, generation, transform))",
        "INSERT INTO job_instances_v7 (job_id, instance_id, destination, generation, state, "
        "status, message, updated_at) SELECT job_id, instance_id, destination, generation, "
        "state, status, message, updated_at FROM job_instances",
        "DROP TABLE job_instances",
        "ALTER TABLE job_instances_v7 RENAME TO job_instances",
        "CREATE INDEX IF NOT EXISTS ix_job_instances_state ON job_instances (job_id, state)",
        "CREATE INDEX IF NOT EXISTS ix_job_instances_updated ON job_instances (updated_at)",
        "CREATE INDEX IF NOT EXISTS ix_job_instances_instance "
        "ON job_instances (instance_id, state)",
        "CREATE INDEX IF NOT EXISTS ix_job_instances_commitment ON job_instances (commitment_uid)",
    ],
}


#: The tables of schema version 7 and their indexes, as SQLite DDL: a table missing
#: from an old index is made as version 7 had it (never from today's ``schema.py``,
#: whose later columns are added by later revisions).
V7_TABLES: dict[str, tuple[str, ...]] = {
    "attempts": (
        (
            "CREATE TABLE IF NOT EXISTS attempts (id INTEGER NOT NULL, job_id INTEGER NOT "
            "NULL, started_at FLOAT NOT NULL, ended_at FLOAT, outcome VARCHAR(16), sent "
            "INTEGER NOT NULL, failed INTEGER NOT NULL, message TEXT, PRIMARY KEY (id), "
            "FOREIGN KEY(job_id) REFERENCES jobs (id))"
        ),
        "CREATE INDEX IF NOT EXISTS ix_attempts_job_id ON attempts (job_id)",
    ),
    "audit_log": (
        (
            "CREATE TABLE IF NOT EXISTS audit_log (id INTEGER NOT NULL, at FLOAT NOT NULL, "
            "actor VARCHAR(128) NOT NULL, source VARCHAR(64) NOT NULL, action VARCHAR(64) NOT "
            "NULL, target VARCHAR(256) NOT NULL, outcome VARCHAR(16) NOT NULL, detail TEXT "
            "NOT NULL, PRIMARY KEY (id))"
        ),
        "CREATE INDEX IF NOT EXISTS ix_audit_log_action ON audit_log (action)",
        "CREATE INDEX IF NOT EXISTS ix_audit_log_at ON audit_log (at)",
    ),
    "commitments": (
        (
            "CREATE TABLE IF NOT EXISTS commitments (transaction_uid VARCHAR(64) NOT NULL, "
            "destination VARCHAR(128) NOT NULL, job_ids TEXT NOT NULL, sent_at FLOAT NOT "
            "NULL, deadline FLOAT NOT NULL, state VARCHAR(16) NOT NULL, instances INTEGER NOT "
            "NULL, failed INTEGER NOT NULL, message TEXT, finished_at FLOAT, PRIMARY KEY "
            "(transaction_uid))"
        ),
        "CREATE INDEX IF NOT EXISTS ix_commitments_finished ON commitments (finished_at)",
        "CREATE INDEX IF NOT EXISTS ix_commitments_state ON commitments (state, deadline)",
    ),
    "config_versions": (
        (
            "CREATE TABLE IF NOT EXISTS config_versions (id INTEGER NOT NULL, applied_at "
            "FLOAT NOT NULL, author VARCHAR(128) NOT NULL, source VARCHAR(32) NOT NULL, "
            "sha256 VARCHAR(64) NOT NULL, yaml TEXT NOT NULL, comment TEXT NOT NULL, PRIMARY "
            "KEY (id))"
        ),
    ),
    "destination_state": (
        (
            "CREATE TABLE IF NOT EXISTS destination_state (name VARCHAR(128) NOT NULL, state "
            "VARCHAR(16) NOT NULL, admin_paused INTEGER DEFAULT '0' NOT NULL, "
            "consecutive_failures INTEGER NOT NULL, paused_since FLOAT, next_probe_at FLOAT, "
            "last_error TEXT, last_success_at FLOAT, updated_at FLOAT NOT NULL, PRIMARY KEY "
            "(name))"
        ),
    ),
    "http_sessions": (
        (
            "CREATE TABLE IF NOT EXISTS http_sessions (id VARCHAR(64) NOT NULL, user "
            "VARCHAR(128) NOT NULL, created_at FLOAT NOT NULL, last_seen FLOAT NOT NULL, "
            "expires_at FLOAT NOT NULL, source VARCHAR(64) NOT NULL, PRIMARY KEY (id))"
        ),
        ("CREATE INDEX IF NOT EXISTS ix_http_sessions_expires_at ON http_sessions (expires_at)"),
        "CREATE INDEX IF NOT EXISTS ix_http_sessions_user ON http_sessions (user)",
    ),
    "instances": (
        (
            "CREATE TABLE IF NOT EXISTS instances (id INTEGER NOT NULL, sop_instance_uid "
            "VARCHAR(64) NOT NULL, sop_class_uid VARCHAR(64) NOT NULL, transfer_syntax_uid "
            "VARCHAR(64) NOT NULL, study_instance_uid VARCHAR(64) NOT NULL, "
            "series_instance_uid VARCHAR(64) NOT NULL, patient_id VARCHAR(64) NOT NULL, "
            "patient_name VARCHAR(324) NOT NULL, accession_number VARCHAR(64) NOT NULL, "
            "study_date VARCHAR(8) NOT NULL, study_description VARCHAR(64) NOT NULL, modality "
            "VARCHAR(16) NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL, received_at "
            "FLOAT NOT NULL, calling_ae VARCHAR(16) NOT NULL, called_ae VARCHAR(16) NOT NULL, "
            "source_address VARCHAR(64) NOT NULL, generation INTEGER NOT NULL, routed INTEGER "
            "NOT NULL, purged_at FLOAT, purge_reason TEXT, PRIMARY KEY (id), UNIQUE "
            "(sop_instance_uid))"
        ),
        ("CREATE INDEX IF NOT EXISTS ix_instances_accession ON instances (accession_number)"),
        (
            "CREATE INDEX IF NOT EXISTS ix_instances_live ON instances (purged_at, "
            "received_at, size)"
        ),
        "CREATE INDEX IF NOT EXISTS ix_instances_patient_id ON instances (patient_id)",
        "CREATE INDEX IF NOT EXISTS ix_instances_received_at ON instances (received_at)",
        (
            "CREATE INDEX IF NOT EXISTS ix_instances_series_instance_uid ON instances "
            "(series_instance_uid)"
        ),
        (
            "CREATE INDEX IF NOT EXISTS ix_instances_study_instance_uid ON instances "
            "(study_instance_uid)"
        ),
        "CREATE INDEX IF NOT EXISTS ix_instances_unrouted ON instances (routed, id)",
    ),
    "job_instances": (
        (
            "CREATE TABLE IF NOT EXISTS job_instances (job_id INTEGER NOT NULL, instance_id "
            "INTEGER NOT NULL, destination VARCHAR(128) NOT NULL, generation INTEGER NOT "
            "NULL, state VARCHAR(16) NOT NULL, status INTEGER, message TEXT, updated_at FLOAT "
            "NOT NULL, transform VARCHAR(128) DEFAULT '' NOT NULL, sent_as TEXT, sent_uid "
            "VARCHAR(64), commitment VARCHAR(16), commitment_uid VARCHAR(64), PRIMARY KEY "
            "(job_id, instance_id), CONSTRAINT uq_delivery_v7 UNIQUE (destination, "
            "instance_id, generation, transform), FOREIGN KEY(job_id) REFERENCES jobs (id), "
            "FOREIGN KEY(instance_id) REFERENCES instances (id))"
        ),
        (
            "CREATE INDEX IF NOT EXISTS ix_job_instances_commitment ON job_instances "
            "(commitment_uid)"
        ),
        (
            "CREATE INDEX IF NOT EXISTS ix_job_instances_instance ON job_instances "
            "(instance_id, state)"
        ),
        ("CREATE INDEX IF NOT EXISTS ix_job_instances_state ON job_instances (job_id, state)"),
        ("CREATE INDEX IF NOT EXISTS ix_job_instances_updated ON job_instances (updated_at)"),
    ),
    "jobs": (
        (
            "CREATE TABLE IF NOT EXISTS jobs (id INTEGER NOT NULL, destination VARCHAR(128) "
            "NOT NULL, level VARCHAR(16) NOT NULL, resource_uid VARCHAR(64) NOT NULL, "
            "study_instance_uid VARCHAR(64) NOT NULL, routes TEXT NOT NULL, transform "
            "VARCHAR(128) DEFAULT '' NOT NULL, state VARCHAR(16) NOT NULL, priority INTEGER "
            "NOT NULL, attempts INTEGER NOT NULL, connection_failures INTEGER DEFAULT '0' NOT "
            "NULL, next_attempt_at FLOAT NOT NULL, lease_owner VARCHAR(128), lease_expires_at "
            "FLOAT, created_at FLOAT NOT NULL, updated_at FLOAT NOT NULL, finished_at FLOAT, "
            "last_error TEXT, PRIMARY KEY (id))"
        ),
        ("CREATE INDEX IF NOT EXISTS ix_jobs_claim ON jobs (destination, state, next_attempt_at)"),
        "CREATE INDEX IF NOT EXISTS ix_jobs_created ON jobs (created_at)",
        ("CREATE INDEX IF NOT EXISTS ix_jobs_resource ON jobs (destination, level, resource_uid)"),
        "CREATE INDEX IF NOT EXISTS ix_jobs_state ON jobs (state)",
        "CREATE INDEX IF NOT EXISTS ix_jobs_study ON jobs (study_instance_uid)",
    ),
    "loop_events": (
        (
            "CREATE TABLE IF NOT EXISTS loop_events (id INTEGER NOT NULL, kind VARCHAR(16) "
            "NOT NULL, instance_id INTEGER NOT NULL, generation INTEGER NOT NULL, "
            "sop_instance_uid VARCHAR(64) NOT NULL, study_instance_uid VARCHAR(64) NOT NULL, "
            "destination VARCHAR(128) NOT NULL, at FLOAT NOT NULL, reason TEXT NOT NULL, "
            "released_at FLOAT, released_by VARCHAR(128), PRIMARY KEY (id))"
        ),
        (
            "CREATE INDEX IF NOT EXISTS ix_loop_events_instance ON loop_events (instance_id, "
            "generation)"
        ),
        "CREATE INDEX IF NOT EXISTS ix_loop_events_kind ON loop_events (kind, at)",
        ("CREATE INDEX IF NOT EXISTS ix_loop_events_study ON loop_events (study_instance_uid)"),
    ),
    "notification_marks": (
        (
            "CREATE TABLE IF NOT EXISTS notification_marks (name VARCHAR(64) NOT NULL, value "
            "FLOAT NOT NULL, updated_at FLOAT NOT NULL, PRIMARY KEY (name))"
        ),
    ),
    "notification_outbox": (
        (
            "CREATE TABLE IF NOT EXISTS notification_outbox (id INTEGER NOT NULL, event_id "
            "VARCHAR(200) NOT NULL, event VARCHAR(32) NOT NULL, webhook VARCHAR(128) NOT "
            "NULL, subject VARCHAR(128) NOT NULL, payload TEXT NOT NULL, occurred_at FLOAT "
            "NOT NULL, created_at FLOAT NOT NULL, state VARCHAR(16) NOT NULL, attempts "
            "INTEGER NOT NULL, next_attempt_at FLOAT NOT NULL, sent_at FLOAT, last_error "
            "TEXT, PRIMARY KEY (id), CONSTRAINT uq_notification_event UNIQUE (event_id, "
            "webhook))"
        ),
        (
            "CREATE INDEX IF NOT EXISTS ix_notification_outbox_created ON notification_outbox "
            "(created_at)"
        ),
        (
            "CREATE INDEX IF NOT EXISTS ix_notification_outbox_due ON notification_outbox "
            "(state, next_attempt_at)"
        ),
    ),
    "process_heartbeats": (
        (
            "CREATE TABLE IF NOT EXISTS process_heartbeats (node VARCHAR(128) NOT NULL, role "
            "VARCHAR(32) NOT NULL, pid INTEGER NOT NULL, started_at FLOAT NOT NULL, "
            "heartbeat_at FLOAT NOT NULL, ok INTEGER NOT NULL, detail TEXT NOT NULL, PRIMARY "
            "KEY (node, role))"
        ),
    ),
    "pseudonym_map": (
        (
            "CREATE TABLE IF NOT EXISTS pseudonym_map (id INTEGER NOT NULL, pipeline "
            "VARCHAR(128) NOT NULL, kind VARCHAR(16) NOT NULL, lookup VARCHAR(64) NOT NULL, "
            "pseudonym VARCHAR(128) NOT NULL, sealed TEXT NOT NULL, key_id VARCHAR(16) NOT "
            "NULL, recorded_at FLOAT NOT NULL, PRIMARY KEY (id), CONSTRAINT "
            "uq_pseudonym_map_original UNIQUE (pipeline, kind, lookup))"
        ),
        "CREATE INDEX IF NOT EXISTS ix_pseudonym_map_lookup ON pseudonym_map (lookup)",
        ("CREATE INDEX IF NOT EXISTS ix_pseudonym_map_pseudonym ON pseudonym_map (pseudonym)"),
    ),
    "purge_runs": (
        (
            "CREATE TABLE IF NOT EXISTS purge_runs (id INTEGER NOT NULL, started_at FLOAT NOT "
            "NULL, ended_at FLOAT, actor VARCHAR(128) NOT NULL, purged INTEGER NOT NULL, "
            "purged_bytes INTEGER NOT NULL, evicted INTEGER NOT NULL, orphans INTEGER NOT "
            "NULL, history_rows INTEGER NOT NULL, audit_rows INTEGER NOT NULL, stored INTEGER "
            "NOT NULL, stored_bytes INTEGER NOT NULL, eligible INTEGER NOT NULL, "
            "eligible_bytes INTEGER NOT NULL, undelivered INTEGER NOT NULL, undelivered_bytes "
            "INTEGER NOT NULL, error TEXT, PRIMARY KEY (id))"
        ),
        "CREATE INDEX IF NOT EXISTS ix_purge_runs_started_at ON purge_runs (started_at)",
    ),
    "route_matches": (
        (
            "CREATE TABLE IF NOT EXISTS route_matches (instance_id INTEGER NOT NULL, route "
            "VARCHAR(128) NOT NULL, generation INTEGER NOT NULL, matched_at FLOAT NOT NULL, "
            "PRIMARY KEY (instance_id, route, generation), FOREIGN KEY(instance_id) "
            "REFERENCES instances (id))"
        ),
        ("CREATE INDEX IF NOT EXISTS ix_route_matches_route ON route_matches (route, matched_at)"),
    ),
    "triggers": (
        (
            "CREATE TABLE IF NOT EXISTS triggers (id INTEGER NOT NULL, route VARCHAR(128) NOT "
            "NULL, level VARCHAR(16) NOT NULL, uid VARCHAR(64) NOT NULL, study_instance_uid "
            "VARCHAR(64) NOT NULL, last_arrival FLOAT NOT NULL, pending INTEGER NOT NULL, "
            "fired_at FLOAT, PRIMARY KEY (id), CONSTRAINT uq_trigger UNIQUE (route, level, "
            "uid))"
        ),
        ("CREATE INDEX IF NOT EXISTS ix_triggers_pending ON triggers (pending, last_arrival)"),
    ),
    "unplanned": (
        (
            "CREATE TABLE IF NOT EXISTS unplanned (instance_id INTEGER NOT NULL, generation "
            "INTEGER NOT NULL, attempts INTEGER NOT NULL, first_failed_at FLOAT NOT NULL, "
            "next_attempt_at FLOAT NOT NULL, last_error TEXT NOT NULL, PRIMARY KEY "
            "(instance_id), FOREIGN KEY(instance_id) REFERENCES instances (id))"
        ),
        ("CREATE INDEX IF NOT EXISTS ix_unplanned_next_attempt_at ON unplanned (next_attempt_at)"),
    ),
}

_ADD_COLUMN = re.compile(r"ALTER TABLE (\w+) ADD COLUMN (\w+)", re.IGNORECASE)


def _already_applied(conn: Connection, statement: str) -> bool:
    """An ``ADD COLUMN`` whose column exists (SQLite has no ``IF NOT EXISTS`` for it):
    an index some steps of which were applied by hand, or a copy restored over a
    newer schema, upgrades instead of failing. Other steps say ``IF NOT EXISTS``."""
    match = _ADD_COLUMN.match(statement.strip())
    if match is None:
        return False
    table, column = match.groups()
    return column in {c["name"] for c in inspect(conn).get_columns(table)}


def create_missing_tables(conn: Connection) -> None:
    """The tables of version 7 this index lacks, with their indexes (a table that
    exists is left as it is: its upgrades are the steps' business)."""
    present = set(inspect(conn).get_table_names())
    for table, statements in V7_TABLES.items():
        if table not in present:
            for statement in statements:
                conn.exec_driver_sql(statement)


def apply(conn: Connection, version: int) -> None:
    """Upgrade an index of version ``version - 1`` to ``version``."""
    create_missing_tables(conn)
    for statement in MIGRATIONS[version]:
        if not _already_applied(conn, statement):
            conn.exec_driver_sql(statement)
