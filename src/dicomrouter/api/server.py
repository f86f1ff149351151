"""The HTTP process: uvicorn serving the app, beside (never inside) the DICOM process.

A separate process because request handling is Python too, and the receiver's GIL
must stay free for modalities (the issue: HTTP "never slows receiving"). It reads
the index through a reader engine (WAL: no lock waits behind C-STOREs) and writes
only small transactions (manual actions, audit rows).
"""

from __future__ import annotations

import logging
from pathlib import Path

from dicomrouter.config import RouterConfig

log = logging.getLogger("dicomrouter.http")


def build_context(config: RouterConfig, config_path: Path | None):  # type: ignore[no-untyped-def]
    from dicomrouter.store import ObjectStore, create_index_engine

    from .context import AppContext

    return AppContext(
        config=config,
        engine=create_index_engine(config.database_url, create=False),
        reader=create_index_engine(config.database_url, create=False, writer=False),
        store=ObjectStore(config.storage.path),
        config_path=config_path,
    )


def serve_http(config: RouterConfig, config_path: Path | None, on_ready=None) -> None:  # type: ignore[no-untyped-def]
    """Run uvicorn until SIGTERM (uvicorn handles it: finish requests, then exit)."""
    import uvicorn

    from .app import create_app

    ctx = build_context(config, config_path)
    app = create_app(ctx)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.http.bind,
            port=config.http.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            server_header=False,
        )
    )
    if on_ready is not None:
        original_startup = server.startup

        async def startup(sockets=None):  # type: ignore[no-untyped-def]
            await original_startup(sockets)
            if server.started:
                on_ready()

        server.startup = startup  # type: ignore[method-assign]
    log.info("HTTP service on http://%s:%s/", config.http.bind, config.http.port)
    server.run()
    if not server.started:
        raise SystemExit(f"cannot serve HTTP on {config.http.bind}:{config.http.port}")
