"""Store/index stage: durable object files plus the SQL index every later stage reads."""

from .database import create_index_engine, missing_index_file
from .files import ObjectStore, StorageError
from .header import InstanceHeader, missing_identity, read_header
from .index import IndexUnavailable, InstanceIndex, Provenance, Recorded
from .uids import InvalidUID, validate_uid

__all__ = [
    "InstanceHeader",
    "IndexUnavailable",
    "InstanceIndex",
    "InvalidUID",
    "ObjectStore",
    "Provenance",
    "Recorded",
    "StorageError",
    "create_index_engine",
    "missing_identity",
    "missing_index_file",
    "read_header",
    "validate_uid",
]
