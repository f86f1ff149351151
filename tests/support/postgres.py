"""A throwaway PostgreSQL for the tests: the index's second database.

``DICOMROUTER_TEST_POSTGRES_URL`` names a server to use (a role that may create
databases). Without it, the session starts its own cluster from Debian's
``postgresql`` package (``initdb`` and ``pg_ctl`` in ``/usr/lib/postgresql/*/bin``):
in a temporary folder, listening only on a Unix socket there (and a free loopback
port, for tools that want TCP), as the ``postgres`` user when the tests run as root
(PostgreSQL refuses to run as root). It is stopped and deleted at the end of the
session. Each test gets a database of its own (:meth:`Postgres.fresh_url`), owned by
an ordinary role (``dicomrouter``: no superuser, like a deployment's), dropped after
the test. Missing PostgreSQL skips locally and fails under CI=true.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import skip_or_fail
from .dcmtk import free_port

ENV = "DICOMROUTER_TEST_POSTGRES_URL"
APP_ROLE = "dicomrouter"
_counter = itertools.count(1)


def postgres_bin() -> Path | None:
    """The folder with ``initdb`` and ``pg_ctl``: Debian keeps them off PATH, under
    ``/usr/lib/postgresql/<major>/bin`` (newest major first)."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    majors = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(majors[-1]).parent if majors else None


class Postgres:
    """A server the tests may create databases on, through ``admin_url``."""

    def __init__(self, admin_url: str, app_role: str | None):
        self.admin_url = admin_url
        self.app_role = app_role
        #: A database holding a fresh index, made once: cloning it (FILE_COPY, ~30 ms)
        #: is several times faster than creating a database and its schema per test.
        self.template = "template0"

    def execute(self, sql: str, database: str | None = None, role: str | None = None) -> None:
        """Run ``sql`` (autocommit) in ``database`` as ``role`` (default: the admin URL's)."""
        import psycopg

        url = self._libpq(self.admin_url) if database is None else self.url_for(database, role)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql)

    @staticmethod
    def _libpq(url: str) -> str:
        return url.replace("postgresql+psycopg://", "postgresql://", 1)

    def create(self, prefix: str = "t", template: str = "template0") -> str:
        """A new database (owned by the application role, if there is one), a copy of
        ``template``: its name."""
        name = f"{prefix}_{os.getpid()}_{next(_counter)}"
        owner = f" OWNER {self.app_role}" if self.app_role else ""
        self.execute(f"CREATE DATABASE {name} TEMPLATE {template}{owner} STRATEGY FILE_COPY")
        return name

    def prepare_template(self) -> None:
        """Make :attr:`template`: a database with a fresh index (created by the code
        under test), which every test database then copies."""
        from dicomrouter.store import create_index_engine

        name = self.create("template")
        create_index_engine(self.url_for(name, self.app_role)).dispose()
        self.template = name

    def drop(self, name: str) -> None:
        self.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def url_for(self, database: str, role: str | None) -> str:
        head, _, tail = self._libpq(self.admin_url).partition("://")
        authority, _, rest = tail.partition("/")
        query = rest.partition("?")[2]
        if role is not None:
            authority = f"{role}@{authority.rpartition('@')[2]}"
        return f"{head}://{authority}/{database}" + (f"?{query}" if query else "")

    @contextmanager
    def database(self, prefix: str = "t") -> Iterator[str]:
        """A fresh database for the block: its ``postgresql://`` URL (for the
        application role, if there is one); dropped afterwards."""
        name = self.create(prefix, self.template)
        try:
            yield self.url_for(name, self.app_role)
        finally:
            self.drop(name)


def _as_postgres(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


@contextmanager
def throwaway_cluster(durable: bool = False) -> Iterator[Postgres]:
    """Start a cluster of our own (see the module docstring); stop and delete it.
    ``durable`` keeps PostgreSQL's fsync on (benchmarks: a commit costs what it costs
    in production); the tests turn it off."""
    bindir = postgres_bin()
    if bindir is None:
        skip_or_fail("PostgreSQL (Debian package postgresql) not installed", "PostgreSQL tests")
        raise AssertionError("unreachable")
    root = Path(tempfile.mkdtemp(prefix="dicomrouter-pg-"))
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
    data = root / "data"
    port = free_port()
    env = {**os.environ, "LC_ALL": "C.UTF-8", "TZ": "UTC"}
    subprocess.run(
        _as_postgres(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ]
        ),
        check=True,
        capture_output=True,
        env=env,
    )
    settings = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} "
        "-c max_connections=300"
    )
    if not durable:
        # This cluster lives for one test session and is never crashed; the
        # durability the router relies on is PostgreSQL's own, unchanged by a test.
        settings += " -c fsync=off -c full_page_writes=off"
    subprocess.run(
        _as_postgres(
            [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o", settings]
            + ["start"]
        ),
        check=True,
        capture_output=True,
        env=env,
    )
    try:
        server = Postgres(f"postgresql://postgres@/postgres?host={root}&port={port}", APP_ROLE)
        server.execute(f"CREATE ROLE {APP_ROLE} LOGIN")
        yield server
    finally:
        subprocess.run(
            _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            check=False,
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def postgres_server() -> Iterator[Postgres]:
    """The server named by ``DICOMROUTER_TEST_POSTGRES_URL``, else a throwaway cluster."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        skip_or_fail("psycopg not installed (pip install -e '.[test]')", "PostgreSQL tests")
    url = os.environ.get(ENV)
    if url:
        server = Postgres(url, None)
        server.prepare_template()
        try:
            yield server
        finally:
            server.drop(server.template)
        return
    with throwaway_cluster() as server:
        server.prepare_template()
        yield server
