"""The node: a coordinator (:class:`Node`) wiring small roles. See coordinator.py for the
map of roles, and docs/ARCHITECTURE.md for one record's path."""

from citynode.node.coordinator import DB_NAME, Node
from citynode.node.ingest import IngestResult
from citynode.node.partners import PartnerLink
from citynode.node.streams import MAX_SUBSCRIBERS, Erased, StreamBatch, Subscriber

__all__ = [
    "DB_NAME",
    "MAX_SUBSCRIBERS",
    "Erased",
    "IngestResult",
    "Node",
    "PartnerLink",
    "StreamBatch",
    "Subscriber",
]
