"""Deliver stored instances as objects in an S3 bucket (``type: s3``), with boto3.

* **Where**: the key is ``prefix`` then ``layout`` rendered by
  :class:`~.layout.Layout`, the same safe names as a folder destination, so no tag
  value can lead outside ``prefix``. Each object has ``Content-Type:
  application/dicom`` and its UIDs as user metadata (``x-amz-meta-sop-instance-uid``...).
* **Flat memory**: an object up to ``multipart_threshold`` is one PUT, read whole; a
  larger one is a multipart upload read from disk one part (``multipart_chunk_size``)
  at a time, parts in order on this worker's connection.
* **Integrity**: every body (a PUT, each part) goes with its Content-MD5 and, with
  ``checksum: sha256``, its S3 additional checksum (``x-amz-checksum-sha256``), both
  computed from the bytes sent: a store that received other bytes refuses them
  (``BadDigest``). The answer is checked too: the ETag of a PUT or part is the MD5 of
  what the store holds (unless it is encrypted), a multipart object's ETag is the MD5 of
  its parts' MD5s, and a returned SHA-256 must be ours. A mismatch deletes what was
  stored (or aborts the upload) and the instance is retried.
* **Outcomes**: uploaded is ``SUCCESS``. A store that refuses us (no such bucket,
  access denied, unknown key id, bad signature, a KMS key we cannot use) raises
  :class:`~.sender.DestinationUnavailable` with ``pause=True``: nothing will go until
  someone fixes it. A store that cannot be reached or answers 5xx/SlowDown raises it
  without ``pause`` when nothing was uploaded yet in this batch, else the rest of the
  batch is ``TRANSIENT``. A checksum mismatch is ``TRANSIENT`` for that instance; a
  layout value that does not fit its format spec, or a request the store refuses for
  this object alone, ``PERMANENT``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import boto3
import botocore.exceptions as boto_errors
from botocore import xform_name
from botocore.config import Config
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicomrouter.config.models import S3DestinationConfig

from .layout import Layout, LayoutError
from .outgoing import InstanceResult, OutgoingInstance, annotate, error_text, prepared
from .recode import TranscodeError, transcoded, uid_label
from .sender import DestinationUnavailable, OnResult, ShouldStop
from .status import Outcome

log = logging.getLogger(__name__)

__all__ = ["S3Sender", "object_key"]

#: Error codes that say the store will take nothing from us until someone acts:
#: the bucket, the credentials, the region, the KMS key. Pause at once.
_REFUSED = frozenset(
    {
        "NoSuchBucket",
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AccountProblem",
        "InvalidBucketName",
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",
        "InvalidStorageClass",
        "InvalidEncryptionAlgorithmError",
        "KMS.DisabledException",
        "KMS.NotFoundException",
        "KMS.KMSInvalidStateException",
        # Our clock is more than 15 minutes off the store's (S3 answers it with 403):
        # no retry can pass until someone fixes this machine's clock.
        "RequestTimeTooSkewed",
        "403",
        "Forbidden",
        "301",
    }
)
#: What to do about an error code, added to its reason.
_HINTS = {"RequestTimeTooSkewed": "fix this machine's clock (NTP)"}
#: The body arrived other than it was sent, or the upload vanished: retry this
#: instance.
_RETRY = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "NoSuchUpload"})
#: The store is busy or failing: retry later (the batch stops).
_BUSY = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
    }
)
#: Fields of an answer that say the object is encrypted.
_ENCRYPTED = ("ServerSideEncryption", "SSEKMSKeyId", "SSECustomerAlgorithm")
_NETWORK = (
    boto_errors.EndpointConnectionError,
    boto_errors.ConnectionClosedError,
    boto_errors.ConnectTimeoutError,
    boto_errors.ReadTimeoutError,
    boto_errors.ProxyConnectionError,
    boto_errors.SSLError,
    boto_errors.HTTPClientError,
    ConnectionError,
    TimeoutError,
)


#: One boto3 session per profile, shared by the senders of a process: a session
#: loads the S3 service model once for all its clients (each new session reads it
#: again, about a tenth of a second).
_SESSIONS: dict[str | None, boto3.session.Session] = {}
_SESSIONS_LOCK = threading.Lock()


def object_key(prefix: str, names: Sequence[str]) -> str:
    """The object key of a rendered layout under ``prefix`` (validated by the
    configuration: plain names, no final ``/``)."""
    return "/".join([prefix, *names] if prefix else names)


@dataclass(frozen=True)
class _Body:
    """One PUT or part: its bytes and their checksums, computed from those bytes."""

    data: bytes
    md5: bytes
    sha256: bytes

    @classmethod
    def of(cls, data: bytes) -> _Body:
        return cls(data, hashlib.md5(data).digest(), hashlib.sha256(data).digest())


class _Failed(Exception):
    """A request failed. ``kind``: ``refused`` (pause the destination),
    ``unavailable`` (the store cannot be reached or is failing), ``retry`` (this
    instance, later: a checksum mismatch), ``permanent`` (this instance, never);
    ``code`` is the store's error code, if it answered."""

    def __init__(self, kind: str, message: str, code: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code


class _Stopped(Exception):
    """:meth:`S3Sender.abort` was called during a multipart upload."""


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


class S3Sender:
    """The :class:`~.sender.Sender` of ``type: s3``. Keeps one boto3 client (and its
    connections) between batches; each worker has its own sender."""

    def __init__(self, config: S3DestinationConfig) -> None:
        self.config = config
        self._layout = Layout(config.layout)
        self._target = config.transfer_syntax_uid
        self._client: Any = None
        self._aborted = threading.Event()
        self._where = config.address

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

        self._aborted.clear()
        uploaded = 0
        for position, inst in enumerate(batch):
            if (should_stop is not None and should_stop()) or self._aborted.is_set():
                return results
            with prepared(inst) as ready:
                if isinstance(ready, InstanceResult):
                    emit(ready)
                    continue
                try:
                    result = self._upload_one(ready)
                except _Stopped:
                    return results
                except _Failed as exc:
                    if exc.kind == "refused":
                        raise DestinationUnavailable(str(exc), pause=True) from None
                    if not uploaded:
                        raise DestinationUnavailable(str(exc)) from None
                    log.warning("uploading to %s: %s", self._where, exc)
                    for rest in batch[position:]:
                        emit(InstanceResult(rest.key, Outcome.TRANSIENT, None, str(exc)))
                    return results
                annotate(result, inst, ready)
                if result.outcome.delivered:
                    uploaded += 1
                emit(result)
        return results

    def probe(self) -> None:
        """The bucket exists and our credentials may use it (``HeadBucket``)."""
        try:
            self._call("HeadBucket", "", Bucket=self.config.bucket)
        except _Failed as exc:
            raise DestinationUnavailable(str(exc), pause=exc.kind == "refused") from None

    def close(self) -> None:
        """Close the client's connections."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def close_if_idle(self) -> None:
        """Idle connections are the connection pool's business."""

    def abort(self) -> None:
        """Stop a multipart upload at its next part (it is aborted on the store)."""
        self._aborted.set()

    # -- the client ------------------------------------------------------------------

    def _s3(self) -> Any:
        """The boto3 client, made on first use: credentials from the named
        environment variables, else the profile, else boto3's chain."""
        if self._client is not None:
            return self._client
        config = self.config
        keys: dict[str, str] = {}
        if config.access_key_id_env and config.secret_access_key_env:
            names = {
                "aws_access_key_id": config.access_key_id_env,
                "aws_secret_access_key": config.secret_access_key_env,
            }
            if config.session_token_env:
                names["aws_session_token"] = config.session_token_env
            for argument, name in names.items():
                value = os.environ.get(name)
                if not value:
                    raise _Failed(
                        "refused", f"{self._where}: environment variable {name} is not set"
                    )
                keys[argument] = value
        try:
            with _SESSIONS_LOCK:  # a session is not thread-safe
                session = _SESSIONS.get(config.profile)
                if session is None:
                    session = _SESSIONS[config.profile] = boto3.session.Session(
                        profile_name=config.profile
                    )
                self._client = self._make_client(session, keys)
        except boto_errors.ProfileNotFound as exc:
            raise _Failed("refused", f"{self._where}: {exc}") from None
        return self._client

    def _make_client(self, session: boto3.session.Session, keys: dict[str, str]) -> Any:
        config = self.config
        return session.client(
            "s3",
            region_name=config.region,
            endpoint_url=config.endpoint_url,
            **keys,
            config=Config(
                connect_timeout=config.connect_timeout,
                read_timeout=config.read_timeout,
                retries={"mode": "standard", "total_max_attempts": 2},
                s3={"addressing_style": config.addressing_style},
                # Our own checksums, computed from the bytes sent; no trailers
                # (aws-chunked), which not every S3-compatible store reads.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                user_agent_extra="dicomrouter",
            ),
        )

    # -- one instance ----------------------------------------------------------------

    def _upload_one(self, inst: OutgoingInstance) -> InstanceResult:
        notes: list[str] = []
        sent_ts, sent_uid = inst.transfer_syntax_uid, inst.sop_instance_uid
        try:
            header: Dataset = dcmread(inst.path, stop_before_pixels=True)
        except Exception as exc:
            return InstanceResult(
                inst.key,
                Outcome.PERMANENT,
                None,
                f"cannot read stored file {inst.path}: {error_text(exc)}",
            )
        data: bytes | None = None
        if self._target and UID(self._target) != UID(inst.transfer_syntax_uid):
            try:
                data, header = transcoded(inst, self._target, self.config.allow_lossy)
            except TranscodeError as exc:
                log.info("%s not uploaded in %s: %s", inst.sop_instance_uid, self._target, exc)
                notes.append(f"not uploaded in {uid_label(self._target)}: {exc}")
            else:
                sent_ts, sent_uid = self._target, str(header.SOPInstanceUID)
        try:
            key = object_key(self.config.prefix, self._layout.render(header))
        except LayoutError as exc:
            return InstanceResult(
                inst.key, Outcome.PERMANENT, None, f"cannot name the object: {exc}"
            )
        extra = self._extra_args(header, sent_ts)
        try:
            if self.config.on_exists == "skip" and self._exists(key):
                how = f"kept the object already at {key} (on_exists: skip)"
            else:
                size = len(data) if data is not None else os.path.getsize(inst.path)
                if size <= self.config.multipart_threshold:
                    if data is None:
                        with open(inst.path, "rb") as fh:
                            data = fh.read()
                    self._put(key, _Body.of(data), extra)
                else:
                    self._multipart(key, inst, data, extra)
                how = f"uploaded to {key}"
        except _Failed as exc:
            if exc.kind in ("retry", "permanent"):
                outcome = Outcome.TRANSIENT if exc.kind == "retry" else Outcome.PERMANENT
                return InstanceResult(inst.key, outcome, None, str(exc))
            raise
        except OSError as exc:  # the stored file, not the store
            if isinstance(exc, _NETWORK):
                raise self._classify(exc, key) from None  # a network error is an OSError
            return InstanceResult(
                inst.key, Outcome.PERMANENT, None, f"cannot read stored file {inst.path}: {exc}"
            )
        message = how + (f" ({'; '.join(notes)})" if notes else "")
        return InstanceResult(
            inst.key,
            Outcome.SUCCESS,
            None,
            message,
            sent_uid=sent_uid if sent_uid != inst.sop_instance_uid else None,
            sent_transfer_syntax_uid=sent_ts,
        )

    def _extra_args(self, header: Dataset, transfer_syntax: str) -> dict[str, Any]:
        """Content type, UIDs as user metadata, storage class, encryption."""
        metadata = {
            "sop-class-uid": str(header.get("SOPClassUID", "")),
            "sop-instance-uid": str(header.get("SOPInstanceUID", "")),
            "study-instance-uid": str(header.get("StudyInstanceUID", "")),
            "series-instance-uid": str(header.get("SeriesInstanceUID", "")),
            "transfer-syntax-uid": transfer_syntax,
        }
        extra: dict[str, Any] = {
            "ContentType": "application/dicom",
            "Metadata": {k: v for k, v in metadata.items() if v and v.isascii()},
        }
        config = self.config
        if config.storage_class:
            extra["StorageClass"] = config.storage_class
        if config.server_side_encryption:
            extra["ServerSideEncryption"] = config.server_side_encryption
        if config.kms_key_id:
            extra["SSEKMSKeyId"] = config.kms_key_id
        return extra

    def _exists(self, key: str) -> bool:
        try:
            self._call("HeadObject", key, Bucket=self.config.bucket, Key=key)
        except _Failed as exc:
            if exc.code in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def _checksum_args(self, body: _Body) -> dict[str, str]:
        args = {"ContentMD5": _b64(body.md5)}
        if self.config.checksum == "sha256":
            args["ChecksumAlgorithm"] = "SHA256"
            args["ChecksumSHA256"] = _b64(body.sha256)
        return args

    def _put(self, key: str, body: _Body, extra: dict[str, Any]) -> None:
        answer = self._call(
            "PutObject",
            key,
            Bucket=self.config.bucket,
            Key=key,
            Body=body.data,
            **self._checksum_args(body),
            **extra,
        )
        problem = self._mismatch(answer, body.md5.hex(), _b64(body.sha256))
        if problem:
            self._forget(key)
            raise _Failed("retry", f"{key}: {problem}; deleted, to be uploaded again")

    def _multipart(
        self, key: str, inst: OutgoingInstance, data: bytes | None, extra: dict[str, Any]
    ) -> None:
        """Upload parts in order, each read from disk (or ``data``, a transcoded copy)
        just before it goes; abort the upload on any failure."""
        bucket = self.config.bucket
        if self.config.checksum == "sha256":
            extra = {**extra, "ChecksumAlgorithm": "SHA256"}
        upload_id = self._call("CreateMultipartUpload", key, Bucket=bucket, Key=key, **extra)[
            "UploadId"
        ]
        try:
            chunks = _chunks(inst, data, self.config.multipart_chunk_size)
            parts = self._parts(key, upload_id, chunks)
            listed = [
                {k: v for k, v in part.items() if k in ("ETag", "PartNumber", "ChecksumSHA256")}
                for part in parts
            ]
            answer = self._call(
                "CompleteMultipartUpload",
                key,
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": listed},
            )
        except BaseException:
            self._abort_upload(key, upload_id)
            raise
        count = len(parts)
        md5 = hashlib.md5(b"".join(part["md5"] for part in parts)).hexdigest() + f"-{count}"
        sha = _b64(hashlib.sha256(b"".join(part["sha256"] for part in parts)).digest())
        problem = self._mismatch(answer, md5, f"{sha}-{count}", composite=True)
        if problem:
            self._forget(key)
            raise _Failed("retry", f"{key}: {problem}; deleted, to be uploaded again")

    def _parts(self, key: str, upload_id: str, chunks: Iterator[bytes]) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = []
        for number, chunk in enumerate(chunks, start=1):
            if self._aborted.is_set():
                raise _Stopped
            body = _Body.of(chunk)
            answer = self._call(
                "UploadPart",
                key,
                Bucket=self.config.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=body.data,
                **self._checksum_args(body),
            )
            problem = self._mismatch(answer, body.md5.hex(), _b64(body.sha256))
            if problem:
                raise _Failed("retry", f"{key}: part {number}: {problem}")
            part = {"ETag": answer["ETag"], "PartNumber": number, "md5": body.md5}
            part["sha256"] = body.sha256
            if self.config.checksum == "sha256":
                part["ChecksumSHA256"] = _b64(body.sha256)
            parts.append(part)
        return parts

    def _mismatch(
        self, answer: dict[str, Any], md5: str, sha256: str, composite: bool = False
    ) -> str:
        """What in the store's answer contradicts the bytes sent ("" if nothing)."""
        etag = str(answer.get("ETag", "")).strip('"')
        # Encrypted, the ETag may not be the MD5 of the data (SSE-KMS, SSE-C; MinIO and
        # RGW for SSE-S3 too): then the store's own check of what we sent stands.
        md5_etag = not any(answer.get(name) for name in _ENCRYPTED)
        if md5_etag and etag and etag.lower() != md5:
            return f"the store holds other bytes than sent (ETag {etag}, MD5 sent {md5})"
        returned = answer.get("ChecksumSHA256")
        if returned and self.config.checksum == "sha256":
            expected = sha256 if composite and "-" in str(returned) else sha256.split("-")[0]
            if returned != expected:
                return f"SHA-256 {returned} returned, {expected} sent"
        return ""

    def _forget(self, key: str) -> None:
        """Delete an object stored wrong, so that ``on_exists: skip`` cannot keep it."""
        try:
            self._call("DeleteObject", key, Bucket=self.config.bucket, Key=key)
        except _Failed as exc:
            log.warning("cannot delete %s after a checksum mismatch: %s", key, exc)

    def _abort_upload(self, key: str, upload_id: str) -> None:
        try:
            self._call(
                "AbortMultipartUpload", key, Bucket=self.config.bucket, Key=key, UploadId=upload_id
            )
        except _Failed as exc:
            log.warning("cannot abort the multipart upload of %s: %s", key, exc)

    def _call(self, operation: str, key: str, **params: Any) -> dict[str, Any]:
        """One S3 request, by its operation name; errors as :class:`_Failed`."""
        client = self._s3()
        method = getattr(client, xform_name(operation))
        try:
            return dict(method(**params))
        except Exception as exc:
            raise self._classify(exc, key, operation) from None

    def _classify(self, exc: Exception, key: str, operation: str = "") -> _Failed:
        where = f"{self._where}{f' ({key})' if key else ''}"
        if isinstance(exc, boto_errors.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            text = error.get("Message") or exc.response.get("ResponseMetadata", {}).get(
                "HTTPHeaders", {}
            ).get("x-amz-error-message", "")
            if operation == "HeadBucket" and code == "404":  # a HEAD answer has no body
                code, text = "NoSuchBucket", f"bucket {self.config.bucket} does not exist"
            elif operation.startswith("Head") and code == "403":
                text = "access denied, or credentials refused (a HEAD answer names no reason)"
            detail = f"{code}{f': {text}' if text else ''} (HTTP {status})"
            if code in _HINTS:
                detail += f"; {_HINTS[code]}"
            return _Failed(self._kind(code, status, operation), f"{where}: {detail}", code)
        if isinstance(exc, boto_errors.NoCredentialsError | boto_errors.PartialCredentialsError):
            return _Failed("refused", f"{where}: no AWS credentials found ({exc})")
        if isinstance(exc, boto_errors.ParamValidationError):
            return _Failed("permanent", f"{where}: {exc}")
        if isinstance(exc, (*_NETWORK, boto_errors.BotoCoreError)):
            return _Failed("unavailable", f"{where}: {exc}")
        return _Failed("unavailable", f"{where}: {type(exc).__name__}: {exc}")

    @staticmethod
    def _kind(code: str, status: int, operation: str) -> str:
        if code in _REFUSED or status in (401, 403):
            return "refused"
        if code in _RETRY:
            return "retry"
        if code in _BUSY or status >= 500 or status in (408, 429):
            return "unavailable"
        return "permanent"


def _chunks(inst: OutgoingInstance, data: bytes | None, size: int) -> Iterator[bytes]:
    """The parts of an object, read one at a time: from the stored file, or sliced
    from ``data`` (a transcoded copy already in memory)."""
    if data is not None:
        for start in range(0, len(data), size):
            yield data[start : start + size]
        return
    with open(inst.path, "rb") as fh:
        while chunk := fh.read(size):
            yield chunk
