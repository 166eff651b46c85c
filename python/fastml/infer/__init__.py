"""fastml.infer: native dynamic batching and tree-ensemble inference (see issues #5 and #6)."""

from fastml.infer.forest import Forest

__all__ = ["Forest"]
