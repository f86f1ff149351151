"""In-process API tests: the FastAPI app on a real index in a temporary folder.

``api_env(tmp_path, config_dict)`` gives an ``ApiEnv`` with a ``TestClient`` per role
(``viewer``, ``operator``, ``admin``) authenticated by API token, an anonymous one,
and the engine, so tests can seed the index and check what an action did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine

from dicomrouter.api import AppContext, create_app
from dicomrouter.config import RouterConfig, parse_config
from dicomrouter.security import hash_password, hash_token
from dicomrouter.store import ObjectStore, create_index_engine

PASSWORD = "correct horse battery staple"
TOKENS = {role: f"drt_test_{role}_token" for role in ("viewer", "operator", "admin")}
# Hashing is slow on purpose; hash once per test session.
_PASSWORD_HASH = hash_password(PASSWORD)


def auth_section() -> dict[str, Any]:
    return {
        "users": {role: {"password_hash": _PASSWORD_HASH, "role": role} for role in TOKENS},
        "tokens": {
            f"{role}-token": {"token_hash": hash_token(token), "role": role}
            for role, token in TOKENS.items()
        },
    }


@dataclass
class ApiEnv:
    config: RouterConfig
    ctx: AppContext
    engine: Engine
    store: ObjectStore
    anonymous: TestClient
    viewer: TestClient
    operator: TestClient
    admin: TestClient

    def client(self, role: str) -> TestClient:
        return getattr(self, role)  # type: ignore[no-any-return]


def api_env(tmp_path: Path, config: dict[str, Any] | None = None) -> ApiEnv:
    data = dict(config or {})
    data.setdefault("storage", {"path": str(tmp_path / "data")})
    data.setdefault("auth", auth_section())
    settings = parse_config(data, environ={})
    store = ObjectStore(settings.storage.path, settings.node.name)
    store.prepare()
    engine = create_index_engine(settings.database_url)
    ctx = AppContext(
        config=settings,
        engine=engine,
        reader=create_index_engine(settings.database_url, create=False, writer=False),
        store=store,
    )
    app = create_app(ctx)

    def client(role: str | None) -> TestClient:
        headers = {"Authorization": f"Bearer {TOKENS[role]}"} if role else {}
        return TestClient(app, headers=headers)

    return ApiEnv(
        settings,
        ctx,
        engine,
        store,
        client(None),
        client("viewer"),
        client("operator"),
        client("admin"),
    )
