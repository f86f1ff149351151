"""Association negotiation: the variable A-ASSOCIATE-RQ/AC PDUs and the acceptor's
choice of presentation contexts (PS3.8 9.3.2-9.3.3, PS3.7 D.3).

The only module that imports pynetdicom: its PDU classes decode and encode the
variable items and its ``negotiate_as_acceptor`` applies the context and role
rules. Everything crosses this boundary as our own frozen dataclasses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pydicom.uid import UID
from pynetdicom import pdu, pdu_primitives
from pynetdicom.presentation import PresentationContext, build_context, negotiate_as_acceptor

from .constants import APPLICATION_CONTEXT, ContextResult, PduType
from .pdu import HEADER, ProtocolError

#: Bytes of an A-ASSOCIATE-AC's fixed fields after its header (PS3.8 9.3.3).
_AC_FIXED_FIELDS = 68
#: PS3.8: presentation context IDs are odd numbers 1..255, so at most 128.
MAX_CONTEXTS = 128


@dataclass(frozen=True)
class Identity:
    """Our implementation class UID and version name, sent in every RQ and AC."""

    class_uid: str
    version_name: str


@dataclass(frozen=True)
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class Role:
    """An SCP/SCU role selection item (PS3.7 D.3.3.4)."""

    sop_class: str
    scu: bool | None
    scp: bool | None


@dataclass(frozen=True)
class AssociateRequest:
    calling_ae: str
    called_ae: str
    contexts: tuple[ProposedContext, ...]
    #: Largest P-DATA-TF PDU the requestor takes; 0: no limit.
    max_pdu: int = 0
    application_context: str = APPLICATION_CONTEXT
    protocol_version: int = 1
    implementation_class_uid: str = ""
    implementation_version: str = ""
    roles: tuple[Role, ...] = ()


@dataclass(frozen=True)
class ContextOutcome:
    """The acceptor's answer for one proposed context."""

    context_id: int
    result: int
    abstract_syntax: str
    #: The one transfer syntax accepted (None when refused).
    transfer_syntax: str | None

    @property
    def accepted(self) -> bool:
        return self.result == ContextResult.ACCEPTANCE


@dataclass(frozen=True)
class AssociateAccept:
    contexts: tuple[ContextOutcome, ...]
    #: Largest P-DATA-TF PDU the acceptor takes; 0: no limit.
    max_pdu: int = 0
    implementation_class_uid: str = ""
    implementation_version: str = ""
    roles: tuple[Role, ...] = field(default=())

    def accepted(self) -> dict[int, tuple[str, str]]:
        """Context ID -> (abstract syntax, transfer syntax) of the accepted ones."""
        return {
            c.context_id: (c.abstract_syntax, c.transfer_syntax)
            for c in self.contexts
            if c.accepted and c.transfer_syntax
        }


# -- bytes ----------------------------------------------------------------------------


def _decode(pdu_type: int, body: bytes) -> tuple[object, pdu_primitives.A_ASSOCIATE]:
    name = "A-ASSOCIATE-RQ" if pdu_type == PduType.A_ASSOCIATE_RQ else "A-ASSOCIATE-AC"
    decoded = pdu.A_ASSOCIATE_RQ() if pdu_type == PduType.A_ASSOCIATE_RQ else pdu.A_ASSOCIATE_AC()
    try:
        decoded.decode(HEADER.pack(pdu_type, len(body)) + body)
        return decoded, decoded.to_primitive()
    except Exception as exc:  # pynetdicom raises many types on malformed items
        raise ProtocolError(f"unreadable {name}: {exc}") from exc


def _user_items(
    primitive: pdu_primitives.A_ASSOCIATE,
) -> tuple[int, str, str, tuple[Role, ...]]:
    max_pdu, class_uid, version, roles = 0, "", "", []
    for item in primitive.user_information:
        if isinstance(item, pdu_primitives.MaximumLengthNotification):
            max_pdu = int(item.maximum_length_received or 0)
        elif isinstance(item, pdu_primitives.ImplementationClassUIDNotification):
            class_uid = str(item.implementation_class_uid or "")
        elif isinstance(item, pdu_primitives.ImplementationVersionNameNotification):
            version = str(item.implementation_version_name or "")
        elif (
            isinstance(item, pdu_primitives.SCP_SCU_RoleSelectionNegotiation)
            and item.sop_class_uid is not None
        ):
            roles.append(Role(str(item.sop_class_uid), item.scu_role, item.scp_role))
    return max_pdu, class_uid, version, tuple(roles)


def decode_associate_rq(body: bytes) -> AssociateRequest:
    """The A-ASSOCIATE-RQ whose body (the bytes after its 6-byte header) is ``body``."""
    decoded, primitive = _decode(PduType.A_ASSOCIATE_RQ, body)
    max_pdu, class_uid, version, roles = _user_items(primitive)
    contexts = tuple(
        ProposedContext(
            int(c.context_id or 0),
            str(c.abstract_syntax or ""),
            tuple(str(ts) for ts in c.transfer_syntax),
        )
        for c in primitive.presentation_context_definition_list
    )
    return AssociateRequest(
        calling_ae=str(primitive.calling_ae_title).strip(),
        called_ae=str(primitive.called_ae_title).strip(),
        contexts=contexts,
        max_pdu=max_pdu,
        application_context=str(primitive.application_context_name),
        protocol_version=int(getattr(decoded, "protocol_version", 1)),
        implementation_class_uid=class_uid,
        implementation_version=version,
        roles=roles,
    )


def decode_associate_ac(body: bytes, request: AssociateRequest) -> AssociateAccept:
    """The A-ASSOCIATE-AC answering ``request``; each outcome names the abstract
    syntax that was proposed under its context ID (the AC does not repeat it)."""
    if len(body) < _AC_FIXED_FIELDS:
        raise ProtocolError(f"unreadable A-ASSOCIATE-AC: {len(body)} bytes, no fixed fields")
    _decoded, primitive = _decode(PduType.A_ASSOCIATE_AC, body)
    if primitive.application_context_name is None:
        raise ProtocolError("unreadable A-ASSOCIATE-AC: no application context")
    max_pdu, class_uid, version, roles = _user_items(primitive)
    proposed = {c.context_id: c for c in request.contexts}
    outcomes = []
    for result in primitive.presentation_context_definition_results_list:
        context = proposed.get(int(result.context_id or 0))
        if context is None:
            continue  # an ID we never proposed: ignored
        syntax = str(result.transfer_syntax[0]) if result.transfer_syntax else None
        if syntax is None and len(context.transfer_syntaxes) == 1:
            syntax = context.transfer_syntaxes[0]
        if syntax not in context.transfer_syntaxes:
            syntax = None  # a syntax we never offered: the context cannot be used
        outcomes.append(
            ContextOutcome(
                context.context_id, int(result.result or 0), context.abstract_syntax, syntax
            )
        )
    return AssociateAccept(tuple(outcomes), max_pdu, class_uid, version, roles)


def _max_length(value: int) -> pdu_primitives.MaximumLengthNotification:
    item = pdu_primitives.MaximumLengthNotification()
    item.maximum_length_received = value
    return item


UserItem = (
    pdu_primitives.MaximumLengthNotification
    | pdu_primitives.ImplementationClassUIDNotification
    | pdu_primitives.ImplementationVersionNameNotification
    | pdu_primitives.SCP_SCU_RoleSelectionNegotiation
)


def _identity_items(identity: Identity) -> list[UserItem]:
    class_uid = pdu_primitives.ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = UID(identity.class_uid)
    version = pdu_primitives.ImplementationVersionNameNotification()
    version.implementation_version_name = identity.version_name
    return [class_uid, version]


def _role_items(roles: Iterable[Role]) -> list[UserItem]:
    items: list[UserItem] = []
    for role in roles:
        item = pdu_primitives.SCP_SCU_RoleSelectionNegotiation()
        item.sop_class_uid = UID(role.sop_class)
        item.scu_role = role.scu
        item.scp_role = role.scp
        items.append(item)
    return items


def encode_associate_rq(request: AssociateRequest, identity: Identity) -> bytes:
    contexts = []
    for proposed in request.contexts:
        context = build_context(proposed.abstract_syntax, list(proposed.transfer_syntaxes))
        context.context_id = proposed.context_id
        contexts.append(context)
    primitive = pdu_primitives.A_ASSOCIATE()
    primitive.application_context_name = UID(request.application_context)
    primitive.calling_ae_title = request.calling_ae
    primitive.called_ae_title = request.called_ae
    primitive.presentation_context_definition_list = contexts
    primitive.user_information = [
        _max_length(request.max_pdu),
        *_identity_items(identity),
        *_role_items(request.roles),
    ]
    return bytes(pdu.A_ASSOCIATE_RQ(primitive).encode())


def encode_associate_ac(
    request: AssociateRequest, accept: AssociateAccept, identity: Identity
) -> bytes:
    results = []
    for outcome in accept.contexts:
        context = PresentationContext()
        context.context_id = outcome.context_id
        context.abstract_syntax = UID(outcome.abstract_syntax)
        context.result = outcome.result
        if outcome.transfer_syntax:
            context.transfer_syntax = [UID(outcome.transfer_syntax)]
        results.append(context)
    primitive = pdu_primitives.A_ASSOCIATE()
    primitive.application_context_name = UID(APPLICATION_CONTEXT)
    primitive.calling_ae_title = request.calling_ae
    primitive.called_ae_title = request.called_ae
    primitive.result = 0x00
    primitive.result_source = 0x01
    primitive.presentation_context_definition_results_list = results
    primitive.user_information = [
        _max_length(accept.max_pdu),
        *_identity_items(identity),
        *_role_items(accept.roles),
    ]
    return bytes(pdu.A_ASSOCIATE_AC(primitive).encode())


# -- the acceptor's choice ---------------------------------------------------------------


class Capabilities:
    """What an acceptor supports: SOP class -> transfer syntaxes. Built once (the
    contexts for ~150 storage classes), then used for every association."""

    def __init__(
        self,
        supported: Mapping[str, Sequence[str]],
        roles: Mapping[str, tuple[bool, bool]] | None = None,
    ):
        """``roles``: for SOP classes whose role selection items we answer, whether
        the requestor may take the SCU role and the SCP role (PS3.7 D.3.3.4). A
        class without an entry keeps the default roles whatever is proposed.
        Storage commitment is the case: the SCP that reports on a new association
        requests it, proposing the SCP role for itself (PS3.4 J.3.3), and we accept
        it with ``(True, True)``."""
        self.syntaxes_by_class = {sop: frozenset(ts) for sop, ts in supported.items()}
        self._contexts = []
        for sop, ts in supported.items():
            context = build_context(sop, list(ts))
            if roles and sop in roles:
                context.scu_role, context.scp_role = roles[sop]
            self._contexts.append(context)

    def negotiate(
        self,
        request: AssociateRequest,
        max_pdu: int,
        private_syntaxes: Sequence[str] = (),
    ) -> AssociateAccept:
        """Accept each proposed context whose SOP class we support, in the first
        transfer syntax *the requestor* listed that we accept, and private SOP
        classes (UIDs outside the DICOM root) in ``private_syntaxes`` when given.

        Why the requestor's order: pynetdicom picks by ours (uncompressed first), so
        a modality offering [JPEG Lossless, Explicit VR LE] in one context would be
        made to decompress: more bytes on the wire, on disk and to every
        destination, and not the object as the modality meant to send it."""
        proposed = []
        for c in request.contexts:
            context = PresentationContext()
            context.context_id = c.context_id
            try:
                context.abstract_syntax = UID(c.abstract_syntax)
                context.transfer_syntax = [UID(ts) for ts in c.transfer_syntaxes]
            except ValueError:
                pass  # an invalid UID: refused like any unknown class
            proposed.append(context)
        roles = {UID(r.sop_class): (r.scu, r.scp) for r in request.roles}
        private = self._private_contexts(request, private_syntaxes)
        results, role_replies = negotiate_as_acceptor(proposed, self._contexts + private, roles)
        requested = {c.context_id: c.transfer_syntaxes for c in request.contexts}
        private_set = frozenset(private_syntaxes)
        outcomes = []
        for result in results:
            context_id = int(result.context_id or 0)
            abstract = str(result.abstract_syntax or "")
            syntax = str(result.transfer_syntax[0]) if result.transfer_syntax else None
            if result.result == ContextResult.ACCEPTANCE:
                ours = self.syntaxes_by_class.get(abstract, private_set)
                syntax = next((ts for ts in requested.get(context_id, ()) if ts in ours), syntax)
            outcomes.append(ContextOutcome(context_id, int(result.result or 0), abstract, syntax))
        roles_out = tuple(Role(str(r.sop_class_uid), r.scu_role, r.scp_role) for r in role_replies)
        return AssociateAccept(tuple(outcomes), max_pdu, roles=roles_out)

    def _private_contexts(
        self, request: AssociateRequest, syntaxes: Sequence[str]
    ) -> list[PresentationContext]:
        if not syntaxes:
            return []
        extra: dict[str, PresentationContext] = {}
        for context in request.contexts:
            abstract = context.abstract_syntax
            if abstract in self.syntaxes_by_class or abstract in extra:
                continue
            try:
                if UID(abstract).is_private:
                    extra[abstract] = build_context(abstract, list(syntaxes))
            except ValueError:  # not a valid UID: refused like any unknown class
                continue
        return list(extra.values())
