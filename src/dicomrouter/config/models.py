"""Configuration models: the single source of truth for every option.

Every key of the YAML file is a field here, with its default and a description.
``docs/configuration.md`` is generated from these models (``dicomrouter config-docs``)
and a test checks that the committed file is current.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dicomrouter import tls
from dicomrouter.security import check_password_hash_format, check_token_hash_format
from dicomrouter.units import ByteSize, Duration, Window

from .hosts import is_local_host
from .problems import ConfigProblems, KeyPath, checked_rule
from .transforms import (
    LOSSLESS_SYNTAXES,
    LOSSY_SYNTAXES,
    NO_ENCODER,
    Pipeline,
    SopClassFilter,
    transfer_syntax_uid,
)

TRANSFER_SYNTAX_NAMES = (*LOSSLESS_SYNTAXES, *LOSSY_SYNTAXES)
_KNOWN_SYNTAX_UIDS = {uid for uid in (*LOSSLESS_SYNTAXES.values(), *LOSSY_SYNTAXES.values()) if uid}

#: ``dicom.processes``: the default is the CPUs but one, up to this many; never more
#: than the max.
DEFAULT_MAX_RECEIVE_PROCESSES = 4
MAX_RECEIVE_PROCESSES = 64

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash, 1..16 chars


def _check_ae_title(value: str) -> str:
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError(f"invalid AE title {value!r}: 1-16 printable characters, no backslash")
    return value.strip()


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def reference_problems(
    routes: Any, destinations: Any, transforms: Any = None
) -> list[tuple[KeyPath, str]]:
    """Duplicate route names, routes sending to undefined destinations, and undefined
    pipelines, on the validated models or on the raw YAML data (so that these are
    reported together with errors elsewhere in the file, which stop the model's own
    cross-checks)."""
    if not isinstance(routes, list):
        return []
    known = sorted(str(name) for name in destinations) if isinstance(destinations, dict) else []
    problems: list[tuple[KeyPath, str]] = []
    seen: dict[str, int] = {}
    for index, route in enumerate(routes):
        name = getattr(route, "name", None) if not isinstance(route, dict) else route.get("name")
        if isinstance(name, str):
            if name in seen:
                problems.append(
                    (
                        ("routes", index, "name"),
                        f"duplicate route name {name!r} (also routes[{seen[name]}])",
                    )
                )
            else:
                seen[name] = index
        targets = getattr(route, "to", None) if not isinstance(route, dict) else route.get("to")
        if not isinstance(targets, list) or not isinstance(destinations, dict):
            continue
        for position, target in enumerate(targets):
            if isinstance(target, str) and target not in destinations:
                problems.append(
                    (
                        ("routes", index, "to", position),
                        f"unknown destination {target!r} (known: "
                        f"{', '.join(known) or 'none defined'})",
                    )
                )
    problems += group_problems(destinations)
    problems += _direct_to_member_problems(routes, destinations)
    return problems + pipeline_reference_problems(routes, destinations, transforms or {})


def _direct_to_member_problems(routes: Any, destinations: Any) -> list[tuple[KeyPath, str]]:
    """Routes that send to a group's member directly. A member's queue holds each
    instance once, whichever route put it there, so a study the group moves away
    from a paused member would take the direct route's delivery with it (and a
    direct delivery queued first would keep the group from failing over)."""
    if not isinstance(routes, list):
        return []
    member_of = group_membership(destinations)
    problems: list[tuple[KeyPath, str]] = []
    for index, route in enumerate(routes):
        targets = getattr(route, "to", None) if not isinstance(route, dict) else route.get("to")
        if not isinstance(targets, list):
            continue
        for position, target in enumerate(targets):
            if isinstance(target, str) and target in member_of:
                problems.append(
                    (
                        ("routes", index, "to", position),
                        f"{target!r} is a member of group {member_of[target]!r}: send to the "
                        "group, or give the direct route a destination of its own with the "
                        "same address (one queue cannot serve a group and a direct route)",
                    )
                )
    return problems


def group_membership(destinations: Any) -> dict[str, str]:
    """Member name -> the first group (in file order) that lists it."""
    member_of: dict[str, str] = {}
    if not isinstance(destinations, dict):
        return member_of
    for name, dest in destinations.items():
        is_group = dest.get("type") if isinstance(dest, dict) else getattr(dest, "type", None)
        if is_group != "group":
            continue
        members = dest.get("members") if isinstance(dest, dict) else dest.members
        for member in members if isinstance(members, list) else []:
            if isinstance(member, str):
                member_of.setdefault(member, str(name))
    return member_of


def pipeline_reference_problems(
    routes: Any, destinations: Any, transforms: Any
) -> list[tuple[KeyPath, str]]:
    """Routes and destinations naming a pipeline that ``transforms`` does not define."""
    known = sorted(str(name) for name in transforms) if isinstance(transforms, dict) else []
    referrers: list[tuple[KeyPath, Any]] = []
    if isinstance(routes, list):
        referrers += [(("routes", i, "transform"), route) for i, route in enumerate(routes)]
    if isinstance(destinations, dict):
        referrers += [
            (("destinations", str(name), "transform"), dest) for name, dest in destinations.items()
        ]
    problems: list[tuple[KeyPath, str]] = []
    for path, item in referrers:
        name = item.get("transform") if isinstance(item, dict) else getattr(item, "transform", None)
        if isinstance(name, str) and name not in known:
            problems.append(
                (path, f"unknown transform {name!r} (known: {', '.join(known) or 'none defined'})")
            )
    return problems


def _readable_file(value: Path, info: ValidationInfo) -> Path:
    """A file that exists and that we may read, made absolute: a relative path is
    relative to the configuration file's folder (the ``base_dir`` in the validation
    context; without one, the current directory)."""
    base = (info.context or {}).get("base_dir")
    path = value.expanduser()
    if not path.is_absolute():
        path = (Path(base) if base is not None else Path.cwd()) / path
    path = Path(os.path.normpath(path))
    if not path.exists():
        raise ValueError(f"no such file: {path}")
    if not path.is_file():
        raise ValueError(f"not a file: {path}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"cannot read {path}: permission denied")
    return path


#: A PEM file named in the configuration: checked to exist and be readable when the
#: configuration is loaded.
PemFile = Annotated[Path, AfterValidator(_readable_file)]


class DicomTlsConfig(_Model):
    """A second DICOM listener, with TLS (DICOM PS3.15 B.1, BCP 195: TLS 1.2 or newer,
    forward-secret AEAD suites only). It shares `bind`, the AE title and every other
    setting of the plain listener; set `dicom.port: null` to keep only this one."""

    port: int = Field(
        ...,
        ge=1,
        le=65535,
        description="TCP port of the TLS listener (2762 is the registered DICOM-over-TLS port).",
    )
    certificate: PemFile = Field(
        ...,
        description="PEM file with the server certificate, followed by any intermediate "
        "CA certificates. Read again on SIGHUP.",
    )
    private_key: PemFile = Field(
        ...,
        description="PEM file with the certificate's private key, unencrypted (keep it "
        "readable by the router's user only). Read again on SIGHUP.",
    )
    ca_certificates: PemFile | None = Field(
        None,
        description="PEM bundle of the CA certificates that sign client certificates. Set: "
        "a client certificate is asked for, and one that is offered must verify. Unset: "
        "no client certificate is asked for.",
    )
    require_client_certificate: bool = Field(
        False,
        description="Refuse a client without a certificate signed by `ca_certificates` "
        "(mutual TLS). Needs `ca_certificates`.",
    )

    @model_validator(mode="after")
    def _usable(self) -> DicomTlsConfig:
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates")
        try:
            tls.server_context(
                self.certificate,
                self.private_key,
                self.ca_certificates,
                self.require_client_certificate,
            )
        except tls.TlsError as exc:
            raise ValueError(str(exc)) from None
        return self


class DestinationTlsConfig(_Model):
    """TLS to a destination (BCP 195: TLS 1.2 or newer). The destination's certificate
    is always verified."""

    ca_certificates: PemFile | None = Field(
        None,
        description="PEM bundle of the CA certificates that may sign the destination's "
        "certificate. Unset: the system's trust store.",
    )
    certificate: PemFile | None = Field(
        None,
        description="PEM file with our client certificate (and intermediates), for "
        "destinations that require mutual TLS. Needs `private_key`.",
    )
    private_key: PemFile | None = Field(
        None, description="PEM file with the client certificate's unencrypted private key."
    )
    verify_hostname: bool = Field(
        True,
        description="Check that the destination's certificate names `host` (DNS name or IP "
        "address). `false` only verifies that a trusted CA signed it.",
    )

    @model_validator(mode="after")
    def _usable(self) -> DestinationTlsConfig:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together: set both or neither")
        try:
            tls.client_context(
                self.ca_certificates, self.certificate, self.private_key, self.verify_hostname
            )
        except tls.TlsError as exc:
            raise ValueError(str(exc)) from None
        return self


class HttpTlsConfig(_Model):
    """HTTPS for the API, dashboard and metrics (BCP 195: TLS 1.2 or newer)."""

    certificate: PemFile = Field(
        ...,
        description="PEM file with the server certificate, followed by any intermediate "
        "CA certificates. Read again on SIGHUP.",
    )
    private_key: PemFile = Field(
        ...,
        description="PEM file with the certificate's private key, unencrypted. Read again "
        "on SIGHUP.",
    )

    @model_validator(mode="after")
    def _usable(self) -> HttpTlsConfig:
        try:
            tls.server_context(self.certificate, self.private_key)
        except tls.TlsError as exc:
            raise ValueError(str(exc)) from None
        return self


class DicomListenerConfig(_Model):
    """The C-STORE / C-ECHO service that modalities send to."""

    port: int | None = Field(
        11112,
        ge=1,
        le=65535,
        description="TCP port of the plain (unencrypted) DICOM listener; null: none "
        "(then `tls` must be set).",
    )
    bind: str = Field("0.0.0.0", description="Address to listen on; '::' for IPv6.")
    tls: DicomTlsConfig | None = Field(
        None, description="A second listener, with TLS, beside the plain one. Unset: none."
    )
    allowed_callers: list[str] | None = Field(
        None,
        description="Calling AE titles allowed to associate. Unset or null: any caller.",
    )
    allowed_networks: list[str] | None = Field(
        None,
        description="Source IP addresses or CIDR networks allowed to connect. Unset: any.",
    )
    require_called_ae: bool = Field(
        True, description="Reject associations whose called AE title is not `ae_title`."
    )
    max_pdu_size: int = Field(
        0, ge=0, description="Maximum PDU size we receive; 0 means unlimited (fastest)."
    )
    accept_private_sop_classes: bool = Field(
        True,
        description="Also accept C-STORE of private SOP classes (UIDs outside the DICOM "
        "root 1.2.840.10008, e.g. vendor raw data or CSA non-image objects), in the same "
        "transfer syntaxes; they are stored and routed like any other. Standard SOP "
        "classes of other services (query/retrieve, worklist...) are never accepted.",
    )
    max_associations: int = Field(
        32,
        ge=1,
        description="Concurrent inbound associations before new ones are rejected "
        "(A-ASSOCIATE-RJ, transient, local limit exceeded). Connections that have not "
        "associated yet do not count; up to 4 times this many may be waiting at once "
        "(further ones are closed), each for at most `acse_timeout`.",
    )
    max_associations_per_host: int = Field(
        8,
        ge=1,
        description="Concurrent inbound associations from one source address before its "
        "new ones are rejected (A-ASSOCIATE-RJ, transient, local limit exceeded). Also "
        "the number of connections from one address that may be waiting to associate "
        "(further ones are closed at once), so that one host cannot take every waiting "
        "place from the others.",
    )
    acse_timeout: Duration = Field(
        30.0, description="Longest wait for the A-ASSOCIATE-RQ after a connection opens."
    )
    dimse_timeout: Duration = Field(
        60.0,
        description="Longest wait for the next fragment of a message in progress; "
        "then A-ABORT (the partial object is discarded).",
    )
    network_timeout: Duration = Field(
        120.0, description="Idle network timeout before an inbound association is aborted."
    )
    processes: int | None = Field(
        None,
        ge=1,
        le=MAX_RECEIVE_PROCESSES,
        description="Receive processes sharing the DICOM ports (`SO_REUSEPORT`), each "
        "running its associations on its own GIL: the node process and N - 1 processes "
        "forked from it. Unset: the number of CPUs but one (the dispatch process needs "
        "one), at least 1 and at most 4; on 2 CPUs a second receiver measured slower "
        "(docs/benchmarks.md). Each enforces its share of `max_associations` (divided, "
        "rounded up) and the whole `max_associations_per_host`. Memory: each one beyond "
        "the first adds about 15-40 MB of PSS (it shares the node's pages); the node "
        "with dispatch and HTTP takes about 230-250 MB. Takes effect at restart.",
    )

    @property
    def process_count(self) -> int:
        """How many receive processes run: ``processes``, or the CPUs but one (at
        least 1, at most 4)."""
        if self.processes is not None:
            return self.processes
        return max(1, min((os.cpu_count() or 1) - 1, DEFAULT_MAX_RECEIVE_PROCESSES))

    @field_validator("allowed_callers")
    @classmethod
    def _callers(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [_check_ae_title(v) for v in value]

    @model_validator(mode="after")
    def _listeners(self) -> DicomListenerConfig:
        if self.port is None and self.tls is None:
            raise ValueError("port is null and tls is not set: nothing would listen")
        if self.tls is not None and self.tls.port == self.port:
            raise ValueError(f"tls.port {self.port} is also the plain listener's port")
        return self

    @property
    def ports(self) -> list[int]:
        """The ports we listen on: the plain one and the TLS one, if set."""
        found = [] if self.port is None else [self.port]
        return found + ([self.tls.port] if self.tls is not None else [])

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"invalid IP address or CIDR network {item!r}") from exc
        return value


class StorageConfig(_Model):
    """Where received objects live. The embedded SQLite index lives here too."""

    path: Path = Field(Path("./data"), description="Storage folder for objects and the index.")
    on_duplicate: Literal["overwrite", "ignore"] = Field(
        "overwrite",
        description=(
            "A SOP Instance UID received again: `overwrite` replaces the stored copy and routes "
            "it again; `ignore` keeps the first copy, answers success and routes nothing."
        ),
    )
    min_free_space: int = Field(
        256 * 1024 * 1024,
        ge=0,
        description="Bytes of free disk below which C-STOREs are refused with 0xA700.",
    )


_NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _default_node_name() -> str:
    return socket.gethostname()


class NodeConfig(_Model):
    """This node's identity among several nodes sharing one index and one storage
    folder. Read at start-up only, and never taken from another node's version."""

    name: str = Field(
        default_factory=_default_node_name,
        description="This node's name, unique among the nodes sharing the index: it "
        "names its heartbeats, the owners of its job leases "
        "(`<node>:<pid>:<destination>:<worker>`), its own folders `<storage>/tmp/<node>/` "
        "and `<storage>/outgoing/<node>/`, and its lock `<storage>/nodes/<node>.lock`. "
        "Letters, digits, `.`, `_` and `-`, at most 64 characters. Read at start-up "
        "only; per node, so usually set with `DICOMROUTER_NODE__NAME`.",
        json_schema_extra={"shown_default": "the host name"},
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NODE_NAME_RE.match(value):
            raise ValueError(
                f"{value!r} is not a usable node name: letters, digits, '.', '_' and '-', "
                "starting with a letter or digit, at most 64 characters "
                "(it names folders and lease owners)"
            )
        return value


class RetryConfig(_Model):
    """Exponential backoff with jitter between delivery attempts."""

    max_attempts: int = Field(
        20,
        ge=1,
        description="Delivery attempts before a job is `failed`. A connection failure "
        "(the destination refused the connection or rejected the association) is not a "
        "delivery attempt and does not use this up: the destination is paused and probed "
        "(`pause_after_failures`, `probe_interval`), and its jobs wait. "
        "Jobs show both counts: *delivery attempts* and *connection failures*.",
    )
    initial_delay: Duration = Field(10.0, description="Delay after the first failure.")
    max_delay: Duration = Field(1800.0, description="Upper bound of the delay.")
    multiplier: float = Field(2.0, ge=1.0, description="Growth factor between attempts.")
    jitter: float = Field(0.2, ge=0.0, le=1.0, description="Random +/- fraction of the delay.")

    @model_validator(mode="after")
    def _order(self) -> RetryConfig:
        if self.max_delay < self.initial_delay:
            raise ValueError("max_delay must not be smaller than initial_delay")
        return self


class StorageCommitmentConfig(_Model):
    """Storage commitment (N-ACTION of the Storage Commitment Push Model) after each
    batch delivered; the destination reports on the same association or calls our
    listener back (docs/destinations.md, "Storage commitment")."""

    enabled: bool = Field(False, description="Ask the destination to commit what it stored.")
    timeout: Duration = Field(
        3600.0, description="How long to wait for the destination's report (N-EVENT-REPORT)."
    )
    on_timeout: Literal["warn", "resend"] = Field(
        "warn",
        description="No report in time, or instances reported failed: `warn` marks their "
        "commitment `failed` and alerts; `resend` also queues them again, each resend using "
        "one of the job's `retry.max_attempts`.",
    )
    wait: Duration = Field(
        5.0,
        description="How long to keep the N-ACTION's association open for a report on it; "
        "a later report comes to our listener on a new association.",
    )


class BaseDestinationConfig(_Model):
    """What every kind of destination shares: when and how often it is sent to, what
    it takes, and what is done to objects on the way. Each kind adds its own keys."""

    type: str = Field(..., description="Destination kind.")
    batch_size: int = Field(
        1000,
        ge=1,
        description="Instances handed to the sender at once (DICOM: sent over one "
        "association before it is renewed).",
    )
    send_window: Window | None = Field(
        None, description="Deliver only inside this local-time window, e.g. '19:00-07:00'."
    )
    retry: RetryConfig = Field(default_factory=lambda: RetryConfig(), description="Retry policy.")
    pause_after_failures: int = Field(
        3,
        ge=1,
        description="Consecutive failures to reach the destination (no connection, a "
        "folder that cannot be written) after which it is paused and probed instead of "
        "retried job by job.",
    )
    probe_interval: Duration = Field(
        15.0,
        description="Probe period while paused (DICOM: a C-ECHO; folder: a test write).",
    )
    give_up_after: Duration | None = Field(
        None,
        description="Once the destination has been unreachable (paused and probed) this "
        "long, jobs that have also waited this long are marked `failed` at the next failed "
        "probe (alerts fire; retry them by hand). Unset: never give up, so a destination "
        "down for a week gets everything when it returns.",
    )
    enabled: bool = Field(True, description="A disabled destination keeps its queue unsent.")
    transform: str | None = Field(
        None,
        description="Name of a pipeline in `transforms` applied to everything sent here "
        "(after the route's own). Unset: objects are sent byte for byte as received.",
    )
    transfer_syntax: str = Field(
        "as-received",
        description="Transfer syntax to send in, by name (`as-received`, `explicit-little`, "
        "`implicit-little`, `deflated`, `rle`, `jpeg-ls-lossless`, `jpeg2000-lossless`, "
        "`jpeg-lossless-sv1`, `htj2k-lossless`; lossy: `jpeg-ls-near-lossless`, `jpeg2000`, "
        "`jpeg-baseline`) or UID. DICOM: refused by the destination, as received, then "
        "Explicit VR Little Endian. Folder: an object that cannot be transcoded is written "
        "as received, with the reason on its delivery. `jpeg-baseline` has no encoder here "
        "and is refused.",
    )
    allow_lossy: bool = Field(
        False, description="Allow a lossy `transfer_syntax` (it gets a new SOP Instance UID)."
    )
    sop_classes: SopClassFilter | None = Field(
        None,
        description="SOP classes this destination takes; others are recorded as `skipped`.",
    )

    @field_validator("transfer_syntax")
    @classmethod
    def _known_syntax(cls, value: str) -> str:
        uid = transfer_syntax_uid(value)
        if uid in NO_ENCODER:
            raise ValueError(
                f"{value!r} cannot be sent: no encoder for it is available ({NO_ENCODER[uid]}); "
                "choose jpeg-ls-lossless, jpeg2000-lossless or rle"
            )
        if uid == "" or uid in _KNOWN_SYNTAX_UIDS:
            return value
        names = ", ".join(TRANSFER_SYNTAX_NAMES)
        raise ValueError(f"unknown transfer syntax {value!r} (known: {names}, or their UIDs)")

    @model_validator(mode="after")
    def _lossy_allowed(self) -> BaseDestinationConfig:
        if self.lossy and not self.allow_lossy:
            raise ConfigProblems(
                [
                    (
                        ("transfer_syntax",),
                        f"{self.transfer_syntax!r} is lossy: set allow_lossy: true to send "
                        "lossy images (they get new SOP Instance UIDs)",
                    )
                ]
            )
        return self

    @property
    def transfer_syntax_uid(self) -> str:
        """The syntax asked for, as a UID; "" for ``as-received``."""
        return transfer_syntax_uid(self.transfer_syntax)

    @property
    def lossy(self) -> bool:
        return self.transfer_syntax_uid in LOSSY_SYNTAXES.values()

    @property
    def workers(self) -> int:
        """How many senders work for this destination in parallel (each kind names
        the key: ``max_associations`` for DICOM, ``max_workers`` for the others)."""
        raise NotImplementedError

    @property
    def address(self) -> str:
        """Where it sends, for people: ``PACS@10.0.0.5:104``, a folder path..."""
        raise NotImplementedError

    @property
    def probe_label(self) -> str:
        """What its probe (and the operator's echo) does, for people: ``C-ECHO``, ``a
        test write``... Shown in "unreachable, probed with ..." and "did not answer ..."."""
        return "a probe"


class DicomDestinationConfig(BaseDestinationConfig):
    """`type: dicom` (the default when `type` is absent): a DICOM C-STORE SCP (a PACS,
    a VNA, an AI node...)."""

    type: Literal["dicom"] = Field("dicom", description="Destination kind.")
    ae_title: str = Field(..., description="Called AE title of the destination.")
    host: str = Field(..., description="Host name or IP address.")
    port: int = Field(..., ge=1, le=65535, description="TCP port.")
    calling_ae_title: str | None = Field(
        None, description="Calling AE title we present; default: the router's `ae_title`."
    )
    max_associations: int = Field(
        1, ge=1, le=32, description="Associations opened in parallel to this destination."
    )
    connect_timeout: Duration = Field(10.0, description="TCP connect timeout.")
    acse_timeout: Duration = Field(30.0, description="Association negotiation timeout.")
    dimse_timeout: Duration = Field(120.0, description="Timeout for each C-STORE response.")
    network_timeout: Duration = Field(
        120.0,
        description="Longest a send may stall because the destination stopped reading "
        "(its TCP window stays closed); then A-ABORT, and the instance is retried.",
    )
    tls: DestinationTlsConfig | None = Field(
        None, description="Connect with TLS. Unset: a plain TCP connection."
    )
    storage_commitment: StorageCommitmentConfig = Field(
        default_factory=lambda: StorageCommitmentConfig(),
        description="Ask for storage commitment after each batch (off by default).",
    )

    _check_ae = field_validator("ae_title", "calling_ae_title")(
        classmethod(lambda cls, v: v if v is None else _check_ae_title(v))
    )

    @property
    def workers(self) -> int:
        return self.max_associations

    @property
    def address(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    @property
    def probe_label(self) -> str:
        return "C-ECHO"


#: ``folder``'s default layout: a folder per patient, study and series.
DEFAULT_FOLDER_LAYOUT = "{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
DEFAULT_DICOMDIR_FOLDER = "{PatientID}/{StudyInstanceUID}"
_TAG_FIELD_RE = re.compile(r"^[0-9A-Fa-f]{4},[0-9A-Fa-f]{4}$")


def _check_layout(value: str) -> str:
    """A layout is a relative path of templates over DICOM keywords or tags."""
    import string

    from pydicom.datadict import tag_for_keyword

    if not value.strip():
        raise ValueError("layout is empty")
    if value.startswith(("/", "\\")):
        raise ValueError(f"layout {value!r} must be relative to path (no leading /)")
    try:
        parsed = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ValueError(f"layout {value!r}: {exc} (write {{{{ and }}}} for braces)") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if conversion:
            raise ValueError(f"layout {value!r}: conversions (!{conversion}) are not supported")
        if not name:
            raise ValueError(f"layout {value!r}: empty field {{}}; name an element")
        if "/" in name or "/" in (spec or "") or "{" in (spec or ""):
            raise ValueError(f"layout {value!r}: a field cannot hold '/' or a nested field")
        if tag_for_keyword(name) is None and not _TAG_FIELD_RE.match(name):
            raise ValueError(
                f"layout {value!r}: {{{name}}} is not a DICOM keyword or a tag (gggg,eeee)"
            )
    parts = value.split("/")
    if any(not part for part in parts):
        raise ValueError(f"layout {value!r}: empty folder name (two '/' in a row, or a final '/')")
    if any(part in (".", "..") for part in parts):
        raise ValueError(f"layout {value!r}: '.' and '..' are not folder names")
    return value


class FolderDestinationConfig(BaseDestinationConfig):
    """`type: folder`: write each instance as a Part-10 file under a folder (a research
    share, a folder another program watches). Files appear whole: each is written to
    a temporary file, synced, then renamed into place. Details: docs/destinations.md."""

    type: Literal["folder"] = Field(..., description="Destination kind.")
    path: Path = Field(
        ..., description="The folder written to; it must exist (nothing is created above it)."
    )
    layout: str = Field(
        DEFAULT_FOLDER_LAYOUT,
        description="Where each file goes under `path`: a template over DICOM keywords or "
        "tags with Python format specs, e.g. `{PatientID}/{StudyDate}_{AccessionNumber}/"
        "{SeriesNumber:03d}_{Modality}/{SOPInstanceUID}.dcm`. Each folder or file name is "
        "made safe (no `..`, `/`, `\\`, control characters, reserved names; at most 100 "
        "bytes; an empty value is `_`), so no value can lead outside `path`.",
    )
    on_exists: Literal["overwrite", "skip", "version"] = Field(
        "overwrite",
        description="A file already at that name: `overwrite` replaces it (atomically); "
        "`skip` keeps it and counts the instance delivered; `version` writes `name_2.dcm`, "
        "`name_3.dcm`... (an identical file already there counts as delivered).",
    )
    max_workers: int = Field(
        1, ge=1, le=32, description="Instances written in parallel (one worker each)."
    )
    render: Literal["png", "jpeg"] | None = Field(
        None,
        description="Also write a preview of each image next to its file (same name, "
        "`.png` or `.jpg`): the object's first window (or VOI LUT), else its minimum to "
        "maximum; the middle frame of a multi-frame image. Objects without pixel data get "
        "none. A preview that cannot be made leaves the instance delivered, as `warning`.",
    )
    extract_documents: bool = Field(
        False,
        description="Also write the document of an Encapsulated PDF (`.pdf`) or CDA "
        "(`.xml`) object next to its file, as it was before it was encapsulated.",
    )
    dicomdir: bool = Field(
        False,
        description="Make each study's folder a DICOM file-set: the study's files under "
        "`DICOM/` with names the standard allows, and a `DICOMDIR` listing them, rewritten "
        "after each batch. The folder is `dicomdir_folder`; `layout` is not used.",
    )
    dicomdir_folder: str = Field(
        DEFAULT_DICOMDIR_FOLDER,
        description="With `dicomdir: true`, the study's folder under `path` (a template "
        "like `layout`'s, each name made safe), e.g. `{PatientID}/{StudyDate}_"
        "{AccessionNumber}`. It should name one study: it holds one `DICOMDIR`.",
    )

    _check_layout = field_validator("layout")(classmethod(lambda cls, v: _check_layout(v)))

    @field_validator("dicomdir_folder")
    @classmethod
    def _check_dicomdir_folder(cls, value: str) -> str:
        try:
            return _check_layout(value)
        except ValueError as exc:
            raise ValueError(str(exc).replace("layout", "dicomdir_folder", 1)) from None

    @model_validator(mode="after")
    def _check_dicomdir(self) -> FolderDestinationConfig:
        if not self.dicomdir:
            if self.dicomdir_folder != DEFAULT_DICOMDIR_FOLDER:
                raise ValueError("dicomdir_folder is used only with dicomdir: true")
            return self
        if "layout" in self.model_fields_set:
            raise ValueError(
                "layout cannot be used with dicomdir: true: a DICOMDIR lists files by IDs of "
                "at most 8 names of 8 characters A-Z, 0-9, _ (PS3.10), which the router "
                "makes itself; set the study's folder with dicomdir_folder instead"
            )
        if self.on_exists == "version":
            raise ValueError(
                "on_exists: version cannot be used with dicomdir: true: a file-set holds "
                "one file per SOP Instance UID (use overwrite or skip)"
            )
        return self

    @property
    def workers(self) -> int:
        return self.max_workers

    @property
    def address(self) -> str:
        return str(self.path)

    @property
    def probe_label(self) -> str:
        return "a test write"


_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_env_name(value: str | None) -> str | None:
    if value is not None and not _ENV_NAME_RE.match(value):
        raise ValueError(f"{value!r} is not an environment variable name")
    return value


_S3_MIN_PART = 5 << 20  # S3's smallest part (but the last)
_S3_MAX_PART = 5 << 30  # and largest, also the largest single PUT


def _check_prefix(value: str) -> str:
    """A key prefix is a relative path of plain names, with or without a final '/'."""
    if value.startswith("/"):
        raise ValueError(f"prefix {value!r} must not start with '/'")
    parts = value.rstrip("/").split("/") if value else []
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"prefix {value!r}: empty, '.' and '..' are not folder names")
    if any(ord(ch) < 0x20 or ch in "\\\x7f" for ch in value):
        raise ValueError(f"prefix {value!r}: no control characters or backslashes")
    return value.rstrip("/")


class S3DestinationConfig(BaseDestinationConfig):
    """`type: s3`: upload each instance as an object to an S3 bucket (AWS S3, or an
    S3-compatible store: MinIO, Ceph RGW). Large objects go up as multipart uploads
    read from disk part by part; every upload is checked with a checksum.
    Details: docs/destinations.md."""

    type: Literal["s3"] = Field(..., description="Destination kind.")
    bucket: str = Field(
        ..., min_length=1, max_length=255, description="The bucket uploaded to; it must exist."
    )
    prefix: str = Field(
        "",
        description="Key prefix: every key starts with it, then `/` and the rendered "
        "`layout`, e.g. `incoming/dicom`. A final `/` is optional.",
    )
    layout: str = Field(
        DEFAULT_FOLDER_LAYOUT,
        description="The key under `prefix`: the same templates as a folder destination's "
        "`layout`, each name made safe the same way, so no value leads outside `prefix`.",
    )
    endpoint_url: str | None = Field(
        None,
        description="The store's URL, for S3-compatible stores (`http://minio:9000`). "
        "Unset: AWS S3 of `region`.",
    )
    region: str | None = Field(
        None, description="AWS region (`eu-central-1`). Unset: from the profile or environment."
    )
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto",
        description="`path` (`host/bucket/key`) for stores without DNS per bucket (most MinIO "
        "and Ceph RGW setups); `virtual` (`bucket.host/key`); `auto`: boto3's choice.",
    )
    profile: str | None = Field(
        None,
        description="A profile of the AWS shared configuration (`~/.aws/credentials`, "
        "`~/.aws/config`). Unset: the standard credential chain (environment, profile "
        "`default`, container or instance role).",
    )
    access_key_id_env: str | None = Field(
        None,
        description="Name of the environment variable holding the access key id (with "
        "`secret_access_key_env`); takes precedence over the credential chain.",
    )
    secret_access_key_env: str | None = Field(
        None, description="Name of the environment variable holding the secret access key."
    )
    session_token_env: str | None = Field(
        None, description="Name of the environment variable holding a session token (optional)."
    )
    storage_class: str | None = Field(
        None,
        pattern=r"^[A-Z][A-Z0-9_]*$",
        description="Storage class of each object (`STANDARD_IA`, `INTELLIGENT_TIERING`, "
        "`GLACIER_IR`...; Ceph RGW: a placement's storage class). Unset: the bucket's default.",
    )
    server_side_encryption: Literal["AES256", "aws:kms"] | None = Field(
        None,
        description="Ask the store to encrypt each object: `AES256` (SSE-S3) or `aws:kms` "
        "(SSE-KMS, with `kms_key_id`). Unset: the bucket's default.",
    )
    kms_key_id: str | None = Field(
        None, description="KMS key (id, ARN or alias) with `server_side_encryption: aws:kms`."
    )
    checksum: Literal["sha256", "md5"] = Field(
        "sha256",
        description="Integrity check of each upload: `sha256` sends an S3 additional checksum "
        "(SHA-256, per part for multipart uploads) and Content-MD5; `md5` only Content-MD5 "
        "(stores without additional checksums, such as Ceph RGW before 19). The store "
        "refuses a body that does not match, and the answer is checked too.",
    )
    on_exists: Literal["overwrite", "skip"] = Field(
        "overwrite",
        description="An object already at that key: `overwrite` replaces it; `skip` keeps "
        "it and counts the instance delivered (a HEAD request before each upload).",
    )
    multipart_threshold: ByteSize = Field(
        16 << 20,
        description="Objects larger than this go up as multipart uploads (`16MB`; units are "
        "powers of 1024). Smaller ones are one PUT, read into memory whole.",
    )
    multipart_chunk_size: ByteSize = Field(
        8 << 20,
        description="Part size of a multipart upload (5MB to 5GB); one part at a time is in "
        "memory per worker.",
    )
    max_workers: int = Field(
        4, ge=1, le=32, description="Instances uploaded in parallel (one connection each)."
    )
    connect_timeout: Duration = Field(10.0, description="TCP connect timeout.")
    read_timeout: Duration = Field(
        60.0, description="Longest wait for an answer (or for the store to read a part)."
    )

    _check_layout = field_validator("layout")(classmethod(lambda cls, v: _check_layout(v)))
    _check_prefix = field_validator("prefix")(classmethod(lambda cls, v: _check_prefix(v)))

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        if "/" in value or any(ch.isspace() for ch in value):
            raise ValueError(f"bucket {value!r}: a bucket name has no '/' or spaces")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"endpoint_url {value!r}: expected http://host[:port] or https://...")
        return value

    _env_name = field_validator("access_key_id_env", "secret_access_key_env", "session_token_env")(
        classmethod(lambda cls, v: _check_env_name(v))
    )

    @field_validator("multipart_threshold", "multipart_chunk_size")
    @classmethod
    def _part_size(cls, value: int) -> int:
        if not _S3_MIN_PART <= value <= _S3_MAX_PART:
            raise ValueError(f"{value} bytes: S3 parts are 5MB to 5GB")
        return value

    @model_validator(mode="after")
    def _pairs(self) -> S3DestinationConfig:
        problems: list[tuple[KeyPath, str]] = []
        if (self.access_key_id_env is None) != (self.secret_access_key_env is None):
            missing = (
                "secret_access_key_env"
                if self.secret_access_key_env is None
                else ("access_key_id_env")
            )
            problems.append(((missing,), "access_key_id_env and secret_access_key_env go together"))
        if self.session_token_env and self.access_key_id_env is None:
            problems.append(
                (("session_token_env",), "needs access_key_id_env and secret_access_key_env")
            )
        if self.kms_key_id and self.server_side_encryption != "aws:kms":
            problems.append((("kms_key_id",), "needs server_side_encryption: aws:kms"))
        if problems:
            raise ConfigProblems(problems)
        return self

    @property
    def workers(self) -> int:
        return self.max_workers

    @property
    def address(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix + '/' if self.prefix else ''}"
        return f"{where} at {self.endpoint_url}" if self.endpoint_url else where

    @property
    def probe_label(self) -> str:
        return "a HEAD of the bucket"


#: Keys every kind has that say how a destination is sent to: on a group, its
#: members' own settings apply, so a group refuses them rather than ignore them.
_GROUP_REFUSES = (
    "batch_size",
    "send_window",
    "retry",
    "pause_after_failures",
    "probe_interval",
    "give_up_after",
    "enabled",
    "transform",
    "transfer_syntax",
    "allow_lossy",
    "sop_classes",
)


class GroupDestinationConfig(BaseDestinationConfig):
    """`type: group`: a study goes to one of `members` (other destinations), chosen
    by `strategy` when its first instance is planned, and stays there (affinity by
    Study Instance UID). Work waiting for a member that is paused moves to the member
    the strategy chooses then. A group sends nothing itself: each member's workers,
    retries, window and transforms do. Details: docs/destinations.md."""

    type: Literal["group"] = Field(..., description="Destination kind.")
    members: list[str] = Field(
        ...,
        min_length=1,
        description="Names of the destinations a study may go to, in order of preference "
        "(`failover`). Each is a destination of another kind; no group in a group.",
    )
    strategy: Literal["failover", "round_robin", "least_queued"] = Field(
        "failover",
        description="How a new study (or the waiting work of a paused member) chooses a "
        "member among those that are up: `failover` the first in `members`, "
        "`round_robin` the next after the last chosen, `least_queued` the one with the "
        "fewest instances waiting to be sent.",
    )

    @model_validator(mode="after")
    def _no_delivery_keys(self) -> GroupDestinationConfig:
        problems: list[tuple[KeyPath, str]] = [
            (
                (key,),
                "a group sends nothing itself: set this on its members (their own "
                "settings apply to what the group sends them)",
            )
            for key in _GROUP_REFUSES
            # Set to something else than the default: a configuration dumped with
            # every key (the running one, written back) loads again.
            if key in self.model_fields_set
            and getattr(self, key)
            != BaseDestinationConfig.model_fields[key].get_default(call_default_factory=True)
        ]
        if problems:
            raise ConfigProblems(problems)
        return self

    @property
    def workers(self) -> int:
        return 0  # no sender of its own: its members' workers send

    @property
    def address(self) -> str:
        return f"{self.strategy} over {', '.join(self.members)}"


def group_problems(destinations: Any) -> list[tuple[KeyPath, str]]:
    """Groups whose members are not destinations of another kind, or repeat, on the
    validated models or on the raw YAML data (as :func:`reference_problems`)."""
    if not isinstance(destinations, dict):
        return []

    def kind(value: Any) -> Any:
        if isinstance(value, dict):
            return value.get("type", "dicom")
        return getattr(value, "type", None)

    known = sorted(str(name) for name, value in destinations.items() if kind(value) != "group")
    member_of = group_membership(destinations)
    problems: list[tuple[KeyPath, str]] = []
    for name, dest in destinations.items():
        if kind(dest) != "group":
            continue
        members = dest.get("members") if isinstance(dest, dict) else dest.members
        if not isinstance(members, list):
            continue
        seen: set[str] = set()
        for position, member in enumerate(members):
            where: KeyPath = ("destinations", str(name), "members", position)
            if not isinstance(member, str):
                continue
            if member in seen:
                problems.append((where, f"{member!r} is listed twice"))
            elif member not in destinations:
                problems.append(
                    (
                        where,
                        f"unknown destination {member!r} (known: "
                        f"{', '.join(known) or 'none defined'})",
                    )
                )
            elif kind(destinations[member]) == "group":
                problems.append((where, f"{member!r} is a group: a group's members are not groups"))
            elif member_of.get(member, name) != name:
                problems.append(
                    (
                        where,
                        f"{member!r} is already a member of group {member_of[member]!r}: a "
                        "destination belongs to one group at most (give it a second "
                        "destination with the same address for this group)",
                    )
                )
            seen.add(member)
    return problems


class HttpAuthConfig(_Model):
    """How a DICOMweb destination authenticates us. Secrets never go in the file: each
    names the environment variable that holds it, read when the sender starts. A
    client certificate (mutual TLS) goes in `tls` instead."""

    type: Literal["basic", "bearer"] = Field(
        ...,
        description="`basic`: HTTP Basic with `username` and `password_env`; `bearer`: "
        "`Authorization: Bearer` with `token_env`.",
    )
    username: str | None = Field(None, description="`basic`: the user name.")
    password_env: str | None = Field(
        None, description="`basic`: the environment variable holding the password."
    )
    token_env: str | None = Field(
        None, description="`bearer`: the environment variable holding the token."
    )

    _check_env = field_validator("password_env", "token_env")(
        classmethod(lambda cls, v: _check_env_name(v))
    )

    @model_validator(mode="after")
    def _complete(self) -> HttpAuthConfig:
        wanted = {"basic": ("username", "password_env"), "bearer": ("token_env",)}[self.type]
        problems: list[tuple[KeyPath, str]] = [
            ((name,), f"required with type: {self.type}")
            for name in wanted
            if getattr(self, name) is None
        ]
        problems += [
            ((name,), f"not used with type: {self.type}")
            for name in ("username", "password_env", "token_env")
            if name not in wanted and getattr(self, name) is not None
        ]
        if problems:
            raise ConfigProblems(problems)
        return self

    @property
    def secret_env(self) -> str:
        """The environment variable holding the password or token."""
        return self.password_env or self.token_env or ""

    @property
    def secret_key(self) -> str:
        """The key naming it, for messages: ``password_env`` or ``token_env``."""
        return "password_env" if self.type == "basic" else "token_env"


class HttpClientTlsConfig(_Model):
    """HTTPS to a destination (BCP 195: TLS 1.2 or newer)."""

    ca_certificates: PemFile | None = Field(
        None,
        description="PEM bundle of the CA certificates that may sign the server's "
        "certificate. Unset: the system's trust store.",
    )
    verify: bool = Field(
        True,
        description="Verify the server's certificate and name. `false` accepts any "
        "certificate (a test server only: anyone in the path can read and change "
        "what is sent).",
    )
    certificate: PemFile | None = Field(
        None,
        description="PEM file with our client certificate (and intermediates), for "
        "servers that require mutual TLS. Needs `private_key`.",
    )
    private_key: PemFile | None = Field(
        None, description="PEM file with the client certificate's unencrypted private key."
    )

    @model_validator(mode="after")
    def _usable(self) -> HttpClientTlsConfig:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together: set both or neither")
        try:
            tls.client_context(self.ca_certificates, self.certificate, self.private_key)
        except tls.TlsError as exc:
            raise ValueError(str(exc)) from None
        return self


def _check_http_url(value: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("no credentials in the URL: use auth (secrets from the environment)")
    if parts.query or parts.fragment:
        raise ValueError(f"{value!r}: the STOW-RS base URL takes no query or fragment")
    return value.strip().rstrip("/")


class DicomwebDestinationConfig(BaseDestinationConfig):
    """`type: dicomweb`: a DICOMweb server (STOW-RS, PS3.18 10.5): an AI platform, a
    cloud archive, a PACS with a DICOMweb front. Each request carries up to
    `max_instances` instances or `max_bytes`, streamed from disk; the server's answer
    sets each instance's state. Details: docs/destinations.md."""

    type: Literal["dicomweb"] = Field(..., description="Destination kind.")
    url: str = Field(
        ...,
        description="The DICOMweb base URL, e.g. `http://host:8042/dicom-web`: instances "
        "are POSTed to `{url}/studies`.",
    )
    auth: HttpAuthConfig | None = Field(
        None, description="HTTP authentication. Unset: none (or a client certificate in `tls`)."
    )
    tls: HttpClientTlsConfig | None = Field(
        None,
        description="Settings for an `https://` URL. Unset: the system's trust store, "
        "no client certificate.",
    )
    timeout: Duration = Field(
        120.0,
        description="Longest wait to connect, and for each read or write of a request "
        "(a server that stops reading or answering); then the server counts as down "
        "(paused and probed) when it answered nothing yet in the batch, else the request's "
        "instances and the rest of the batch are retried.",
    )
    max_instances: int = Field(10, ge=1, le=10000, description="Instances per request at most.")
    max_bytes: ByteSize = Field(
        10 * 1024 * 1024,
        ge=1,
        description="Bytes of files per request at most, e.g. `10MB`, `64MiB` (an instance "
        "larger than this goes alone in its request).",
    )
    max_workers: int = Field(
        1, ge=1, le=32, description="Requests in parallel (one HTTP connection each)."
    )
    probe_path: str = Field(
        "studies?limit=1",
        description="What a probe GETs, relative to `url` (a QIDO-RS search by default; "
        "any 2xx answer means up).",
    )

    _check_url = field_validator("url")(classmethod(lambda cls, v: _check_http_url(v)))

    @model_validator(mode="after")
    def _tls_needs_https(self) -> DicomwebDestinationConfig:
        if self.tls is not None and not self.url.startswith("https://"):
            raise ConfigProblems([(("tls",), "set, but url is not https://")])
        return self

    @property
    def workers(self) -> int:
        return self.max_workers

    @property
    def address(self) -> str:
        return self.url

    @property
    def probe_label(self) -> str:
        return f"a GET of {self.probe_path}"

    @property
    def stow_url(self) -> str:
        """Where instances are POSTed (PS3.18 10.5: ``{base}/studies``)."""
        return f"{self.url}/studies"


#: Every kind of destination, by its ``type``.
DESTINATION_MODELS: dict[str, type[BaseDestinationConfig]] = {
    "dicom": DicomDestinationConfig,
    "folder": FolderDestinationConfig,
    "dicomweb": DicomwebDestinationConfig,
    "s3": S3DestinationConfig,
    "group": GroupDestinationConfig,
}
DESTINATION_KINDS = tuple(DESTINATION_MODELS)


def _destination_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        kind = value.get("type", "dicom")
        return kind if isinstance(kind, str) and kind in DESTINATION_MODELS else None
    if isinstance(value, BaseDestinationConfig):
        return value.type
    return None


#: A destination: one of :data:`DESTINATION_MODELS`, told apart by ``type``.
DestinationConfig = Annotated[
    Annotated[DicomDestinationConfig, Tag("dicom")]
    | Annotated[FolderDestinationConfig, Tag("folder")]
    | Annotated[DicomwebDestinationConfig, Tag("dicomweb")]
    | Annotated[S3DestinationConfig, Tag("s3")]
    | Annotated[GroupDestinationConfig, Tag("group")],
    Discriminator(
        _destination_kind,
        custom_error_type="destination_type",
        custom_error_message="unknown destination type; known: " + ", ".join(DESTINATION_KINDS),
    ),
]


TriggerLevel = Literal["instance", "series", "study"]
ForwardLevel = Literal["instance", "series", "study", "patient", "matched"]


class RouteConfig(_Model):
    """A declarative rule: when an object matches, forward something to destinations."""

    name: str = Field(..., min_length=1, description="Unique route name, shown in history.")
    trigger: TriggerLevel = Field(
        "instance",
        description="`instance`: route each instance as it arrives. `series`/`study`: wait "
        "until no new instance of that series/study arrived for `stable_after`.",
    )
    stable_after: Duration = Field(
        60.0, description="Quiet time that makes a series or study stable (series/study triggers)."
    )
    when: dict[str, Any] | None = Field(
        None, description="Conditions (see docs/rules.md). Unset: every object matches."
    )
    forward: ForwardLevel | None = Field(
        None,
        description="What to send once triggered. Default: the trigger level (`instance`, "
        "`series` or `study`), so one matching instance sends its whole series or study; "
        "`matched` sends only the matching instances.",
    )
    to: list[str] = Field(..., min_length=1, description="Destination names.")
    enabled: bool = Field(True, description="A disabled route is kept but never fires.")
    transform: str | None = Field(
        None,
        description="Name of a pipeline in `transforms` applied to everything this route "
        "sends (before the destination's own).",
    )
    priority: Literal["urgent", "normal", "low"] = Field(
        "normal", description="Job priority: urgent jobs are claimed first, low ones last."
    )

    # A field validator, not a model one: a typo elsewhere in the route does not hide
    # an error in its rule.
    _compile_when = field_validator("when")(classmethod(lambda cls, when: checked_rule(when)))

    @property
    def forward_level(self) -> ForwardLevel:
        return self.forward or self.trigger


class DispatchConfig(_Model):
    """The delivery engine."""

    lease: Duration = Field(
        120.0, description="A claimed job not renewed within this time is taken back."
    )
    poll_interval: Duration = Field(0.05, description="How often idle workers look for work.")
    send_back_to_sender: bool = Field(
        False,
        description="Also send an instance to the destination it came from (a destination "
        "whose AE title is the instance's calling AE title and whose host is the address "
        "it came from). Off: that destination is skipped, the skip is logged and shown in "
        "the study's trace.",
    )
    loop_window: Duration = Field(
        600.0,
        description="An instance received from one of our destinations (its calling AE "
        "title is the destination's) within this time of being delivered there is a "
        "routing loop: it is held, not forwarded again, and `loop_detected` alerts. "
        "Release it with `dicomrouter loops release`. 0 turns the check off.",
    )


Role = Literal["viewer", "operator", "admin"]


class HttpConfig(_Model):
    """The HTTP service: REST API, web dashboard and Prometheus metrics."""

    enabled: bool = Field(True, description="Serve HTTP beside the DICOM service.")
    port: int = Field(8080, ge=1, le=65535, description="TCP port of the HTTP service.")
    bind: str = Field("0.0.0.0", description="Address to listen on; '127.0.0.1' for local only.")
    tls: HttpTlsConfig | None = Field(
        None,
        description="Serve HTTPS (only) on `port`. Unset: plain HTTP. The session cookie "
        "is marked `Secure` over HTTPS.",
    )
    open_probes: bool = Field(
        True,
        description="Serve `/healthz`, `/readyz` and `/metrics` without credentials "
        "(for load balancers and Prometheus). `false`: they need a `viewer` login too.",
    )
    session_lifetime: Duration = Field(
        8 * 3600.0,
        description="How long a dashboard login lasts without activity: each request "
        "extends it (it slides). Logging out, or a change of the user's password or "
        "removal of the user, ends the session on the server at once.",
    )
    max_body_size: int = Field(
        1024 * 1024,
        ge=1024,
        description="Largest request body in bytes (JSON, forms) for everything but "
        "configuration uploads and the rule tester's files. Checked before "
        "authentication and before the body is read: a larger `Content-Length`, or a "
        "stream that grows past it, gets 413.",
    )
    max_config_size: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="Largest configuration upload in bytes (`/api/v1/config`, "
        "`/config/validate`, `/config/import`, the dashboard's configuration page). "
        "Larger gets 413.",
    )
    max_upload_size: int = Field(
        1024**3,
        ge=1024,
        description="Largest upload in bytes of DICOM files to the rule tester "
        "(`/api/v1/routes/test`, the Routes page). Larger gets 413.",
    )
    public_url: str | None = Field(
        None,
        description="The address people reach the dashboard at, e.g. "
        "`https://router.example.org` behind a reverse proxy; used for the links in "
        "notifications (`{public_url}/studies/{uid}`). Unset: `http(s)://<host>:<port>` "
        "from `bind` and `port` (the machine's name when `bind` is a wildcard).",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="IP addresses or CIDR networks of reverse proxies allowed to set "
        "`X-Forwarded-For` (and `X-Forwarded-Proto`). From anyone else these headers are "
        "ignored: the client address in the audit log and the login throttle is the "
        "connection's. Default: none (the header is never trusted).",
    )

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"invalid public URL {value!r}: expected http:// or https://")
        return value.rstrip("/") if value is not None else None

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"invalid IP address or CIDR network {item!r}") from exc
        return value


class UserConfig(_Model):
    """A person who logs in to the dashboard or the API with a password."""

    password_hash: str = Field(
        ...,
        description="scrypt hash of the password, as printed by `dicomrouter hash-password` "
        "(never the password itself).",
    )
    role: Role = Field("viewer", description="`viewer`, `operator` or `admin`.")

    @field_validator("password_hash")
    @classmethod
    def _hash_format(cls, value: str) -> str:
        return check_password_hash_format(value)


class TokenConfig(_Model):
    """An API token for scripts (sent as `Authorization: Bearer <token>`)."""

    token_hash: str = Field(
        ...,
        description="SHA-256 hash of the token, as printed by `dicomrouter token`.",
    )
    role: Role = Field("viewer", description="`viewer`, `operator` or `admin`.")

    @field_validator("token_hash")
    @classmethod
    def _hash_format(cls, value: str) -> str:
        return check_token_hash_format(value)


class AuthConfig(_Model):
    """Who may use the HTTP service. On by default: no users means nobody gets in."""

    enabled: bool = Field(
        True,
        description="Require credentials. `false` gives every request the admin role: "
        "only for a router reachable from a trusted machine alone. Then the HTTP "
        "service answers only requests addressed to `localhost` or an IP address "
        "(`http://127.0.0.1:8080/`); a host name gets 403, so that a web page cannot "
        "re-point its own name at the router (DNS rebinding).",
    )
    users: dict[str, UserConfig] = Field(
        default_factory=dict, description="Dashboard and API users by login name."
    )
    tokens: dict[str, TokenConfig] = Field(
        default_factory=dict, description="API tokens by name (the name shows in the audit log)."
    )


class WebhookConfig(_Model):
    """An HTTP endpoint that receives alerts as a JSON POST (see docs/alerts.md)."""

    url: str = Field(..., description="`http://` or `https://` URL the alert is POSTed to.")
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra request headers, e.g. an `Authorization` the receiver expects.",
    )
    timeout: Duration = Field(10.0, description="Timeout of one POST.")
    retries: int = Field(
        3, ge=0, le=10, description="POSTs retried after a failure (timeout, error, non-2xx)."
    )
    retry_delay: Duration = Field(
        2.0, description="Delay before the first retry; doubled before each next one."
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"invalid webhook URL {value!r}: expected http:// or https://")
        return value


class AlertEventConfig(_Model):
    """Whether one kind of alert is sent, and to which webhooks."""

    enabled: bool = Field(True, description="Send this alert.")
    webhooks: list[str] | None = Field(
        None, description="Names of the webhooks to notify. Unset: every webhook."
    )


class ResolvableAlertConfig(AlertEventConfig):
    """An alert about a condition that lasts, and ends."""

    send_resolved: bool = Field(
        True, description="Also send a `resolved` message when the condition ends."
    )


class DestinationDownAlertConfig(ResolvableAlertConfig):
    """A destination paused by an operator, or unreachable, for too long."""

    after: Duration = Field(
        600.0, description="How long a destination must be down before the alert fires."
    )


class QueueStaleAlertConfig(ResolvableAlertConfig):
    """A destination's oldest job not yet delivered is too old."""

    after: Duration = Field(
        1800.0,
        description="Age of the oldest pending or in-progress job that fires the alert "
        "(jobs waiting for their send window do not count).",
    )


class DiskAlertConfig(ResolvableAlertConfig):
    """Free disk space in storage below a watermark."""

    below: int = Field(
        2 * 1024 * 1024 * 1024,
        ge=0,
        description="Free bytes below which the alert fires (keep it above "
        "`storage.min_free_space`, where C-STOREs start being refused).",
    )


class UnplannedAlertConfig(ResolvableAlertConfig):
    """Received instances whose plan could not be written to the index."""

    after: Duration = Field(
        300.0,
        description="How long the oldest such instance must have waited before the alert "
        "fires (the planner retries each by itself meanwhile: 5 s, doubling up to 5 min).",
    )


class NodeDownAlertConfig(ResolvableAlertConfig):
    """A node sharing the index stopped writing heartbeats."""

    after: Duration = Field(
        60.0,
        description="How long after a node's last heartbeat the alert fires (a node is "
        "down 20 s after its last heartbeat, so less than that means at once).",
    )


class CertificateExpiryAlertConfig(ResolvableAlertConfig):
    """A configured certificate (or CA certificate) expires soon, or has expired."""

    before: Duration = Field(
        14 * 86400.0,
        description="How long before a certificate's expiry (its notAfter) the alert fires.",
    )


class AlertEventsConfig(_Model):
    """The alerts, one entry per kind."""

    job_failed: AlertEventConfig = Field(
        default_factory=lambda: AlertEventConfig(),
        description="A job failed for good (retries used up, or refused by the destination); "
        "one alert per destination and check, listing the jobs.",
    )
    destination_down: DestinationDownAlertConfig = Field(
        default_factory=lambda: DestinationDownAlertConfig(),
        description="A destination paused by an operator, or unreachable, for longer than `after`.",
    )
    queue_stale: QueueStaleAlertConfig = Field(
        default_factory=lambda: QueueStaleAlertConfig(),
        description="The oldest job not yet delivered to a destination is older than `after`.",
    )
    disk_low: DiskAlertConfig = Field(
        default_factory=lambda: DiskAlertConfig(),
        description="Free disk space in storage is below `below`.",
    )
    commitment_failed: AlertEventConfig = Field(
        default_factory=lambda: AlertEventConfig(),
        description="A destination did not commit what it stored (storage commitment "
        "failed, refused, or not reported within its `timeout`); one alert per destination "
        "and check.",
    )
    loop_detected: AlertEventConfig = Field(
        default_factory=lambda: AlertEventConfig(),
        description="Instances came back from a destination shortly after we sent them "
        "there (`dispatch.loop_window`) and are held; one alert per destination and "
        "check, listing them.",
    )
    unplanned: UnplannedAlertConfig = Field(
        default_factory=lambda: UnplannedAlertConfig(),
        description="Acknowledged instances could not be planned (routed) for longer than "
        "`after`: nothing is queued for them until a retry succeeds.",
    )
    orphaned_jobs: ResolvableAlertConfig = Field(
        default_factory=lambda: ResolvableAlertConfig(),
        description="Open jobs for a destination that is no longer configured: nothing "
        "sends them until they are moved to another destination or canceled.",
    )
    certificate_expiry: CertificateExpiryAlertConfig = Field(
        default_factory=lambda: CertificateExpiryAlertConfig(),
        description="A certificate file of the configuration (`dicom.tls`, `http.tls`, "
        "a destination's `tls`, their CA bundles) expires within `before`, or has "
        "expired; one alert per file.",
    )
    node_down: NodeDownAlertConfig = Field(
        default_factory=lambda: NodeDownAlertConfig(),
        description="A node sharing the index (several nodes: docs/operations.md, "
        "*Nodes*) has written no heartbeat for `after`: stopped, killed, hung or cut "
        "off from the index. One incident per node; resolved when it beats again "
        "(or is forgotten with `dicomrouter nodes forget`).",
    )


class AlertsConfig(_Model):
    """Webhook notifications when something needs a person (see docs/alerts.md)."""

    webhooks: dict[str, WebhookConfig] = Field(
        default_factory=dict, description="Named webhooks. None: no alert is sent."
    )
    events: AlertEventsConfig = Field(
        default_factory=lambda: AlertEventsConfig(), description="Which alerts fire, and when."
    )
    check_interval: Duration = Field(30.0, description="How often conditions are checked.")
    max_per_hour: int = Field(
        30,
        ge=1,
        description="Alerts sent per webhook in any hour; more are dropped (and audited) so "
        "an incident storm cannot flood the receiver.",
    )

    @model_validator(mode="after")
    def _known_webhooks(self) -> AlertsConfig:
        problems: list[tuple[KeyPath, str]] = []
        for event in AlertEventsConfig.model_fields:
            names = getattr(self.events, event).webhooks or []
            unknown = [name for name in names if name not in self.webhooks]
            known = ", ".join(sorted(self.webhooks)) or "none defined"
            problems += [
                (("events", event, "webhooks"), f"unknown webhook {name!r} (known: {known})")
                for name in unknown
            ]
        if problems:
            raise ConfigProblems(problems)
        return self


class NotificationEventConfig(_Model):
    """Whether one kind of event notification is sent, and to which webhooks."""

    enabled: bool = Field(False, description="Send this notification.")
    webhooks: list[str] | None = Field(
        None,
        description="Names of `alerts.webhooks` to notify. Unset: every webhook.",
    )


class StudyReceivedNotificationConfig(NotificationEventConfig):
    """A study has been received: no instance of it arrived for `stable_after`."""

    stable_after: Duration | None = Field(
        None,
        description="How long a study must be quiet (no instance received) to count as "
        "received. Unset: the longest `stable_after` of the enabled routes with "
        "`trigger: study` (so the event comes when those routes fire), or 2 minutes "
        "when no route has a study trigger.",
    )


class NotificationsConfig(_Model):
    """Webhook notifications of operational events: a study received, a job
    completed, a study delivered everywhere (see docs/alerts.md, "Notifications").
    They use the webhooks, retries and rate limit of `alerts`; all off by default."""

    study_received: StudyReceivedNotificationConfig = Field(
        default_factory=lambda: StudyReceivedNotificationConfig(),
        description="A study was received and has been quiet for `stable_after`.",
    )
    job_completed: NotificationEventConfig = Field(
        default_factory=lambda: NotificationEventConfig(),
        description="A job was delivered: it ended `completed` or `warning` (failed jobs "
        "are the `job_failed` alert's).",
    )
    study_delivered: NotificationEventConfig = Field(
        default_factory=lambda: NotificationEventConfig(),
        description="Every job of a received study ended `completed` or `warning` "
        "(canceled jobs aside; none failed or still open, nothing left to plan).",
    )
    check_interval: Duration = Field(
        5.0,
        gt=0,
        description="How often new events are looked for and waiting notifications sent.",
    )
    give_up_after: Duration = Field(
        86400.0,
        description="A notification that could not be delivered (webhook down, or held "
        "back by `alerts.max_per_hour`) is tried again, with growing delays, for this long "
        "after it was recorded; then it is dropped and audited (`notification.dropped`).",
    )
    keep: Duration = Field(
        7 * 86400.0,
        description="How long sent notifications are kept in the index (the outbox) "
        "before they are deleted.",
    )

    def any_enabled(self) -> bool:
        return any(
            getattr(self, name).enabled
            for name in ("study_received", "job_completed", "study_delivered")
        )


NOTIFICATION_EVENTS = ("study_received", "job_completed", "study_delivered")


class RetentionConfig(_Model):
    """What is deleted, when (see docs/operations.md, "Retention"). An object that has
    not reached every destination it was queued for is never deleted by age unless
    `delete_undelivered_after` is set, and never evicted for space."""

    delete_delivered_after: Duration = Field(
        7 * 86400.0,
        description="Delete an object this long after it reached every destination it was "
        "queued for (every job holding it completed, warning or canceled, and no series or "
        "study trigger still waiting for it).",
    )
    delete_unrouted_after: Duration = Field(
        7 * 86400.0,
        description="Delete an object no route matched this long after it was received.",
    )
    delete_undelivered_after: Duration | None = Field(
        None,
        description="Delete an object whose delivery failed or is still pending this long "
        "after it was received (its waiting deliveries fail with the reason). Unset (the "
        "default): never; such objects are reported as kept because undelivered.",
    )
    free_space_target: int | None = Field(
        None,
        ge=0,
        description="Bytes of free disk to keep: below it, delivered and unrouted objects are "
        "deleted oldest first, before their time, until free space is back above it. "
        "Undelivered objects are never evicted. Unset: no eviction.",
    )
    keep_history: Duration = Field(
        90 * 86400.0,
        description="How long the history (jobs, attempts, route matches, triggers and the "
        "purge record) of deleted objects is kept, counted from their deletion.",
    )
    keep_audit: Duration = Field(365 * 86400.0, description="How long audit log entries are kept.")
    interval: Duration = Field(
        300.0,
        gt=0,
        description="How often the retention sweeper runs (in the dispatch process).",
    )


class RouterConfig(_Model):
    """The whole file."""

    ae_title: str = Field("DICOMROUTER", description="Our AE title, called and calling.")
    node: NodeConfig = Field(
        default_factory=lambda: NodeConfig(),
        description="This node among several sharing one index and one storage folder.",
    )
    dicom: DicomListenerConfig = Field(
        default_factory=lambda: DicomListenerConfig(),
        description="The DICOM listener modalities send to.",
    )
    storage: StorageConfig = Field(
        default_factory=lambda: StorageConfig(),
        description="Where received objects (and the embedded index) are kept.",
    )
    database: str | None = Field(
        None,
        description="URL of the index. Default: SQLite at `<storage.path>/index.sqlite` "
        "(`sqlite:////abs/path/index.sqlite` names another file). PostgreSQL: "
        "`postgresql://user:password@host:5432/dbname` (psycopg 3; "
        "`?host=/run/postgresql` for a Unix socket); see docs/deployment.md, "
        '"One node on PostgreSQL". Both are tested with the same suite.',
    )

    @field_validator("database")
    @classmethod
    def _database(cls, value: str | None) -> str | None:
        if value is not None:
            index_url(value)  # raises for another kind of database
        return value

    destinations: dict[str, DestinationConfig] = Field(
        default_factory=dict,
        description="Named destinations; each has a `type` (`dicom`, the default, "
        "`folder`, `s3`, or `group` over other destinations): see docs/destinations.md.",
    )
    routes: list[RouteConfig] = Field(default_factory=list, description="Routing rules.")
    transforms: dict[str, Pipeline] = Field(
        default_factory=dict,
        description="Named pipelines of steps that change objects on the way "
        "(docs/transforms.md); used by `routes[].transform` and `destinations.<name>.transform`.",
    )
    dispatch: DispatchConfig = Field(
        default_factory=lambda: DispatchConfig(),
        description="The delivery engine's timing.",
    )
    http: HttpConfig = Field(
        default_factory=lambda: HttpConfig(),
        description="The REST API, web dashboard and metrics.",
    )
    auth: AuthConfig = Field(
        default_factory=lambda: AuthConfig(),
        description="Users, API tokens and their roles.",
    )
    alerts: AlertsConfig = Field(
        default_factory=lambda: AlertsConfig(),
        description="Webhook alerts: failed jobs, destinations down, stale queues, low disk.",
    )
    notifications: NotificationsConfig = Field(
        default_factory=lambda: NotificationsConfig(),
        description="Webhook notifications of events: study received, job completed, "
        "study delivered (off by default).",
    )
    retention: RetentionConfig = Field(
        default_factory=lambda: RetentionConfig(),
        description="When received objects, their history and the audit log are deleted.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO",
        description="Log verbosity (stderr).",
    )

    _check_ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))

    @model_validator(mode="after")
    def _cross_checks(self) -> RouterConfig:
        problems = reference_problems(self.routes, self.destinations, self.transforms)
        for event in NOTIFICATION_EVENTS:
            known = ", ".join(sorted(self.alerts.webhooks)) or "none defined in alerts.webhooks"
            problems += [
                (("notifications", event, "webhooks"), f"unknown webhook {name!r} (known: {known})")
                for name in getattr(self.notifications, event).webhooks or []
                if name not in self.alerts.webhooks
            ]
        for name, dest in self.destinations.items():
            if isinstance(dest, DicomDestinationConfig) and self.is_self(dest):
                problems.append(
                    (
                        ("destinations", name),
                        f"routing loop: {dest.ae_title}@{dest.host}:{dest.port} "
                        "is this router itself",
                    )
                )
        if problems:
            raise ConfigProblems(problems)
        return self

    def is_self(self, dest: BaseDestinationConfig) -> bool:
        """True when a destination points back at this router (a routing loop): one
        of our ports (plain or TLS) on an address of this machine, however spelled
        (see ``hosts``), with our AE title, or with any AE title when we do not check
        the called AE (``dicom.require_called_ae: false``). Only a DICOM destination
        can be."""
        return (
            isinstance(dest, DicomDestinationConfig)
            and (dest.ae_title == self.ae_title or not self.dicom.require_called_ae)
            and dest.port in self.dicom.ports
            and is_local_host(dest.host)
        )

    @property
    def senders(self) -> dict[str, BaseDestinationConfig]:
        """The destinations that send themselves: every kind but `group` (a group's
        members do its sending). Workers, health, probes and echo are theirs."""
        return {
            name: dest
            for name, dest in self.destinations.items()
            if not isinstance(dest, GroupDestinationConfig)
        }

    @property
    def groups(self) -> dict[str, GroupDestinationConfig]:
        return {
            name: dest
            for name, dest in self.destinations.items()
            if isinstance(dest, GroupDestinationConfig)
        }

    def certificate_files(self) -> dict[str, Path]:
        """Every certificate file the configuration names, by key path (for the
        ``certificate_expiry`` alert and the expiry metric): the TLS listeners'
        certificates, the destinations' client certificates, and the CA bundles."""
        found: dict[str, Path] = {}
        sections: list[tuple[str, Any]] = [
            ("dicom.tls", self.dicom.tls),
            ("http.tls", self.http.tls),
        ]
        sections += [
            (f"destinations.{name}.tls", d.tls)
            for name, d in self.destinations.items()
            if isinstance(d, DicomDestinationConfig)
        ]
        for prefix, section in sections:
            for key in ("certificate", "ca_certificates"):
                path = getattr(section, key, None)
                if path is not None:
                    found[f"{prefix}.{key}"] = path
        return found

    @property
    def database_url(self) -> str:
        if self.database:
            return index_url(self.database)
        return f"sqlite:///{(self.storage.path / 'index.sqlite').resolve()}"


#: URL schemes ``database`` accepts, and the SQLAlchemy driver each one means.
_DATABASE_SCHEMES = {
    "sqlite": "sqlite",
    "sqlite+pysqlite": "sqlite+pysqlite",
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
}


def index_url(url: str) -> str:
    """``url`` with the driver the index uses: the plain ``postgresql://`` (libpq's own
    form) means psycopg 3. Raises ValueError for any other kind of database."""
    scheme, sep, rest = url.partition("://")
    driver = _DATABASE_SCHEMES.get(scheme.lower()) if sep else None
    if driver is None:
        what = f"unsupported database {scheme!r}" if sep else "not a URL (no scheme://)"
        raise ValueError(
            f"{what}: use sqlite:////path/to/index.sqlite or postgresql://user:password@host/dbname"
        )
    return f"{driver}://{rest}"
