"""fastml.infer: native dynamic batching and tree-ensemble inference (see issues #5 and #6)."""

from fastml.infer.batcher import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    Batcher,
    BatchFuture,
    QueueFull,
    as_completed,
    export_prometheus,
    wait,
)
from fastml.infer.forest import Forest

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "BatchFuture",
    "Batcher",
    "Forest",
    "QueueFull",
    "as_completed",
    "export_prometheus",
    "wait",
]
