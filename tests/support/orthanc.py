"""Orthanc as a real DICOM peer in tests and benchmarks.

Why Orthanc: it is an independent, widely deployed DICOM implementation, so it catches
interoperability mistakes a pynetdicom-to-pynetdicom test cannot, and its REST API is a
convenient oracle ("what did the destination really store?"). It also doubles as the
reference router in the benchmark, via a Lua ``OnStoredInstance`` auto-routing script.

Each :class:`Orthanc` writes its own JSON configuration with private storage and index
folders under ``workdir`` and free ports, so runs never share state with a system
Orthanc or with each other. The REST helpers use ``urllib`` only (no new dependency),
and every wait is bounded: a dead or stuck peer raises instead of hanging the suite.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support import stop_process
from tests.support.dcmtk import free_port

__all__ = ["Orthanc", "OrthancError", "orthanc_executable"]

_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
#: Where Debian's orthanc-* plugin packages put their libraries.
PLUGIN_FOLDER = "/usr/share/orthanc/plugins"


class OrthancError(RuntimeError):
    """Orthanc failed to start, died, or answered a REST call with an error."""


def orthanc_executable() -> str | None:
    """Path of the Orthanc server binary, or ``None`` if it is not installed.

    ``/usr/sbin`` is not on every user's ``PATH`` (Debian puts Orthanc there), so the
    usual locations are tried before ``shutil.which``.
    """
    for candidate in _CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("Orthanc")


def _port_open(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


class Orthanc:
    """A private Orthanc server, used as a context manager.

    ``fast_stop`` (default) kills the server on exit: a clean Orthanc shutdown takes
    about 3 s of thread polling, which buys nothing when the storage is thrown away.
    Pass ``fast_stop=False`` to restart a server over the same storage (``stop()`` then
    ``start()``), e.g. to test what survives a restart.

    ``modalities`` maps a name (used in Lua ``SendToModality`` and in
    ``/modalities/{name}``) to ``(aet, host, port)``. ``lua`` is the text of a Lua script
    loaded at startup. Ports default to free ones; read them back from ``dicom_port`` and
    ``http_port``. ``extra_config`` is merged last and can override any generated key.

    ``plugins`` names plugins to load from Debian's plugin folder, e.g.
    ``("libOrthancDicomWeb.so",)`` (installed by ``orthanc-dicomweb``); their own
    settings go in ``extra_config`` (``"DicomWeb": {...}``). ``credentials`` (user,
    password) turns HTTP authentication on, with that one registered user, and the
    REST helpers send it.

    Orthanc 1.10 cannot bind to one interface, so its DICOM and HTTP servers listen on
    all of them; ``RemoteAccessAllowed`` stays ``false`` so only local clients get
    answers from the REST API, and callers should only use 127.0.0.1.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        aet: str = "ORTHANC",
        dicom_port: int | None = None,
        http_port: int | None = None,
        modalities: dict[str, tuple[str, str, int]] | None = None,
        lua: str | None = None,
        stable_age: int = 60,
        concurrent_jobs: int = 2,
        extra_config: dict[str, Any] | None = None,
        startup_timeout: float = 30.0,
        fast_stop: bool = True,
        executable: str | None = None,
        plugins: tuple[str, ...] = (),
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.aet = aet
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.modalities = dict(modalities or {})
        self.lua = lua
        self.stable_age = stable_age
        self.concurrent_jobs = concurrent_jobs
        self.extra_config = dict(extra_config or {})
        self.startup_timeout = startup_timeout
        self.fast_stop = fast_stop
        self.executable = executable or orthanc_executable()
        self.plugins = plugins
        self.credentials = credentials
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int | None:
        """Process id of the running server (for RSS sampling), else ``None``."""
        return self._proc.pid if self._proc else None

    def config(self) -> dict[str, Any]:
        """The configuration written to ``orthanc.json``."""
        storage = self.workdir / "storage"
        config: dict[str, Any] = {
            "Name": f"test-{self.aet}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            # The Debian default loads worklist/serve-folder plugins: only those asked for.
            "Plugins": [str(Path(PLUGIN_FOLDER) / name) for name in self.plugins],
            "ConcurrentJobs": self.concurrent_jobs,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            # Any calling AE may echo and store, known in DicomModalities or not.
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {
                name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()
            },
            "DicomModalitiesInDatabase": False,
            "StableAge": self.stable_age,
            "SaveJobs": False,
            "JobsHistorySize": 10,
            "LuaScripts": [],
            "TcpNoDelay": True,
        }
        if self.credentials is not None:
            config["AuthenticationEnabled"] = True
            config["RegisteredUsers"] = {self.credentials[0]: self.credentials[1]}
        if self.lua is not None:
            config["LuaScripts"] = [str(self.workdir / "script.lua")]
        config.update(self.extra_config)
        return config

    def start(self) -> Orthanc:
        """Write the configuration, launch Orthanc and wait until it answers."""
        if self._proc is not None:
            raise OrthancError("Orthanc already started")
        if not self.executable:
            raise OrthancError("Orthanc is not installed (apt-get install orthanc)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.lua is not None:
            (self.workdir / "script.lua").write_text(self.lua, encoding="utf-8")
        self.config_path.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        env = dict(os.environ, TCP_NODELAY="1")  # dcmtk inside Orthanc: avoid Nagle stalls
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [self.executable, str(self.config_path)],
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise OrthancError(f"Orthanc exited during startup:\n{self.log_tail()}")
            with contextlib.suppress(OSError, OrthancError):
                self.get_json("/system", timeout=1.0)
                if _port_open(self.dicom_port):
                    return
            time.sleep(0.1)
        raise OrthancError(
            f"Orthanc not ready after {self.startup_timeout:.0f}s:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 15.0) -> None:
        """Stop Orthanc: SIGKILL if ``fast_stop``, else SIGTERM then SIGKILL after ``timeout``."""
        proc, self._proc = self._proc, None
        stop_process(proc, timeout, signal.SIGKILL if self.fast_stop else signal.SIGTERM)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of Orthanc's log, for error messages."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ REST

    def _request(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 30.0
    ) -> bytes:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if self.credentials is not None:
            token = base64.b64encode(":".join(self.credentials).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", errors="replace")[:500]
            raise OrthancError(f"{method} {path}: HTTP {exc.code}: {detail}") from exc
        except urllib.error.URLError as exc:
            raise OrthancError(f"{method} {path}: {exc.reason}") from exc

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        """GET a REST resource and decode its JSON."""
        return json.loads(self._request("GET", path, timeout=timeout))

    def post_json(self, path: str, body: Any, timeout: float = 30.0) -> Any:
        """POST a body (JSON-encoded unless ``str``/``bytes``) and decode the JSON answer."""
        if isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode("utf-8")
        else:
            data = json.dumps(body).encode("utf-8")
        answer = self._request("POST", path, data, timeout=timeout)
        return json.loads(answer) if answer.strip() else None

    def set_log_level(self, level: str) -> None:
        """``default``, ``verbose`` or ``trace`` from now on (``/tools/log-level``)."""
        self._request("PUT", "/tools/log-level", level.encode())

    def instances(self) -> list[str]:
        """Orthanc IDs of every stored instance."""
        return list(self.get_json("/instances"))

    def studies(self) -> list[str]:
        """Orthanc IDs of every stored study."""
        return list(self.get_json("/studies"))

    def statistics(self) -> dict[str, Any]:
        """``/statistics``: counts of patients/studies/series/instances and disk size."""
        return dict(self.get_json("/statistics"))

    def instance_count(self) -> int:
        """Number of stored instances (cheap: read from ``/statistics``)."""
        return int(self.statistics()["CountInstances"])

    def get_instance_file(self, instance_id: str) -> bytes:
        """The stored Part-10 file of one instance, byte for byte."""
        return self._request("GET", f"/instances/{instance_id}/file")

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """``/instances/{id}/simplified-tags``: tag keyword -> value."""
        return dict(self.get_json(f"/instances/{instance_id}/simplified-tags"))

    def find_sop(self, sop_instance_uid: str) -> str | None:
        """Orthanc ID of the instance with this SOP Instance UID, or ``None``."""
        for hit in self.post_json("/tools/lookup", sop_instance_uid) or []:
            if hit.get("Type") == "Instance":
                return str(hit["ID"])
        return None

    def wait_for_instances(self, count: int, timeout: float = 30.0, interval: float = 0.1) -> int:
        """Poll until at least ``count`` instances are stored; return the final count.

        Raises :class:`OrthancError` on timeout or if Orthanc died, so a test fails with
        a message instead of hanging.
        """
        deadline = time.monotonic() + timeout
        current = 0
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise OrthancError(f"Orthanc is not running:\n{self.log_tail()}")
            current = self.instance_count()
            if current >= count:
                return current
            if time.monotonic() >= deadline:
                raise OrthancError(f"only {current}/{count} instances after {timeout:.0f}s")
            time.sleep(interval)
