"""The DICOM Upper Layer and DIMSE messaging, for both ends of an association.

A package that imports nothing else from dicomrouter (a test enforces it):

- :mod:`.constants`: PDU types, reasons, command fields and statuses (one copy);
- :mod:`.pdu`: PS3.8 framing and the one P-DATA-TF fragmenter;
- :mod:`.command`: the command set as a dataclass;
- :mod:`.negotiation`: A-ASSOCIATE-RQ/AC and context negotiation (pynetdicom's
  encoders, behind our dataclasses);
- :mod:`.machine`: the socket-free state machine (PS3.8 Sta1-Sta13);
- :mod:`.server` and :mod:`.acceptor`: the acceptor, behind :mod:`.handler`;
- :mod:`.requestor`: the requestor.
"""

from .command import Command
from .constants import CommandField, Status
from .handler import (
    AcceptorSettings,
    BaseHandler,
    Peer,
    Reply,
    Request,
    ServiceHandler,
    Sink,
    StoreRequest,
)
from .negotiation import Identity
from .requestor import (
    AssociationLost,
    AssociationRejected,
    CannotConnect,
    Hooks,
    OutboundAssociation,
    Response,
    Timeouts,
    TlsClient,
)
from .server import Server

__all__ = [
    "AcceptorSettings",
    "AssociationLost",
    "AssociationRejected",
    "BaseHandler",
    "CannotConnect",
    "Command",
    "CommandField",
    "Hooks",
    "Identity",
    "OutboundAssociation",
    "Peer",
    "Reply",
    "Request",
    "Response",
    "Server",
    "ServiceHandler",
    "Sink",
    "Status",
    "StoreRequest",
    "Timeouts",
    "TlsClient",
]
