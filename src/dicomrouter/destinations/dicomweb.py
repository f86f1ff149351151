"""Deliver stored instances to a DICOMweb server with STOW-RS (``type: dicomweb``).

* **Requests**: a batch is cut into requests of at most ``max_instances`` instances
  and ``max_bytes`` bytes of files (an instance larger than ``max_bytes`` goes
  alone). Each is a ``multipart/related`` POST to ``{url}/studies`` whose body is
  streamed from the stored (or transformed) files with a known length
  (:class:`~.stow.MultipartBody`): memory stays flat whatever the study's size. One
  ``httpx.Client`` (a kept-alive connection) serves a worker's batches.
* **Outcomes**, from the HTTP status and the Store Instances Response
  (:func:`~.stow.parse_response`, JSON or XML):

  - 200/202: each instance in the Referenced SOP Sequence is ``SUCCESS``
    (``WARNING`` with a Warning Reason). One in the Failed SOP Sequence is never
    delivered, whatever its Failure Reason: ``TRANSIENT`` when out of resources
    (``0xA7xx``, ``0x0213``), else ``PERMANENT``; a reason that is not a number is
    shown as given and counts as none (by the HTTP status). An instance the
    response does not name is ``TRANSIENT`` (sent again: STOW-RS stores the same
    instance twice harmlessly, while calling it stored could lose it), unless the
    status is 200 and the body is empty or a response naming nothing, which says
    all were stored. A body that is not a Store Instances Response (a proxy's
    sign-in page) is not the server speaking: ``TRANSIENT``.
  - 409 and 400 (and the other 4xx but 401/403/404/405/408/413/429): the request's
    instances failed, ``PERMANENT`` unless a Failure Reason says out of resources.
  - 401/403: :class:`~.sender.DestinationUnavailable` with ``pause=True``: the
    credentials were refused, nothing will be taken until someone acts.
  - 404/405: not a STOW-RS endpoint (a wrong ``url``): the destination cannot be
    reached as configured.
  - 503, 502, 504, 429, a refused connection, a connect, read or write timeout:
    the server is down, overloaded or hung (it takes connections but never
    answers). When nothing was answered in this batch yet,
    :class:`~.sender.DestinationUnavailable` (paused and probed, as DICOM
    destinations are); else this request's instances and the rest are
    ``TRANSIENT``.
  - A TLS failure (the server refused our certificate, which TLS 1.3 tells only
    after the request is sent): as a refused connection, the reason pointing at
    ``tls``.
  - 413: the request is halved and each half sent in turn; a single instance
    refused so is ``PERMANENT``, the reason naming the server's body limit.
  - Other 5xx, 408, a connection lost mid-request: this request's instances are
    ``TRANSIENT`` (retried with backoff; the server may or may not have stored them).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import NoReturn

import httpx
from pydicom.uid import UID

from dicomrouter import tls
from dicomrouter.config.models import DicomwebDestinationConfig

from .outgoing import InstanceResult, OutgoingInstance, annotate, prepared
from .recode import TranscodeError, transcoded
from .sender import DestinationUnavailable, OnResult, ShouldStop
from .status import Outcome, classify_status, describe_status
from .stow import BodyChanged, MultipartBody, Part, StowResponse, parse_response

log = logging.getLogger(__name__)

__all__ = ["DicomwebSender"]

#: The response body read at most (a Store Instances Response names each instance
#: once: a few hundred bytes each).
_MAX_RESPONSE = 16 * 1024 * 1024
_ACCEPT = "application/dicom+json"  # both encodings are read; Orthanc logs an error on a list
#: Statuses that say the server cannot take anything now: pause and probe.
_UNAVAILABLE = frozenset({429, 502, 503, 504})
#: Statuses that say this request failed for a reason a retry may fix.
_RETRY = frozenset({408})


@dataclass
class _Item:
    """One instance of a request being built: what is sent, and its copy's cleanup."""

    original: OutgoingInstance
    ready: OutgoingInstance
    part: Part
    size: int
    sent_ts: str
    cleanup: ExitStack


#: How one instance of an answered request went: outcome, status code, message.
_Decide = Callable[[_Item], tuple[Outcome, int | None, str]]


class _Stop(Exception):
    """The rest of the batch is not sent (a transient failure part way)."""


class _Down(Exception):
    """The server cannot take anything now (down, overloaded, hung): the reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DicomwebSender:
    """The :class:`~.sender.Sender` of ``type: dicomweb``."""

    def __init__(
        self,
        config: DicomwebDestinationConfig,
        name: str = "",
        keep_alive: float = 0.0,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.name = name
        self.keep_alive = keep_alive
        self._environ = os.environ if environ is None else environ
        self._client: httpx.Client | None = None
        self._last_used = 0.0
        self._lock = threading.Lock()
        self._target = config.transfer_syntax_uid

    # -- the Sender interface ------------------------------------------------------

    def send(
        self,
        batch: Sequence[OutgoingInstance],
        on_result: OnResult | None = None,
        should_stop: ShouldStop | None = None,
    ) -> list[InstanceResult]:
        results: list[InstanceResult] = []

        def emit(result: InstanceResult) -> None:
            results.append(result)
            if on_result is not None:
                on_result(result)

        if not batch:
            return results
        client = self._connect()
        answered = False  # the server answered a request of this batch
        group: list[_Item] = []
        size = 0
        try:
            for position, inst in enumerate(batch):
                if should_stop is not None and should_stop():
                    return results
                item = self._item(inst, emit)
                if item is None:
                    continue
                limits = self.config.max_instances, self.config.max_bytes
                if group and (len(group) >= limits[0] or size + item.size > limits[1]):
                    try:
                        answered |= self._post(client, group, batch, position, emit, answered)
                        stop = should_stop is not None and should_stop()
                    except BaseException:
                        item.cleanup.close()
                        raise
                    group, size = [], 0
                    if stop:
                        item.cleanup.close()
                        return results
                group.append(item)
                size += item.size
            if group:
                self._post(client, group, batch, len(batch), emit, answered)
        except _Stop:
            pass
        finally:
            for item in group:
                item.cleanup.close()
            self._last_used = time.monotonic()
        return results

    def probe(self) -> None:
        """A GET on ``probe_path`` (a QIDO-RS search): any 2xx answer is up."""
        client = self._connect()
        url = f"{self.config.url}/{self.config.probe_path.lstrip('/')}"
        try:
            response = client.get(url, headers={"Accept": "application/dicom+json"})
            response.close()
        except httpx.HTTPError as exc:
            raise DestinationUnavailable(f"{url}: {_describe(exc)}") from None
        finally:
            self._last_used = time.monotonic()
        if response.status_code in (401, 403):
            raise DestinationUnavailable(self._refused(response.status_code, url), pause=True)
        if not response.is_success:
            raise DestinationUnavailable(f"HTTP {response.status_code} from {url}")

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def close_if_idle(self) -> None:
        if self._client is not None and time.monotonic() - self._last_used >= self.keep_alive:
            self.close()

    def abort(self) -> None:
        """Close the connection under a blocked request (it fails at once)."""
        self.close()

    # -- building requests -----------------------------------------------------------

    def _connect(self) -> httpx.Client:
        """The kept client; raises (pause) when the secret it needs is not set."""
        headers = {"Accept": _ACCEPT, "User-Agent": "dicomrouter"}
        auth: httpx.BasicAuth | None = None
        spec = self.config.auth
        if spec is not None:
            secret = self._environ.get(spec.secret_env)
            if not secret:
                raise DestinationUnavailable(
                    f"the environment variable {spec.secret_env} (destinations.{self.name}."
                    f"auth.{spec.secret_key}) is not set: nothing is sent without credentials",
                    pause=True,
                )
            if spec.type == "basic":
                auth = httpx.BasicAuth(spec.username or "", secret)
            else:
                headers["Authorization"] = f"Bearer {secret}"
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(
                    auth=auth,
                    headers=headers,
                    timeout=httpx.Timeout(self.config.timeout),
                    verify=self._ssl_context() if self.config.url.startswith("https:") else True,
                    follow_redirects=False,
                )
            return self._client

    def _ssl_context(self) -> ssl.SSLContext:
        spec = self.config.tls
        if spec is None:
            return tls.client_context()
        context = tls.client_context(spec.ca_certificates, spec.certificate, spec.private_key)
        if not spec.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _item(self, inst: OutgoingInstance, emit: OnResult) -> _Item | None:
        """``inst`` ready to go in a request (its transforms run, its copy kept until
        the request is answered), or None when its result is already reported."""
        cleanup = ExitStack()
        ready = cleanup.enter_context(prepared(inst))
        if isinstance(ready, InstanceResult):
            cleanup.close()
            emit(ready)
            return None
        part = Part(ready.path)
        if self._target and UID(self._target) != UID(ready.transfer_syntax_uid):
            try:
                data, ds = transcoded(ready, self._target, self.config.allow_lossy)
            except TranscodeError as exc:
                log.info("%s not sent in %s: %s", ready.sop_instance_uid, self._target, exc)
                note = f"not sent in {self._target}: {exc}"
                ready = replace(ready, sent_as="; ".join(filter(None, (ready.sent_as, note))))
            else:
                part = Part(data)
                uid = str(ds.SOPInstanceUID)  # a lossy syntax gives a new one
                ready = replace(ready, sop_instance_uid=uid, transfer_syntax_uid=self._target)
        try:
            size = part.size
        except OSError as exc:
            cleanup.close()
            emit(
                InstanceResult(
                    inst.key, Outcome.PERMANENT, None, f"cannot read stored file: {exc.strerror}"
                )
            )
            return None
        return _Item(inst, ready, part, size, ready.transfer_syntax_uid, cleanup)

    # -- one request -------------------------------------------------------------------

    def _post(
        self,
        client: httpx.Client,
        group: list[_Item],
        batch: Sequence[OutgoingInstance],
        next_position: int,
        emit: OnResult,
        answered: bool,
    ) -> bool:
        """Send ``group`` and report its instances; True when the server answered.
        A request refused as too large (413) is halved and each half sent in turn.
        Raises :class:`_Stop` (the rest reported ``TRANSIENT``) or
        :class:`DestinationUnavailable` when nothing more should be sent."""
        waiting = [group]
        try:
            while waiting:
                request = waiting.pop(0)
                try:
                    done = self._request(client, request, emit)
                except _Down as down:
                    later = [item for rest in waiting for item in rest]
                    self._down(down.reason, request + later, batch, next_position, emit, answered)
                if done is None:  # 413: two smaller requests, first half first
                    half = len(request) // 2
                    waiting[:0] = [request[:half], request[half:]]
                answered |= done is not False
            return answered
        finally:
            for item in group:  # a copy lives until its last request is answered
                item.cleanup.close()

    def _request(self, client: httpx.Client, group: list[_Item], emit: OnResult) -> bool | None:
        """One POST of ``group``: True when answered (its instances reported), False
        when the request failed on the way (reported ``TRANSIENT``), None when it is
        too large for the server and should be split. Raises :class:`_Down` when the
        server cannot take anything now."""
        url = self.config.stow_url
        body = MultipartBody([item.part for item in group], [item.size for item in group])
        headers = {"Content-Type": body.content_type, "Content-Length": str(len(body))}
        try:
            with client.stream("POST", url, content=body, headers=headers) as response:
                content = _read_capped(response.iter_bytes())
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise _Down(f"{url}: {_describe(exc)}") from None
        except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:
            # Connected but not answered: as a refused connection when it is the
            # batch's first answer that never comes (the server is hung).
            raise _Down(f"{url}: {_describe(exc)}") from None
        except (httpx.HTTPError, BodyChanged) as exc:
            reason = f"{url}: {_describe(exc)}"
            if _tls_refused(exc):  # TLS 1.3 reports a refused client certificate late
                raise _Down(f"{reason}; check destinations.{self.name}.tls") from None
            log.warning("STOW of %d instance(s) failed: %s", len(group), reason)
            self._report(group, emit, lambda item: (Outcome.TRANSIENT, None, reason))
            return False
        status = response.status_code
        if status in (401, 403):
            raise DestinationUnavailable(self._refused(status, url), pause=True)
        if status in (404, 405):
            raise DestinationUnavailable(
                f"HTTP {status} from {url}: not a STOW-RS endpoint; check "
                f"destinations.{self.name}.url"
            )
        if 300 <= status < 400:
            where = response.headers.get("location", "elsewhere")
            raise DestinationUnavailable(
                f"HTTP {status} from {url}: redirected to {where}; set "
                f"destinations.{self.name}.url to the server's STOW-RS base"
            )
        if status in _UNAVAILABLE:
            raise _Down(f"HTTP {status} from {url}" + _detail(content))
        if status == 413:
            if len(group) > 1:
                log.info("HTTP 413 for %d instances: sending them in two requests", len(group))
                return None
            reason = (
                f"HTTP 413 from {url}: the server refuses this instance alone "
                f"({len(body)} bytes): its request body limit (nginx: client_max_body_size) "
                f"is lower; raise it (destinations.{self.name}.max_bytes only groups "
                "instances under a limit)"
            )
            self._report(group, emit, lambda item: (Outcome.PERMANENT, None, reason))
            return True
        answer = parse_response(response.headers.get("content-type", ""), content)
        self._report(group, emit, lambda item: _outcome(status, answer, item, url, content))
        return True

    def _down(
        self,
        reason: str,
        group: list[_Item],
        batch: Sequence[OutgoingInstance],
        next_position: int,
        emit: OnResult,
        answered: bool,
    ) -> NoReturn:
        """The server cannot take anything now: pause (nothing answered yet in this
        batch) or report this request and the rest ``TRANSIENT`` and stop."""
        if not answered:
            raise DestinationUnavailable(reason)
        log.warning("destination %s stopped answering: %s", self.name, reason)
        self._report(group, emit, lambda item: (Outcome.TRANSIENT, None, reason))
        for rest in batch[next_position:]:
            emit(InstanceResult(rest.key, Outcome.TRANSIENT, None, reason))
        raise _Stop

    def _report(self, group: list[_Item], emit: OnResult, decide: _Decide) -> None:
        for item in group:
            outcome, code, message = decide(item)
            result = InstanceResult(
                item.original.key,
                outcome,
                code,
                message,
                sent_transfer_syntax_uid=item.sent_ts,
            )
            annotate(result, item.original, item.ready)
            emit(result)

    def _refused(self, status: int, url: str) -> str:
        what = "credentials refused" if status == 401 else "access forbidden"
        return f"HTTP {status} from {url}: {what}; check destinations.{self.name}.auth"


def _outcome(
    status: int, answer: StowResponse, item: _Item, url: str, content: bytes
) -> tuple[Outcome, int | None, str]:
    """What ``status`` and the response say of one instance of the request."""
    uid = item.ready.sop_instance_uid
    if uid in answer.failed:
        return _failed(status, answer.failed[uid], answer.texts.get(uid))
    if 200 <= status < 300:
        if uid in answer.stored:
            warning, text = answer.stored[uid], answer.texts.get(uid)
            if warning is not None or text is not None:
                what = describe_status(warning) if warning is not None else repr(text)
                return Outcome.WARNING, warning, f"stored with a warning: {what}"
            return Outcome.SUCCESS, None, f"stored (HTTP {status})"
        if status == 200 and not content.strip():
            return Outcome.SUCCESS, None, "stored (HTTP 200)"
        if not answer.readable:  # a proxy's page, say: it is not the server that spoke
            return (
                Outcome.TRANSIENT,
                None,
                f"HTTP {status} from {url}, but not a Store Instances Response{_detail(content)}",
            )
        if status == 200 and not answer.stored and not answer.failed:
            return Outcome.SUCCESS, None, "stored (HTTP 200, the response names no instance)"
        return Outcome.TRANSIENT, None, f"HTTP {status}: not named in the server's response"
    what = f"HTTP {status} from {url}" + _detail(content)
    if status >= 500 or status in _RETRY:
        return Outcome.TRANSIENT, None, what
    return Outcome.PERMANENT, None, what


def _failed(status: int, code: int | None, text: str | None) -> tuple[Outcome, int | None, str]:
    """An instance in the Failed SOP Sequence: never delivered, whatever its
    Failure Reason says (a ``0x0000`` or ``0xBxxx`` there is the server's mistake).
    Transient when the reason is out of resources (``0xA7xx``, ``0x0213``), else
    permanent; with no reason, or one that is not a number (its text shown), by the
    HTTP status."""
    if code is not None:
        transient = classify_status(code) is Outcome.TRANSIENT
        outcome = Outcome.TRANSIENT if transient else Outcome.PERMANENT
        return outcome, code, f"HTTP {status}: not stored: {describe_status(code)}"
    outcome = Outcome.TRANSIENT if status >= 500 or status in _RETRY else Outcome.PERMANENT
    reason = f"failure reason {text!r}" if text else "no failure reason"
    return outcome, None, f"HTTP {status}: refused by the server ({reason})"


def _read_capped(blocks: Iterator[bytes]) -> bytes:
    data = bytearray()
    for block in blocks:
        data += block
        if len(data) > _MAX_RESPONSE:
            break
    return bytes(data[:_MAX_RESPONSE])


def _detail(content: bytes) -> str:
    text = " ".join(content[:300].decode("utf-8", "replace").split())
    return f": {text}" if text else ""


def _tls_refused(exc: BaseException) -> bool:
    """The TLS layer failed (an alert from the server: our certificate refused)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _describe(exc: BaseException) -> str:
    kinds: dict[type[BaseException], str] = {
        httpx.ConnectError: "cannot connect",
        httpx.ConnectTimeout: "connect timed out",
        httpx.ReadTimeout: "no answer in time",
        httpx.WriteTimeout: "the server stopped reading",
        httpx.PoolTimeout: "no connection free",
        httpx.RemoteProtocolError: "connection lost",
        httpx.ReadError: "connection lost",
        httpx.WriteError: "connection lost",
    }
    kind = kinds.get(type(exc), type(exc).__name__)
    detail = " ".join(str(exc).split())
    return f"{kind} ({detail})" if detail else kind
