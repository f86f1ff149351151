"""The HTTP process: uvicorn serving the app, beside (never inside) the DICOM process.

A separate process because request handling is Python too, and the receiver's GIL
must stay free for modalities (the issue: HTTP "never slows receiving"). It reads
the index through a reader engine (WAL: no lock waits behind C-STOREs) and writes
only small transactions (manual actions, audit rows).

Configuration: ``PUT /api/v1/config`` replaces this process's configuration at once
and sends SIGHUP to the node (our parent), which validates the file again and
forwards SIGHUP to every child; here that loads the newest recorded version, so a
reload started from the shell (``kill -HUP``) reaches this process too.

HTTPS (``http.tls``): uvicorn serves with our BCP 195 context
(:mod:`dicomrouter.tls`), and SIGHUP reads the certificate and key again into that
same context, so a renewed certificate is served from the next connection on.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType

from dicomrouter.config import RouterConfig
from dicomrouter.observe.alerts import start_alerts
from dicomrouter.tls import ReloadableServerContext, TlsError

log = logging.getLogger("dicomrouter.http")


def build_context(config: RouterConfig, config_path: Path | None):  # type: ignore[no-untyped-def]
    from dicomrouter.edge.context import AppContext
    from dicomrouter.store import ObjectStore, create_index_engine

    return AppContext(
        config=config,
        engine=create_index_engine(config.database_url, create=False),
        reader=create_index_engine(config.database_url, create=False, writer=False),
        store=ObjectStore(config.storage.path, config.node.name),
        config_path=config_path,
    )


def reload_context(ctx) -> bool:  # type: ignore[no-untyped-def]
    """Replace ``ctx.config`` by the newest recorded version (the node recorded it
    after validating it). Handlers read ``ctx.config`` once, so each request sees
    one version."""
    from dicomrouter.control import versions

    if ctx.config_path is None:
        return False

    def install(config: RouterConfig) -> None:
        ctx.config = config
        logging.getLogger().setLevel(config.log_level)

    version = versions.install_newest(ctx.reader, ctx.config_path, lambda: ctx.config, install)
    if version is None:
        return False
    log.info("HTTP service runs on configuration version %d", version.id)
    return True


def _tell_node() -> None:
    os.kill(os.getppid(), signal.SIGHUP)


def https_context(config: RouterConfig) -> ReloadableServerContext | None:
    """The HTTPS context for ``http.tls`` (None: plain HTTP)."""
    if config.http.tls is None:
        return None
    holder = ReloadableServerContext(
        config.http.tls.certificate, config.http.tls.private_key, name="HTTPS"
    )
    holder.context.set_alpn_protocols(["http/1.1"])  # uvicorn's h11 speaks HTTP/1.1
    return holder


def base_url(config: RouterConfig) -> str:
    """Where the dashboard is served, as logged: ``https://`` when ``http.tls`` is set."""
    scheme = "https" if config.http.tls is not None else "http"
    host = config.http.bind
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{config.http.port}/"


def serve_http(config: RouterConfig, config_path: Path | None, on_ready=None) -> None:  # type: ignore[no-untyped-def]
    """Run uvicorn until SIGTERM (uvicorn handles it: finish requests, then exit).
    Meant to run as the node's child: SIGHUP reloads, and an applied configuration
    is signalled to the parent."""
    import uvicorn

    from .app import create_app

    try:
        tls = https_context(config)
    except TlsError as exc:  # the files changed since the configuration was checked
        raise SystemExit(f"cannot serve HTTPS: {exc}") from None
    ctx = build_context(config, config_path)
    ctx.reload_node = _tell_node

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        # Off the signal handler (and the event loop): file and index reads.
        threading.Thread(target=_reload_logged, args=(ctx, tls), name="reload", daemon=True).start()

    signal.signal(signal.SIGHUP, on_hangup)
    app = create_app(ctx)
    alerter = start_alerts(ctx)  # webhook alerts: a thread here, far from the receiver
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.http.bind,
            port=config.http.port,
            log_level="warning",
            log_config=None,  # uvicorn's lines through our handler (escaped, one format)
            access_log=False,
            lifespan="off",
            server_header=False,
            # X-Forwarded-For is believed only from http.trusted_proxies (api/proxy.py).
            proxy_headers=False,
        )
    )
    if on_ready is not None:
        original_startup = server.startup

        async def startup(sockets=None):  # type: ignore[no-untyped-def]
            await original_startup(sockets)
            if server.started:
                on_ready()

        server.startup = startup  # type: ignore[method-assign]
    if tls is not None:
        # uvicorn builds its own context from file names; ours (BCP 195, reloadable)
        # replaces it once the configuration is loaded (startup keeps a loaded one).
        server.config.load()
        server.config.ssl = tls.context
    log.info("HTTP service on %s", base_url(config))
    try:
        server.run()
    finally:
        alerter.stop()
    if not server.started:
        raise SystemExit(f"cannot serve HTTP on {config.http.bind}:{config.http.port}")


def _reload_logged(ctx, tls: ReloadableServerContext | None = None) -> None:  # type: ignore[no-untyped-def]
    if tls is not None:
        tls.reload()  # logs its outcome; bad files keep the certificate in service
    try:
        reload_context(ctx)
    except Exception:
        log.exception("configuration reload failed in the HTTP service")
