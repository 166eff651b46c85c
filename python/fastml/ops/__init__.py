"""fastml.ops: fused kernels for training, with autograd and CPU fallbacks.

CUDA tensors run Triton kernels; CPU tensors run torch implementations with
the same semantics; :func:`set_backend` forces one. Every op is a registered
torch custom op (``torch.ops.fastml.*``) with a fake implementation, so it
traces under ``torch.compile(fullgraph=True)``.

>>> import torch
>>> from fastml import ops
>>> x = torch.randn(4, 64)
>>> ops.rms_norm(x, torch.ones(64)).shape
torch.Size([4, 64])
"""

from fastml.ops._dispatch import get_backend, set_autotune, set_backend, tuned_configs
from fastml.ops.adamw import AdamW
from fastml.ops.cross_entropy import cross_entropy
from fastml.ops.layer_norm import layer_norm
from fastml.ops.linear_cross_entropy import linear_cross_entropy
from fastml.ops.modules import LayerNorm, RMSNorm, SwiGLU
from fastml.ops.rms_norm import add_rms_norm, rms_norm
from fastml.ops.softmax import log_softmax, softmax
from fastml.ops.swiglu import geglu, swiglu

__all__ = [
    "AdamW",
    "LayerNorm",
    "RMSNorm",
    "SwiGLU",
    "add_rms_norm",
    "cross_entropy",
    "geglu",
    "get_backend",
    "layer_norm",
    "linear_cross_entropy",
    "log_softmax",
    "rms_norm",
    "set_autotune",
    "set_backend",
    "softmax",
    "swiglu",
    "tuned_configs",
]
