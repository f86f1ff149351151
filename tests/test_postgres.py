"""PostgreSQL as the index: what only PostgreSQL has (the URL form, the append-only
audit log against the application role), and a router process on it end to end.

Everything else the index does runs on both databases through the same tests
(``BOTH_DATABASES`` in conftest.py).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import DatabaseError, ProgrammingError

from dicomrouter.config import ConfigError, parse_config
from dicomrouter.retention.prune import prune_audit
from dicomrouter.store import audit, create_index_engine
from dicomrouter.store.schema import audit_log, instances
from tests.support.dcmtk import StoreSCP, free_port
from tests.support.postgres import Postgres
from tests.support.router import RouterProcess, all_settled
from tests.support.synth import make_study

_roles = itertools.count(1)


def test_a_plain_postgresql_url_means_psycopg(postgres_url: str) -> None:
    """``database: postgresql://…`` (libpq's own form) works as written: psycopg 3."""
    assert postgres_url.startswith("postgresql://")
    config = parse_config({"database": postgres_url}, environ={})
    assert config.database_url.startswith("postgresql+psycopg://")
    engine = create_index_engine(config.database_url)
    assert engine.dialect.driver == "psycopg"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT value FROM meta_info WHERE key = 'schema'")).scalar()
    engine.dispose()


def test_another_database_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"- database: unsupported database 'mysql'"):
        parse_config({"database": "mysql://router@db/router"}, environ={})


def test_the_audit_log_refuses_truncate_too(postgres_url: str) -> None:
    engine = create_index_engine(postgres_url)
    audit.record(engine, "admin", "config.apply", "v1")
    with pytest.raises(DatabaseError, match="append-only"), engine.begin() as conn:
        conn.execute(text("TRUNCATE audit_log"))
    assert audit.query(engine)[0] == 1
    engine.dispose()


def _app_role(postgres: Postgres, database: str) -> str:
    """A role as docs/deployment.md sets one up: it reads and writes the index but does
    not own it, and may not UPDATE or DELETE the audit log."""
    role = f"router_app_{os.getpid()}_{next(_roles)}"
    postgres.execute(f"CREATE ROLE {role} LOGIN")
    owner = postgres.app_role
    for statement in (
        f"GRANT CONNECT ON DATABASE {database} TO {role}",
        f"GRANT USAGE ON SCHEMA public TO {role}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}",
        f"REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM {role}",
    ):
        postgres.execute(statement, database, owner)
    return role


def test_a_role_without_update_and_delete_on_the_audit_log_runs_but_cannot_rewrite_it(
    postgres: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    """The trigger holds against anyone but the table's owner (who could drop it); the
    REVOKE holds even against the owner's escape hatch for pruning. The router runs
    with such a role: it opens the index, writes audit rows, and its retention run
    keeps old audit rows with a warning instead of failing."""
    database = postgres.create("audit", postgres.template)
    role = None
    try:
        owner_url = postgres.url_for(database, postgres.app_role)
        create_index_engine(owner_url).dispose()
        role = _app_role(postgres, database)
        engine = create_index_engine(postgres.url_for(database, role))  # opens, upgrades nothing
        old = time.time() - 400 * 86400
        with engine.begin() as conn:
            conn.execute(
                insert(audit_log).values(at=old, actor="x", action="old.entry", detail="{}")
            )
        audit.record(engine, "admin", "config.apply", "v1")
        for statement in ("UPDATE audit_log SET actor = 'y'", "DELETE FROM audit_log"):
            denied = pytest.raises(ProgrammingError, match="permission denied")
            with denied, engine.begin() as conn:
                # The setting that lets retention's pruning through the trigger: no
                # help without the privilege.
                conn.execute(text("SET LOCAL dicomrouter.prune_audit = 'on'"))
                conn.execute(text(statement))
        with caplog.at_level(logging.WARNING, logger="dicomrouter.retention"):
            assert prune_audit(engine, time.time() - 365 * 86400) == 0
        assert "may not delete them" in caplog.text
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(audit_log)).scalar() == 2
        engine.dispose()
        # The owner prunes them (retention as the owner, or by hand).
        owner = create_index_engine(owner_url)
        assert prune_audit(owner, time.time() - 365 * 86400) == 1
        owner.dispose()
    finally:
        postgres.drop(database)
        if role is not None:
            postgres.execute(f"DROP ROLE {role}")


def test_a_router_on_postgresql_keeps_what_it_acknowledged_through_a_kill(
    tmp_path: Path, postgres_url: str, dcmtk: None
) -> None:
    """storescu -> router on PostgreSQL -> storescp, with the destination down at
    first and the router killed (SIGKILL) after it acknowledged everything: once
    restarted, and the destination up, every instance arrives, as sent."""
    port = free_port()
    config = {
        "database": postgres_url,
        "destinations": {
            "pacs": {
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": port,
                "retry": {"initial_delay": "1s", "max_delay": "1s"},
                "probe_interval": "1s",
            }
        },
        "routes": [{"name": "all", "trigger": "instance", "to": ["pacs"]}],
    }
    files = make_study(tmp_path / "in", 6)
    router = RouterProcess(tmp_path / "router", config)
    router.start()
    try:
        result = router.send(files)
        assert result.returncode == 0, result.stderr
        router.kill()
        # Nothing of the index is in the storage folder: it is all in PostgreSQL.
        assert not (router.storage / "index.sqlite").exists()
        engine = create_index_engine(postgres_url, create=False)
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(instances)).scalar() == 6
        engine.dispose()
        with StoreSCP(port, "PACS", tmp_path / "pacs", accept="all") as pacs:
            router.start()
            jobs = router.wait_jobs(
                lambda jobs: len(jobs) == 6 and all_settled(jobs), 120, "6 settled"
            )
            assert {j["state"] for j in jobs} == {"completed"}
            received = {dcmread(p).SOPInstanceUID: dcmread(p) for p in pacs.received_files()}
        sent = {dcmread(f).SOPInstanceUID: dcmread(f) for f in files}
        assert received.keys() == sent.keys()
        for uid, original in sent.items():
            assert received[uid].PixelData == original.PixelData
            assert received[uid].PatientName == original.PatientName
    finally:
        router.stop()
