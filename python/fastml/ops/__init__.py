"""fastml.ops: fused GPU kernels for training with CPU fallbacks (see issue #7)."""
