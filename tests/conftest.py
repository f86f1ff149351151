"""Shared fixtures. Interop peers are required: in CI (CI=true) a missing dcmtk or
Orthanc is a failure, never a skip; locally the skip prints its reason.

The index's two databases: every test of a module in :data:`BOTH_DATABASES` runs
twice, ``[sqlite]`` and ``[postgresql]`` (``index_backend``). On PostgreSQL the test
gets a fresh database of its own, and every configuration without a ``database``
key points at it (``RouterConfig.database_url``), so the test itself is unchanged.
A test that is about the SQLite file itself (or runs a router process, which reads
its own configuration file) is marked ``sqlite_only``; one about PostgreSQL itself
asks for ``postgres_url``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import require_peers
from tests.support.dcmtk import StoreSCP, free_port
from tests.support.orthanc import orthanc_executable
from tests.support.pki import Pki, make_pki
from tests.support.postgres import Postgres, postgres_server


@pytest.fixture
def dcmtk() -> None:
    require_peers(dcmtk=True)


@pytest.fixture
def orthanc_bin() -> str:
    require_peers(dcmtk=False, orthanc=True)
    return str(orthanc_executable())


@pytest.fixture
def pacs(tmp_path: Path, dcmtk: None) -> Iterator[StoreSCP]:
    """A dcmtk storescp destination (AE PACS) accepting every transfer syntax."""
    with StoreSCP(free_port(), "PACS", tmp_path / "pacs", accept="all") as scp:
        yield scp


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One throwaway PKI for the session (tests/support/pki.py): do not change its
    files; a test that does (a certificate reload) makes its own with make_pki."""
    return make_pki(tmp_path_factory.mktemp("pki"))


#: Test modules that touch the index in-process: run on both databases.
BOTH_DATABASES = frozenset(
    {
        "test_alerts",
        "test_api_audit",
        "test_api_auth",
        "test_api_config_checks",
        "test_api_destinations",
        "test_api_jobs",
        "test_api_reidentify",
        "test_api_routes",
        "test_api_security",
        "test_api_status",
        "test_api_studies",
        "test_certificate_expiry",
        "test_commitment_store",
        "test_config_versions",
        "test_dispatch_transforming",
        "test_dispatch_worker",
        "test_groupcommit",
        "test_groups",
        "test_loops_guard",
        "test_metrics",
        "test_migrations",
        "test_nodes",
        "test_notifications",
        "test_queue",
        "test_queue_transforms",
        "test_readiness",
        "test_recovery",
        "test_reidentify",  # tests/transforms
        "test_retention",
        "test_retention_crossfeature",
        "test_retention_surfaces",
        "test_several_nodes",
        "test_shared_health",
        "test_store",
        "test_unplanned",
        "test_web",
        "test_web_readable",
    }
)
DATABASES = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rpartition(".")[2]
    if (
        "index_backend" in metafunc.fixturenames
        and module in BOTH_DATABASES
        and metafunc.definition.get_closest_marker("sqlite_only") is None
        # A test about PostgreSQL itself asks for it by name.
        and "postgres_url" not in metafunc.fixturenames
    ):
        metafunc.parametrize("index_backend", DATABASES, indirect=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """The PostgreSQL server of this session (tests/support/postgres.py)."""
    with postgres_server() as server:
        yield server


@pytest.fixture
def postgres_url(postgres: Postgres) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test, dropped after it."""
    with postgres.database() as url:
        yield url


@pytest.fixture
def index_url(index_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """The URL of an index of this test's database: a new SQLite file, or the
    test's own PostgreSQL database."""
    if index_backend == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return f"sqlite:///{tmp_path / 'index.sqlite'}"


@pytest.fixture(autouse=True)
def index_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``sqlite`` (every test outside :data:`BOTH_DATABASES`), or ``postgresql``: then
    a configuration without ``database`` uses a PostgreSQL database of its own,
    one per storage folder, as SQLite's default index is one file per storage folder
    (a test with two sites gets two databases)."""
    backend = getattr(request, "param", "sqlite")
    if backend != "postgresql":
        yield str(backend)
        return
    from dicomrouter.config import RouterConfig

    server: Postgres = request.getfixturevalue("postgres")
    made: dict[Path, str] = {}

    def database_url(self: RouterConfig) -> str:
        if self.database:
            return self.database
        folder = self.storage.path.resolve()
        if folder not in made:
            made[folder] = server.create("t", server.template)
        return server.url_for(made[folder], server.app_role)

    monkeypatch.setattr(RouterConfig, "database_url", property(database_url))
    try:
        yield str(backend)
    finally:
        for name in made.values():
            server.drop(name)
